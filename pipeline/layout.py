"""The logit store's arrays, declared once (issue #15).

``ARRAYS`` is the one table of every array a logit store (image or token) holds: where it lives, its
dimensions (which give its shape, its chunking and its zarr ``dimension_names``), its dtype rule, its codec
rule, who writes it and when it is present. Store creation (``LogitStore.create_or_open``,
``begin_teacher``), the chunk writer's expected keys, ``TeacherView``'s root reads, ``verify_store``'s flag
mapping and docs/store-format.md's Layout block (``render_layout``, checked by a test) all read it, so a new
array is one entry here plus its computation.

Sizes of the dimensions (``Sizes.dims``):
  row = R rows, class = C, k = K (top-k), temperature = T, chunk = n_chunks, aug_param = P,
  draw = S sampled ids per row, sequence = N sequences, sequence_edge = N + 1, new_token = G greedy tokens,
  greedy_chunk = number of greedy chunks; imported = 1 in a store written by ``lm-import`` (no array has it as a
  dimension: it only switches ``import_flags`` on).
The first dimension decides the chunking (``CHUNKS``): rows by ``chunk_rows``, flags one per chunk file
(concurrent writers never share a flag file), sequences by the greedy chunk, the offsets in 2¹⁶ pieces;
every other dimension is one chunk. An array whose dimensions are not all known and non-zero (no views →
no ``aug_params``, no draws → no ``sampled_ids``) or whose dtype rule gives None (``--logits-dtype none``) is
absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from loca_pipe.pipeline.codecs import id_dtype

ROOT, TEACHER = "root", "teacher"

# writer of each array
ROWS = "write_rows"          # LogitStore.write_rows: the shared per-row arrays
SUMMARY = "write_chunk"      # TeacherWriter.write_chunk, from summarize_logits (and the teacher's logits)
JOB = "write_chunk (job)"    # TeacherWriter.write_chunk, the caching job's own row arrays (listed in row_arrays)
FLAG = "flag"                # set once chunk c of the arrays it covers is whole
INDEX = "lm index"           # pipeline/lm/cache.py::_write_index, once per token store
FINISH = "lm finish"         # pipeline/lm/cache.py's greedy pass, chunk by chunk

LETTERS = {"row": "R", "class": "C", "k": "K", "temperature": "T", "chunk": "n_chunks", "aug_param": "P",
           "draw": "S", "sequence": "N", "sequence_edge": "N+1", "new_token": "G", "greedy_chunk": "n_greedy"}


def array_codecs(dtype: np.dtype, compress: bool = False) -> dict[str, Any]:
    """The zarr codecs of every array the project writes (store, targets, token index): the one helper.

    Integers (ids, labels, flags) get zstd always, floats only when ``compress``; CRC32C goes on everything.
    """
    # Logits barely compress (zstd ~1.09x, blosc-lz4 1.00x on fp16; docs/store-format.md), so float arrays are
    # stored raw by default; integers (ids, labels) compress well. CRC32C goes on everything.
    comp: list[Any] = []
    if compress or np.dtype(dtype).kind in "iub":
        comp.append(ZstdCodec(level=1))
    comp.append(Crc32cCodec())
    return {"serializer": BytesCodec(), "compressors": comp}


@dataclass(frozen=True)
class Sizes:
    """What the shape, chunk and dtype rules are evaluated on."""

    dims: dict[str, int]
    chunks: dict[str, int]           # chunk length of a first dimension (row → chunk_rows, sequence → greedy_chunk)
    num_classes: int
    logits_dtype: str | None = None
    compress_logits: bool = False
    task: str = "classification"


def _chunk_of(first: str, n: int, s: Sizes) -> int:
    if first in ("chunk", "greedy_chunk"):
        return 1
    if first == "sequence_edge":
        return max(1, min(n, 1 << 16))
    return s.chunks[first]


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store."""

    name: str
    where: str                                  # ROOT (the store group) or TEACHER (teachers/<name>/)
    dims: tuple[str, ...]                       # dimension names: shape, chunking and zarr dimension_names
    dtype: Callable[[Sizes], Any]               # the dtype rule (None: the array is not stored)
    fill: Any
    compress: Callable[[Sizes], bool]           # zstd on a float array (integers always get zstd: array_codecs)
    writer: str
    doc: str
    dtype_doc: str = ""                         # how the dtype rule reads in the docs (default: the dtype)
    codec: bool = False                         # a top-k array: stored through the teacher's top-k codec
    flag: str | None = None                     # the done flag covering it (None: the group's row flag for row arrays)
    tasks: tuple[str, ...] = ("classification", "causal-lm")
    note: str = ""                              # when it is present, for the docs

    def shape(self, s: Sizes) -> tuple[int, ...] | None:
        if any(s.dims.get(d, 0) <= 0 for d in self.dims):
            return None
        return tuple(int(s.dims[d]) for d in self.dims)

    def chunks(self, s: Sizes) -> tuple[int, ...]:
        shape = self.shape(s)
        assert shape is not None
        return (_chunk_of(self.dims[0], shape[0], s),) + shape[1:]

    def present(self, s: Sizes) -> bool:
        return s.task in self.tasks and self.shape(s) is not None and self.dtype(s) is not None


