"""Student training for causal LMs from the token cache: SFT, SeqKD, token-level KD and LoCa-KD.

- ``sft``: cross-entropy on the reference response tokens.
- ``seqkd``: cross-entropy on the teacher's own greedy responses (cached at stage one) — the paper's
  text-generation "KD" baseline (Kim & Rush 2016).
- ``kd``: β · τ² · KL(p_T ‖ p_S) on the sparse teacher (top-k ∪ {label} ∪ tail, exact from the store's top-k
  logits, lse at τ and label logit) + γ · CE. The student is normalised over the *full* vocabulary before
  its probabilities are gathered at the kept ids (:func:`loca_pipe.pipeline.losses.sparse_kd_loss`).
- ``loca``: the same with the sparse teacher calibrated by LoCa first
  (:func:`loca_pipe.pipeline.calibration.loca_sparse`; only mis-instructed tokens change).
- ``kd_sampled``: β · τ² · KL(p̂_T ‖ p_S) + γ · CE with p̂_T = counts / S from the Sparse Logit Sampling form
  (S ids drawn from p_T at the cached ``sample_tau`` with replacement; an unbiased estimate of p_T,
  Anshumann et al. 2025); τ must equal ``sample_tau``. The student is normalised over the full vocabulary.
- ``kd_star``: ``kd`` with the teacher's mis-instructed tokens (label not the strict winner of the sparse
  teacher, :func:`~loca_pipe.pipeline.calibration.mis_instruction_mask`) dropped from the KD term — each kept
  token weighs what it weighs in KD, dropped ones 0 (the paper's KD*, as the image ``kd_star``); CE covers all.

Every method is one entry of :data:`METHODS` (what it reads from the store, its loss, the method the report
pairs it with); the losses take the batch's teacher rows (a dict, as the trainer's collator attaches them) or
the batch's sequence ids (the rows are then read from the teacher).

Evaluation: Rouge-L of greedy generations against the reference responses, token accuracy and perplexity
of the reference responses under teacher forcing (held-out data).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.calibration import loca_sparse, mis_instruction_mask, sparse_from_topk
from loca_pipe.pipeline.errors import ConfigError, StoreConflictError
from loca_pipe.pipeline.lm.cache import LMTeacherCache
from loca_pipe.pipeline.lm.tokenizer import Encoded
from loca_pipe.pipeline.losses import LossConfig, sparse_kd_loss

log = logging.getLogger(__name__)
SPARSE_ARRAYS = ("topk_logits", "topk_ids", "lse", "label_logit")


@dataclass(frozen=True)
class LMMethod:
    """One student method: ``target`` None (cross-entropy only), "sparse" (top-k ∪ label ∪ tail at τ) or
    "sampled" (Sparse Logit Sampling counts); ``loca``: the sparse teacher LoCa-calibrated at α first;
    ``drop_mis``: mis-instructed tokens dropped from the KD term (KD*); ``data``: "reference" responses or the
    teacher's cached "greedy" ones; ``base``: the method the report's paired difference is taken against."""

    name: str
    target: Optional[str]
    description: str
    base: Optional[str] = None
    loca: bool = False
    drop_mis: bool = False
    data: str = "reference"

    @property
    def arrays(self) -> tuple[str, ...]:
        """The teacher arrays the method reads per batch (what a streamed teacher keeps in its buffer)."""
        if self.target == "sampled":
            return ("sampled_ids", "sampled_counts")
        if self.target == "sparse":
            return SPARSE_ARRAYS
        return ("label",)


METHODS: dict[str, LMMethod] = {m.name: m for m in (
    LMMethod("sft", None, "cross-entropy on the reference responses"),
    LMMethod("seqkd", None, "cross-entropy on the teacher's cached greedy responses (SeqKD)", base="sft",
             data="greedy"),
    LMMethod("kd", "sparse", "sparse token-level KD + CE", base="sft"),
    LMMethod("loca", "sparse", "KD on the LoCa-calibrated sparse teacher + CE", base="kd", loca=True),
    LMMethod("kd_sampled", "sampled", "KD on Sparse Logit Sampling targets + CE", base="kd"),
    LMMethod("kd_star", "sparse", "KD with the teacher's mis-instructed tokens dropped from the KD term + CE "
             "(KD*)", base="kd", drop_mis=True),
)}


@dataclass(frozen=True)
class KDSettings(LossConfig):
    """The one loss config (:class:`~loca_pipe.pipeline.losses.LossConfig`, with its checks) at the language
    models' defaults: L = β·L_KD + γ·CE, τ = 1, β = γ = 0.5 (paper, ImageNet/LLM-style)."""

    tau: float = 1.0
    beta: float = 0.5
    gamma: float = 0.5


