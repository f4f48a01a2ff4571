"""Token-level teacher caching for causal LMs, in the project's logit store (task ``causal-lm``).

Rows are *response tokens*: the store's ``num_samples`` are sequences, ``num_rows`` the total number of
response tokens, ``num_views`` 1. Prompt tokens are never stored. Row r of sequence i predicts response
token ``position[r]`` of that sequence from the teacher's logits at the previous position; ``label[r]`` is
that token (the next token), ``sample_id[r] = i``. The ragged sequences are stored flat with offsets (the
same values + offsets layout Arrow's list type uses; docs/language-models.md gives the measurement that
chose Zarr). Arrays added by this module (everything else is the store package's, ``pipeline/store/``)::

    STORE/
      offsets        (N+1,) int64   rows of sequence i are offsets[i] .. offsets[i+1]-1
      position       (R,)   int32   index of the token inside its response (0 = first response token)
      attrs["loca_pipe_lm"]         {"index_written": true, "prompt_tokens_stored": 0, ...}
      teachers/<name>/
        sampled_ids     (R, S) int32   optional Sparse Logit Sampling: distinct ids drawn from p_tau ...
        sampled_counts  (R, S) uint16  ... with their counts (S draws with replacement; unused slots -1 / 0)
        greedy_ids      (N, G) int32   the teacher's greedy response to each prompt (SeqKD), -1 padded
        greedy_done     (n_greedy_chunks,) uint8

Resume and integrity follow the image path: a row chunk is written whole (extra arrays first, then the
store's arrays, then its ``done`` flag), greedy chunks have their own flags, and the teacher is marked
complete only when both are all set. Sampling draws from a generator seeded by (seed, chunk), so a resumed
run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from loca_pipe.pipeline import caching
from loca_pipe.pipeline import layout
from loca_pipe.pipeline.caching import Batch, CacheReport, CacheSettings, sample_sparse
from loca_pipe.pipeline.errors import ConfigError, StoreConflictError, StoreError
from loca_pipe.pipeline.lm.models import greedy_generate, input_device, model_vocab, placement, response_logits
from loca_pipe.pipeline.lm.tokenizer import Encoded
from loca_pipe.pipeline.store import LogitStore, StoreInfo, read_checked, require_tau, root_sizes

log = logging.getLogger(__name__)
TASK = "causal-lm"
LM_ATTR = "loca_pipe_lm"
from loca_pipe.pipeline.names import LM_ID_DTYPES as ID_DTYPES  # defined in the torch-free leaf, for the CLI


def check_id_dtype(vocab_size: int, id_dtype: str) -> None:
    """A requested id dtype must hold every token id (fp16 or narrow ids silently corrupt large vocabularies)."""
    if id_dtype not in ID_DTYPES:
        raise ConfigError(f"id dtype must be one of {list(ID_DTYPES)}; got {id_dtype!r}")
    if id_dtype == "auto":
        return
    top = np.iinfo(np.dtype(id_dtype)).max
    if vocab_size - 1 > top:
        raise StoreError(f"the teacher's vocabulary has {vocab_size} tokens but {id_dtype} ids hold at most "
                         f"{top + 1}; use id dtype int32 (or auto)")


def check_top_k(top_k: int, vocab_size: int) -> None:
    if not 1 <= top_k <= vocab_size:
        raise ConfigError(f"top_k must be in [1, {vocab_size}] (the teacher's vocabulary); got {top_k}")


def rows_of_sequences(offsets: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Sequences [i0, i1) whose rows overlap the row range [lo, hi)."""
    i0 = int(np.searchsorted(offsets, lo, side="right") - 1)
    i1 = int(np.searchsorted(offsets, hi - 1, side="right"))
    return i0, i1


