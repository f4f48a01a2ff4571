"""The shape of pipeline/: no import circle among its modules (module-level imports, read from the AST), and the
store package never imports torch (statically, and in a fresh interpreter)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"
PACKAGE = "loca_pipe.pipeline"


def _modules() -> dict[str, Path]:
    """Module name → file, for every module under pipeline/ (``pipeline/store/__init__.py`` → ``…pipeline.store``)."""
    out = {}
    for f in sorted(PIPELINE.rglob("*.py")):
        parts = list(f.relative_to(PIPELINE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_level_imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports when it is imported: top-level statements (inside if/try too, except
    ``if TYPE_CHECKING:``), not function or class bodies. ``from a import b`` is ``a`` and, if it is a module, ``a.b``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name if is_pkg else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between pipeline modules, external top-level packages each module imports)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target in _module_level_imports(m, path):
            if not target.startswith("loca_pipe"):
                external[m].add(target.split(".")[0])
                continue
            # importing a.b.c runs a, a.b, a.b.c; the packages that hold m are already being imported
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in mods and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_what_python_runs(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import json\n"
                 "try:\n    import zarr\nexcept ImportError:\n    pass\n"
                 "from . import sib\nfrom .pkg import thing\n\ndef f():\n    import torch\n")
    got = _module_level_imports("loca_pipe.pipeline.m", f)
    assert {"os", "zarr", "loca_pipe.pipeline", "loca_pipe.pipeline.sib", "loca_pipe.pipeline.pkg",
            "loca_pipe.pipeline.pkg.thing"} <= got
    assert "json" not in got and "torch" not in got


def test_no_import_circle_in_pipeline():
    edges, _ = _graph()
    assert "loca_pipe.pipeline.store.logit_store" in edges  # the walk sees the package
    assert _cycles(edges) == []


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    return seen


def test_the_store_package_never_imports_torch():
    edges, external = _graph()
    store = [m for m in edges if m == f"{PACKAGE}.store" or m.startswith(f"{PACKAGE}.store.")]
    assert len(store) >= 5
    for m in store:
        with_torch = sorted(r for r in _reach(edges, m) if "torch" in external[r])
        assert with_torch == [], f"{m} imports torch through {with_torch}"
    # and in a fresh interpreter, from the interpreter's own module list
    code = ("import sys, json; import loca_pipe.pipeline.store as s; s.LogitStore; s.verify_store; "
            "print(json.dumps(sorted(m for m in ('torch', 'torchvision') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_store_successor_modules_stay_small():
    for f in (PIPELINE / "store").glob("*.py"):
        assert len(f.read_text().splitlines()) < 400, f


def test_the_lazy_reexports_are_the_modules_lists():
    import loca_pipe.pipeline as p
    from loca_pipe.pipeline import calibration, losses

    assert p._CALIBRATION == list(calibration.__all__)
    assert sorted(p._LOSSES) == sorted(losses.__all__)
    assert p.kd_loss is losses.kd_loss and p.loca_from_logits is calibration.loca_from_logits


def test_the_store_reexports_its_old_names():
    from loca_pipe.pipeline import caching, store

    for name in store.__all__:
        assert getattr(store, name) is not None, name
    assert store.summarize_logits is caching.summarize_logits  # moved, still reachable by the old name
