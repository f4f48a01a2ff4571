"""Small file-writing helpers shared by the stages: atomic writes and the package versions.

Every write here is atomic on a local file system: the data go to a temporary file in the destination's
folder (``.<name>.<pid>.<random>.tmp``, created exclusively and with the usual permissions), are flushed
and fsync'ed, and the temporary is renamed over the destination with ``os.replace``; the folder is then
fsync'ed so the rename survives a power loss. A crash at any point leaves either the old file or the new
one, never a torn file, and a failed write leaves no temporary behind. Missing parent folders are created.
A destination that exists and is not a regular file (a device such as ``/dev/full``, a FIFO, a socket, a
folder; symlinks followed) is refused with a ConfigError before anything is written and again just before
the rename, so a rename never replaces one (:func:`loca_pipe.pipeline.guard.special_kind`).

Checkpoint sidecars are read by :func:`loca_pipe.pipeline.models.read_sidecar` (one contract, beside
``load_checkpoint``); the logit store writes through zarr and does not use these helpers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_save", "atomic_write", "atomic_write_bytes", "atomic_write_text", "jsonable", "versions",
           "write_json"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _refuse_non_regular(path: Path) -> None:
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.pipeline.guard import special_kind

    what = "a folder" if path.is_dir() else special_kind(path)
    if what:
        raise ConfigError(f"cannot write {str(path)!r}: it is {what}, not a regular file; choose another output "
                          f"path — nothing was written")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary file object, then atomically put the result at ``path``; returns it."""
    path = Path(path)
    _refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _refuse_non_regular(path)  # again: something may have appeared while the data were written
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x: Any) -> Any:
    """JSON for what ``json`` cannot encode itself: numpy scalars and arrays, torch tensors (``tolist``: an
    ``int64`` stays an integer, a ``bool_`` a boolean), paths, dataclasses."""
    import dataclasses

    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    raise TypeError(f"{type(x).__name__} {x!r} is not JSON serialisable")


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> Path:
    """Write ``obj`` as indented JSON (2 spaces, trailing newline) to ``path`` atomically; numpy / torch values
    and paths are converted by :func:`jsonable`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=jsonable) + "\n")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints: a crash leaves the previous file)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the stored numbers depend on (recorded in stores, sidecars)."""
    import numpy as np
    import torch
    import zarr

    import loca_pipe

    out = {"loca_pipe": loca_pipe.__version__, "torch": torch.__version__, "zarr": zarr.__version__,
           "numpy": np.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return out