class TokenJob:
    """The token use of the engine: batches of whole sequences overlapping each chunk, through the teacher.

    ``length_window`` > 1 groups sequences by length: each chunk's sequences are taken ``length_window`` at a
    time, sorted by length (ties by index) inside that window and cut into batches, so a batch pads to the
    length of similar sequences rather than of the longest nearby one. Every row carries its global row
    number (``row``); the engine puts each chunk back in row order before writing, so the store's row order
    stays the data's whatever the batches were.
    """

    def __init__(self, model, enc: Encoded, pad_id: int, batch_size: int, info: StoreInfo, length_window: int = 0):
        self.model, self.enc, self.pad_id, self.batch_size, self.info = model, enc, pad_id, batch_size, info
        self.offsets = enc.offsets()
        self.length_window = int(length_window)
        self.lengths = np.array([len(s) for s in enc.ids], dtype=np.int64)

    def groups(self, i0: int, i1: int) -> list[np.ndarray]:
        """The batches (sequence indices, in forward order) of sequences [i0, i1)."""
        seqs = np.arange(i0, i1)
        if self.length_window <= 1:
            return [seqs[s:s + self.batch_size] for s in range(0, len(seqs), self.batch_size)]
        out = []
        for w in range(0, len(seqs), self.length_window):
            win = seqs[w:w + self.length_window]
            win = win[np.lexsort((win, self.lengths[win]))]  # by length, then index: deterministic
            out += [win[s:s + self.batch_size] for s in range(0, len(win), self.batch_size)]
        return out

    def batches(self, chunks: list[int]):
        for c in chunks:
            sl = self.info.chunk_slice(c)
            i0, i1 = rows_of_sequences(self.offsets, sl.start, sl.stop)
            for seqs in self.groups(i0, i1):  # each chunk's batches start at its first sequence
                if self.length_window <= 1:
                    lo, hi = int(self.offsets[seqs[0]]), int(self.offsets[seqs[-1] + 1])
                    yield c, (seqs, slice(max(sl.start, lo) - lo, min(sl.stop, hi) - lo))
                else:
                    rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in seqs])
                    yield c, (seqs, np.flatnonzero((rows >= sl.start) & (rows < sl.stop)))

    def forward(self, item) -> Batch:
        seqs, keep = item
        with torch.inference_mode():
            logits, labels = response_logits(self.model, [self.enc.ids[i] for i in seqs], self.enc.prompt_len[seqs],
                                             self.pad_id)
        rows = {"sample_id": np.repeat(seqs, self.enc.response_len[seqs])}
        if self.length_window > 1:
            rows["row"] = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in seqs])
        return Batch(logits, labels, rows, keep)

    def padding(self, chunks: list[int]) -> float:
        """Share of the padded (batch × length) tokens that are padding, over the batches of ``chunks``."""
        pad = tot = 0
        for _, (seqs, _) in self.batches(chunks):
            L = self.lengths[seqs]
            tot += len(seqs) * int(L.max())
            pad += len(seqs) * int(L.max()) - int(L.sum())
        return pad / max(tot, 1)


