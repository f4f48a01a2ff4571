"""Import a DistillKit Parquet logit cache into a token store, so ``lm-analyze`` and LoCa run on caches people have.

What is read (DistillKit's published schema, understood from its README, its capture script's Parquet schema and
its compression description; no DistillKit code is used or copied). One Parquet row per sequence:

=====================  ===========================  ====================================================
column                 type                         holds
=====================  ===========================  ====================================================
input_ids              list<int>  (L)               the token ids of the sequence
token_ids              list<list<int>>   (n, k)     raw top-k form: the teacher's k ids of each position
top_values             list<list<float>> (n, k)     raw top-k form: their log-probs (full vocabulary, τ = 1)
compressed_logprobs    list<list<uint8>> (n, B)     compressed form: the k log-probs, packed (below)
bytepacked_indices     list<list<uint8>> (n, ⌈k·b/8⌉) compressed form: the k ids, b = ⌈log2 d⌉ bits each
=====================  ===========================  ====================================================

Teacher row j scores the next token, ``input_ids[j + 1]`` (vLLM's prompt log-probs minus the first, empty one;
DistillKit truncates ``input_ids`` to the rows it has, so n ≤ L). A row whose next token is beyond the sequence
(j = L − 1) has no label and is not imported.

The compressed form (DistillKit's "distribution quantization", config section ``logprob_compressor``): the k
log-probs sorted descending (ids in the same order), optionally delta-encoded (each value minus the one before,
the first kept); then, little-endian, ``exact_k`` values in ``exact_dtype``, the least-squares coefficients of
``polynomial_terms`` (powers of t, ``sqrt``, ``exp``) over the remaining k − exact_k ranks (t = 0 … k−exact_k−1,
or evenly spaced on [0, 1] with ``normalize_t``) in ``term_dtype``, then each residual bin: its scale
(``scale_dtype``) and ``num_elements`` residuals of ``element_bits`` bits, MSB first, offset by 2^(bits−1) (one
bit: ±scale). Decoding sums fit and residuals (the missing residuals are 0) and undoes the delta encoding.
The ids are one MSB-first bit stream of b-bit integers, zero-padded to a byte.

Into the store (the one ``lm-cache`` writes, docs/store-format.md): one sequence per Parquet row, one store row
per imported position; ``topk_logits`` = the log-probs (descending; ties: lower id first), ``topk_ids``, and
``temperatures`` = [1.0] with ``lse`` = 0 — log-probs normalised over the full vocabulary at τ = 1 are logits
whose logsumexp is 0. Other τ are unknowable (the tail's shape is not stored) and refused by every reader.
What the format cannot give is flagged per row in ``import_flags`` (docs/store-format.md):

* ``LABEL_UNKNOWN`` (1): the next token is outside the stored top-k. Its probability is unknown and at most the
  tail mass 1 − Σ top-k; ``label_logit`` holds that upper bound (log of the tail, floored at 1e-30). The label's
  mis-instruction is then certain when the tail ≤ p_top1 and undetermined otherwise (``lm-analyze`` reports both).
* ``RENORMALISED`` (2): the decoded top-k mass exceeded 1 (bf16 rounding, a polynomial tail decoded too high);
  ``lse`` is raised to logsumexp(top-k) so the row sums to 1 with no tail. Mass above ``MAX_MASS`` is refused:
  those are not log-probs (raw logits, or the wrong compression config).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, DataError, StoreConflictError, StoreError

log = logging.getLogger(__name__)

LABEL_UNKNOWN, RENORMALISED = 1, 2
MAX_MASS = 1.5          # decoded top-k mass above this is not a log-prob row (refused); (1, MAX_MASS] is renormalised
TAIL_FLOOR = 1e-30      # label_logit = log(max(tail, TAIL_FLOOR)) for a label outside the top-k
RAW = ("token_ids", "top_values")
COMPRESSED = ("bytepacked_indices", "compressed_logprobs")  # ids first, like RAW
LEGACY = ("packed_indices", "exact_values", "coeffs")
FLOAT_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")


# ----------------------------------------------------------------------------------------------------
# The compression config (DistillKit's ``logprob_compressor``)


@dataclass(frozen=True)
class Bin:
    scale_dtype: str
    element_bits: int
    num_elements: int

    def nbytes(self) -> int:
        return FLOAT_DTYPES[self.scale_dtype] + (self.element_bits * self.num_elements + 7) // 8


@dataclass(frozen=True)
class Compression:
    """DistillKit's ``logprob_compressor`` settings (its defaults where it has them: delta encoding on)."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple[Any, ...] = ()
    term_dtype: str = "float32"
    residual_bins: tuple[Bin, ...] = field(default=())
    delta_encoding: bool = True
    error_diffusion: bool = False   # an encoder setting; decoding ignores it
    normalize_t: bool = False

    @classmethod
    def from_mapping(cls, m: dict[str, Any], where: str = "the compression config") -> "Compression":
        """From a DistillKit YAML: the ``logprob_compressor`` mapping itself, or a file holding it (top level,
        under ``logprob_compressor`` or under ``teacher.logprob_compressor``)."""
        if not isinstance(m, dict):
            raise ConfigError(f"{where} must be a mapping (DistillKit's logprob_compressor); got {type(m).__name__}")
        if isinstance(m.get("teacher"), dict) and "logprob_compressor" in m["teacher"]:
            m = m["teacher"]["logprob_compressor"]
        elif "logprob_compressor" in m:
            m = m["logprob_compressor"]
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: logprob_compressor must be a mapping")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; DistillKit's logprob_compressor has {sorted(known)}")
        missing = [k for k in ("d", "k", "exact_k") if k not in m]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing} (the vocabulary size d, k and exact_k the cache was "
                              f"captured with)")
        kw = dict(m)
        try:
            kw["polynomial_terms"] = tuple(t if isinstance(t, str) else int(t) for t in (m.get("polynomial_terms") or ()))
            kw["residual_bins"] = tuple(Bin(str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                                        for b in (m.get("residual_bins") or ()))
            for key in ("d", "k", "exact_k"):
                kw[key] = int(m[key])
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc!r}; residual_bins entries need scale_dtype, element_bits, num_elements")
        c = cls(**kw)
        c.check(where)
        return c

    def check(self, where: str = "the compression config") -> None:
        if self.d < 1 or not 1 <= self.k or not 0 <= self.exact_k <= self.k:
            raise ConfigError(f"{where}: need d ≥ 1 and 0 ≤ exact_k ≤ k; got d={self.d}, k={self.k}, exact_k={self.exact_k}")
        dtypes = [("exact_dtype", self.exact_dtype), ("term_dtype", self.term_dtype)] + \
            [(f"residual_bins[{i}].scale_dtype", b.scale_dtype) for i, b in enumerate(self.residual_bins)]
        for name, v in dtypes:
            if v not in FLOAT_DTYPES:
                raise ConfigError(f"{where}: {name} must be one of {list(FLOAT_DTYPES)}; got {v!r}")
        for t in self.polynomial_terms:
            if isinstance(t, str) and t not in SPECIAL_TERMS:
                raise ConfigError(f"{where}: polynomial term {t!r} is not a power or one of {list(SPECIAL_TERMS)}")
        if any(not 1 <= b.element_bits <= 64 or b.num_elements < 1 for b in self.residual_bins):
            raise ConfigError(f"{where}: residual bins need 1 ≤ element_bits ≤ 64 and num_elements ≥ 1")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise ConfigError(f"{where}: the residual bins hold more than k − exact_k = {self.k - self.exact_k} values")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise ConfigError(f"{where}: exact_k < k needs polynomial_terms or residual_bins for the other ranks")

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.d)))

    def logprob_bytes(self) -> int:
        """Bytes of one position's ``compressed_logprobs``."""
        return (self.exact_k * FLOAT_DTYPES[self.exact_dtype] + len(self.polynomial_terms) * FLOAT_DTYPES[self.term_dtype]
                + sum(b.nbytes() for b in self.residual_bins))

    def id_bytes(self) -> int:
        return (self.k * self.id_bits + 7) // 8

    def basis(self) -> np.ndarray:
        """(k − exact_k, terms) float64: the fit's terms at the approximated ranks."""
        n = self.k - self.exact_k
        t = np.linspace(0.0, 1.0, n) if self.normalize_t else np.arange(n, dtype=np.float64)
        cols = [np.sqrt(t) if x == "sqrt" else np.exp(t) if x == "exp" else t ** int(x) for x in self.polynomial_terms]
        return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes (n, m·size) → (n, m) float64."""
    raw = np.ascontiguousarray(raw)
    if dtype == "bfloat16":
        u = raw.view("<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    return raw.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(n, bytes) uint8 MSB-first bit stream → (n, count) int64 of ``bits`` bits each."""
    stream = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), axis=1)[:, :count * bits]
    stream = stream.reshape(len(packed), count, bits).astype(np.int64)
    return stream @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


