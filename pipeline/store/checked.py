"""Checked chunk reads: every read of a logit, targets or token store goes through here, so a chunk failing its
CRC32C becomes a StoreError naming the array, the row chunk, its rows and its file (never zarr's bare ValueError).

Raw local arrays (BytesCodec little-endian + CRC32C) are read straight from their chunk files (:func:`read_raw_chunk`);
any other layout goes through zarr with the same error contract (:func:`read_checked`, :class:`CheckedArray`).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from loca_pipe.pipeline.errors import StoreError


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
        return os.path.join(self.folder, *self.key(c).split("/"))


def raw_chunks(arr: zarr.Array) -> RawChunks | None:
    """The chunk layout of ``arr`` when its chunks can be read as plain files (local store, zarr v3, raw bytes
    + CRC32C, C order, chunks spanning all but the first axis); None otherwise."""
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


TARGETS_FORMAT = "loca-pipe/targets"  # pipeline/targets.py's FORMAT: its chunks go through these reads too


def _advice(root: str, fmt: str | None) -> tuple[str, str]:
    """(what the store is, how to rewrite a corrupted chunk of it) for a store of format ``fmt`` at ``root``."""
    if fmt == TARGETS_FORMAT:
        return ("targets store", f"re-run the same `loca-pipe calibrate` command with --overwrite to rewrite {root} "
                                 f"from its logit store")
    return ("logit store", f"run `loca-pipe verify {root} --repair` (it marks the bad chunks not done), then the same "
                           f"`loca-pipe cache-logits` command (`lm-cache` for a token store) again to rewrite only them")


def _format_at(folder: str) -> str | None:
    """The ``loca_pipe.format`` attribute of the local Zarr group at ``folder`` (None if unreadable)."""
    try:
        with open(os.path.join(folder, "zarr.json")) as fh:
            return ((json.load(fh).get("attributes") or {}).get("loca_pipe") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _crc_error(arr_path: str, lay: RawChunks, c: int, why: str) -> StoreError:
    n = lay.shape[0]
    folder = lay.folder.replace("\\", "/")
    store_root = folder[:-len(arr_path)].rstrip("/") if arr_path != "?" and folder.endswith(arr_path) else "STORE"
    what, fix = _advice(store_root, _format_at(store_root) if store_root != "STORE" else None)
    return StoreError(
        f"array {arr_path!r} of the {what}: chunk {c} (rows {c * lay.chunk_rows}..{min(n, (c + 1) * lay.chunk_rows) - 1}, "
        f"file {arr_path + '/' + lay.key(c)!r}) {why} — the file is corrupted (disk or copy error), so its numbers "
        f"cannot be trusted; {fix}")


def read_raw_chunk(lay: RawChunks, c: int, out: np.ndarray, arr_path: str = "?", row0: int = 0,
                   scratch: np.ndarray | None = None) -> np.ndarray:
    """Read rows ``row0 ..`` of row chunk ``c`` (as many as ``out`` holds) into ``out`` (C-contiguous, the
    array's dtype and trailing shape), checking the chunk's CRC32C over all its bytes; returns ``out``.

    A missing chunk file is the array's fill value (zarr writes no chunk that equals it); a file of the wrong
    size or a checksum mismatch raises a StoreError naming the array, the chunk, its rows and its file.
    ``scratch``: a reusable uint8 buffer for the bytes of the chunk that ``out`` does not take.
    """
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
        if where is None:
            raise exc
        root = _location(arr)
        what, fix = _advice(root, _format_at(root) if root != "STORE" and "://" not in root else None)
        raise StoreError(
            f"array {arr.path!r} of the {what}: {names} failed its CRC32C checksum — the file is corrupted "
            f"(disk or copy error), so its numbers cannot be trusted; {fix}") from exc


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
