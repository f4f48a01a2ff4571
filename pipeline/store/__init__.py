"""The logit store (a package): one Zarr v3 group, one sub-group per teacher, rows written chunk by chunk.

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

The package, leaves first (no module imports one after it; none imports torch — tests/pipeline/test_imports.py):

* :mod:`.format` — constants, chunk sizing, the τ rules (``find_tau``, ``require_tau``), the write guard
  (``io_guard``), ``StoreInfo``; the array dtype and codec rules (``id_dtype``, ``array_codecs``) live with the
  array table in ``pipeline/layout.py``, the top-k codecs in ``pipeline/codecs.py``;
* :mod:`.checked` — CRC32C-checked chunk reads (also the targets store's and the token store's);
* :mod:`.teacher` — ``TeacherWriter`` and ``TeacherView``;
* :mod:`.logit_store` — ``LogitStore`` (open, create, shared rows, teachers);
* :mod:`.verify` — ``verify_store`` and ``invalidate_chunks`` (repair).

Everything is re-exported here, so ``from loca_pipe.pipeline.store import LogitStore`` and ``store.LogitStore``
keep working. ``summarize_logits`` (torch) lives in the caching engine, ``pipeline/caching.py``.
"""

from __future__ import annotations

from typing import Any

from loca_pipe.pipeline.io import versions
from loca_pipe.pipeline.layout import array_codecs, id_dtype
from loca_pipe.pipeline.store.checked import (
    CRC_PIECE_BYTES,
    PARALLEL_READ_BYTES,
    READ_THREADS,
    CheckedArray,
    RawChunks,
    chunk_key,
    raw_chunks,
    read_checked,
    read_raw_chunk,
    read_rows_fast,
)
from loca_pipe.pipeline.store.format import (
    ATTR,
    FORMAT,
    FORMAT_VERSION,
    LOGIT_DTYPES,
    MAX_CHUNK_ROWS,
    TARGET_CHUNK_BYTES,
    TASKS,
    VERIFY_ATTR,
    StoreInfo,
    cache_command,
    default_chunk_rows,
    find_tau,
    io_guard,
    now,
    require_tau,
)
from loca_pipe.pipeline.store.logit_store import (
    LogitStore,
    dimension_names,
    dims,
    not_a_store_message,
    open_zarr_group,
    root_arrays,
    root_sizes,
)
from loca_pipe.pipeline.store.teacher import TeacherView, TeacherWriter
from loca_pipe.pipeline.store.verify import INDEX_FLAG, BadChunk, invalidate_chunks, verify_store

# The batch summaries moved to the caching engine (they need torch; the store does not). Deferred on purpose:
# ``store.summarize_logits`` still resolves for code written against the old module, without the store
# importing torch.
_MOVED_TO_CACHING = ("summarize_logits", "one_thread", "SMALL_OP_ELEMENTS", "CPU_BLOCK_ELEMENTS")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_CACHING:
        from loca_pipe.pipeline import caching

        return getattr(caching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTR", "BadChunk", "CRC_PIECE_BYTES", "CheckedArray", "FORMAT", "FORMAT_VERSION", "INDEX_FLAG", "LOGIT_DTYPES",
    "LogitStore", "MAX_CHUNK_ROWS", "PARALLEL_READ_BYTES", "READ_THREADS", "RawChunks", "StoreInfo",
    "TARGET_CHUNK_BYTES", "TASKS", "TeacherView", "TeacherWriter", "VERIFY_ATTR", "array_codecs", "cache_command",
    "chunk_key", "default_chunk_rows", "dimension_names", "dims", "find_tau", "id_dtype", "invalidate_chunks",
    "io_guard", "not_a_store_message", "now", "open_zarr_group", "raw_chunks", "read_checked", "read_raw_chunk",
    "read_rows_fast", "require_tau", "root_arrays", "root_sizes", "verify_store", "versions",
]
