"""Issue #15: each helper, rule and constructor is defined in one module of the package.

Read from the source (the AST of every module of pipeline/, stages/ and cli/), so a second copy — the three
``_codecs``, the two ``tau_index`` tolerances, ``versions`` / ``_check_tau`` / ``_check_labels`` twice, the
four atomic writers and the two ``read_sidecar`` contracts this issue found — fails here by name and place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("pipeline", "stages", "cli")

# name → the one module allowed to define it (None: no module may; the name was a copy that is gone)
ONCE = {
    "versions": "pipeline/io.py",
    "atomic_write": "pipeline/io.py",
    "atomic_write_bytes": "pipeline/io.py",
    "atomic_write_text": "pipeline/io.py",
    "atomic_save": "pipeline/io.py",
    "write_json": "pipeline/io.py",
    "jsonable": "pipeline/io.py",
    "progress_bar": "pipeline/progress.py",
    "read_sidecar": "pipeline/models.py",
    "find_tau": "pipeline/store/format.py",
    "require_tau": "pipeline/store/format.py",
    "array_codecs": "pipeline/layout.py",
    "summarize_logits": "pipeline/caching.py",
    "WRITE_REASONS": "pipeline/oserrors.py",
    "one_thread": "pipeline/threads.py",
    "torch_threads": "pipeline/threads.py",
    "_check_tau": "pipeline/calibration.py",
    "_check_labels": "pipeline/calibration.py",
    "mis_instruction_mask": "pipeline/calibration.py",
    "_codecs": None,
    "_atomic_write": None,
    "_versions": None,
    "execute": None,  # a second stage entry point beside run(params)
}
# zarr codec objects are built in one place (array_codecs, with the array table in pipeline/layout.py)
CODEC_CLASSES = {"ZstdCodec", "Crc32cCodec", "BytesCodec", "BloscCodec", "ShardingCodec"}
CODEC_BUILDERS = {"pipeline/layout.py"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for d in PACKAGE_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            out[str(f.relative_to(ROOT))] = ast.parse(f.read_text(), str(f))
    return out


MODULES = _modules()


def _defined(tree: ast.Module) -> set[str]:
    """Names a module defines: every def and every name bound by an assignment, at any depth (an alias such
    as ``write_json = functools.partial(…)`` is a second definition too). Imports are uses, not copies."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for n in ast.walk(tree):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_the_scan_sees_the_package():
    assert "pipeline/io.py" in MODULES and "stages/lm/common.py" in MODULES and "cli/main.py" in MODULES
    assert "versions" in _defined(MODULES["pipeline/io.py"])  # the scan finds a definition where it is


@pytest.mark.parametrize("name", sorted(ONCE))
def test_defined_once(name):
    where = sorted(m for m, tree in MODULES.items() if name in _defined(tree))
    want = [] if ONCE[name] is None else [ONCE[name]]
    assert where == want, f"{name!r} is defined in {where}; the one definition belongs in {want or 'no module'}"


def test_zarr_codecs_are_built_in_one_place():
    where = set()
    for m, tree in MODULES.items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Call):
                f = n.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in CODEC_CLASSES:
                    where.add(m)
    assert where == CODEC_BUILDERS, f"zarr codecs constructed in {sorted(where)}; use layout.array_codecs"


def _mentions_tau(node: ast.AST) -> bool:
    return any((isinstance(x, ast.Name) and "tau" in x.id.lower()) or
               (isinstance(x, ast.Attribute) and ("tau" in x.attr.lower() or "temperature" in x.attr.lower()))
               for x in ast.walk(node))


def test_temperatures_are_compared_by_the_one_rule():
    """No module compares two temperatures by its own tolerance (``math.isclose`` / ``abs(a - b) > eps``):
    store.find_tau is the rule (relative 1e-6)."""
    found = []
    for m, tree in MODULES.items():
        for n in ast.walk(tree):
            isclose = isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) == "isclose"
            absdiff = (isinstance(n, ast.Compare) and isinstance(n.left, ast.Call)
                       and getattr(n.left.func, "id", "") == "abs" and n.left.args
                       and isinstance(n.left.args[0], ast.BinOp) and isinstance(n.left.args[0].op, ast.Sub))
            if (isclose or absdiff) and _mentions_tau(n):
                found.append(f"{m}:{n.lineno}")
    assert found == ["pipeline/store/format.py:" + str(_find_tau_isclose_line())], found


def _find_tau_isclose_line() -> int:
    tree = MODULES["pipeline/store/format.py"]
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "find_tau")
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "isclose")


def test_progress_bars_come_from_the_one_helper():
    """tqdm is imported by pipeline/progress.py only (one line per update off a terminal, one look)."""
    where = set()
    for m, tree in MODULES.items():
        for n in ast.walk(tree):
            mods = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            if any(x == "tqdm" or x.startswith("tqdm.") for x in mods):
                where.add(m)
    assert where == {"pipeline/progress.py"}, f"tqdm imported in {sorted(where)}; use progress.progress_bar"