def check_method(method: str) -> LMMethod:
    """The registry entry of ``method``; an unknown name's error lists the valid ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown student method {method!r}; valid methods are {list(METHODS)}")
    return METHODS[method]


def check_cache_matches(cache: LMTeacherCache, enc: Encoded) -> None:
    """The cache's rows must be exactly this data's response tokens (same sequences, same order)."""
    off = enc.offsets()
    if len(cache.offsets) != len(off) or not np.array_equal(cache.offsets, off):
        raise StoreConflictError(f"the teacher cache holds {cache.num_sequences} sequences / {int(cache.offsets[-1])} "
                                 f"response tokens, this data {len(enc)} / {int(off[-1])}; re-cache the teacher on the "
                                 f"same data, template, tokenizer and max_length")
    labels = np.concatenate([s[p:] for s, p in zip(enc.ids, enc.prompt_len)])
    if not np.array_equal(cache.label, labels):
        bad = int(np.flatnonzero(cache.label != labels)[0])
        raise StoreConflictError(f"the teacher cache's next-token labels differ from this data's response tokens "
                                 f"(first at row {bad}); re-cache the teacher on the same data and tokenizer")


def teacher_rows(src, seq_idx: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's arrays for the rows of the given sequences (in that order), from a whole
    :class:`LMTeacherCache` or a :mod:`~loca_pipe.pipeline.lm.streaming` teacher (in memory or streamed)."""
    if isinstance(src, LMTeacherCache):
        rows = src.rows(seq_idx)
        out = {k: getattr(src, k)[rows] for k in ("topk_logits", "topk_ids", "lse", "label_logit")}
        if src.sampled_ids is not None:
            out.update(sampled_ids=src.sampled_ids[rows], sampled_counts=src.sampled_counts[rows])
        return out
    return src.batch(seq_idx)


def _rows_of(src, batch) -> dict[str, Any]:
    """The batch's teacher rows: given (a dict of arrays or tensors), or read for the sequence ids ``batch``."""
    return batch if isinstance(batch, dict) else teacher_rows(src, batch)