def decode_logprobs(raw: np.ndarray, c: Compression) -> np.ndarray:
    """(n, logprob_bytes) uint8 → (n, k) float64 log-probs in rank order (descending as encoded)."""
    n, o = len(raw), 0
    exact = _floats(raw[:, :c.exact_k * FLOAT_DTYPES[c.exact_dtype]], c.exact_dtype)
    o = c.exact_k * FLOAT_DTYPES[c.exact_dtype]
    m = c.k - c.exact_k
    approx = np.zeros((n, m))
    if c.polynomial_terms:
        nb = len(c.polynomial_terms) * FLOAT_DTYPES[c.term_dtype]
        coef = _floats(raw[:, o:o + nb], c.term_dtype)
        o += nb
        approx += coef @ c.basis().T
    at = 0
    for b in c.residual_bins:
        sb = FLOAT_DTYPES[b.scale_dtype]
        scale = _floats(raw[:, o:o + sb], b.scale_dtype)
        o += sb
        pb = (b.element_bits * b.num_elements + 7) // 8
        q = unpack_bits(raw[:, o:o + pb], b.element_bits, b.num_elements).astype(np.float64)
        o += pb
        approx[:, at:at + b.num_elements] += ((2 * q - 1) if b.element_bits == 1 else (q - 2.0 ** (b.element_bits - 1))) * scale
        at += b.num_elements
    v = np.concatenate([exact, approx], axis=1)
    return np.cumsum(v, axis=1) if c.delta_encoding else v


