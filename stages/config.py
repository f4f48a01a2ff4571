"""params.yaml → frozen dataclasses.

``params.yaml`` is the single source of truth: one section per stage plus a shared ``base``. Each stage
declares a frozen dataclass for its section; :func:`load_section` builds it, rejecting unknown keys and
wrong types with a message that names the key and the file, like nanoGPT's configurator.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loca_pipe.pipeline.errors import ConfigError, did_you_mean
from loca_pipe.pipeline.oserrors import WRITE_REASONS

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")
# A whole value `=section.key` refers to another key of the same params file, so a sweep value such as
# `analyze.alpha` is written once and read by every stage that needs it; dvc.yaml lists the referenced key
# in those stages' `params`, so `dvc exp run -S analyze.alpha=...` re-runs them. (Not DVC's `${...}`:
# `dvc exp run -S` would resolve those in place and every stage would look changed.)
_REF = re.compile(r"^=\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\s*$")


def resolve_refs(params: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """Replace every value that is exactly ``=a.b.c`` by the value at that key (refs may chain)."""

    def lookup(dotted: str, seen: tuple[str, ...]) -> Any:
        if dotted in seen:
            raise ConfigError(f"{where}: reference cycle {' -> '.join(seen + (dotted,))}")
        node: Any = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: reference ={dotted} names no key of the params file")
            node = node[part]
        return walk(node, seen + (dotted,))

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, str):
            m = _REF.match(node)
            return lookup(m.group(1), seen) if m else node
        if isinstance(node, dict):
            return {k: walk(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, seen) for v in node]
        return node

    return walk(params, ())


# The sections a params file may hold: one per stage of dvc.yaml and lm/dvc.yaml, plus the shared ones. A
# misspelled section (`analyse:`) would otherwise be ignored silently and its stage run on defaults.
# Sections named in a dvc.yaml next to the params file (its stages' `params:` lists) count as known too,
# so a new stage is accepted once dvc.yaml reads its section.
SECTIONS = ("base", "prepare_data", "train_teacher", "cache", "select_recipe", "analyze", "calibrate",
            "train_student", "cnn_students", "report",
            "lm_base", "lm_prepare", "lm_tokenizer", "lm_train_teacher", "lm_cache", "lm_analyze",
            "lm_train_student", "lm_report", "lm_plan")


def _dvc_sections(params_file: Path) -> set[str]:
    """Top-level params keys that the stages of ``dvc.yaml`` beside ``params_file`` declare as params."""
    dvc = params_file.parent / "dvc.yaml"
    try:
        stages = (yaml.safe_load(dvc.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return set()
    out: set[str] = set()
    for stage in stages.values() if isinstance(stages, dict) else ():
        for entry in (stage.get("params") or []) if isinstance(stage, dict) else ():
            if isinstance(entry, str):
                out.add(entry.split(".")[0])
    return out


def check_sections(data: dict[str, Any], where: str, extra: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse a top-level key that is no known section, suggesting the closest one (``analyse`` → ``analyze``)."""
    known = set(SECTIONS) | set(extra)
    for key in data:
        if key in known:
            continue
        raise ConfigError(f"{where}: unknown section {key!r}; {did_you_mean(key, known)}the sections are {sorted(SECTIONS)} "
                          f"(a new stage's section is accepted once dvc.yaml lists it in that stage's params)")


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params file into a dict (empty file → empty dict); unknown sections are refused."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {str(path)!r} not found; run from the project folder or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"params file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    check_sections(data, f"params file {str(path)!r}", _dvc_sections(path))
    return resolve_refs(data, str(path))


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _check(value, arm, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is expected: `alpha: 0.9` means [0.9]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ConfigError."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; {did_you_mean(unknown[0], fields)}valid keys are "
                          f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _check(values[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key {name!r} is missing")
    return cls(**kwargs)


def load_section(cls: type[T], section: str, params: dict[str, Any] | str | Path = DEFAULT_PARAMS,
                 overrides: dict[str, Any] | None = None, *, shared: tuple[type, str] | None = None,
                 shared_overrides: dict[str, Any] | None = None, default_optional: bool = False) -> T:
    """Build the frozen dataclass ``cls`` from ``params[section]`` with ``overrides`` (None values skipped).

    The one params loader of both pipelines. ``shared=(SharedClass, "lm_base")``: ``cls``'s field ``base`` is
    built from that shared section (with ``shared_overrides``), and a ``base`` key inside ``section`` is refused.
    ``default_optional``: when ``params`` is the default ``params.yaml`` and it does not exist, every setting has
    its default (a file named otherwise that is missing is still refused)."""
    if not isinstance(params, dict):
        missing_default = Path(params) == DEFAULT_PARAMS and not Path(params).exists()
        params = {} if default_optional and missing_default else read_params(params)
    values = dict(params.get(section) or {})
    base = None
    if shared is not None:
        if "base" in values:
            raise ConfigError(f"{section}: unknown key 'base'; the shared settings go in the {shared[1]} section")
        base = load_section(shared[0], shared[1], params, shared_overrides)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    built = build(cls, values, section)
    return built if shared is None else dataclasses.replace(built, base=base)


# ----------------------------------------------------------------------------------------------------
# Outputs: refuse an unwritable location before the expensive work, in one line.

_WRITE_REASONS = WRITE_REASONS  # the one errno table, pipeline/oserrors.py


def check_writable(path: str | Path, what: str, option: str, kind: str = "dir") -> None:
    """Raise ConfigError unless ``path`` (a folder, or with ``kind="file"`` a file) can be written.

    Probes with a real temporary file in the deepest folder that exists (``os.access`` is not enough: root
    passes it on a read-only mount), creates nothing else, and says what to change. URLs (``s3://…``) are
    left to their back-end.
    """
    text = str(path)
    if not text or "://" in text:
        return
    p = Path(text)
    from loca_pipe.pipeline.guard import special_kind

    if special_kind(p):  # a device, FIFO or socket (issue #20)
        raise ConfigError(f"cannot write {what} to {text!r}: it is {special_kind(p)}, not a regular "
                          f"{'folder' if kind == 'dir' else 'file'}; choose another {option}")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"cannot write {what} to {text!r}: it is a file, not a folder; choose another {option}")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"cannot write {what} to {text!r}: it is a folder, not a file; choose another {option}")
    folder = p if kind == "dir" else p.parent
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot write {what} to {text!r}: {str(probe)!r} is a file, not a folder; "
                          f"choose another {option}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".loca-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = _WRITE_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        code = errno.errorcode.get(exc.errno or 0, "")
        raise ConfigError(f"cannot write {what} to {text!r}: {reason}{f' ({code})' if code else ''} in "
                          f"{str(probe)!r}; choose another {option} or make that folder writable — checked "
                          f"before any work, nothing was written") from exc