def _restore_index(store: LogitStore, arr, want: np.ndarray) -> None:
    """Check a written index array against the data's; a chunk that is wholly the fill value (its file deleted by
    ``loca-pipe verify --repair``) is rewritten from the data, any other difference is a conflict."""
    have = arr[:]
    diff = have != want if have.shape == want.shape else None
    if diff is not None and not diff.any():
        return
    ch = int(arr.chunks[0])
    chunks = [] if diff is None else sorted({int(i) // ch for i in np.flatnonzero(diff)})
    if diff is None or any(not (have[c * ch:(c + 1) * ch] == arr.fill_value).all() for c in chunks):
        raise StoreConflictError(f"store {store.path!r} holds other sequence boundaries than this data; use another "
                                 f"--store or --overwrite")
    for c in chunks:
        arr[c * ch:(c + 1) * ch] = want[c * ch:(c + 1) * ch]
    log.info("rewrote %d repaired chunk(s) of %s from the data", len(chunks), arr.path)


def _write_index(store: LogitStore, enc: Encoded) -> None:
    """offsets + position, written once; on reopen they must be identical."""
    offsets = enc.offsets()
    position = np.concatenate([np.arange(n, dtype=np.int32) for n in enc.response_len]) if len(enc) else np.zeros(0, np.int32)
    g = store.group
    meta = dict(g.attrs).get(LM_ATTR, {})
    if meta.get("index_written"):
        for name, want in (("offsets", offsets), ("position", position)):
            _restore_index(store, g[name], want)
        return
    sizes = root_sizes(store.info, sequence_edge=len(offsets))
    for spec in layout.arrays(layout.ROOT, sizes, writer=layout.INDEX):  # offsets, position: the table's
        layout.create(g, spec, sizes, overwrite=True)
    g["offsets"][:] = offsets
    if len(position):
        g["position"][:] = position
    g.attrs[LM_ATTR] = {"index_written": True, "prompt_tokens_stored": 0, "row_unit": "response token"}


def cache_teacher(store_path: str, name: str, model, enc: Encoded, *, pad_id: int, eos_id: int, top_k: int,
                  temperatures: Sequence[float], dataset: dict[str, Any], provenance: dict[str, Any],
                  chunk_rows: int = 2048, batch_size: int = 32, logits_dtype: str | None = None,
                  id_dtype: str = "auto", sample_draws: int = 0, sample_tau: float = 1.0, seed: int = 0,
                  greedy_max_new_tokens: int = 0, greedy_chunk: int = 256, overwrite: bool = False,
                  recache: bool = False, max_chunks: int | None = None, progress: bool = False,
                  compress_logits: bool = False, codec: str = "lossless", shard: int | None = None,
                  num_shards: int | None = None, length_window: int = 0) -> CacheReport:
    """Cache teacher ``name`` over the response tokens of ``enc`` into the store at ``store_path`` (resumable).

    Runs on the one caching engine (pipeline/caching.py): sharding (torchrun's RANK / WORLD_SIZE or
    ``shard``/``num_shards``), the writer lease, background writes and completion are the image path's.
    ``max_chunks`` writes at most that many row chunks in this call (a time-sliced job; the next call
    resumes). ``greedy_max_new_tokens`` > 0 also caches the teacher's greedy responses (SeqKD).
    ``compress_logits`` puts zstd on the float arrays too; ``codec`` picks how top-k values and ids are
    stored (pipeline/codecs.py; lossless by default). ``overwrite`` replaces what conflicts, ``recache``
    also a complete identical teacher. ``length_window`` > 1 batches sequences by length within windows of
    that many sequences (:class:`TokenJob`); the store is the one written without it, its integer arrays bit for
    bit and its float summaries to fp32 rounding (other batch shapes); with ``sample_draws`` the draws come from
    the same distribution but consume the generator in another order, so they differ.
    """
    V = model_vocab(model)
    check_top_k(top_k, V)
    check_id_dtype(V, id_dtype)
    if sample_draws < 0 or sample_draws > 65535:
        raise ConfigError(f"sample_draws must be in [0, 65535]; got {sample_draws}")
    for n, s in enumerate(enc.ids):
        if s.max(initial=0) >= V:
            raise StoreError(f"sequence {n} holds token id {int(s.max())} but the teacher scores only {V} tokens; "
                             f"the tokenizer does not belong to this teacher")
    R, N = int(enc.offsets()[-1]), len(enc)
    if R == 0:
        raise StoreError("no response tokens to cache")
    info = StoreInfo(task=TASK, num_samples=N, num_views=1, num_rows=R, num_classes=V,
                     chunk_rows=int(chunk_rows), dataset=dataset)
    # dtype and attention implementation change the numbers (a resume must match them); where it ran does not
    where = placement(model)
    run = {"device": where["device"], "device_map": where["device_map"], "batch_size": int(batch_size),
           "length_window": int(length_window), "num_processes": caching.resolve_shard(shard, num_shards)[1]}
    prov = {**provenance, "sample_draws": int(sample_draws), "sample_tau": float(sample_tau), "sample_seed": int(seed),
            "greedy_max_new_tokens": int(greedy_max_new_tokens), "id_dtype": id_dtype, "dtype": where["dtype"],
            "attn_implementation": where["attn_implementation"], "run": {**provenance.get("run", {}), **run}}
    G, n_greedy = int(greedy_max_new_tokens), -(-N // greedy_chunk)
    # the sampled and greedy arrays are the store table's (pipeline/layout.py): sized here, absent when 0
    extra = {"dims": {"draw": int(sample_draws), "sequence": N, "new_token": G, "greedy_chunk": n_greedy if G else 0},
             "chunks": {"sequence": int(greedy_chunk)}}
    written = [0]

    def finish(writer, shard: int, num_shards: int) -> bool:  # greedy responses, chunk by chunk, sharded likewise
        if not G:
            return True
        g = writer.group
        for gc in np.flatnonzero(g["greedy_done"][:] == 0):
            if gc % num_shards != shard:
                continue
            s, e = gc * greedy_chunk, min(N, (gc + 1) * greedy_chunk)
            prompts = [enc.ids[i][:enc.prompt_len[i]] for i in range(s, e)]
            resp = greedy_generate(model, prompts, eos_id, pad_id, G, batch_size=max(batch_size, 64))
            block = np.full((e - s, G), -1, np.int32)
            for j, r in enumerate(resp):
                block[j, :len(r)] = r
            g["greedy_ids"][s:e] = block
            g["greedy_done"][int(gc)] = 1
            written[0] += 1
        return bool(g["greedy_done"][:].all())

    settings = CacheSettings(
        store=str(store_path), name=name, top_k=top_k, temperatures=tuple(float(t) for t in temperatures),
        logits_dtype=logits_dtype, compress_logits=compress_logits, codec=codec, sample_draws=int(sample_draws),
        sample_tau=float(sample_tau), sample_seed=int(seed), overwrite=overwrite, recache=recache, shard=shard,
        num_shards=num_shards, max_chunks=max_chunks, device_type=input_device(model).type, progress=progress,
        unit="tok")
    model.eval()
    rep = caching.cache(settings, info, prov, TokenJob(model, enc, pad_id, batch_size, info, length_window), extra_dims=extra,
                        on_store=lambda store: _write_index(store, enc), finish=finish)
    rep.extra.update(sequences=N, tokens=R, greedy_chunks_written=written[0],
                     tokens_per_s=rep.rows / max(rep.seconds_total, 1e-9), dtype=where["dtype"],
                     attn_implementation=where["attn_implementation"], **run)
    return rep


# ----------------------------------------------------------------------------------------------------
# Reading


@dataclass
class LMTeacherCache:
    """One complete teacher of a causal-LM store, loaded whole into memory (tokens × k is small)."""

    offsets: np.ndarray        # (N+1,) int64
    position: np.ndarray       # (R,) int32
    sample_id: np.ndarray      # (R,) int64
    label: np.ndarray          # (R,) int64 next-token ids
    topk_logits: np.ndarray    # (R, K) float32
    topk_ids: np.ndarray       # (R, K) int
    lse: np.ndarray            # (R, T) float32
    label_logit: np.ndarray    # (R,) float32
    temperatures: list[float]
    num_classes: int
    attrs: dict[str, Any]
    dataset: dict[str, Any]
    sampled_ids: np.ndarray | None = None
    sampled_counts: np.ndarray | None = None
    greedy_ids: np.ndarray | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def rows(self, seqs: Sequence[int]) -> np.ndarray:
        """Row indices of the given sequences, concatenated in the order given."""
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in seqs])

    def tau_index(self, tau: float) -> int:
        return require_tau(self.temperatures, tau)

    def greedy_responses(self) -> list[np.ndarray]:
        if self.greedy_ids is None:
            raise StoreError("this teacher was cached without greedy responses; re-cache with greedy_max_new_tokens > 0 "
                             "(SeqKD needs them)")
        return [row[row >= 0] for row in self.greedy_ids]


def open_token_store(store_path: str, expect_fingerprint: str | None = None) -> LogitStore:
    """A causal-LM token store; its data fingerprint must match when ``expect_fingerprint`` is given."""
    store = LogitStore.open(str(store_path))
    if store.info.task != TASK:
        raise StoreError(f"store {store_path!r} is a {store.info.task!r} store, not a language-model ({TASK}) one")
    if expect_fingerprint is not None and store.info.dataset.get("fingerprint") != expect_fingerprint:
        raise StoreConflictError(
            f"store {store_path!r} was cached on data with fingerprint {store.info.dataset.get('fingerprint')!r}, "
            f"but this run's data has {expect_fingerprint!r} (other examples, template, tokenizer or max_length); "
            f"re-cache or use the matching data")
    return store


def open_lm_cache(store_path: str, name: str | None = None, expect_fingerprint: str | None = None) -> LMTeacherCache:
    """A complete causal-LM teacher loaded whole: every row of :class:`~loca_pipe.pipeline.lm.streaming.TokenTeacher`
    (the one LM reader: fingerprint, completeness, codec version, checked chunk reads) in one read."""
    from loca_pipe.pipeline.lm.streaming import TokenTeacher

    t = TokenTeacher(store_path, name, expect_fingerprint)
    d = t.read(0, t.num_rows)
    return LMTeacherCache(
        offsets=t.offsets, position=d["position"], sample_id=d["sample_id"], label=d["label"],
        topk_logits=d["topk_logits"], topk_ids=d["topk_ids"], lse=d["lse"], label_logit=d["label_logit"],
        temperatures=list(t.temperatures), num_classes=t.num_classes, attrs=t.attrs, dataset=t.dataset,
        sampled_ids=d.get("sampled_ids"), sampled_counts=d.get("sampled_counts"),
        greedy_ids=read_checked(t.view.group["greedy_ids"]) if t.has_greedy else None)


def store_bytes(store_path: str) -> dict[str, int]:
    """Bytes on disk of each array of a local store, keyed by its path inside the store ("teachers/t/topk_ids")."""
    from pathlib import Path

    out: dict[str, int] = {}
    root = Path(store_path)
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        parts = f.relative_to(root).parts
        key = "/".join(parts[:parts.index("c")]) if "c" in parts else "/".join(parts[:-1])
        out[key or "."] = out.get(key or ".", 0) + f.stat().st_size
    return out


__all__ = ["cache_teacher", "open_lm_cache", "open_token_store", "LMTeacherCache", "CacheReport", "check_id_dtype", "check_top_k",
           "sample_sparse", "store_bytes", "TokenJob", "TASK"]
