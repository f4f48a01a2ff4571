"""The store's format leaf: constants, chunk sizing, the τ rules, the write guard, the store-level attributes.

Imports neither torch nor zarr (nor any other part of the store package), so every module of the package, the
targets store and the token store can import it without a circle. The dtype and codec rules of the arrays
(``id_dtype``, ``array_codecs``) live with the array table, ``pipeline/layout.py``; the store package re-exports
them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno as _errno
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from loca_pipe.pipeline.errors import StoreError
from loca_pipe.pipeline.names import LOGIT_DTYPES
from loca_pipe.pipeline.oserrors import WRITE_REASONS

__all__ = ["ATTR", "FORMAT", "FORMAT_VERSION", "LOGIT_DTYPES", "MAX_CHUNK_ROWS", "TARGET_CHUNK_BYTES", "TASKS",
           "VERIFY_ATTR", "StoreInfo", "cache_command", "default_chunk_rows", "find_tau", "io_guard", "now",
           "require_tau"]

FORMAT = "loca-pipe/logit-store"
FORMAT_VERSION = 1
ATTR = "loca_pipe"
TASKS = ("classification", "causal-lm")
# ~4 MiB for the widest array of a chunk: big enough to read at disk speed (tiny chunks are slow,
# docs/store-format.md), small enough that a crash loses little and resume has something to skip.
TARGET_CHUNK_BYTES = 4 << 20
# ... but never more than 8192 rows: with few classes (Fashion-MNIST, C=10) 4 MiB would be 100k rows, the
# whole data set in one chunk, and a crash would lose all the teacher compute. 8192 rows of C=10 fp32 are
# 320 KiB, still well above the "tiny chunk" zone, and a chunk is a few seconds of CPU teacher time.
MAX_CHUNK_ROWS = 8192
# Teacher attributes that describe the run, not the numbers: a resume may differ in them.
_RUN_KEYS = ("created", "versions", "run", "finished", "complete", "name", "row_arrays")
VERIFY_ATTR = "verify_failed"  # teacher attribute set by verify_store(record=True) while bad chunks are known


def default_chunk_rows(num_classes: int, bytes_per_value: int = 4, minimum: int = 256,
                       maximum: int = MAX_CHUNK_ROWS) -> int:
    """Rows per chunk so that a (rows, C) array chunk is about TARGET_CHUNK_BYTES (capped at ``maximum``)."""
    rows = TARGET_CHUNK_BYTES // max(1, num_classes * bytes_per_value)
    return int(min(maximum, max(minimum, rows)))


def find_tau(temperatures: Iterable[float], tau: float) -> int | None:
    """Index of ``tau`` among the declared temperatures (relative tolerance 1e-6), else None: the one rule."""
    for i, t in enumerate(temperatures):
        if math.isclose(float(t), float(tau), rel_tol=1e-6):
            return i
    return None


def cache_command(task: str) -> str:
    """The command that writes (and resumes, and after a repair rewrites) a store of ``task``."""
    return "loca-pipe lm-cache" if task == "causal-lm" else "loca-pipe cache-logits"


def require_tau(temperatures: Sequence[float], tau: float) -> int:
    """:func:`find_tau`, or the error a top-k-only reader gives for a τ the store did not declare."""
    i = find_tau(temperatures, tau)
    if i is None:
        raise StoreError(f"temperature {tau} was not declared at cache time (the store has {list(temperatures)}); "
                         f"with top-k only, p at τ={tau} is unknowable — pass --tau as one of {list(temperatures)}, or "
                         f"re-cache with --temperatures including {tau}")
    return i


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")




@contextlib.contextmanager
def io_guard(path: str, action: str) -> Iterator[None]:
    """Turn a file-system OSError (full, read-only, no permission) while ``action`` into a StoreError.

    The message says what happened, that chunks already marked done are kept, and that the same command
    resumes once the cause is fixed.
    """
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or exc.errno not in WRITE_REASONS:
            raise StoreError(f"cannot write logit store {path!r} while {action}: {exc}; chunks already "
                             f"finished are kept — fix the cause and run the same command again to resume") from exc
        raise StoreError(
            f"cannot write logit store {path!r} while {action}: {WRITE_REASONS[exc.errno]} "
            f"({_errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}); chunks already finished "
            f"are kept — free space / fix permissions (or choose another --store) and run the same command "
            f"again to resume") from exc


@dataclass(frozen=True)
class StoreInfo:
    """The store-level attributes (shared by every teacher)."""

    task: str
    num_samples: int
    num_views: int
    num_rows: int
    num_classes: int
    chunk_rows: int
    dataset: dict[str, Any]
    aug_param_names: tuple[str, ...] = ()

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.num_rows / self.chunk_rows))

    def chunk_slice(self, c: int) -> slice:
        return slice(c * self.chunk_rows, min(self.num_rows, (c + 1) * self.chunk_rows))

    def to_attrs(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task,
                "num_samples": self.num_samples, "num_views": self.num_views, "num_rows": self.num_rows,
                "num_classes": self.num_classes, "chunk_rows": self.chunk_rows, "dataset": self.dataset,
                "aug_param_names": list(self.aug_param_names)}

    @classmethod
    def from_attrs(cls, a: dict[str, Any]) -> "StoreInfo":
        return cls(task=a["task"], num_samples=a["num_samples"], num_views=a["num_views"],
                   num_rows=a["num_rows"], num_classes=a["num_classes"], chunk_rows=a["chunk_rows"],
                   dataset=a["dataset"], aug_param_names=tuple(a.get("aug_param_names", ())))


def _same_identity(a: StoreInfo, b: StoreInfo) -> list[str]:
    diffs = []
    for key in ("task", "num_samples", "num_views", "num_rows", "num_classes", "chunk_rows", "aug_param_names"):
        if getattr(a, key) != getattr(b, key):
            diffs.append(f"{key}: store has {getattr(a, key)!r}, this run has {getattr(b, key)!r}")
    for key in ("fingerprint", "split", "view_seed"):
        if a.dataset.get(key) != b.dataset.get(key):
            diffs.append(f"dataset.{key}: store has {a.dataset.get(key)!r}, this run has {b.dataset.get(key)!r}")
    return diffs
