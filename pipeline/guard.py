"""The one output guard: nothing a command reads, and nothing it did not write, is ever replaced.

Every command that writes calls :func:`check_outputs` before any work, with what it reads (``inputs``) and
what it writes (``outputs``: a path and the kind of thing the command writes there). Paths are resolved
first (following symlinks, so a link to a store is the store). An output is refused — one
:class:`~loca_pipe.pipeline.errors.ConfigError` naming both paths, before anything is written — when it

* is not a regular file or folder (a device such as ``/dev/full``, a FIFO, a socket);
* is, contains or lies inside one of the command's inputs, or another of its outputs;
* is, contains or lies inside a logit store, a targets store or a teacher checkpoint the command does not
  write there (found by their markers: the store's ``zarr.json`` attribute ``loca_pipe.format``, the
  checkpoint's ``<ckpt>.json`` sidecar naming an ``arch``);
* for a store output: holds something else (a non-empty folder that is not a store of that kind).

So ``--overwrite`` only ever replaces something of the kind the command itself writes. URLs (``s3://…``)
are left to their back-end. The atomic writer (:func:`loca_pipe.pipeline.io.atomic_write`) applies the
special-file rule itself, so no rename ever replaces a device.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError

__all__ = ["LOGITS", "TARGETS", "CHECKPOINT", "FOLDER", "FILE", "check_outputs", "check_lm", "kind_of",
           "special_kind", "resolve"]

LOGITS, TARGETS, CHECKPOINT = "logit store", "targets store", "teacher checkpoint"
FOLDER, FILE = "folder", "file"  # any other output: results folders, run folders, JSON/CSV/HTML files
_FORMATS = {"loca-pipe/logit-store": LOGITS, "loca-pipe/targets": TARGETS}  # store.FORMAT, targets.FORMAT (tested)
_SCAN_LIMIT = 20000  # entries looked at below a folder output (a store is never descended into)


def is_url(path: Any) -> bool:
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink followed (as far as the path exists)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def special_kind(path: str | os.PathLike) -> str | None:
    """"a character device", "a FIFO", … when ``path`` exists (symlinks followed) and is neither a regular file
    nor a folder; None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file or folder"


def _zarr_format(folder: Path) -> str | None:
    """The loca-pipe format of the zarr group at ``folder`` ("" for a zarr group without one); None: no group."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        attrs = json.loads(meta.read_text()).get("attributes") or {}
        return str((attrs.get("loca_pipe") or {}).get("format") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _is_checkpoint(path: Path) -> bool:
    """A teacher checkpoint: a file whose ``<ckpt>.json`` sidecar names its ``arch``."""
    side = Path(f"{path}.json")
    if not (path.is_file() and side.is_file()):
        return False
    try:
        return "arch" in json.loads(side.read_text())
    except (OSError, ValueError, TypeError):
        return False


def kind_of(path: Path) -> str | None:
    """What a loca-pipe command wrote at ``path``: LOGITS, TARGETS, CHECKPOINT (the state-dict file or its
    sidecar), "zarr group" (a store of no loca-pipe format), or None."""
    if path.is_dir():
        fmt = _zarr_format(path)
        if fmt is None:
            return None
        return _FORMATS.get(fmt, "zarr group") if fmt else "zarr group"
    if _is_checkpoint(path):
        return CHECKPOINT
    if path.name.endswith(".json") and _is_checkpoint(path.with_name(path.name[:-5])):
        return CHECKPOINT
    return None


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def _within(path: Path) -> tuple[Path, str] | None:
    """The nearest folder above ``path`` holding a loca-pipe store or zarr group, and its kind."""
    for up in path.parents:
        k = kind_of(up) if up.is_dir() else None
        if k in (LOGITS, TARGETS, "zarr group"):
            return up, k
    return None


def _contained(folder: Path, own: str) -> tuple[Path, str] | None:
    """A store or teacher checkpoint below ``folder`` (not ``own`` kind at the top), or None."""
    seen = 0
    for top, dirs, files in os.walk(folder):
        here = Path(top)
        for d in list(dirs):
            k = kind_of(here / d)
            if k is not None:
                return here / d, k
        for f in files:
            if f.endswith(".json") or f.startswith("."):
                continue
            if _is_checkpoint(here / f):
                return here / f, CHECKPOINT
        seen += len(dirs) + len(files)
        if seen > _SCAN_LIMIT:
            return None
    return None


def _root_row_arrays() -> set[str]:
    from loca_pipe.pipeline import layout

    return {a.name for a in layout.ARRAYS if a.where == layout.ROOT} | {"zarr.json"}


def _check_one(opt: str, out: Path, kind: str, inputs: list[tuple[str, Path]], others: list[tuple[str, Path]]) -> None:
    shown = f"{opt} {str(out)!r}"
    special = special_kind(out)
    if special:
        raise ConfigError(f"{shown} is {special}, not a regular {'file' if kind in (FILE, CHECKPOINT) else 'folder'}; "
                          f"choose another {opt} — nothing was written")
    for name, path in inputs:
        if _inside(out, path) or _inside(path, out):
            rel = "is" if out == path else ("lies inside" if _inside(out, path) else "contains")
            raise ConfigError(f"{shown} {rel} the input {name} {str(path)!r}; writing there would destroy what this "
                              f"command reads — choose another {opt}")
    for name, path in others:
        if _inside(out, path) or _inside(path, out):
            raise ConfigError(f"{shown} overlaps the other output {name} {str(path)!r}; give them separate paths")
    up = _within(out)
    if up is not None:
        raise ConfigError(f"{shown} lies inside the {up[1]} {str(up[0])!r}; choose another {opt} outside it")
    if not out.exists():
        return
    found = kind_of(out)
    if found is not None and found != kind and not (kind == LOGITS and found == "zarr group"):
        raise ConfigError(f"{shown} is a {found}; this command writes a {kind} there and never replaces a {found} "
                          f"(not even with --overwrite) — choose another {opt}")
    if out.is_dir() and found is None:
        inner = _contained(out, kind)
        if inner is not None:
            raise ConfigError(f"{shown} contains the {inner[1]} {str(inner[0])!r}; choose another {opt}")
        if kind in (LOGITS, TARGETS) and any(out.iterdir()):
            raise ConfigError(f"{shown} is a folder that holds something other than a {kind}; choose another {opt} "
                              f"(--overwrite only replaces a {kind} written by loca-pipe)")
    if kind == LOGITS and found == "zarr group":
        extra = {p.name for p in out.iterdir()} - _root_row_arrays()
        if extra:  # a creation killed before its attributes were written leaves only row arrays: resumable
            raise ConfigError(f"{shown} is a zarr group that is not a loca-pipe {kind}; choose another {opt}")
    if kind in (FILE, CHECKPOINT) and out.is_dir():
        raise ConfigError(f"{shown} is a folder, not a file; choose another {opt}")


def check_outputs(inputs: Mapping[str, Any], outputs: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse (ConfigError) any output that would replace an input, a special file or something of another
    kind; see the module docstring. ``inputs``: option → path (None: not given); ``outputs``: option →
    (path, kind) with kind one of LOGITS, TARGETS, CHECKPOINT, FOLDER, FILE. URLs are skipped."""
    ins = [(k, resolve(v)) for k, v in inputs.items() if v not in (None, "") and not is_url(v)]
    outs = [(k, resolve(v), kind) for k, (v, kind) in outputs.items() if v not in (None, "") and not is_url(v)]
    for i, (opt, path, kind) in enumerate(outs):
        others = [(o, p) for j, (o, p, _) in enumerate(outs) if j != i and not _siblings_ok(path, p)]
        _check_one(opt, path, kind, ins, others)


