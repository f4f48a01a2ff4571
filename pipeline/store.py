"""The logit store: one Zarr v3 group, one sub-group per teacher, rows written chunk by chunk.

Layout (docs/store-format.md is the reader's reference)::

    STORE/                          attrs["loca_pipe"]: format, version, task, rows, classes, chunk_rows, dataset
      sample_id   (R,)   int64      data-set index of each row
      label       (R,)   int64      class (or next-token id) the row is scored against
      view        (R,)   int16      augmented view index (0 when views are not cached)
      aug_params  (R, P) float32    replayable augmentation parameters (only when views are cached)
      rows_done   (n_chunks,) uint8 1 once the shared row arrays of chunk c are written
      teachers/<name>/              attrs["loca_pipe"]: provenance, settings, complete
        logits       (R, C)  float32|float16   optional full logits
        topk_logits  (R, K)  float32            raw top-k logits, descending
        topk_ids     (R, K)  int16|int32        their class ids (wide enough for C)
        lse          (R, T)  float32            logsumexp(z / tau_t) for each declared tau
        label_logit  (R,)    float32            z_label, so p_label is exact even outside the top-k
        done         (n_chunks,) uint8          completion record, one flag per row chunk

Rows are samples × views (row = sample · V + view) for classifiers and tokens for language models, so
every array is 2-D at most and chunks are aligned across arrays: chunk c is rows
[c·chunk_rows, (c+1)·chunk_rows). A chunk is written whole, then its ``done`` flag; a teacher is marked
complete only when every flag is set. Readers refuse incomplete teachers (IncompleteStoreError). Every
array carries a CRC32C checksum per chunk, so a corrupted chunk fails loudly on read.

Completion protocol (what makes kill-and-resume safe): for chunk c a writer first writes the shared row
arrays and sets ``rows_done[c]`` (a later teacher re-checks them for identity instead of rewriting), then
writes every teacher array of chunk c, then sets that teacher's ``done[c]``; after the last flag it sets
``complete: true`` in the teacher's attributes. zarr 3.1.6's LocalStore writes every chunk file to a
``*.partial`` temporary and renames it into place, so a killed process leaves either the old or the new
chunk file (plus, at worst, a stray ``*.partial`` file that nothing reads) — never a torn chunk. On
stores without atomic writes (some fsspec back-ends, or a power loss before the data reach the disk) a
torn chunk is possible, but its ``done`` flag was not yet written (so resume rewrites it), and if it was,
CRC32C makes reading it fail instead of returning wrong numbers.

Write errors from the file system (disk full, read-only, permission denied) become a StoreError that
says finished chunks are kept and the same command resumes (see :func:`io_guard`).

Reads through :class:`TeacherView` (``view[key][sel]``, ``.oindex``, ``.read``, ``.probs``, ``.sparse``) go
through :class:`CheckedArray`: a chunk failing its CRC32C raises a StoreError naming the array, the chunk, its
rows and its file, instead of zarr's bare ValueError. Paths may be fsspec URLs (``s3://…``, ``memory://…``;
:func:`open_zarr_group`). One job at a time writes a teacher: see ``pipeline.distributed.WriterLease`` (its
file lives in ``rows_done/``, where zarr never looks for group members).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno as _errno
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from loca_pipe.pipeline.errors import (
    IncompleteStoreError,
    NumericsError,
    StoreConflictError,
    StoreError,
)
from loca_pipe.pipeline.io import versions

FORMAT = "loca-pipe/logit-store"
FORMAT_VERSION = 1
ATTR = "loca_pipe"
LOGIT_DTYPES = ("float32", "float16")
TASKS = ("classification", "causal-lm")
# ~4 MiB for the widest array of a chunk: big enough to read at disk speed (tiny chunks are slow,
# DESIGN.md §6), small enough that a crash loses little and resume has something to skip.
TARGET_CHUNK_BYTES = 4 << 20
# ... but never more than 8192 rows: with few classes (Fashion-MNIST, C=10) 4 MiB would be 100k rows, the
# whole data set in one chunk, and a crash would lose all the teacher compute. 8192 rows of C=10 fp32 are
# 320 KiB, still well above the "tiny chunk" zone, and a chunk is a few seconds of CPU teacher time.
MAX_CHUNK_ROWS = 8192
# Teacher attributes that describe the run, not the numbers: a resume may differ in them.
_RUN_KEYS = ("created", "versions", "run", "finished", "complete", "name", "row_arrays")


def default_chunk_rows(num_classes: int, bytes_per_value: int = 4, minimum: int = 256,
                       maximum: int = MAX_CHUNK_ROWS) -> int:
    """Rows per chunk so that a (rows, C) array chunk is about TARGET_CHUNK_BYTES (capped at ``maximum``)."""
    rows = TARGET_CHUNK_BYTES // max(1, num_classes * bytes_per_value)
    return int(min(maximum, max(minimum, rows)))


def id_dtype(num_classes: int) -> np.dtype:
    """Smallest signed integer dtype that holds every class id in [0, C). (fp16 ids are a known bug.)"""
    for dt in (np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def array_codecs(dtype: np.dtype, compress: bool = False) -> dict[str, Any]:
    """The zarr codecs of every array the project writes (store, targets, token index): the one helper.

    Integers (ids, labels, flags) get zstd always, floats only when ``compress``; CRC32C goes on everything.
    """
    # Logits barely compress (zstd ~1.09x, blosc-lz4 1.00x on fp16; DESIGN.md §6), so float arrays are
    # stored raw by default; integers (ids, labels) compress well. CRC32C goes on everything.
    comp: list[Any] = []
    if compress or np.dtype(dtype).kind in "iub":
        comp.append(ZstdCodec(level=1))
    comp.append(Crc32cCodec())
    return {"serializer": BytesCodec(), "compressors": comp}


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


_OS_REASONS = {
    _errno.ENOSPC: "the disk is full",
    _errno.EDQUOT: "the disk quota is exceeded",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "operation not permitted",
    _errno.EROFS: "the location is read-only",
}


@contextlib.contextmanager
def io_guard(path: str, action: str) -> Iterator[None]:
    """Turn a file-system OSError (full, read-only, no permission) while ``action`` into a StoreError.

    The message says what happened, that chunks already marked done are kept, and that the same command
    resumes once the cause is fixed.
    """
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or exc.errno not in _OS_REASONS:
            raise StoreError(f"cannot write logit store {path!r} while {action}: {exc}; chunks already "
                             f"finished are kept — fix the cause and run the same command again to resume") from exc
        raise StoreError(
            f"cannot write logit store {path!r} while {action}: {_OS_REASONS[exc.errno]} "
            f"({_errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}); chunks already finished "
            f"are kept — free space / fix permissions (or choose another --store) and run the same command "
            f"again to resume") from exc


# ----------------------------------------------------------------------------------------------------
# Derived fields: one place computes everything stored from a batch of logits (device-agnostic).


# Below this many elements a CPU op is cheaper on one thread: ATen still splits small reductions across
# its OpenMP threads, and on a loaded machine each split waits for a descheduled thread. Measured on the
# 2-core VM under load: summarize_logits on (256, 10) took ~20 ms with 2 threads, ~1.3 ms with 1.
SMALL_OP_ELEMENTS = 1 << 18
CPU_BLOCK_ELEMENTS = 1 << 22  # logits per row block of a large CPU batch (16 MB of fp32)


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block's torch CPU ops on one intra-op thread (restores the previous count)."""
    n = torch.get_num_threads()
    if not enabled or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def summarize_logits(logits: torch.Tensor, labels: torch.Tensor, top_k: int,
                     temperatures: Iterable[float], row_ids: torch.Tensor | None = None,
                     amp: bool = False) -> dict[str, torch.Tensor]:
    """Everything the store keeps for a batch of teacher logits, computed on the logits' device.

    logits (B, C) any float dtype → computed in fp32. Returns top-k logits/ids (descending), lse (B, T) =
    logsumexp(z/τ_t), and the label's logit z_y. Raises NumericsError naming the offending rows (``row_ids``
    when given) if any logit is NaN or inf — an fp16 overflow is never written silently; ``amp`` says the
    logits came from fp16 autocast (then an overflow is the likely cause, else the teacher itself).
    """
    if logits.ndim != 2:
        raise StoreError(f"teacher output must be (batch, classes); got shape {tuple(logits.shape)}")
    temperatures = list(temperatures)
    small = logits.device.type == "cpu" and logits.numel() * max(1, len(temperatures)) < SMALL_OP_ELEMENTS
    if logits.device.type == "cpu" and logits.ndim == 2 and logits.numel() > 2 * CPU_BLOCK_ELEMENTS:
        # row blocks: each of the ~6 passes over a block then runs from cache, not DRAM. Measured on a
        # (768, 32000) batch, one thread: 0.26–0.31 s whole, 0.14–0.16 s in blocks of 128 rows
        rows = max(1, CPU_BLOCK_ELEMENTS // logits.shape[1])
        ids = row_ids if row_ids is not None else torch.arange(logits.shape[0])
        parts = [_summarize(logits[i:i + rows], labels[i:i + rows], top_k, temperatures, ids[i:i + rows], amp)
                 for i in range(0, logits.shape[0], rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with one_thread(small):
        return _summarize(logits, labels, top_k, temperatures, row_ids, amp)


def _summarize(logits: torch.Tensor, labels: torch.Tensor, top_k: int, temperatures: list[float],
               row_ids: torch.Tensor | None, amp: bool = False) -> dict[str, torch.Tensor]:
    z = logits.float()
    # one pass: a row sum is finite iff the row is (bar |z| ~ 1e34, re-checked on the flagged rows only);
    # a full isfinite() mask cost more than the teacher's lm_head at a 32k vocabulary (bench_lm)
    bad = ~torch.isfinite(z.sum(dim=1))
    if bool(bad.any()):
        bad[bad.clone()] = ~torch.isfinite(z[bad]).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        ids = (row_ids[idx] if row_ids is not None else idx).tolist()
        cause = ("this is usually an fp16 overflow — cache with autocast off (--no-amp) or fix the checkpoint"
                 if amp else "the teacher ran in full precision (no autocast), so its weights or inputs hold "
                             "NaN/inf — check the checkpoint (a diverged training run) and the input data")
        raise NumericsError(f"teacher produced NaN or inf logits for {len(ids)} row(s) {ids[:20]}"
                            f"{' …' if len(ids) > 20 else ''}; {cause}")
    C = z.shape[1]
    if not 1 <= top_k <= C:
        raise StoreError(f"top-k must be in [1, {C}] for a {C}-class teacher; got {top_k}")
    labels = labels.to(z.device).long()
    if bool(((labels < 0) | (labels >= C)).any()):
        raise StoreError(f"labels must lie in [0, {C}); got values {labels[(labels < 0) | (labels >= C)].unique().tolist()[:10]}")
    topv, topi = torch.topk(z, top_k, dim=1, largest=True, sorted=True)
    # lse_τ = m/τ + log Σ exp((z − m)/τ) with m the row max (= topv[:, 0]): per τ one fused scale-and-shift,
    # an in-place exp and a sum — no (B, T, C) tensor (it cost more than a 32k-vocabulary lm_head, bench_lm)
    m = topv[:, :1]
    parts = []
    for t in temperatures:
        e = torch.sub(z, m) if t == 1.0 else torch.add(-m / t, z, alpha=1.0 / t)  # (B, C), ≤ 0
        parts.append(m[:, 0] / t + torch.log(e.exp_().sum(dim=1)))
    lse = torch.stack(parts, dim=1)                                       # (B, T)
    label_logit = z.gather(1, labels.view(-1, 1)).squeeze(1)
    return {"topk_logits": topv, "topk_ids": topi, "lse": lse, "label_logit": label_logit}


# ----------------------------------------------------------------------------------------------------


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


def root_sizes(info: StoreInfo, **dims: int) -> "layout.Sizes":
    from loca_pipe.pipeline import layout

    return layout.Sizes(dims={"row": info.num_rows, "chunk": info.num_chunks, "aug_param": len(info.aug_param_names),
                              **dims}, chunks={"row": info.chunk_rows}, num_classes=info.num_classes, task=info.task)


def _created_root_arrays() -> tuple[str, ...]:
    from loca_pipe.pipeline import layout

    return tuple(a.name for a in layout.arrays(layout.ROOT) if a.writer != layout.INDEX)


def root_arrays() -> tuple[str, ...]:
    """Names of the arrays of the store group (the shared rows, their flag, a token store's index): the table's."""
    from loca_pipe.pipeline import layout

    return tuple(a.name for a in layout.arrays(layout.ROOT))


def dimension_names() -> dict[str, tuple[str, ...]]:
    """Zarr v3 ``dimension_names`` of every array of the table (pipeline/layout.py), so xarray.open_zarr (and other
    readers that label axes) open the store and each teacher group as a data set: rows share the dimension
    ``row``, flags the dimension ``chunk``."""
    from loca_pipe.pipeline import layout

    return {a.name: a.dims for a in layout.ARRAYS}


def dims(name: str) -> dict[str, Any]:
    """``{"dimension_names": …}`` for array ``name`` (empty for an array not in the table)."""
    from loca_pipe.pipeline import layout

    a = layout.spec(name)
    return {"dimension_names": a.dims} if a is not None else {}


def _teacher_sizes(info: StoreInfo, K: int, T: int, logits_dtype: str | None, compress_logits: bool,
                   extra_dims: dict[str, int] | None = None, extra_chunks: dict[str, int] | None = None) -> Any:
    from loca_pipe.pipeline import layout

    return layout.Sizes(dims={"row": info.num_rows, "chunk": info.num_chunks, "class": info.num_classes, "k": K,
                              "temperature": T, **(extra_dims or {})},
                        chunks={"row": info.chunk_rows, **(extra_chunks or {})}, num_classes=info.num_classes,
                        logits_dtype=logits_dtype, compress_logits=compress_logits, task=info.task)


def _create_row_arrays(group: zarr.Group, info: StoreInfo) -> None:
    from loca_pipe.pipeline import layout

    sizes = root_sizes(info)
    for a in layout.arrays(layout.ROOT, sizes):
        if a.writer != layout.INDEX:  # a token store's index is written by pipeline/lm/cache.py, once
            layout.create(group, a, sizes)


def open_zarr_group(path: str, mode: str) -> zarr.Group:
    """``zarr.open_group`` on a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``…).

    An unknown protocol or a missing fsspec back-end (s3fs, gcsfs) becomes a StoreError saying what to install;
    credentials and endpoints come from the back-end's usual sources (for S3: AWS_* variables such as
    AWS_ENDPOINT_URL, ~/.aws, or fsspec's config files).
    """
    try:
        return zarr.open_group(path, mode=mode)
    except ImportError as exc:
        raise StoreError(f"cannot open logit store {path!r}: its URL needs an fsspec back-end that is not installed "
                         f"({exc}); install it (s3:// → s3fs, gs:// → gcsfs, az:// → adlfs)") from exc
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        raise StoreError(f"cannot open logit store {path!r}: {exc}; use a local path or an fsspec URL such as "
                         f"s3://bucket/name.zarr or memory://name.zarr") from exc


def _stores_below(path: str, limit: int = 3) -> str:
    """``"; stores below it: 'a.zarr', …"`` for logit stores up to two levels under a local folder, else ``""``."""
    import json
    from pathlib import Path

    if "://" in path or not Path(path).is_dir():
        return ""
    found = []
    for meta in sorted(Path(path).glob("*/zarr.json")) + sorted(Path(path).glob("*/*/zarr.json")):
        try:
            a = json.loads(meta.read_text()).get("attributes", {}).get(ATTR) or {}
        except (OSError, ValueError):
            continue
        if a.get("format") == FORMAT:
            found.append(str(meta.parent))
    if not found:
        return ""
    more = f" (+{len(found) - limit} more)" if len(found) > limit else ""
    return f"; logit stores below it: {', '.join(repr(f) for f in found[:limit])}{more}"


def not_a_store_message(path: str) -> str:
    """Why ``path`` cannot be opened as a logit store, and what to pass instead (one line)."""
    from pathlib import Path

    local = "://" not in path
    if local and Path(path).is_file():
        return f"{path!r} is a file, not a logit store (a Zarr v3 folder written by `loca-pipe cache-logits`)"
    if local and Path(path).is_dir():
        return (f"{path!r} is not a loca-pipe logit store: a folder without zarr.json{_stores_below(path)}; pass a "
                f"store folder written by `loca-pipe cache-logits` (for example data/logits/fashion-mnist-train.zarr)")
    return (f"no logit store at {path!r} (nothing is there); check the path, or create one with "
            f"`loca-pipe cache-logits --store {path} …`")


class LogitStore:
    """A logit store on local disk or any fsspec URL zarr understands."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = dict(group.attrs).get(ATTR)
        if not attrs or attrs.get("format") != FORMAT:
            if attrs and attrs.get("format") == "loca-pipe/targets":
                src = (attrs.get("source") or {}).get("store")
                raise StoreError(f"{path!r} is a targets store (written by `loca-pipe calibrate`), not a logit store; "
                                 f"pass the logit store it was made from{f' ({src!r})' if src else ''}, or give "
                                 f"this folder to train-student as --targets")
            raise StoreError(f"{path!r} is not a loca-pipe logit store (a Zarr group without {ATTR!r} attributes "
                             f"of format {FORMAT!r}); point --store at a folder written by `loca-pipe cache-logits`"
                             f"{_stores_below(path)}")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path!r} has store format version {attrs.get('format_version')}, this loca-pipe "
                             f"reads version {FORMAT_VERSION}; re-cache or use a matching loca-pipe")
        self.info = StoreInfo.from_attrs(attrs)

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, mode: str = "r") -> "LogitStore":
        """Open an existing store (mode 'r' or 'r+'); a missing or foreign path raises StoreError."""
        try:
            group = open_zarr_group(str(path), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise StoreError(not_a_store_message(str(path))) from exc
        return cls(group, str(path))

    @classmethod
    def create_or_open(cls, path: str, info: StoreInfo, overwrite: bool = False) -> "LogitStore":
        """Open the store at ``path`` for writing, creating it if absent.

        An existing store must have the same identity (data fingerprint, split, rows, classes, views, chunking);
        otherwise StoreConflictError, unless ``overwrite`` — which deletes it first.
        """
        path = str(path)
        existing = None
        try:
            existing = cls.open(path, mode="r+")
        except StoreError:
            try:
                probe = open_zarr_group(path, mode="r")
                # a creation killed before its attributes were written leaves only row arrays: redo it
                interrupted = not dict(probe.attrs) and set(probe.keys()) <= set(_created_root_arrays())
                if (list(probe.keys()) or dict(probe.attrs)) and not interrupted:
                    if not overwrite:
                        raise StoreConflictError(f"{path!r} holds something that is not a loca-pipe store; "
                                                 f"choose another --store or pass --overwrite to replace it")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
                pass
        if existing is not None and not overwrite:
            diffs = _same_identity(existing.info, info)
            if diffs:
                raise StoreConflictError(
                    f"store {path!r} belongs to another data set or layout ({'; '.join(diffs)}); "
                    f"use another --store, or pass --overwrite to replace it (its teachers are deleted)")
            return existing
        group = open_zarr_group(path, mode="w")
        _create_row_arrays(group, info)
        group.attrs[ATTR] = info.to_attrs()  # last: a store with attributes has all its row arrays
        return cls(group, path)

    # -- shared rows ----------------------------------------------------------------------------------
    def write_rows(self, c: int, sample_id: np.ndarray, label: np.ndarray, view: np.ndarray,
                   aug_params: np.ndarray | None = None) -> None:
        """Write the shared row arrays of chunk ``c``; if already written, check they are identical."""
        sl = self.info.chunk_slice(c)
        new = {"sample_id": np.asarray(sample_id, np.int64), "label": np.asarray(label, np.int64),
               "view": np.asarray(view, np.int16)}
        if self.info.aug_param_names:
            if aug_params is None:
                raise StoreError("this store caches augmented views; aug_params are required for every row")
            new["aug_params"] = np.asarray(aug_params, np.float32)
        for k, v in new.items():
            if v.shape[0] != sl.stop - sl.start:
                raise StoreError(f"chunk {c} needs {sl.stop - sl.start} rows of {k}; got {v.shape[0]}")
        if self.group["rows_done"][c]:
            for k, v in new.items():
                old = self.group[k][sl]
                if not np.array_equal(old, v):
                    raise StoreConflictError(
                        f"rows {sl.start}..{sl.stop - 1} of {k!r} differ from what the store holds: this run sees "
                        f"another sample order, labels or views than the store's first teacher; use another --store")
            return
        for k, v in new.items():
            self.group[k][sl] = v
        self.group["rows_done"][c] = 1

    # -- teachers -----------------------------------------------------------------------------------
    @property
    def teachers(self) -> list[str]:
        if "teachers" not in self.group:
            return []
        return sorted(self.group["teachers"].group_keys())

    def teacher_attrs(self, name: str) -> dict[str, Any]:
        """The teacher's ``loca_pipe`` attributes ({} if its creation was interrupted before they were set)."""
        return dict(dict(self._teacher_group(name).attrs).get(ATTR) or {})

    def _teacher_group(self, name: str) -> zarr.Group:
        if name not in self.teachers:
            have = ", ".join(self.teachers) or "none"
            raise StoreError(f"teacher {name!r} is not in store {self.path!r}; it holds: {have}")
        return self.group["teachers"][name]

    def is_complete(self, name: str) -> bool:
        return bool(self.teacher_attrs(name).get("complete", False))

    def pending_chunks(self, name: str) -> list[int]:
        g = self._teacher_group(name)
        if "done" not in g:  # creation interrupted: nothing of it counts
            return list(range(self.info.num_chunks))
        done = g["done"][:]
        return [int(c) for c in np.flatnonzero(done == 0)]

    def teacher(self, name: str | None = None, allow_incomplete: bool = False) -> "TeacherView":
        """Read access to one teacher's arrays; refuses a half-written teacher unless ``allow_incomplete``."""
        if name is None:
            if len(self.teachers) != 1:
                raise StoreError(f"store {self.path!r} holds {len(self.teachers)} teachers ({', '.join(self.teachers) or 'none'}); "
                                 f"name one")
            name = self.teachers[0]
        g = self._teacher_group(name)
        if not allow_incomplete and not self.is_complete(name):
            left = len(self.pending_chunks(name))
            from loca_pipe.pipeline.distributed import live_writer

            if (writer := live_writer(self.path, name)) is not None:  # issue #20: say a writer is running
                raise IncompleteStoreError(f"teacher {name!r} in {self.path!r} is incomplete ({left} of "
                                           f"{self.info.num_chunks} chunks not written): it is {writer}; wait for it")
            raise IncompleteStoreError(
                f"teacher {name!r} in {self.path!r} is incomplete ({left} of {self.info.num_chunks} chunks not "
                f"written): it is still being written or its run crashed; re-run the same `{cache_command(self.info.task)}` "
                f"command to resume it")
        return TeacherView(self, name, g)

    def begin_teacher(self, name: str, provenance: dict[str, Any], top_k: int, temperatures: Iterable[float],
                      logits_dtype: str | None = "float32", compress_logits: bool = False,
                      overwrite: bool = False, codec: str = "lossless",
                      extra_dims: dict[str, int] | None = None,
                      extra_chunks: dict[str, int] | None = None) -> "TeacherWriter":
        """Create (or reopen for resume) teacher ``name``. Provenance must match an existing teacher of that name.

        ``logits_dtype`` None keeps only top-k (the vocabulary-scale form). ``codec`` says how the top-k
        values and ids are stored (pipeline/codecs.py; resuming with another codec is refused).
        ``extra_dims`` gives the sizes of the job's own dimensions (a token store's ``draw``, ``sequence``,
        ``new_token``, ``greedy_chunk``; ``extra_chunks`` their chunk lengths): the table's arrays
        (pipeline/layout.py) with those dimensions are created with the teacher, before its attributes (so a
        joining shard finds them); the job's row arrays among them are written by ``write_chunk``.
        """
        from loca_pipe.pipeline.codecs import get_codec

        cod = get_codec(codec)
        C = self.info.num_classes
        temps = [float(t) for t in temperatures]
        if not 1 <= top_k <= C:
            raise StoreError(f"--top-k must be in [1, {C}] (the teacher has {C} classes); got {top_k}")
        if not temps or any(not (t > 0 and math.isfinite(t)) for t in temps):
            raise StoreError(f"temperatures must be positive numbers; got {temps}")
        if logits_dtype is not None and logits_dtype not in LOGIT_DTYPES:
            raise StoreError(f"logits dtype must be one of {list(LOGIT_DTYPES)} (or none); got {logits_dtype!r}")
        settings = {"top_k": int(top_k), "temperatures": temps, "logits_dtype": logits_dtype,
                    "full_logits": logits_dtype is not None}
        if cod.name != "lossless":
            if self.info.task != "causal-lm":
                raise StoreError(f"codec {cod.name!r} is for token stores (lm-cache); the image readers read lossless "
                                 f"top-k, so cache-logits keeps codec 'lossless'")
            settings["codec"] = cod.attrs()
        cod.check(C, int(top_k))
        meta = {**provenance, **settings}
        teachers = self.group.require_group("teachers")
        if name in self.teachers and not overwrite and self.teacher_attrs(name):
            old = self.teacher_attrs(name)
            have = (old.get("codec") or {}).get("name", "lossless")
            if have != cod.name:
                raise StoreConflictError(
                    f"teacher {name!r} in {self.path!r} was written with codec {have!r}; this run asks for codec "
                    f"{cod.name!r}; resume with --codec {have}, or pass --overwrite to re-cache it with {cod.name!r}")
            diffs = [f"{k}: store has {old.get(k)!r}, this run has {v!r}" for k, v in meta.items()
                     if k not in _RUN_KEYS and old.get(k) != v]
            if diffs:
                raise StoreConflictError(
                    f"teacher {name!r} already in {self.path!r} with other settings ({'; '.join(diffs)}); "
                    f"pass --overwrite to replace it, or cache under another --name")
            return TeacherWriter(self, name, teachers[name])
        g = teachers.create_group(name, overwrite=True)
        from loca_pipe.pipeline import layout

        sizes = _teacher_sizes(self.info, int(top_k), len(temps), logits_dtype, compress_logits, extra_dims,
                               extra_chunks)
        rows = []
        for spec in layout.arrays(layout.TEACHER, sizes):
            if spec.codec:  # the top-k values and ids, as the codec keeps them (its own arrays for a lossy codec)
                if spec.name == next(x.name for x in layout.ARRAYS if x.codec):
                    self._create_codec_arrays(g, cod, sizes)
                continue
            layout.create(g, spec, sizes)
            if spec.writer == layout.JOB:
                rows.append(spec.name)
        g.attrs[ATTR] = {**meta, "name": name, "created": now(), "versions": versions(), "complete": False,
                         **({"row_arrays": rows} if rows else {})}
        return TeacherWriter(self, name, g)

    @staticmethod
    def _create_codec_arrays(g: zarr.Group, cod: Any, sizes: Any) -> None:
        from loca_pipe.pipeline import layout

        C, K, T = sizes.num_classes, sizes.dims["k"], sizes.dims["temperature"]
        for key, (width, dt, fill) in cod.arrays(C, K, T).items():
            dt = np.dtype(dt)
            g.create_array(key, shape=(sizes.dims["row"], width), chunks=(sizes.chunks["row"], width), dtype=dt,
                           fill_value=fill, **array_codecs(dt, sizes.compress_logits or cod.compress),
                           dimension_names=layout.dimension_names(key))

    def describe(self) -> dict[str, Any]:
        """What `loca-pipe info` prints: layout, teachers, completeness, provenance."""
        out: dict[str, Any] = {"path": self.path, **self.info.to_attrs(), "num_chunks": self.info.num_chunks,
                               "arrays": _describe_arrays(self.group), "teachers": {}}
        for t in self.teachers:
            a = self.teacher_attrs(t)
            pending = len(self.pending_chunks(t))
            out["teachers"][t] = {**a, "chunks_done": self.info.num_chunks - pending,
                                  "arrays": _describe_arrays(self._teacher_group(t))}
            if a.get(VERIFY_ATTR):  # `loca-pipe verify` found bad chunks: never reported as complete
                out["teachers"][t]["complete"] = False
        return out


def _describe_arrays(group: zarr.Group) -> dict[str, dict[str, Any]]:
    """``{name: {shape, dtype, written_by}}`` of the arrays in ``group``, the writer from the table (pipeline/layout.py)."""
    from loca_pipe.pipeline import layout

    out = {}
    for k in sorted(group.array_keys()):
        arr, spec = group[k], layout.spec(k)
        out[k] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                  "written_by": spec.writer if spec is not None else "write_chunk (top-k codec)"}
    return out


class TeacherWriter:
    """Writes one teacher chunk by chunk; each chunk is whole before its done flag is set."""

    def __init__(self, store: LogitStore, name: str, group: zarr.Group):
        self.store, self.name, self.group = store, name, group
        a = dict(group.attrs[ATTR])
        self.top_k, self.temperatures, self.logits_dtype = a["top_k"], a["temperatures"], a["logits_dtype"]
        from loca_pipe.pipeline.codecs import codec_of

        self.codec = codec_of(a)
        from loca_pipe.pipeline import layout

        R = store.info.num_rows
        summary = layout.arrays(layout.TEACHER, writer=layout.SUMMARY)
        # what write_chunk needs (the codec's inputs, then the other summaries this teacher stores) and writes as is
        self.plain = [a.name for a in summary if not a.codec and (a.name in group or a.name != "logits")]
        self.need = [a.name for a in summary if a.codec] + [k for k in self.plain if k != "logits"] + \
            (["logits"] if "logits" in self.plain else [])
        standard = {*(a.name for a in layout.arrays(layout.TEACHER) if a.writer != layout.JOB),
                    *self.codec.arrays(store.info.num_classes, 1, 1)}
        # the job's own row arrays (e.g. sampled ids): written with each chunk, before its done flag
        self.extra_rows = list(a["row_arrays"]) if "row_arrays" in a else \
            [k for k in group.array_keys() if k not in standard and group[k].shape[:1] == (R,)]

    def pending_chunks(self) -> list[int]:
        return self.store.pending_chunks(self.name)

    def write_chunk(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk ``c``: ``arrays`` holds topk_logits, topk_ids, lse, label_logit (and logits if stored,
        and the teacher's extra row arrays); the codec turns the top-k into what is stored, then the flag."""
        sl = self.store.info.chunk_slice(c)
        n = sl.stop - sl.start
        for k in self.need + self.extra_rows:
            if k not in arrays:
                raise StoreError(f"chunk {c}: missing array {k!r}")
            if arrays[k].shape[0] != n:
                raise StoreError(f"chunk {c}: {k} has {arrays[k].shape[0]} rows, the chunk has {n}")
        if self.logits_dtype:
            with np.errstate(over="ignore"):  # overflow is detected just below, with the row numbers
                z = np.asarray(arrays["logits"]).astype(self.logits_dtype)
            if not np.isfinite(z).all():
                bad = np.flatnonzero(~np.isfinite(z).all(axis=1)) + sl.start
                raise NumericsError(f"logits of rows {bad[:20].tolist()} overflow {self.logits_dtype}; "
                                    f"cache with --logits-dtype float32")
            self.group["logits"][sl] = z
        from loca_pipe.pipeline.codecs import encode_checked

        coded = encode_checked(self.codec, np.asarray(arrays["topk_logits"], np.float32), np.asarray(arrays["topk_ids"]),
                               np.asarray(arrays["lse"], np.float32), self.temperatures, self.store.info.num_classes)
        for k in self.extra_rows:
            self.group[k][sl] = np.asarray(arrays[k]).astype(self.group[k].dtype)
        for k, v in {**coded, **{k: arrays[k] for k in self.plain if k != "logits"}}.items():
            self.group[k][sl] = np.asarray(v).astype(self.group[k].dtype)
        self.group["done"][c] = 1

    def finalize(self) -> bool:
        """Mark the teacher complete if every chunk is done; returns whether it is."""
        if self.pending_chunks():
            return False
        a = dict(self.group.attrs[ATTR])
        if a.get("complete"):
            return True  # already finalised: keep its record untouched
        a.update(complete=True, finished=now())
        self.group.attrs[ATTR] = a
        return True


def _is_checksum_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "checksum" in str(exc).lower()


def chunk_key(arr: zarr.Array, c: int) -> str:
    """The store key of row chunk ``c`` of ``arr`` (default v3 chunk-key encoding: ``c/<i>/<j>…``)."""
    return f"{arr.path}/c/" + "/".join([str(c)] + ["0"] * (arr.ndim - 1))


# -- fast checked reads of raw local chunks ----------------------------------------------------------
# zarr's read path (async hand-offs, a buffer per chunk, a copy into the output) costs several times the
# disk read on uncompressed arrays. For a local array stored raw (BytesCodec little-endian + CRC32C, the
# store's default for float arrays) the chunk files are read straight into the output with ``readinto``
# and their CRC32C (google-crc32c, the C implementation zarr itself uses) is computed piece by piece while
# the bytes are still in the CPU cache: one copy from the page cache and one checksum pass, nothing else.
# Any other layout (compressed, fsspec URL, big-endian) goes through zarr, with the same error contract.

CRC_PIECE_BYTES = 1 << 18  # checksum each 256 KiB right after reading it (in L2; measured 1.29× np.load vs 1.41× at 1 MiB)
# Reads of at least this many bytes may use READ_THREADS threads (interleaved chunks). One by default: measured
# on this shared 2-core VM (load ≈ 5), best of 6, 1.28 GB of fp16 logits: 1 thread 1.30× np.load of the
# same .npy, 2 threads 1.75× (on a 400 MB read at lower load 2 threads were faster, 0.6–1.0×).
PARALLEL_READ_BYTES = 64 << 20
READ_THREADS = 1


@dataclass(frozen=True)
class RawChunks:
    """Where and how the row chunks of a raw local array live (see :func:`raw_chunks`)."""

    folder: str
    chunk_rows: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    key: Any  # chunk index → key inside the array folder ("c/5/0")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def file(self, c: int) -> str:
        import os

        return os.path.join(self.folder, *self.key(c).split("/"))


def raw_chunks(arr: zarr.Array) -> RawChunks | None:
    """The chunk layout of ``arr`` when its chunks can be read as plain files (local store, zarr v3, raw bytes
    + CRC32C, C order, chunks spanning all but the first axis); None otherwise."""
    import os

    if isinstance(arr, CheckedArray):
        arr = arr.zarr
    try:
        md = arr.metadata
        store = arr.store
        if getattr(md, "zarr_format", None) != 3 or not isinstance(store, zarr.storage.LocalStore):
            return None
        codecs = tuple(md.codecs)
        if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], Crc32cCodec)
                or arr.order != "C" or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or arr.ndim < 1):
            return None
        dtype = np.dtype(arr.dtype)
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if dtype.itemsize > 1 and endian != "little":
            return None
        ndim = arr.ndim
        return RawChunks(folder=os.path.join(str(store.root), *arr.path.split("/")), chunk_rows=int(arr.chunks[0]),
                         shape=tuple(int(n) for n in arr.shape), dtype=dtype.newbyteorder("<"),
                         fill_value=arr.fill_value, key=lambda c: md.encode_chunk_key((int(c),) + (0,) * (ndim - 1)))
    except (AttributeError, TypeError, ValueError):
        return None


def _crc_error(arr_path: str, lay: RawChunks, c: int, why: str) -> StoreError:
    n = lay.shape[0]
    folder = lay.folder.replace("\\", "/")
    store_root = folder[:-len(arr_path)].rstrip("/") if arr_path != "?" and folder.endswith(arr_path) else "STORE"
    return StoreError(
        f"array {arr_path!r} of the logit store: chunk {c} (rows {c * lay.chunk_rows}..{min(n, (c + 1) * lay.chunk_rows) - 1}, "
        f"file {arr_path + '/' + lay.key(c)!r}) {why} — the file is corrupted (disk or copy error), so its numbers "
        f"cannot be trusted; run `loca-pipe verify {store_root} --repair` (it marks the bad chunks not done), then "
        f"the same `loca-pipe cache-logits` command (`lm-cache` for a token store) again to rewrite only them")


def read_raw_chunk(lay: RawChunks, c: int, out: np.ndarray, arr_path: str = "?", row0: int = 0,
                   scratch: np.ndarray | None = None) -> np.ndarray:
    """Read rows ``row0 ..`` of row chunk ``c`` (as many as ``out`` holds) into ``out`` (C-contiguous, the
    array's dtype and trailing shape), checking the chunk's CRC32C over all its bytes; returns ``out``.

    A missing chunk file is the array's fill value (zarr writes no chunk that equals it); a file of the wrong
    size or a checksum mismatch raises a StoreError naming the array, the chunk, its rows and its file.
    ``scratch``: a reusable uint8 buffer for the bytes of the chunk that ``out`` does not take.
    """
    import google_crc32c

    rb = lay.row_bytes
    full = lay.chunk_rows * rb
    want = out.shape[0] * rb
    if row0 < 0 or row0 * rb + want > full or not out.flags.c_contiguous:
        raise ValueError(f"rows {row0}..{row0 + out.shape[0]} outside chunk of {lay.chunk_rows} rows, or out not contiguous")
    try:
        fh = open(lay.file(c), "rb", buffering=0)
    except FileNotFoundError:
        out[...] = lay.fill_value
        return out
    with fh:
        import os

        size = os.fstat(fh.fileno()).st_size
        if size != full + 4:
            raise _crc_error(arr_path, lay, c, f"has {size:,} bytes where {full + 4:,} were written")
        dst = out.reshape(-1).view(np.uint8)
        if scratch is None or scratch.size < CRC_PIECE_BYTES:
            scratch = np.empty(CRC_PIECE_BYTES, np.uint8)
        crc = 0
        pos = 0  # byte offset inside the chunk's data
        begin, end = row0 * rb, row0 * rb + want
        while pos < full:
            if begin <= pos < end:  # bytes that belong to ``out``: read them in place
                n = min(CRC_PIECE_BYTES, end - pos)
                buf = dst[pos - begin:pos - begin + n]
            else:  # bytes outside ``out`` (edge padding, rows before row0 or after): scratch
                stop = begin if pos < begin else full
                n = min(scratch.size, stop - pos)
                buf = scratch[:n]
            got = fh.readinto(buf)
            if got != n:
                raise _crc_error(arr_path, lay, c, "ended early while being read")
            crc = google_crc32c.extend(crc, buf)
            pos += n
        stored = fh.read(4)
    if len(stored) != 4 or int.from_bytes(stored, "little") != crc:
        raise _crc_error(arr_path, lay, c, "failed its CRC32C checksum")
    return out


def read_rows_fast(arr: zarr.Array, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray | None:
    """Rows [start, stop) of a raw local array through :func:`read_raw_chunk` (None when ``arr`` has another
    layout; the caller then reads through zarr)."""
    lay = raw_chunks(arr)
    if lay is None:
        return None
    z = arr.zarr if isinstance(arr, CheckedArray) else arr
    n = lay.shape[0]
    start, stop = max(0, start), min(n, stop)
    if out is None:
        out = np.empty((max(0, stop - start),) + lay.shape[1:], lay.dtype)
    ch = lay.chunk_rows
    spans = []
    r = start
    while r < stop:
        c = r // ch
        hi = min(stop, (c + 1) * ch)
        spans.append((c, r, hi))
        r = hi

    def run(part: list[tuple[int, int, int]]) -> None:
        scratch = np.empty(CRC_PIECE_BYTES, np.uint8)
        for c, lo, hi in part:
            read_raw_chunk(lay, c, out[lo - start:hi - start], z.path, row0=lo - c * ch, scratch=scratch)

    threads = READ_THREADS if (stop - start) * lay.row_bytes >= PARALLEL_READ_BYTES and len(spans) > 1 else 1
    if threads <= 1:
        run(spans)
    else:  # readinto releases the GIL: one thread's disk copy overlaps the other's checksum
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(run, [spans[i::threads] for i in range(threads)]))
    return out


def read_checked(arr: zarr.Array, rows: Any = None) -> np.ndarray:
    """``arr[rows]`` (None: all; a slice; or row indices) that turns a CRC32C mismatch into a StoreError.

    zarr raises a bare ValueError ("Stored and computed checksum do not match") without saying where; this
    re-reads the touched row chunks one by one and names the array, the chunk, its rows and its file.
    """
    if isinstance(arr, CheckedArray):
        arr = arr.zarr
    if rows is None or (isinstance(rows, slice) and rows.step in (None, 1)):
        start, stop, _ = (rows or slice(None)).indices(arr.shape[0])
        fast = read_rows_fast(arr, start, stop) if arr.ndim >= 1 else None
        if fast is not None:
            return fast
    if rows is None:
        return _checked(arr, lambda: arr[...], None)
    if isinstance(rows, slice):
        return _checked(arr, lambda: arr[rows], rows)
    idx = np.asarray(rows, dtype=np.int64)
    return _checked(arr, lambda: arr.oindex[idx], idx)


def _checked(arr: zarr.Array, read: Any, rows: Any) -> np.ndarray:
    try:
        return read()
    except ValueError as exc:
        if not _is_checksum_error(exc):
            raise
        ch, n = arr.chunks[0], arr.shape[0]
        if rows is None:
            chunks = range(math.ceil(n / ch))
        elif isinstance(rows, slice):
            r = range(*rows.indices(n))
            chunks = sorted({i // ch for i in r}) if len(r) else []
        else:
            chunks = sorted({int(i) // ch for i in np.asarray(rows).ravel()})
        bad = []
        for c in chunks:
            try:
                arr[c * ch:min(n, (c + 1) * ch)]
            except ValueError as e2:
                if _is_checksum_error(e2):
                    bad.append(c)
        where = bad[0] if bad else None
        names = ", ".join(f"chunk {c} (rows {c * ch}..{min(n, (c + 1) * ch) - 1}, file {chunk_key(arr, c)!r})"
                          for c in bad[:5]) or "a chunk"
        raise StoreError(
            f"array {arr.path!r} of the logit store: {names} failed its CRC32C checksum — the file is corrupted "
            f"(disk or copy error), so its numbers cannot be trusted; run `loca-pipe verify {_location(arr)} --repair` (it "
            f"marks the bad chunks not done), then the same `loca-pipe cache-logits` command (`lm-cache` for a token store) again to rewrite only them") from exc \
            if where is not None else exc


def _location(arr: zarr.Array) -> str:
    """The folder or URL of the store holding ``arr`` (``STORE`` when the back-end does not say)."""
    st = arr.store_path.store
    where = getattr(st, "root", None) or getattr(st, "path", None)
    return str(where) if where else "STORE"


class CheckedArray:
    """A zarr array whose reads (``a[sel]``, ``a.oindex[idx]``) turn a CRC32C mismatch into a StoreError naming
    the array, the row chunk and its file; every other attribute is the zarr array's (``.zarr`` is the array)."""

    def __init__(self, arr: zarr.Array):
        self.zarr = arr

    def __getattr__(self, name: str) -> Any:
        return getattr(self.zarr, name)

    def __len__(self) -> int:
        return self.zarr.shape[0]

    def __getitem__(self, sel: Any) -> np.ndarray:
        first, rest = (sel[0], sel[1:]) if isinstance(sel, tuple) and sel else (sel, ())
        if isinstance(first, slice) and first.step in (None, 1) and self.zarr.ndim >= 1 and len(rest) < self.zarr.ndim:
            start, stop, _ = first.indices(self.zarr.shape[0])
            fast = read_rows_fast(self.zarr, start, stop)
            if fast is not None:
                return fast[(slice(None),) + tuple(rest)] if rest else fast
        return _checked(self.zarr, lambda: self.zarr[sel], _rows_of(sel, self.zarr.shape[0]))

    def read_chunk(self, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of row chunk ``c`` (CRC32C checked), read into ``out`` when given (fast for raw local arrays)."""
        n, ch = self.zarr.shape[0], self.zarr.chunks[0]
        lo, hi = c * ch, min(n, (c + 1) * ch)
        lay = raw_chunks(self.zarr)
        if lay is None:
            data = read_checked(self.zarr, slice(lo, hi))
            if out is None:
                return data
            out[...] = data
            return out
        if out is None:
            out = np.empty((hi - lo,) + lay.shape[1:], lay.dtype)
        return read_raw_chunk(lay, c, out, self.zarr.path)

    def __setitem__(self, sel: Any, value: Any) -> None:
        self.zarr[sel] = value

    @property
    def oindex(self) -> "_CheckedOIndex":
        return _CheckedOIndex(self.zarr)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class _CheckedOIndex:
    def __init__(self, arr: zarr.Array):
        self.arr = arr

    def __getitem__(self, sel: Any) -> np.ndarray:
        return _checked(self.arr, lambda: self.arr.oindex[sel], _rows_of(sel, self.arr.shape[0]))


def _rows_of(sel: Any, n: int) -> Any:
    """The row selection (first axis) of an index expression: None (all), a slice, or indices."""
    first = sel[0] if isinstance(sel, tuple) and sel else sel
    if first is Ellipsis or (isinstance(sel, tuple) and not sel):
        return None
    if isinstance(first, slice):
        return first
    if isinstance(first, (int, np.integer)):
        i = int(first) % max(1, n)
        return slice(i, i + 1)
    return np.asarray(first).ravel()


class TeacherView:
    """Read access to one complete teacher: zarr arrays plus exact probabilities at any stored τ."""

    def __init__(self, store: LogitStore, name: str, group: zarr.Group):
        self.store, self.name, self.group = store, name, group
        self.attrs = dict(group.attrs[ATTR])
        self.temperatures: list[float] = list(self.attrs["temperatures"])
        self.top_k: int = int(self.attrs["top_k"])
        self.has_full_logits: bool = "logits" in group

    def __getitem__(self, key: str) -> "CheckedArray":
        """Array ``key`` (a zarr array wrapper whose reads name a chunk that fails its CRC32C)."""
        from loca_pipe.pipeline import layout

        if layout.spec(key) is not None and layout.spec(key).where == layout.ROOT and layout.spec(key).writer == layout.ROWS:
            return CheckedArray(self.store.group[key])
        if key not in self.group:
            raise StoreError(f"teacher {self.name!r} has no array {key!r}; it has {sorted(self.group.array_keys())}")
        return CheckedArray(self.group[key])

    def read(self, key: str, rows: Any = None) -> np.ndarray:
        """Rows of array ``key`` (all, a slice or indices); a chunk failing its CRC32C raises a StoreError naming it."""
        return read_checked(self[key].zarr, rows)

    def tau_index(self, tau: float) -> int:
        i = find_tau(self.temperatures, tau)
        if i is not None:
            return i
        if self.has_full_logits:
            return -1
        raise StoreError(f"temperature {tau} was not declared when teacher {self.name!r} was cached (it has "
                         f"{self.temperatures}) and the store keeps only top-k logits, so p at τ={tau} is unknowable; "
                         f"pass --tau as one of {self.temperatures}, or re-cache with --temperatures including {tau}")

    # -- exact probabilities ------------------------------------------------------------------------
    @staticmethod
    def _read(arr: zarr.Array, rows: Any) -> np.ndarray:
        return read_checked(arr, rows)

    def lse(self, tau: float, rows: Any = None) -> np.ndarray:
        """logsumexp(z/τ) per row (n,) float64: stored when τ was declared, else from the full logits."""
        i = self.tau_index(tau)
        if i >= 0:
            return self._read(self.group["lse"], rows)[:, i].astype(np.float64)
        z = self._read(self.group["logits"], rows).astype(np.float64) / tau
        m = z.max(axis=1, keepdims=True)
        return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]

    def probs(self, tau: float, rows: Any = None) -> np.ndarray:
        """Dense p = softmax(z/τ) (n, C) float32 from the full logits (any τ); needs full logits."""
        if not self.has_full_logits:
            raise StoreError(f"teacher {self.name!r} keeps only top-{self.top_k} logits; use .sparse(tau) "
                             f"(top-k + label probabilities) or re-cache with full logits")
        z = self._read(self.group["logits"], rows).astype(np.float64) / tau
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def sparse(self, tau: float, rows: Any = None) -> dict[str, np.ndarray]:
        """Exact top-k and label probabilities at τ: p_i = exp(z_i/τ − lse_τ) (docs/store-format.md).

        Returns ``topk_ids`` (n, K) int64, ``topk_probs`` (n, K) float32 (descending), ``label`` (n,) int64
        and ``label_prob`` (n,) float32 (p_y, exact even when y is outside the top-k).
        """
        lse = self.lse(tau, rows)[:, None]
        topv = self._read(self.group["topk_logits"], rows).astype(np.float64)
        return {"topk_ids": self._read(self.group["topk_ids"], rows).astype(np.int64),
                "topk_probs": np.exp(topv / tau - lse).astype(np.float32),
                "label": self._read(self.store.group["label"], rows).astype(np.int64),
                "label_prob": np.exp(self._read(self.group["label_logit"], rows).astype(np.float64) / tau
                                     - lse[:, 0]).astype(np.float32)}


# ----------------------------------------------------------------------------------------------------
# Verification on demand (`loca-pipe verify`) and chunk-wise repair: mark exactly the bad chunks not done,
# so re-running the same `loca-pipe cache-logits` command rewrites only those.

VERIFY_ATTR = "verify_failed"  # teacher attribute set by verify_store(record=True) while bad chunks are known


INDEX_FLAG = "index"  # BadChunk.flag of a token store's offsets / position chunk (pipeline/lm/cache.py::_write_index)


@dataclass(frozen=True)
class BadChunk:
    """One chunk file that failed verification."""

    array: str                 # array path in the store, e.g. 'teachers/strong/logits'
    chunk: tuple[int, ...]     # chunk grid coordinates
    file: str                  # the chunk's store key (its file, relative to the store folder)
    reason: str                # 'CRC32C mismatch' | 'missing file' | a decoding error
    teachers: tuple[str, ...]  # teachers whose data it is (every teacher for the shared row arrays)
    row_chunk: int | None      # the store's row chunk it belongs to (None: not row-aligned)
    flag: str | None           # the done-flag array that repair clears for it (INDEX: a token store's sequence
                               # index, rewritten from the data by the next lm-cache; None: not repairable chunk-wise)

    def describe(self) -> str:
        rows = f", row chunk {self.row_chunk}" if self.row_chunk is not None else ""
        return f"array {self.array!r} chunk {list(self.chunk)}{rows} (file {self.file!r}): {self.reason}"


def _chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _key_exists(arr: zarr.Array, key: str) -> bool:
    from zarr.core.sync import sync

    return bool(sync(arr.store_path.store.exists(key)))


def _flag_for(group: zarr.Group, name: str, arr: zarr.Array, info: StoreInfo, flag: str) -> tuple[str | None, Any]:
    """(flag array name, how a chunk coordinate maps to its flag index) for array ``name`` of ``group``.

    From the array's table entry (pipeline/layout.py) when it has one; a codec's own top-k arrays (and arrays
    of older stores) are mapped by their shape."""
    from loca_pipe.pipeline import layout

    spec = layout.spec(name)
    if spec is not None:
        if spec.writer == layout.INDEX:  # offsets / position: a function of the data, rewritten whole chunks at open
            return INDEX_FLAG, lambda co: co[0]
        if spec.writer == layout.FLAG:
            return name, lambda co: co[0]
        if spec.flag is not None:
            return (spec.flag, lambda co: co[0]) if spec.flag in group.array_keys() else (None, None)
        if spec.dims[0] == "row":
            return flag, lambda co: co[0]
        return None, None
    if name == flag or name.endswith("_done"):  # a flag array: chunk c of it is flag c
        return name, lambda co: co[0]
    if arr.ndim >= 1 and arr.shape[0] == info.num_rows and arr.chunks[0] == info.chunk_rows:
        return flag, lambda co: co[0]
    prefix = name.split("_")[0]
    side = f"{prefix}_done"
    if side != name and side in group.array_keys() and group[side].shape[0] == arr.cdata_shape[0]:
        return side, lambda co: co[0]  # e.g. LM greedy_ids chunk g ↔ greedy_done[g]
    return None, None


def _scan_group(group: zarr.Group, names: Iterable[str], info: StoreInfo, flag: str, owners: tuple[str, ...],
                done: dict[str, np.ndarray], bar: Any) -> list[BadChunk]:
    bad: list[BadChunk] = []
    for name in names:
        arr = group[name]
        fname, to_flag = _flag_for(group, name, arr, info, flag)
        for coords in np.ndindex(*arr.cdata_shape):
            coords = tuple(int(c) for c in coords)
            key = _chunk_key(arr, coords)
            reason = None
            try:
                arr.blocks[coords]
            except ValueError as exc:
                reason = "CRC32C mismatch (the file is corrupted)" if _is_checksum_error(exc) else f"unreadable ({exc})"
            except Exception as exc:  # a decoder error on garbage bytes (zstd, truncated file)
                reason = f"unreadable ({type(exc).__name__}: {exc})"
            if reason is None and np.issubdtype(arr.dtype, np.signedinteger) and arr.fill_value is not None \
                    and int(arr.fill_value) < 0 and fname is not None and (fname in done or fname == INDEX_FLAG):
                # an id/label array never holds only its negative fill value where the chunk is marked done (a
                # token store's index is written whole when the store is opened)
                idx = to_flag(coords)
                marked = fname == INDEX_FLAG or (idx < len(done[fname]) and done[fname][idx])
                if marked and not _key_exists(arr, key):
                    reason = "missing file (chunk marked done)"
            if reason is not None:
                rc = coords[0] if (arr.ndim >= 1 and arr.shape[0] == info.num_rows
                                   and arr.chunks[0] == info.chunk_rows) or name == flag else None
                bad.append(BadChunk(arr.path, coords, key, reason, owners, rc, fname))
            bar.update(1)
    return bad


def _flags(group: zarr.Group) -> dict[str, np.ndarray]:
    out = {}
    for name in group.array_keys():
        if name == "done" or name.endswith("_done"):
            try:
                out[name] = group[name][:]
            except ValueError:  # a corrupted flag chunk: verify names it; treat flags as unknown
                out[name] = np.zeros(group[name].shape, np.uint8)
    return out


def verify_store(path: str, teachers: Iterable[str] | None = None, record: bool = True,
                 progress: bool = False) -> dict[str, Any]:
    """Check every chunk of every array (the shared row arrays and each teacher's) against its CRC32C.

    Returns ``{"path", "task", "chunks_checked", "bad": [BadChunk…], "teachers": {name: [bad row chunks]}}``. With
    ``record``, a teacher with bad chunks gets the attribute ``verify_failed`` (its chunks and the time), so
    ``describe``/``loca-pipe info`` no longer call it complete; a later clean verify or a repair removes it.
    """
    from loca_pipe.pipeline.progress import progress_bar

    store = LogitStore.open(path, mode="r+" if record else "r")
    names = list(teachers) if teachers else store.teachers
    for t in names:
        store._teacher_group(t)  # unknown teacher → StoreError naming the ones there
    root = store.group
    row_names = [k for k in root.array_keys()]
    total = sum(int(np.prod(root[k].cdata_shape)) for k in row_names)
    groups = {t: store._teacher_group(t) for t in names}
    total += sum(int(np.prod(g[k].cdata_shape)) for g in groups.values() for k in g.array_keys())
    bad: list[BadChunk] = []
    with progress_bar(total=total, desc="verify", unit="chunk", enabled=progress) as bar:
        bad += _scan_group(root, row_names, store.info, "rows_done", tuple(store.teachers), _flags(root), bar)
        for t, g in groups.items():
            bad += _scan_group(g, list(g.array_keys()), store.info, "done", (t,), _flags(g), bar)
    per: dict[str, list[int]] = {t: sorted({b.row_chunk for b in bad if t in b.teachers and b.row_chunk is not None})
                                 for t in names}
    if record:
        try:
            _record_verify(store, groups, bad, per)
        except (StoreError, OSError) as exc:  # a read-only copy can still be verified
            import logging

            logging.getLogger(__name__).warning("verify: result not recorded in %s (%s)", path, exc)
    return {"path": str(path), "task": store.info.task, "chunks_checked": total, "bad": bad, "teachers": per}


def _record_verify(store: "LogitStore", groups: dict[str, zarr.Group], bad: list[BadChunk],
                   per: dict[str, list[int]]) -> None:
    with io_guard(store.path, "recording the verify result"):
        for t in groups:
            a = store.teacher_attrs(t)
            if not a:  # its creation was interrupted: nothing of it counts yet, nothing to record
                continue
            hit = [b for b in bad if t in b.teachers]
            if hit:
                a[VERIFY_ATTR] = {"time": now(), "chunks": [b.describe() for b in hit[:50]], "row_chunks": per[t]}
                groups[t].attrs[ATTR] = a
            elif VERIFY_ATTR in a:
                a.pop(VERIFY_ATTR)
                groups[t].attrs[ATTR] = a


def invalidate_chunks(path: str, bad: Iterable[BadChunk]) -> dict[str, list[int]]:
    """Repair step: delete each bad chunk file and clear the done flag it belongs to; mark the teachers
    concerned incomplete. Re-running the same `loca-pipe cache-logits` command then rewrites exactly those
    chunks (for the shared row arrays: every teacher's chunk, each by its own command).

    Takes each teacher's writer lease (a job still writing it is refused). Raises StoreError for a chunk that
    no done flag covers (it cannot be rewritten chunk-wise; re-cache the teacher with --overwrite).
    Returns ``{teacher: [row chunks cleared]}``.
    """
    from zarr.core.sync import sync

    from loca_pipe.pipeline.distributed import WriterLease

    bad = list(bad)
    store = LogitStore.open(path, mode="r+")
    loose = [b for b in bad if b.flag is None]
    if loose:
        raise StoreError(f"{len(loose)} bad chunk(s) are not covered by a done flag ({loose[0].describe()}); they "
                         f"cannot be rewritten chunk by chunk — re-cache the teacher with `{cache_command(store.info.task)} "
                         f"--overwrite` (or restore the store from a copy)")
    owners = sorted({t for b in bad for t in b.teachers})
    leases = [WriterLease(str(path), t) for t in owners]
    cleared: dict[str, set[int]] = {t: set() for t in owners}
    taken: list[Any] = []
    with io_guard(str(path), "repairing"):
        try:
            for lease in leases:
                lease.acquire()
                taken.append(lease)
            for b in bad:
                arr = store.group[b.array]
                sync(arr.store_path.store.delete(b.file))
                parent = store.group if "/" not in b.array else store.group[b.array.rsplit("/", 1)[0]]
                idx = b.chunk[0]
                if b.flag == INDEX_FLAG:  # no flag to clear: every teacher is marked incomplete until lm-cache
                    for t in store.teachers:  # has rewritten the index chunk from the data
                        cleared.setdefault(t, set())
                elif b.flag == "rows_done":  # a shared row chunk: every teacher rewrites (and re-checks) it
                    parent[b.flag][idx] = 0
                    for t in store.teachers:
                        store._teacher_group(t)["done"][idx] = 0
                        cleared.setdefault(t, set()).add(idx)
                else:
                    parent[b.flag][idx] = 0
                    for t in b.teachers:
                        cleared.setdefault(t, set()).add(idx)
            for t in cleared:
                g = store._teacher_group(t)
                a = store.teacher_attrs(t)
                if not a:
                    continue
                a.pop(VERIFY_ATTR, None)
                a["complete"] = False
                g.attrs[ATTR] = a
        finally:
            for lease in taken:
                lease.release()
    return {t: sorted(c) for t, c in cleared.items()}