def _fixed(dt: Any) -> Callable[[Sizes], Any]:
    return lambda s: np.dtype(dt)


def _always(flag: bool) -> Callable[[Sizes], bool]:
    return lambda s: flag


def _id_dtype(s: Sizes) -> np.dtype:
    return id_dtype(s.num_classes)


ARRAYS: tuple[ArraySpec, ...] = (
    # -- the store group: shared by every teacher --------------------------------------------------------
    ArraySpec("sample_id", ROOT, ("row",), _fixed(np.int64), -1, _always(True), ROWS, "data-set index of the row's sample"),
    ArraySpec("label", ROOT, ("row",), _fixed(np.int64), -1, _always(True), ROWS, "the sample's class (token stores: the response token)"),
    ArraySpec("view", ROOT, ("row",), _fixed(np.int16), -1, _always(True), ROWS, "view index v (0 when views are not cached)"),
    ArraySpec("aug_params", ROOT, ("row", "aug_param"), _fixed(np.float32), 0.0, _always(True), ROWS,
              "crop-flip [top, left, flip] per row", note="only when views > 0"),
    ArraySpec("rows_done", ROOT, ("chunk",), _fixed(np.uint8), 0, _always(False), FLAG,
              "1 once chunk c of the row arrays above is written", flag="rows_done"),
    ArraySpec("offsets", ROOT, ("sequence_edge",), _fixed(np.int64), -1, _always(True), INDEX,
              "rows of sequence i are offsets[i] … offsets[i+1]-1", tasks=("causal-lm",), note="token stores"),
    ArraySpec("position", ROOT, ("row",), _fixed(np.int32), -1, _always(True), INDEX,
              "index of the token in its response (0 = first response token)", tasks=("causal-lm",), note="token stores"),
    # -- teachers/<name>/ --------------------------------------------------------------------------------
    ArraySpec("logits", TEACHER, ("row", "class"), lambda s: np.dtype(s.logits_dtype) if s.logits_dtype else None, 0,
              lambda s: s.compress_logits, SUMMARY, "full logits z", dtype_doc="float32 or float16",
              note="absent when cached with --logits-dtype none"),
    ArraySpec("topk_logits", TEACHER, ("row", "k"), _fixed(np.float32), 0, lambda s: s.compress_logits, SUMMARY,
              "the K largest logits, descending (ties: lower class id first)", codec=True),
    ArraySpec("topk_ids", TEACHER, ("row", "k"), _id_dtype, -1, lambda s: s.compress_logits, SUMMARY,
              "their class ids (int16 when C ≤ 32768, else int32; never a float)", dtype_doc="int16 or int32", codec=True),
    ArraySpec("lse", TEACHER, ("row", "temperature"), _fixed(np.float32), 0, _always(False), SUMMARY,
              "logsumexp(z / τ_t) for each declared temperature τ_t"),
    ArraySpec("label_logit", TEACHER, ("row",), _fixed(np.float32), 0, _always(False), SUMMARY,
              "z_label, so p_label is exact even when the label is not in the top-k"),
    ArraySpec("sampled_ids", TEACHER, ("row", "draw"), _fixed(np.int32), -1, _always(True), JOB,
              "Sparse Logit Sampling: S draws from p at sample_tau, distinct ids (most drawn first), unused -1", tasks=("causal-lm",), note="token stores, sample_draws > 0"),
    ArraySpec("sampled_counts", TEACHER, ("row", "draw"), _fixed(np.uint16), 0, _always(True), JOB,
              "their counts (counts/S estimates p), unused 0", tasks=("causal-lm",), note="token stores, sample_draws > 0"),
    ArraySpec("import_flags", TEACHER, ("row",), lambda s: np.dtype(np.uint8) if s.dims.get("imported") else None, 0,
              _always(False), JOB, "what an imported cache cannot give exactly: bit 1 = the label is outside the stored "
              "top-k (p_label unknown, at most the tail mass; label_logit holds that bound), bit 2 = the decoded top-k "
              "mass exceeded 1 and was renormalised (tail 0)", dtype_doc="uint8", tasks=("causal-lm",),
              note="token stores written by lm-import"),
    ArraySpec("greedy_ids", TEACHER, ("sequence", "new_token"), _fixed(np.int32), -1, _always(True), FINISH,
              "the teacher's greedy response to each prompt (SeqKD), -1 padded, eos not stored", flag="greedy_done", tasks=("causal-lm",),
              note="token stores, greedy_max_new_tokens > 0"),
    ArraySpec("greedy_done", TEACHER, ("greedy_chunk",), _fixed(np.uint8), 0, _always(False), FLAG,
              "1 once greedy chunk g is written", flag="greedy_done", tasks=("causal-lm",),
              note="token stores, greedy_max_new_tokens > 0"),
    ArraySpec("done", TEACHER, ("chunk",), _fixed(np.uint8), 0, _always(False), FLAG,
              "completion record: 1 once chunk c of this teacher is written", flag="done"),
)