# ----------------------------------------------------------------------------------------------------
# Reading the Parquet file


@dataclass(frozen=True)
class Layout:
    """What the file holds: its form, k, and per sequence its length and number of imported rows."""

    form: str                  # "raw" | "compressed"
    k: int
    lengths: np.ndarray        # (N,) tokens per sequence
    rows: np.ndarray           # (N,) imported rows per sequence: min(teacher rows, L − 1)
    max_input_id: int

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)


def _form(names: list[str], path: str, compression: Compression | None) -> str:
    have = set(names)
    if "input_ids" not in have:
        raise DataError(f"{path!r} has no column 'input_ids' (it has {sorted(have)}); a DistillKit cache holds "
                        f"input_ids plus token_ids/top_values (raw top-k) or compressed_logprobs/bytepacked_indices")
    for form, cols in (("raw", RAW), ("compressed", COMPRESSED)):
        if have & set(cols):
            missing = [x for x in cols if x not in have]
            if missing:
                raise DataError(f"{path!r} has {sorted(have & set(cols))} but no column {missing[0]!r}; the {form} "
                                f"DistillKit form needs both {list(cols)}")
            if form == "compressed" and compression is None:
                raise ConfigError(f"{path!r} holds compressed log-probs; pass --compression-config with the "
                                  f"logprob_compressor settings it was captured with (d, k, exact_k, …)")
            return form
    if have & set(LEGACY):
        raise DataError(f"{path!r} is in DistillKit's legacy compressed form ({list(LEGACY)}), which lm-import does "
                        f"not read; re-capture it with logprob_compressor (or raw top-k)")
    raise DataError(f"{path!r} has neither {list(RAW)} (raw top-k) nor {list(COMPRESSED)} (compressed); it has "
                    f"{sorted(have)}")