def _siblings_ok(a: Path, b: Path) -> bool:
    return a != b and a.parent == b.parent  # two files side by side (a checkpoint and its sidecar)


# The LM commands (cli/lm.py): what each one reads and writes, from the params' derived paths (stages/lm/common.py).
def _lm_table(command: str, p: Any) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    b = p.base
    if command == "lm-prepare":
        src = getattr(p, "source", None)
        return {"--source": src if src and src != "default" else None}, {"lm_base.outputs.data": (b.data_dir, FOLDER)}
    if command == "lm-tokenizer":
        return ({"lm_base.outputs.data": b.data_dir, "--from-model": getattr(p, "from_model", None)},
                {"lm_base.outputs.tokenizer": (b.tokenizer_dir, FOLDER)})
    if command == "lm-train-teacher":
        return ({"lm_base.outputs.data": b.data_dir, "lm_base.outputs.tokenizer": b.tokenizer_dir,
                 "--init-from": getattr(p, "init_from", None)}, {"lm_base.outputs.teacher": (b.teacher_dir, FOLDER)})
    if command == "lm-cache":
        return ({"lm_base.outputs.data": b.data_dir, "lm_base.outputs.tokenizer": b.tokenizer_dir,
                 "--teacher": getattr(p, "teacher", None) or b.teacher_dir},
                {"lm_base.outputs.store": (b.store, LOGITS), "lm_base.outputs.cache_report": (b.cache_report, FILE)})
    if command == "lm-analyze":
        return {"lm_base.outputs.store": b.store}, {"lm_base.outputs.analysis": (b.analysis_dir, FOLDER)}
    if command == "lm-train-student":
        return ({"lm_base.outputs.store": b.store, "lm_base.outputs.data": b.data_dir,
                 "lm_base.outputs.tokenizer": b.tokenizer_dir, "lm_base.outputs.teacher": b.teacher_dir},
                {"lm_base.outputs.students": (b.students_dir, FOLDER)})
    if command == "lm-report":
        return {"lm_base.outputs.students": b.students_dir}, {"lm_base.outputs.report": (b.report_dir, FOLDER)}
    raise KeyError(command)


def check_lm(command: str, p: Any) -> None:
    """:func:`check_outputs` for one ``lm-*`` command's params (its inputs and outputs under ``lm_base.workdir``)."""
    inputs, outputs = _lm_table(command, p)
    check_outputs(inputs, outputs)