# The targets store (pipeline/targets.py, `loca-pipe calibrate`): the same rules; "{t}" is a target's base name
# (``kd``, ``loca_<α>``), one array per target. k = K + 1 there (the top-k plus the label).
CALIBRATE = "calibrate"
TARGET_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("{t}", TEACHER, ("row", "class"), _fixed(np.float32), 0, _always(False), CALIBRATE,
              "dense target probabilities", note="form dense"),
    ArraySpec("ids", TEACHER, ("row", "k"), _id_dtype, -1, _always(False), CALIBRATE,
              "the top-k ids and the label", note="form sparse"),
    ArraySpec("{t}_probs", TEACHER, ("row", "k"), _fixed(np.float32), 0, _always(False), CALIBRATE,
              "target probabilities of ids", note="form sparse"),
    ArraySpec("{t}_tail", TEACHER, ("row",), _fixed(np.float32), 0, _always(False), CALIBRATE,
              "the probability mass outside ids", note="form sparse"),
    ArraySpec("mis_instructed", TEACHER, ("row",), _fixed(np.uint8), 0, _always(False), CALIBRATE,
              "1 where the teacher mis-instructs (LoCa calibrated the row)"),
    ArraySpec("violations", TEACHER, ("chunk", "check"), _fixed(np.int64), 0, _always(False), CALIBRATE,
              "invariant violations per chunk and check"),
    ArraySpec("sigma_sum", TEACHER, ("chunk",), _fixed(np.float64), 0.0, _always(False), CALIBRATE,
              "Σσ over the chunk's calibrated rows"),
    ArraySpec("done", TEACHER, ("chunk",), _fixed(np.uint8), 0, _always(False), FLAG,
              "1 once chunk c of this teacher's targets is written", flag="done"),
)


def target_arrays(form: str, bases: list[str]) -> list[ArraySpec]:
    """The targets store's arrays of one teacher in ``form`` (dense | sparse), each "{t}" entry once per base name."""
    from dataclasses import replace

    out: list[ArraySpec] = []
    entries = [a for a in TARGET_ARRAYS if not a.note.startswith("form ") or a.note == f"form {form}"]
    templates = [a for a in entries if "{t}" in a.name]
    for a in entries:
        if "{t}" not in a.name:
            out.append(a)
        elif a is templates[0]:
            out += [replace(x, name=x.name.format(t=b)) for b in bases for x in templates]
    return out


def table() -> dict[str, ArraySpec]:
    """``{name: spec}`` of ``ARRAYS`` (read at call time, so a test may extend the table)."""
    return {a.name: a for a in ARRAYS}


def spec(name: str) -> ArraySpec | None:
    return table().get(name)


def arrays(where: str, s: Sizes | None = None, writer: str | None = None) -> list[ArraySpec]:
    """The table's arrays of ``where`` (present for sizes ``s`` when given; of ``writer`` when given)."""
    return [a for a in ARRAYS if a.where == where and (s is None or a.present(s))
            and (writer is None or a.writer == writer)]


def dimension_names(name: str) -> tuple[str, ...]:
    """zarr ``dimension_names`` of array ``name`` (a codec's own array: ``("row", "<name>_col")``)."""
    a = spec(name)
    return a.dims if a is not None else ("row", f"{name}_col")


def create(group: Any, a: ArraySpec, s: Sizes, **kw: Any) -> Any:
    """Create array ``a`` in ``group`` with the shape, chunks, dtype, fill, codecs and dimension names its entry gives."""
    dt = np.dtype(a.dtype(s))
    return group.create_array(a.name, shape=a.shape(s), chunks=a.chunks(s), dtype=dt, fill_value=a.fill,
                              **array_codecs(dt, a.compress(s)), dimension_names=a.dims, **kw)


_DOC_DIMS = {"imported": 1}  # the docs describe every array, also those present only in imported stores


def _codec_doc(a: ArraySpec) -> str:
    if a.codec:
        return "the top-k codec (lossless: as `logits`)"
    probe = Sizes(dict(_DOC_DIMS), {}, 10, "float32")
    if np.dtype(a.dtype(probe)).kind in "iub":
        return "zstd, crc32c"
    off = a.compress(probe)
    on = a.compress(Sizes({}, {}, 10, "float32", compress_logits=True))
    return "zstd, crc32c" if off else ("raw, crc32c (zstd with --compress-logits)" if on else "raw, crc32c")


def render_layout() -> str:
    """docs/store-format.md's array table, from ``ARRAYS`` (tests/pipeline/test_layout.py checks they are equal)."""
    out = ["| array | in | shape | dtype | codecs | written by | holds |", "|---|---|---|---|---|---|---|"]
    for a in ARRAYS:
        shape = "(" + ", ".join(LETTERS[d] for d in a.dims) + ("," if len(a.dims) == 1 else "") + ")"
        dt = a.dtype_doc or np.dtype(a.dtype(Sizes({}, {}, 10, "float32"))).name
        where = "store" if a.where == ROOT else "teachers/<name>"
        text = a.doc + (f" ({a.note})" if a.note else "")
        out.append(f"| `{a.name}` | {where} | {shape} | {dt} | {_codec_doc(a)} | {a.writer} | {text} |")
    return "\n".join(out)
