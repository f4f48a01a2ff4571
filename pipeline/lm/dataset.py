"""A token store as a map-style torch ``Dataset`` for any training loop (plain PyTorch, Hugging Face
``Trainer``, TRL, accelerate): one item per sequence, the teacher's rows decoded through whatever codec
wrote the store, normalised over the full vocabulary at a chosen τ with the stored lse, LoCa-calibrated
on request.

Item ``i`` (L = the sequence's length, K = the store's top-k), aligned the Hugging Face way (position j's
logits predict token j + 1; ``labels`` are the inputs, the model shifts them):

=================  ============  =================================================================
key                shape, dtype  what it holds
=================  ============  =================================================================
input_ids          (L,) int64    bos + prompt + response (+ eos), as the caller's data holds it
labels             (L,) int64    ``input_ids`` with the prompt masked (−100)
teacher_mask       (L,) bool     position j has teacher rows (it predicts a response token j + 1)
teacher_ids        (L, K) int64  the teacher's top-k ids for token j + 1 (0 where unmasked)
teacher_logprobs   (L, K) fp32   their log-probs at τ over the full vocabulary (z/τ − lse_τ; LoCa'd)
label_logprob      (L,) fp32     log p of token j + 1 (the exact label logit outside the top-k, its
                                 top-k entry inside it, as the codec decoded it; LoCa'd)
label_in_topk      (L,) bool     token j + 1 is among the top-k ids
tail_mass          (L,) fp32     the mass outside top-k ∪ {label}: 1 − Σ kept, ≥ 0
label_known        (L,) bool     only for a store written by ``lm-import``: False where token j + 1 is outside
                                 the cache's top-k, so ``label_logprob`` is the upper bound log(tail) (and
                                 ``tail_mass`` 0: the label took the whole tail)
=================  ============  =================================================================

Memory: the dataset holds the sequence index (offsets, 8 B per sequence), the caller's token ids and at
most ``cache_blocks`` decoded blocks of rows (one block = the sequences that start in ``block_rows`` rows
of whole store chunks, 16,384 by default: one read per array per block),
so a store larger than RAM is read a block at a time. Random access reads and decodes a whole block for
one sequence; :class:`BlockShuffleSampler` orders an epoch block by block (blocks in random order,
sequences shuffled within a window of ``window_blocks`` blocks), so each block is decoded once per epoch
— the chunk-granular shuffle the students' streamed teacher uses.

``sidecar=True`` (or a folder) instead decodes every row once into a memory-mapped sidecar beside the store
(``<store>.dataset-sidecar/<teacher>-<key>/``, one ``.npy`` per decoded array, 8·K + 9 bytes per token), keyed by
the teacher's identity and write times, its codec, the data fingerprint, τ and α — a re-cached store or another
τ/α gets a new sidecar, never a stale one. It is built block by block in a temporary folder and renamed into
place. Items are then slices of the memory maps: no block reads or decodes, and memory stays what the page cache
gives (the OS evicts pages of a sidecar larger than RAM). Measured in ``python -m benchmarks lm`` [5].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from loca_pipe.pipeline.errors import ConfigError, StoreConflictError
from loca_pipe.pipeline.lm.streaming import TokenTeacher

ROW_KEYS = ("topk_logits", "topk_ids", "lse", "label_logit", "label")
# The decoded sidecar (``sidecar=True``): what ``_targets`` returns, one .npy file per array, (dtype, ndim)
SIDECAR_ARRAYS = {"teacher_ids": (np.int32, 2), "teacher_logprobs": (np.float32, 2), "label_logprob": (np.float32, 1),
                  "label_in_topk": (np.bool_, 1), "tail_mass": (np.float32, 1)}
SIDECAR_SUFFIX = ".dataset-sidecar"
SIDECAR_VERSION = 1


class TokenStoreDataset(torch.utils.data.Dataset):
    """Map-style dataset over one teacher of a token store, keyed by sequence (see the module doc).

    ``input_ids``: the tokenized sequences the store was cached on (a list of int arrays, or an
    :class:`~loca_pipe.pipeline.lm.tokenizer.Encoded`, whose ``prompt_len`` is then used); ``prompt_len``:
    tokens before each response. Their response tokens must equal the store's labels (checked, block by
    block: another tokenizer or other data is refused). ``tau`` must be a declared temperature;
    ``alpha`` (0 < α, < 1 advised) applies LoCa to every row. ``block_rows``: rows per block, rounded down to
    whole store chunks (at least one); ``cache_blocks``: decoded blocks held. ``sidecar``: True (beside the
    store) or a folder: read through the decoded, memory-mapped sidecar (module doc), built on first use."""

    def __init__(self, store_path: str, input_ids: Any, prompt_len: Sequence[int] | None = None, *,
                 teacher: str | None = None, tau: float = 1.0, alpha: float | None = None,
                 expect_fingerprint: str | None = None, cache_blocks: int = 2, block_rows: int = 16384,
                 sidecar: bool | str = False):
        if prompt_len is None:
            if not hasattr(input_ids, "prompt_len"):
                raise ConfigError("TokenStoreDataset needs prompt_len (tokens before each response) with plain "
                                  "input_ids; pass an Encoded, or input_ids and prompt_len")
            prompt_len, input_ids = input_ids.prompt_len, input_ids.ids
        self.ids = [np.asarray(s, np.int64) for s in input_ids]
        self.prompt_len = np.asarray(prompt_len, np.int64)
        self.t = TokenTeacher(store_path, teacher, expect_fingerprint)
        self.ti = self.t.tau_index(tau)
        # an imported cache (lm-import) flags labels outside its top-k: items then carry label_known
        self.flagged = "import_flags" in self.t.keys
        self.row_keys = ROW_KEYS + (("import_flags",) if self.flagged else ())
        self.tau = float(tau)
        if alpha is not None:
            from loca_pipe.pipeline.calibration import check_alpha

            check_alpha(alpha)
        self.alpha = alpha
        self.cache_blocks = max(1, int(cache_blocks))
        self._check_data()
        off = self.t.offsets
        self.block_rows = max(1, int(block_rows) // self.t.chunk_rows) * self.t.chunk_rows  # whole store chunks
        chunk_of = off[:-1] // self.block_rows
        self.block_of = np.concatenate([[0], np.cumsum(np.diff(chunk_of) != 0)]).astype(np.int64) \
            if len(chunk_of) else np.zeros(0, np.int64)
        self.block_seqs = np.split(np.arange(len(chunk_of)), np.flatnonzero(np.diff(chunk_of)) + 1) \
            if len(chunk_of) else []
        self._cache: OrderedDict[int, tuple[int, dict[str, np.ndarray]]] = OrderedDict()
        self.blocks_read = 0
        self.sidecar_path: Path | None = None
        self._side: dict[str, np.ndarray] | None = None
        if sidecar:
            root = Path(sidecar) if isinstance(sidecar, (str, Path)) and not isinstance(sidecar, bool) \
                else Path(f"{store_path}{SIDECAR_SUFFIX}")
            self._side = self._open_sidecar(root)

    def _check_data(self) -> None:
        t = self.t
        lens = np.array([len(s) for s in self.ids], np.int64) - self.prompt_len
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        if len(self.ids) != len(self.prompt_len) or len(off) != len(t.offsets) or not np.array_equal(off, t.offsets):
            raise StoreConflictError(
                f"the teacher store holds {t.num_sequences} sequences / {t.num_rows} response tokens, these "
                f"input_ids {len(self.ids)} / {int(off[-1])}; pass the sequences (same tokenizer, template and "
                f"max_length) the store was cached on")
        labels = np.concatenate([s[p:] for s, p in zip(self.ids, self.prompt_len)]) if self.ids else np.zeros(0)
        try:
            t.check_labels(lambda lo, hi: labels[lo:hi])
        except StoreConflictError as e:
            raise StoreConflictError(f"{e} (is the tokenizer the store's?)") from None

    def __len__(self) -> int:
        return self.t.num_sequences

    @property
    def num_classes(self) -> int:
        return self.t.num_classes

    @property
    def top_k(self) -> int:
        return self.t.top_k

    def _block(self, b: int) -> tuple[int, dict[str, np.ndarray]]:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        seqs = self.block_seqs[b]
        lo, hi = int(self.t.offsets[seqs[0]]), int(self.t.offsets[seqs[-1] + 1])
        d = self.t.read(lo, hi, self.row_keys)
        self._cache[b] = (lo, self._targets(d))
        self.blocks_read += 1
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return self._cache[b]

    def _targets(self, d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows → log-probs at τ over the full vocabulary (LoCa'd on request), the label's, the tail."""
        from loca_pipe.pipeline.calibration import loca_sparse, sparse_from_topk

        ids = torch.as_tensor(np.asarray(d["topk_ids"]).astype(np.int64))
        y = torch.as_tensor(np.asarray(d["label"]).astype(np.int64))
        sd = sparse_from_topk(torch.as_tensor(d["topk_logits"]), ids, torch.as_tensor(np.ascontiguousarray(
            d["lse"][:, self.ti])), torch.as_tensor(d["label_logit"]), y, self.tau)
        if self.alpha is not None and len(y):
            sd, _ = loca_sparse(sd, y, self.alpha)
        K = ids.shape[1]
        in_top = (ids == y[:, None]).any(1)
        p = sd.probs.double()
        p_label = torch.where(in_top, (p[:, :K] * (sd.ids[:, :K] == y[:, None])).sum(1), p[:, K])
        with np.errstate(divide="ignore"):
            out = {"teacher_ids": sd.ids[:, :K].numpy(), "teacher_logprobs": np.log(p[:, :K].numpy()).astype(np.float32),
                   "label_logprob": np.log(p_label.numpy()).astype(np.float32), "label_in_topk": in_top.numpy(),
                   "tail_mass": sd.tail.float().numpy()}
        if self.flagged:  # lm-import's bit 1: the label is outside the stored top-k, its log-prob only a bound
            from loca_pipe.pipeline.lm.import_distillkit import LABEL_UNKNOWN

            out["label_known"] = (np.asarray(d["import_flags"]) & LABEL_UNKNOWN) == 0
        return out

    # -- the decoded sidecar ------------------------------------------------------------------------
    def sidecar_key(self) -> str:
        """What the decoded rows depend on: the teacher's identity and write times (a re-cached store gets new
        ones), its codec, the data fingerprint, τ and α."""
        a = self.t.attrs
        ident = {"v": SIDECAR_VERSION, "teacher": self.t.view.name, "created": a.get("created"),
                 "finished": a.get("finished"), "weights": a.get("weights_sha256"), "codec": a.get("codec"),
                 "fingerprint": self.t.dataset.get("fingerprint"), "rows": self.t.num_rows, "k": self.top_k,
                 "tau": self.tau, "alpha": self.alpha}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _open_sidecar(self, root: Path) -> dict[str, np.ndarray]:
        """The decoded rows memory-mapped from ``root/<teacher>-<key>/`` (built once, block by block, in a
        temporary folder renamed into place: a killed build leaves no half sidecar)."""
        final = root / f"{self.t.view.name}-{self.sidecar_key()}"
        if not (final / "done.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
            try:
                R, K = self.t.num_rows, self.top_k
                out = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=dt, shape=(R, K)[:nd])
                       for k, (dt, nd) in self._sidecar_arrays().items()}
                for b, seqs in enumerate(self.block_seqs):
                    lo, hi = int(self.t.offsets[seqs[0]]), int(self.t.offsets[seqs[-1] + 1])
                    tg = self._targets(self.t.read(lo, hi, self.row_keys))
                    for k, v in out.items():
                        v[lo:hi] = tg[k]
                for v in out.values():
                    v.flush()
                del out
                (tmp / "done.json").write_text(json.dumps({"store": str(self.t.path), "tau": self.tau,
                                                           "alpha": self.alpha, "rows": self.t.num_rows}))
                try:
                    os.replace(tmp, final)
                except OSError:  # another process finished the same sidecar first: use theirs
                    if not (final / "done.json").is_file():
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        self.sidecar_path = final
        return {k: np.load(final / f"{k}.npy", mmap_mode="r") for k in self._sidecar_arrays()}

    def _sidecar_arrays(self) -> dict[str, tuple[Any, int]]:
        return {**SIDECAR_ARRAYS, **({"label_known": (np.bool_, 1)} if self.flagged else {})}

    def rows(self, i: int) -> dict[str, np.ndarray]:
        """The teacher's decoded rows of sequence ``i`` (one per response token)."""
        if self._side is not None:
            a, b = int(self.t.offsets[i]), int(self.t.offsets[i + 1])
            return {k: v[a:b] for k, v in self._side.items()}
        lo, blk = self._block(int(self.block_of[i]))
        a, b = int(self.t.offsets[i]) - lo, int(self.t.offsets[i + 1]) - lo
        return {k: v[a:b] for k, v in blk.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range (the store holds {len(self)})")
        ids, P = self.ids[i], int(self.prompt_len[i])
        L, K = len(ids), self.top_k
        r = self.rows(i)
        at = slice(P - 1, L - 1)  # position j predicts token j + 1: the response tokens P .. L−1
        mask = np.zeros(L, bool)
        mask[at] = True
        t_ids = np.zeros((L, K), np.int64)
        t_lp = np.zeros((L, K), np.float32)
        lab_lp, tail, in_top = np.zeros(L, np.float32), np.zeros(L, np.float32), np.zeros(L, bool)
        t_ids[at], t_lp[at] = r["teacher_ids"], r["teacher_logprobs"]
        lab_lp[at], tail[at], in_top[at] = r["label_logprob"], r["tail_mass"], r["label_in_topk"]
        labels = ids.copy()
        labels[:P] = -100
        item = {"input_ids": torch.as_tensor(ids), "labels": torch.as_tensor(labels),
                "teacher_mask": torch.as_tensor(mask), "teacher_ids": torch.as_tensor(t_ids),
                "teacher_logprobs": torch.as_tensor(t_lp), "label_logprob": torch.as_tensor(lab_lp),
                "label_in_topk": torch.as_tensor(in_top), "tail_mass": torch.as_tensor(tail)}
        if self.flagged:
            known = np.ones(L, bool)
            known[at] = r["label_known"]
            item["label_known"] = torch.as_tensor(known)
        return item


class BlockShuffleSampler(torch.utils.data.Sampler):
    """An epoch of sequence indices, block by block: blocks in a random order, sequences shuffled within
    each window of ``window_blocks`` consecutive blocks of that order (give the dataset at least as many
    ``cache_blocks``, so each block is decoded once per epoch). ``set_epoch`` changes the permutation."""

    def __init__(self, dataset: TokenStoreDataset, window_blocks: int = 2, seed: int = 0):
        self.blocks = dataset.block_seqs
        self.window = max(1, int(window_blocks))
        self.seed, self.epoch = int(seed), 0
        self.n = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.blocks))
        for w in range(0, len(order), self.window):
            seqs = np.concatenate([self.blocks[b] for b in order[w:w + self.window]])
            yield from (int(s) for s in rng.permutation(seqs))


def collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of items to the longest: ``input_ids`` with ``pad_id``, ``labels`` with −100,
    ``teacher_mask``/``label_in_topk`` with False, the rest with 0; adds ``attention_mask``."""
    L = max(len(it["input_ids"]) for it in items)
    out: dict[str, torch.Tensor] = {}
    for k in items[0]:
        fill = pad_id if k == "input_ids" else -100 if k == "labels" else 0
        first = items[0][k]
        buf = torch.full((len(items), L, *first.shape[1:]), fill, dtype=first.dtype)
        for n, it in enumerate(items):
            buf[n, :len(it[k])] = it[k]
        out[k] = buf
    out["attention_mask"] = torch.zeros((len(items), L), dtype=torch.long)
    for n, it in enumerate(items):
        out["attention_mask"][n, :len(it["input_ids"])] = 1
    return out


class Collator:
    """:func:`collate` with a fixed ``pad_id`` (picklable, for DataLoader workers and ``Trainer``)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = int(pad_id)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id)


def kd_target(batch: dict[str, torch.Tensor], beta: float = 1.0, gamma: float = 0.0):
    """The project's :class:`~loca_pipe.pipeline.lm.vocab_losses.KDTarget` for a collated batch's masked
    positions (in row-major order: the rows of ``logits[batch["teacher_mask"]]``): the top-k ∪ {label}
    weights and the tail mass; ``gamma`` adds γ·CE on the next tokens."""
    from loca_pipe.pipeline.lm.vocab_losses import KDTarget

    m = batch["teacher_mask"]
    ids = batch["teacher_ids"][m]
    nxt = torch.roll(batch["input_ids"], -1, dims=1)[m]  # token j + 1
    w = batch["teacher_logprobs"][m].exp()
    w_label = torch.where(batch["label_in_topk"][m], 0.0, batch["label_logprob"][m].exp())
    return KDTarget(ids=torch.cat([ids, nxt[:, None]], 1), weights=torch.cat([w, w_label[:, None]], 1),
                    tail=batch["tail_mass"][m].float(), labels=nxt, beta=beta, gamma=gamma)


__all__ = ["TokenStoreDataset", "BlockShuffleSampler", "collate", "Collator", "kd_target"]