def _flat(col, what: str, path: str):
    """A list<list<…>> column of one batch → (teacher rows per sequence, row widths, flat values)."""
    import pyarrow as pa

    if col.null_count:
        raise DataError(f"{path!r}: column {what!r} has null rows; every sequence needs its teacher rows")
    inner = col.flatten()
    if not pa.types.is_list(inner.type) and not pa.types.is_large_list(inner.type):
        raise DataError(f"{path!r}: column {what!r} must be a list of lists (one list per position); got {col.type}")
    return (np.asarray(col.value_lengths(), np.int64), np.asarray(inner.value_lengths(), np.int64),
            inner.flatten().to_numpy(zero_copy_only=False))


def _select(n: np.ndarray, L: np.ndarray, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """The imported teacher rows of one batch: (sequence in the batch, row j) of every row j < n_i that scores a
    next token — j + 1 < L_i and, when the file has ``labels``, labels[j + 1] ≠ −100 (a prompt position)."""
    seq = np.repeat(np.arange(len(n)), n)
    j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    keep = j + 1 < L[seq]
    if labels is not None:
        lab_len = np.asarray(labels.value_lengths(), np.int64)
        lab = labels.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        at = np.concatenate([[0], np.cumsum(lab_len)])[seq] + j + 1
        keep &= j + 1 < lab_len[seq]
        keep[keep] = lab[at[keep]] != -100
    return seq[keep], j[keep]


def scan(path: str, compression: Compression | None) -> Layout:
    """Pass 1: the form, k and the sequence sizes, reading only the list lengths (and the labels, if any)."""
    pf = _open(path)
    form = _form(pf.schema_arrow.names, path, compression)
    ids_col = "token_ids" if form == "raw" else "bytepacked_indices"
    has_labels = "labels" in pf.schema_arrow.names
    lengths, rows, k, top = [], [], None, -1
    for batch in pf.iter_batches(columns=["input_ids", ids_col] + (["labels"] if has_labels else []), batch_size=1024):
        inp = batch.column(0)
        if inp.null_count:
            raise DataError(f"{path!r}: column 'input_ids' has null rows")
        L = np.asarray(inp.value_lengths(), np.int64)
        n, widths, _ = _flat(batch.column(1), ids_col, path)
        vals = inp.flatten().to_numpy(zero_copy_only=False)
        top = max(top, int(vals.max()) if len(vals) else -1)
        if len(widths) and (widths != widths[0]).any():
            raise DataError(f"{path!r}: rows of {ids_col!r} have different widths ({sorted(set(widths.tolist()))[:5]}); "
                            f"every position must hold the same k")
        if len(widths):
            w = int(widths[0])
            if k is None:
                k = w
            elif w != k:
                raise DataError(f"{path!r}: {ids_col!r} holds {k} entries per position in one batch and {w} in another")
        bad = np.flatnonzero(n > L)
        if len(bad):
            i = len(lengths) + int(bad[0])
            raise DataError(f"{path!r}: sequence {i} has {int(n[bad[0]])} teacher rows but only {int(L[bad[0]])} "
                            f"input_ids; row j must score input_ids[j + 1]")
        lengths.append(L)
        seq, _ = _select(n, L, batch.column(2) if has_labels else None)
        rows.append(np.bincount(seq, minlength=len(L)).astype(np.int64))
    if k is None:
        raise DataError(f"{path!r} holds no teacher rows")
    if form == "compressed":
        if k != compression.id_bytes():
            raise ConfigError(f"{path!r}: bytepacked_indices rows hold {k} bytes; the compression config (k="
                              f"{compression.k}, d={compression.d}: {compression.id_bits} bits per id) implies "
                              f"{compression.id_bytes()}; pass the config the cache was captured with")
        k = compression.k
    lengths_a, rows_a = np.concatenate(lengths), np.concatenate(rows)
    return Layout(form, int(k), lengths_a, rows_a, top)


def _open(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"no Parquet file at {path!r}") from None
    except OSError as exc:  # pyarrow's ArrowInvalid is an OSError subclass: not Parquet, or truncated
        raise DataError(f"{path!r} is not a readable Parquet file ({exc}); pass a DistillKit .parquet cache") from None


def read_rows(path: str, lay: Layout, compression: Compression | None, batch_size: int = 256
              ) -> Iterator[dict[str, np.ndarray]]:
    """Pass 2: the imported rows in store order, batch by batch: ``sample_id``, ``position``, ``label`` and the
    top-k ``ids`` / ``logprobs`` (float64, as the file holds them: not yet sorted)."""
    pf = _open(path)
    cols = ["input_ids", *(RAW if lay.form == "raw" else COMPRESSED)]
    has_labels = "labels" in pf.schema_arrow.names
    first = 0
    for batch in pf.iter_batches(columns=cols + (["labels"] if has_labels else []), batch_size=batch_size):
        S = batch.num_rows
        inp = batch.column(0)
        in_off = np.concatenate([[0], np.cumsum(np.asarray(inp.value_lengths(), np.int64))])
        in_vals = inp.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        n_ids, w_ids, ids_flat = _flat(batch.column(1), cols[1], path)
        n_val, w_val, val_flat = _flat(batch.column(2), cols[2], path)
        if (n_ids != n_val).any():
            i = first + int(np.flatnonzero(n_ids != n_val)[0])
            raise DataError(f"{path!r}: sequence {i} has {cols[1]} and {cols[2]} of different lengths")
        t_off = np.concatenate([[0], np.cumsum(n_ids)])
        seq, j = _select(n_ids, np.diff(in_off), batch.column(3) if has_labels else None)
        if not np.array_equal(np.bincount(seq, minlength=S), lay.rows[first:first + S]):
            raise DataError(f"{path!r} changed while it was read; run the import again")
        trow = t_off[seq] + j
        local = np.arange(len(seq)) - np.searchsorted(seq, seq, side="left")  # index among the sequence's rows
        if lay.form == "raw":
            if len(w_val) and (w_val != lay.k).any():
                raise DataError(f"{path!r}: top_values rows must hold k = {lay.k} values like token_ids")
            ids = ids_flat.reshape(-1, lay.k)[trow].astype(np.int64)
            lp = val_flat.reshape(-1, lay.k)[trow].astype(np.float64)
        else:
            B = compression.logprob_bytes()
            if len(w_val) and (w_val != B).any():
                raise ConfigError(f"{path!r}: compressed_logprobs rows hold {int(w_val[w_val != B][0])} bytes; the "
                                  f"compression config implies {B} (exact_k={compression.exact_k} "
                                  f"{compression.exact_dtype}, {len(compression.polynomial_terms)} "
                                  f"{compression.term_dtype} terms, {len(compression.residual_bins)} residual bins); "
                                  f"pass the config the cache was captured with")
            lp = decode_logprobs(val_flat.astype(np.uint8).reshape(-1, B)[trow], compression)
            ids = unpack_bits(ids_flat.astype(np.uint8).reshape(-1, compression.id_bytes())[trow],
                              compression.id_bits, compression.k)
        yield {"sample_id": (first + seq).astype(np.int64), "position": local.astype(np.int32),
               "label": in_vals[in_off[seq] + 1 + j], "ids": ids, "logprobs": lp}
        first += S


def to_store_rows(d: dict[str, np.ndarray], vocab: int, first_row: int, path: str) -> dict[str, np.ndarray]:
    """One batch of read rows → the store's per-row arrays (sorted top-k, lse, label logit, flags)."""
    ids, lp, y = d["ids"], d["logprobs"], d["label"]
    if len(y) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        r = int(np.flatnonzero((ids < 0).any(1) | (ids >= vocab).any(1))[0])
        raise DataError(f"{path!r}: teacher ids up to {int(ids.max())} at store row {first_row + r} (sequence "
                        f"{int(d['sample_id'][r])}) exceed the declared vocabulary of {vocab} tokens; pass the teacher's "
                        f"vocabulary size (--vocab-size, or d in the compression config)")
    if not np.isfinite(lp).all():
        r = int(np.flatnonzero(~np.isfinite(lp).all(1))[0])
        raise DataError(f"{path!r}: non-finite log-probs at store row {first_row + r} (sequence "
                        f"{int(d['sample_id'][r])}); a position with fewer than k log-probs (vLLM pads with -inf) "
                        f"cannot be imported — re-capture with k at most the vocabulary")
    order = np.lexsort((ids, -lp), axis=-1)  # descending, ties: lower id first (the store's order)
    ids = np.take_along_axis(ids, order, 1)
    lp = np.take_along_axis(lp, order, 1)
    if ids.shape[1] > 1 and (np.diff(np.sort(ids, 1), axis=1) == 0).any():
        r = int(np.flatnonzero((np.diff(np.sort(ids, 1), axis=1) == 0).any(1))[0])
        raise DataError(f"{path!r}: store row {first_row + r} (sequence {int(d['sample_id'][r])}) repeats a token id "
                        f"among its top-k; the file is not a top-k cache (or the compression config is wrong)")
    top = lp.max(1, keepdims=True)
    lse_k = (top + np.log(np.exp(lp - top).sum(1, keepdims=True)))[:, 0]   # log Σ top-k probabilities
    if (lse_k > math.log(MAX_MASS)).any():
        r = int(np.argmax(lse_k))
        raise DataError(f"{path!r}: the top-k of store row {first_row + r} holds probability {math.exp(lse_k[r]):.3g} "
                        f"> {MAX_MASS}: these are not log-probs normalised over the vocabulary (raw logits, or the "
                        f"wrong compression config); lm-import reads DistillKit's log-prob caches")
    renorm = lse_k > 0
    lse = np.maximum(lse_k, 0.0)
    tail = -np.expm1(lse_k - lse)                                            # 1 − Σ p (0 on renormalised rows)
    hit = ids == y[:, None]
    known = hit.any(1)
    label_logit = np.where(known, (lp * hit).sum(1), lse + np.log(np.maximum(tail, TAIL_FLOOR)))
    flags = np.where(known, 0, LABEL_UNKNOWN) | np.where(renorm, RENORMALISED, 0)
    return {"sample_id": d["sample_id"], "position": d["position"], "label": y,
            "topk_logits": lp.astype(np.float32), "topk_ids": ids, "lse": lse.astype(np.float32)[:, None],
            "label_logit": label_logit.astype(np.float32), "import_flags": flags.astype(np.uint8)}


# ----------------------------------------------------------------------------------------------------
# The import

SECTION = "lm_import"


@dataclass(frozen=True)
class Params:
    """Section ``lm_import`` of a params file (``loca-pipe lm-import``); ``base`` is ``lm_base`` (stages/lm/common.py)."""

    name: str = "teacher"               # the teacher's name in the store
    vocab_size: int = 0                 # the teacher's vocabulary (0: the compression config's d)
    compression_config: str = ""        # DistillKit YAML with logprob_compressor ('' = the raw top-k form)
    tokenizer: str = ""                 # optional: the cache's tokenizer, checked and recorded
    chunk_rows: int = 4096              # rows per store chunk
    out: str = ""                       # the store ('' = lm_base.workdir / outputs.store, what lm-analyze reads)
    overwrite: bool = False
    base: Any = None


def output_path(p: Params) -> Path:
    return Path(p.out) if p.out else Path(p.base.store)



class _Index:
    """What ``pipeline/lm/cache._write_index`` reads of an encoded split: the offsets and rows per sequence."""

    def __init__(self, lay: Layout):
        self.response_len = lay.rows
        self._offsets = lay.offsets

    def offsets(self) -> np.ndarray:
        return self._offsets

    def __len__(self) -> int:
        return len(self.response_len)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizer(tok, vocab: int, lay: Layout, tok_dir: str) -> str:
    """The tokenizer must be the cache's: its ids fit the teacher's vocabulary and cover every input id."""
    from loca_pipe.pipeline.lm.tokenizer import tokenizer_fingerprint

    n = len(tok)
    if n > vocab:
        raise StoreConflictError(f"the tokenizer at {tok_dir!r} has {n} tokens but the cache's teacher scores {vocab}; "
                                 f"it is not the cache's tokenizer — pass the teacher's tokenizer (--tokenizer)")
    if lay.max_input_id >= n:
        raise StoreConflictError(f"the cache's input_ids reach {lay.max_input_id} but the tokenizer at {tok_dir!r} has "
                                 f"{n} tokens; it is not the cache's tokenizer — pass the teacher's tokenizer (--tokenizer)")
    return tokenizer_fingerprint(tok)


def import_distillkit(parquet: str, out: str, *, name: str = "teacher", vocab_size: int | None = None,
                      compression: Compression | None = None, tokenizer_dir: str | None = None,
                      chunk_rows: int = 4096, overwrite: bool = False) -> dict[str, Any]:
    """Write the DistillKit cache ``parquet`` as teacher ``name`` of a new token store at ``out``; returns a report.

    ``vocab_size``: the teacher's vocabulary (required for the raw form; the compressed form's ``d`` otherwise,
    and they must agree). An existing ``out`` is refused unless ``overwrite``, which replaces the whole store. The
    store is written beside ``out`` (a fresh hidden folder ``.<out>.import-…``) and moved into place only when
    complete, so a file refused mid-way (a bad row) leaves ``out`` as it was.
    """
    from loca_pipe.pipeline import caching
    from loca_pipe.pipeline.distributed import WriterLease
    from loca_pipe.pipeline.lm.cache import TASK, _write_index
    from loca_pipe.pipeline.store import StoreInfo, io_guard

    parquet = str(parquet)
    if compression is not None and vocab_size is not None and compression.d != vocab_size:
        raise ConfigError(f"--vocab-size {vocab_size} disagrees with the compression config's d = {compression.d}; "
                          f"give one vocabulary size")
    V = vocab_size if vocab_size is not None else (compression.d if compression is not None else None)
    lay = scan(parquet, compression)
    if V is None:
        raise ConfigError("the raw top-k form does not record the vocabulary size; pass --vocab-size (the teacher's)")
    if V < 1 or lay.k > V:
        raise ConfigError(f"the cache keeps k = {lay.k} per position but the vocabulary has {V} tokens; pass the "
                          f"teacher's --vocab-size")
    if lay.max_input_id >= V:
        raise DataError(f"{parquet!r}: input_ids reach {lay.max_input_id}, beyond the declared vocabulary of {V} tokens; "
                        f"pass the teacher's vocabulary size (--vocab-size, or d in the compression config)")
    tok_fp = None
    if tokenizer_dir:
        from loca_pipe.pipeline.lm.tokenizer import load_tokenizer

        tok_fp = check_tokenizer(load_tokenizer(tokenizer_dir), V, lay, str(tokenizer_dir))
    R, N = int(lay.rows.sum()), len(lay.rows)
    if R == 0:
        raise DataError(f"{parquet!r}: no position has a next token to score (every sequence is shorter than 2 tokens)")
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be ≥ 1; got {chunk_rows}")
    outp = Path(out)
    if not overwrite and outp.exists() and (not outp.is_dir() or any(outp.iterdir())):
        raise StoreConflictError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or choose "
                                 f"another --out")
    sha = file_sha256(parquet)
    dataset = {"name": "distillkit-import", "split": "train", "fingerprint": sha[:16], "source": parquet,
               "form": lay.form, "tokenizer": tok_fp}
    info = StoreInfo(task=TASK, num_samples=N, num_views=1, num_rows=R, num_classes=int(V),
                     chunk_rows=int(min(chunk_rows, R)), dataset=dataset)
    prov = {"imported_from": "distillkit", "source_sha256": sha, "form": lay.form,
            "compression": None if compression is None else _jsonable(compression),
            "values": "log-probs over the full vocabulary at τ = 1 (lse 0)"}
    # written beside --out and moved into place whole: a refusal met mid-file (a bad row) leaves --out as it was
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outp.name}.import-", dir=outp.parent))  # a fresh name: never a user's
    settings = caching.CacheSettings(store=str(tmp), name=name, top_k=lay.k, temperatures=(1.0,), logits_dtype=None,
                                     progress=False, unit="tok")
    counts = {"label_unknown": 0, "renormalised": 0}
    try:
        store, writer = caching.open_for_writing(settings, info, prov, extra_dims={"dims": {"imported": 1}},
                                                 on_store=lambda st: _write_index(st, _Index(lay)))
        try:
            _write_chunks(parquet, lay, compression, int(V), info, store, writer, counts, str(out))
            with io_guard(str(out), "finalising"):
                writer.finalize()
        finally:
            WriterLease(str(tmp), name).release()
        with io_guard(str(out), "moving the imported store into place"):
            old = None
            if outp.exists():  # --overwrite: the old store steps aside, the new one takes its name, then it goes
                old = Path(tempfile.mkdtemp(prefix=f".{outp.name}.replaced-", dir=outp.parent))
                os.replace(outp, old)
            os.replace(tmp, outp)
            if old is not None:
                shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"store": str(out), "teacher": name, "form": lay.form, "sequences": N, "tokens": R, "top_k": lay.k,
            "vocab_size": int(V), "label_unknown": counts["label_unknown"],
            "label_unknown_share": counts["label_unknown"] / R, "renormalised": counts["renormalised"],
            "temperatures": [1.0]}