def _t(x, device) -> torch.Tensor:
    """A teacher array as a tensor on ``device`` (unsigned ids widened to int64)."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "u":
        x = x.astype(np.int64)
    return torch.as_tensor(x).to(device)


def _sd_from(d: dict[str, Any], t: int, labels: torch.Tensor, tau: float, alpha: float | None):
    dev = labels.device
    sd = sparse_from_topk(_t(d["topk_logits"], dev).float(), _t(d["topk_ids"], dev).long(),
                          _t(d["lse"], dev)[:, t].float().contiguous(), _t(d["label_logit"], dev).float(), labels, tau)
    if alpha is not None:
        sd, _ = loca_sparse(sd, labels, alpha)
    return sd


def check_student_vocab(model, folder, teacher_tok, teacher_vocab: int) -> None:
    """A student started from a model folder must share the teacher's vocabulary: its output size equals the
    teacher's, and a tokenizer saved in the folder has the same tokens at the same ids (file names and
    formats may differ: the loaded vocabularies are compared)."""
    from pathlib import Path

    from loca_pipe.pipeline.errors import ModelError
    from loca_pipe.pipeline.lm import models, tokenizer

    V = models.model_vocab(model)
    folder = Path(folder)
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    student_tok = tokenizer.load_tokenizer(folder) if any((folder / f).exists() for f in tok_files) else None
    if student_tok is not None:
        tokenizer.check_same_tokenizer(teacher_tok, student_tok)
    if V != teacher_vocab:
        first = ""
        if student_tok is None:
            first = " (the folder has no tokenizer to compare token by token)"
        raise ModelError(f"the student at {str(folder)!r} outputs {V} logits but the teacher's vocabulary has "
                         f"{teacher_vocab} tokens{first}; token-level distillation needs the same vocabulary (ids and "
                         f"size) — start from a model with the teacher's tokenizer, or resize its embeddings to "
                         f"{teacher_vocab}")


def arrays_for(method: str) -> tuple[str, ...]:
    """The teacher arrays a method reads per batch (what a streamed teacher keeps in its buffer)."""
    return check_method(method).arrays


def check_source_matches(src, enc: Encoded) -> None:
    """:func:`check_cache_matches` for a streaming teacher: offsets compared whole, labels block by block."""
    if isinstance(src, LMTeacherCache):
        return check_cache_matches(src, enc)
    t = src.t
    off = enc.offsets()
    if len(t.offsets) != len(off) or not np.array_equal(t.offsets, off):
        raise StoreConflictError(f"the teacher cache holds {t.num_sequences} sequences / {t.num_rows} "
                                 f"response tokens, this data {len(enc)} / {int(off[-1])}; re-cache the teacher on the "
                                 f"same data, template, tokenizer and max_length")
    labels = np.concatenate([s[p:] for s, p in zip(enc.ids, enc.prompt_len)]) if len(enc) else np.zeros(0, np.int64)
    t.check_labels(lambda lo, hi: labels[lo:hi])


def sparse_targets(cache: LMTeacherCache, rows: np.ndarray, labels: torch.Tensor, tau: float,
                   alpha: float | None):
    """Sparse teacher at τ for the given rows; LoCa-calibrated when ``alpha`` is given."""
    t = cache.tau_index(tau)
    d = {k: getattr(cache, k)[rows] for k in ("topk_logits", "topk_ids", "lse", "label_logit")}
    return _sd_from(d, t, labels, tau, alpha)


def make_loss(method: str, cache, kd: KDSettings, fused: bool = False,
              chunk_rows: int = 256) -> Callable | None:
    """The per-batch loss (None = plain cross-entropy), ``loss(logits (R, V), labels (R,), batch)`` or, fused,
    ``loss(hidden (R, d), labels, batch, output_layer)``; ``batch`` is the batch's teacher rows (a dict) or its
    sequence ids. Every loss is a mean over the R response tokens.

    ``cache``: a whole :class:`LMTeacherCache` or a streaming teacher (``streaming.open_teacher``). ``fused``:
    the vocabulary-scale loss of :mod:`~loca_pipe.pipeline.lm.vocab_losses` on the student's hidden states
    and output projection, ``chunk_rows`` tokens at a time (the same loss and gradients within fp32 rounding,
    without the (tokens, V) logits and their autograd temporaries)."""
    m = check_method(method)
    if m.target is None:
        return None
    if cache is None:
        raise ConfigError(f"method {method!r} needs a teacher cache (--store)")
    if m.target == "sampled":
        base = _sampled_loss(cache, kd)
        if not fused:
            return base
        return _fused(lambda labels, batch: _sampled_target(cache, labels, batch, kd), kd, chunk_rows)
    alpha = kd.alpha if m.loca else None

    t = cache.tau_index(kd.tau)  # fail before training when τ was not cached

    if fused:
        from loca_pipe.pipeline.lm.vocab_losses import KDTarget

        def target(labels, batch):
            sd = _sd_from(_rows_of(cache, batch), t, labels, kd.tau, alpha)
            tg = KDTarget.sparse(sd, labels, kd.beta, kd.gamma)
            if m.drop_mis:  # a row with no teacher mass has KD loss 0 and KD gradient 0 (vocab_losses)
                keep = (~mis_instruction_mask(sd, labels)).to(tg.weights.dtype)
                tg = dataclasses.replace(tg, weights=tg.weights * keep[:, None], tail=tg.tail * keep)
            return tg

        return _fused(target, kd, chunk_rows)

    def loss(logits: torch.Tensor, labels: torch.Tensor, batch) -> torch.Tensor:
        sd = _sd_from(_rows_of(cache, batch), t, labels, kd.tau, alpha)
        if m.drop_mis:
            from loca_pipe.pipeline.losses import _kd_star_mean, _sparse_kd_rows

            keep = ~mis_instruction_mask(sd, labels)
            sd = type(sd)(sd.ids, sd.probs.to(logits.dtype), sd.tail.to(logits.dtype))
            distill = _kd_star_mean(_sparse_kd_rows(logits, sd, kd.tau), keep) * kd.tau ** 2
        else:
            distill = sparse_kd_loss(logits, sd, kd.tau)
        return kd.beta * distill + kd.gamma * F.cross_entropy(logits, labels)

    return loss


def _fused(target_of: Callable, kd: KDSettings, chunk_rows: int) -> Callable:
    from loca_pipe.pipeline.lm.vocab_losses import fused_linear_kd_loss

    def loss(hidden: torch.Tensor, labels: torch.Tensor, batch, head) -> torch.Tensor:
        return fused_linear_kd_loss(hidden, head.weight, head.bias, target_of(labels, batch), kd.tau, chunk_rows,
                                    recompute=True)

    loss.wants_hidden = True
    return loss


def _sampled_target(cache, labels: torch.Tensor, batch, kd: KDSettings):
    from loca_pipe.pipeline.lm.vocab_losses import KDTarget

    d = _rows_of(cache, batch)
    return KDTarget.sampled(_t(d["sampled_ids"], labels.device), _t(d["sampled_counts"], labels.device).long(),
                            labels, kd.beta, kd.gamma)


def sampled_kd(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · mean_rows Σ_j p̂_j (log p̂_j − log q_j), p̂ = counts / counts.sum(1), q = softmax(z_S/τ) over the
    full vocabulary gathered at the sampled ids (unused slots: count 0, id -1)."""
    lq = F.log_softmax(student_logits.float() / tau, dim=1)  # (R, V)
    valid = counts > 0
    c = counts.float()
    ph = c / c.sum(1, keepdim=True)  # (R, S)
    lq_ids = lq.gather(1, ids.clamp_min(0).long())
    ent = torch.where(valid, ph * ph.clamp_min(1e-30).log(), 0.0).sum(1)
    cross = torch.where(valid, ph * lq_ids, 0.0).sum(1)
    return tau * tau * (ent - cross).mean()