def _write_chunks(parquet: str, lay: Layout, compression: Compression | None, V: int, info, store, writer,
                  counts: dict[str, int], out: str) -> None:
    """Decode the file batch by batch and write the store's chunks in order (each whole, then its flag)."""
    from loca_pipe.pipeline.store import io_guard

    buf: list[dict[str, np.ndarray]] = []
    held, c, row = 0, 0, 0
    for d in read_rows(parquet, lay, compression):
        s = to_store_rows(d, V, row, parquet)
        row += len(s["label"])
        buf.append(s)
        held += len(s["label"])
        while c < info.num_chunks and held >= info.chunk_slice(c).stop - info.chunk_slice(c).start:
            n = info.chunk_slice(c).stop - info.chunk_slice(c).start
            cat = {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}
            part = {k: v[:n] for k, v in cat.items()}
            buf, held = [{k: v[n:] for k, v in cat.items()}], held - n
            counts["label_unknown"] += int(((part["import_flags"] & LABEL_UNKNOWN) != 0).sum())
            counts["renormalised"] += int(((part["import_flags"] & RENORMALISED) != 0).sum())
            with io_guard(out, f"writing chunk {c}"):
                store.write_rows(c, part["sample_id"], part["label"], np.zeros(n, np.int16))
                writer.write_chunk(c, {k: part[k] for k in ("topk_logits", "topk_ids", "lse", "label_logit",
                                                            "import_flags")})
            c += 1


def _jsonable(c: Compression) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(c)
    d["polynomial_terms"] = list(c.polynomial_terms)
    d["residual_bins"] = [asdict(b) for b in c.residual_bins]
    return d


def load_compression(path: str) -> Compression:
    """A DistillKit YAML (the capture's compression config, or a training config naming it) → :class:`Compression`."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no compression config at {str(path)!r}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not YAML ({exc.__class__.__name__}); pass DistillKit's compression config")
    return Compression.from_mapping(data, where=str(path))


__all__ = ["Params", "SECTION", "output_path", "Compression", "Bin", "LABEL_UNKNOWN", "RENORMALISED", "decode_logprobs", "unpack_bits", "scan",
           "read_rows", "to_store_rows", "import_distillkit", "load_compression"]