def _sampled_loss(cache, kd: KDSettings) -> Callable:
    has = (cache.sampled_ids is not None and cache.sampled_counts is not None) if isinstance(cache, LMTeacherCache) \
        else "sampled_ids" in cache.keys and "sampled_counts" in cache.keys
    if not has:
        raise ConfigError("method 'kd_sampled' needs the sampled form in the cache; re-cache with sample_draws > 0")
    st = float(cache.attrs.get("sample_tau", 1.0))
    from loca_pipe.pipeline.store import find_tau

    if find_tau((st,), kd.tau) is None:
        raise ConfigError(f"method 'kd_sampled' trains at the temperature the ids were drawn at (sample_tau={st}); "
                          f"got tau={kd.tau}")

    def loss(logits: torch.Tensor, labels: torch.Tensor, batch) -> torch.Tensor:
        d = _rows_of(cache, batch)
        ids = _t(d["sampled_ids"], logits.device)
        cnt = _t(d["sampled_counts"], logits.device).long()
        return kd.beta * sampled_kd(logits, ids, cnt, kd.tau) + kd.gamma * F.cross_entropy(logits, labels)

    return loss


def seqkd_encoding(enc: Encoded, greedy: list[np.ndarray], eos_id: int, max_length: int) -> Encoded:
    """The training prompts with the teacher's greedy responses (+ eos) as targets."""
    if len(greedy) != len(enc):
        raise StoreConflictError(f"the cache holds {len(greedy)} greedy responses for {len(enc)} training prompts; "
                                 f"re-cache the teacher on this data")
    ids = []
    for s, p, g in zip(enc.ids, enc.prompt_len, greedy):
        seq = np.concatenate([s[:p], g.astype(np.int64), [eos_id]])[:max_length]
        ids.append(seq)
    return Encoded(ids, enc.prompt_len.copy())
