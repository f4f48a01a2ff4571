"""LoCa — label-aware logit calibration of a teacher's tempered distribution (arXiv 2409.04778, Eq. 14–18).

Notation: p = softmax(z/τ) the teacher's tempered distribution over C classes, y the label, and
p_k = max_{i≠y} p_i the strongest *other* class. Only **mis-instruction** rows change — the rule (label
not the strict winner, ties counted) is stated once, in :func:`mis_instruction_mask`:

    σ = 1 / (1 − p_y + p_k),   s = α·σ,
    p′_i = s·p_i  (i ≠ y),      p′_y = 1 − s·(1 − p_y).

(The paper's Eq. 14 sums over "i ≠ k"; the sum that makes Σp′ = 1 is over i ≠ y.)
Consequences, for 0 < α < 1: Σp′ = 1; p′_y − max_{i≠y} p′_i = 1 − α; p′_i/p′_j = p_i/p_j for i, j ≠ y;
rows where the label already strictly wins are returned bit for bit.

On a tie row p_k = p_y, so σ = 1, s = α and the label ends strictly ahead by 1 − α. The mask is computed
on the same fp32 probabilities that are calibrated, so the guarantees hold for the returned numbers, not
only in exact arithmetic.

Everything here is vectorised torch (no Python loop over samples) and computes in fp32 for fp16/bf16
inputs (fp64 stays fp64). NaN inputs raise :class:`NumericsError`, bad arguments :class:`ConfigError`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from loca_pipe.pipeline.errors import ConfigError, NumericsError

__all__ = [
    "LocaResult",
    "LocaWarning",
    "SparseDist",
    "check_alpha",
    "loca",
    "loca_calibrate",
    "loca_calibrate_blocks",
    "loca_from_logits",
    "loca_label_logit",
    "loca_sparse",
    "mis_instruction_mask",
    "sparse_from_topk",
    "swap",
    "swap_sparse",
]

_TORCH_OK = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}

#: Tolerance on Σp = 1 when a caller hands in probabilities (fp16 storage rounds each entry).
PROB_SUM_TOL = 1e-2


class LocaWarning(UserWarning):
    """α ≥ 1: LoCa no longer guarantees that the calibrated target predicts the label."""


class LocaResult(NamedTuple):
    """Calibrated distribution plus per-row bookkeeping for statistics.

    probs: (B, C) calibrated probabilities; calibrated: (B,) bool, True for mis-instruction rows
    (the ones that changed); scale: (B,) the factor s for calibrated rows, 1.0 elsewhere.
    """

    probs: torch.Tensor
    calibrated: torch.Tensor
    scale: torch.Tensor


class SparseDist(NamedTuple):
    """A teacher distribution kept as top-k ∪ {label} ∪ one tail bucket.

    ids (B, K+1) int64: columns 0..K-1 are the teacher's top-k class ids (descending probability),
    column K is always the label id. probs (B, K+1): the matching probabilities; column K holds p_y when
    the label is not in the top-k and 0 when it is (its mass is already counted). tail (B,): the mass of
    every class not kept, 1 − probs.sum(1) clamped at 0. After :func:`loca_sparse` the columns are no
    longer sorted (the label is the largest entry of calibrated rows).
    """

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor


# ---------------------------------------------------------------------------------------------------
# argument checks


def check_alpha(alpha: float) -> float:
    """Validate α: an error for α ≤ 0 or non-finite, a :class:`LocaWarning` for α ≥ 1."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"LoCa alpha must be a number in (0, 1); got {alpha!r}") from None
    if not math.isfinite(a) or a <= 0.0:
        raise ConfigError(
            f"LoCa alpha must be a finite number in (0, 1) (the paper uses 0.9–0.999); got {alpha!r}. "
            f"alpha <= 0 would zero or flip the non-target probabilities; use a value such as 0.95")
    if a >= 1.0:
        warnings.warn(
            f"LoCa alpha={a} >= 1: prediction correctness is no longer guaranteed (the calibrated target "
            f"may not put the label first; the paper's Table 6 shows such alphas do worse than plain KD). "
            f"Use alpha in (0, 1), e.g. 0.95.", LocaWarning, stacklevel=3)
    return a


def _check_tau(tau: float, name: str = "tau") -> float:
    """A temperature: a finite number > 0 (the one check, used by calibration and the losses)."""
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number; got {tau!r}") from None
    if not math.isfinite(t) or t <= 0.0:
        raise ConfigError(f"{name} must be a finite temperature > 0 (e.g. 4.0 for CIFAR-100, "
                          f"1.0 for ImageNet); got {tau!r}")
    return t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise ConfigError(f"expected a floating-point tensor of logits or probabilities; got dtype {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_2d(x: Any, labels: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2:
        raise ConfigError(f"{what} must be a (batch, classes) tensor; got shape {tuple(x.shape)}")
    B, C = x.shape
    if C < 2:
        raise ConfigError(f"{what} needs at least 2 classes for LoCa; got shape {tuple(x.shape)}")
    labels = _check_labels(labels, B, C, x.device)
    return x, labels


def _check_labels(labels: Any, B: int, C: int, device: torch.device | None = None) -> torch.Tensor:
    """(B,) int64 class ids in [0, C) on ``device`` (the one check, used by calibration and the losses)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 1 or labels.shape[0] != B:
        raise ConfigError(f"labels must be a ({B},) tensor to match the batch; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integer class ids; got dtype {labels.dtype}")
    labels = labels.to(device=device if device is not None else labels.device, dtype=torch.long)
    if B and bool(((labels < 0) | (labels >= C)).any()):
        bad = labels[(labels < 0) | (labels >= C)].unique().tolist()[:10]
        lo, hi = (int(v) for v in torch.aminmax(labels))
        raise ConfigError(f"labels must lie in [0, {C}) for {C} classes; got values in [{lo}, {hi}] (bad: "
                          f"{bad}). Check that the teacher and the data set have the same number of classes")
    return labels


def _raise_nan(x: torch.Tensor, what: str) -> None:
    bad = torch.isnan(x).flatten(1).any(1) if x.ndim > 1 else torch.isnan(x)
    rows = torch.nonzero(bad).flatten().tolist()
    raise NumericsError(f"{what} contain NaN (or +inf / an all -inf row) in {len(rows)} row(s) "
                        f"{rows[:20]}{' …' if len(rows) > 20 else ''}; fix the teacher outputs before "
                        f"calibrating (fp16 overflow is the usual cause)")


_LOGITS_FIX = "use loca_from_logits(logits, labels, alpha, tau)"


def _check_probs(p: torch.Tensor, what: str = "probabilities", fix: str = _LOGITS_FIX) -> None:
    """p is fp32/fp64 (B, C): finite, in [0, 1], rows sum to 1 within PROB_SUM_TOL (two passes).
    ``fix`` completes "If these are logits, ..." in the error message."""
    if p.numel() == 0:
        return
    sums = p.sum(1)
    if bool(torch.isnan(sums).any()):
        _raise_nan(p, what)
    lo, hi = (float(v) for v in torch.aminmax(p))
    if lo < 0.0 or hi > 1.0:
        raise ConfigError(f"{what} must lie in [0, 1]; got values in [{lo:g}, {hi:g}]. If these are logits, "
                          f"{fix}")
    dev = float((sums - 1.0).abs().max())
    if dev > PROB_SUM_TOL:
        raise ConfigError(f"{what} must sum to 1 over classes (within {PROB_SUM_TOL}); a row is off by "
                          f"{dev:.3g}. Pass the tempered softmax p = softmax(z/tau); if these are logits, {fix}")


# ---------------------------------------------------------------------------------------------------
# the maths (internal: inputs already validated, fp32/fp64)


def _is_mis(x_y: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
    """The one comparison behind every mis-instruction mask (rule: :func:`mis_instruction_mask`)."""
    return x_y <= x_k


def _sparse_label_and_rival(ids: torch.Tensor, p: torch.Tensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column of the label's mass, p_y, p_k) of a validated sparse teacher, all (B, 1)."""
    K1 = p.shape[1]
    y = labels.view(-1, 1)
    is_lab_top = (ids == y)[:, :-1]
    in_top = is_lab_top.any(1, keepdim=True)
    # column holding the label's mass: its top-k position, else column K
    pos = torch.where(in_top, is_lab_top.to(torch.uint8).argmax(1, keepdim=True), torch.full_like(y, K1 - 1))
    p_y = p.gather(1, pos)
    p_k = p[:, :-1].masked_fill(is_lab_top, -1.0).amax(1, keepdim=True)
    return pos, p_y, p_k


def _mask_and_scale(p_y: torch.Tensor, p_k: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """Per-row LoCa factors from p_y and p_k = max_{i≠y} p_i (any matching shapes).

    Returns (mis, s, new_py): the mis-instruction mask (:func:`_is_mis`), s (1 for correct rows) and p′_y
    (= p_y exactly for correct rows).
    """
    mis = _is_mis(p_y, p_k)
    rest = 1.0 - p_y
    # σ ∈ (1/2, 1] on mis rows since p_k ≥ p_y: no division blow-up.
    s = torch.where(mis, alpha / (rest + p_k), torch.ones_like(p_y))
    new_py = torch.where(mis, 1.0 - s * rest, p_y)
    if alpha >= 1.0 and bool((new_py < 0).any()):
        # only reachable with the warned alpha >= 1: the formula then leaves the probability simplex
        raise NumericsError(
            f"LoCa alpha={alpha} >= 1 makes the label's calibrated probability negative for "
            f"{int((new_py < 0).sum())} row(s) (s·(1 − p_y) > 1 when p_k is small); use alpha < 1")
    return mis, s, new_py


def _loca_dense(p: torch.Tensor, labels: torch.Tensor, alpha: float, what: str = "probabilities",
                inplace: bool = False) -> LocaResult:
    """LoCa on validated fp32/fp64 probabilities. ``inplace`` (only for a p this module owns) saves two
    full-size copies, which matters for offline calibration of large arrays."""
    y = labels.view(-1, 1)
    p_y = p.gather(1, y)  # (B, 1)
    if inplace:
        p_k = p.scatter_(1, y, -1.0).amax(1, keepdim=True)  # (B, 1) max over i ≠ y; label restored below
    else:
        p_k = p.scatter(1, y, -1.0).amax(1, keepdim=True)
    # amax propagates NaN, and softmax turns any NaN/+inf logit into a NaN row: an O(B) check suffices
    if bool(torch.isnan(p_y).any() | torch.isnan(p_k).any()):
        if inplace:
            p.scatter_(1, y, p_y)
        _raise_nan(p, what)
    mis, s, new_py = _mask_and_scale(p_y, p_k, alpha)
    out = p.mul_(s) if inplace else p * s  # × 1.0 on correct rows is exact
    out.scatter_(1, y, new_py)  # correct rows get their own p_y back, bit for bit
    return LocaResult(out, mis.view(-1), s.view(-1))


# ---------------------------------------------------------------------------------------------------
# public API


def mis_instruction_mask(logits_or_probs: torch.Tensor | SparseDist, labels: torch.Tensor,
                         tau: float | None = None) -> torch.Tensor:
    """(B,) bool: the project's one definition of a **mis-instruction** — every other module points here.

    Rule: a row is mis-instructed when its label is not the *strict* winner, x_y ≤ max_{i≠y} x_i. Ties
    for the maximum count (all-equal logits, or the label tied with another class, are mis-instructions):
    that is the only rule under which "after LoCa the label wins" holds for every row, and it is exactly
    the set of rows :func:`loca`, :func:`loca_from_logits` and :func:`loca_sparse` calibrate (their
    ``LocaResult.calibrated``). It differs from ``argmax(x) != y`` only on exact ties, where torch's argmax
    may return the label; use this function, never argmax, for ratios, follow rates and confusions.

    Inputs: dense (B, C) probabilities, or logits, or a :class:`SparseDist` (the rule on its kept
    entries, exactly as :func:`loca_sparse`). With ``tau`` the input is logits and the rule is applied to
    p = softmax(z/τ) computed exactly as :func:`loca_from_logits` does, so the mask is LoCa's bit for bit
    even where distinct logits round to equal probabilities; without ``tau`` it is applied to the numbers
    given (softmax is monotone, so logits and their probabilities agree except for such rounding ties).
    """
    if isinstance(logits_or_probs, SparseDist):
        if tau is not None:
            raise ConfigError("mis_instruction_mask: tau applies to dense logits only; a SparseDist is already "
                              "a distribution at its tau")
        sd, labels = _check_sparse(logits_or_probs, labels)
        if sd.ids.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=sd.ids.device)
        _, p_y, p_k = _sparse_label_and_rival(sd.ids, sd.probs, labels)
        return _is_mis(p_y, p_k).view(-1)
    x, labels = _check_2d(logits_or_probs, labels, "logits_or_probs")
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    x = x.to(_compute_dtype(x))
    if tau is not None:
        x = torch.softmax(x / _check_tau(tau), dim=1)
    y = labels.view(-1, 1)
    x_y = x.gather(1, y).view(-1)
    x_k = x.scatter(1, y, -math.inf).amax(1)  # amax propagates NaN
    if bool(torch.isnan(x_y).any() | torch.isnan(x_k).any()):
        _raise_nan(x, "logits/probabilities")
    return _is_mis(x_y, x_k)


def loca(probs: torch.Tensor, labels: torch.Tensor, alpha: float) -> LocaResult:
    """LoCa on dense tempered probabilities (B, C) → :class:`LocaResult` (probs fp32, or fp64 for fp64 input).

    p′_i = s·p_i (i ≠ y), p′_y = 1 − s(1 − p_y), s = α/(1 − p_y + p_k), on mis-instruction rows only
    (:func:`mis_instruction_mask`).
    """
    a = check_alpha(alpha)
    p, labels = _check_2d(probs, labels, "probs")
    p = p.to(_compute_dtype(p))
    _check_probs(p)
    if p.shape[0] == 0:
        return LocaResult(p.clone(), torch.zeros(0, dtype=torch.bool, device=p.device),
                          torch.zeros(0, dtype=p.dtype, device=p.device))
    return _loca_dense(p, labels, a)


def loca_calibrate(probs: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoCa on dense tempered probabilities (B, C); returns only the calibrated probabilities."""
    return loca(probs, labels, alpha).probs


def loca_from_logits(logits: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float) -> LocaResult:
    """p = softmax(z/τ) (in fp32 for half inputs), then :func:`loca`. The mask is taken on p."""
    a = check_alpha(alpha)
    t = _check_tau(tau)
    z, labels = _check_2d(logits, labels, "logits")
    dt = _compute_dtype(z)
    zf = z.to(dt)
    zf = zf.div_(t) if zf is not z else zf / t  # divide in place when the cast already copied
    p = torch.softmax(zf, dim=1)
    if p.shape[0] == 0:
        return LocaResult(p, torch.zeros(0, dtype=torch.bool, device=p.device),
                          torch.zeros(0, dtype=p.dtype, device=p.device))
    return _loca_dense(p, labels, a, "teacher logits", inplace=True)


def loca_label_logit(logits: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float
                     ) -> tuple[torch.Tensor, LocaResult]:
    """LoCa expressed on logits: only the label's logit changes.

    Since p′_i = s·p_i for i ≠ y, the calibrated distribution at τ is softmax(z′/τ) with z′_i = z_i (i ≠ y)
    and z′_y = τ·(lse + log p′_y − log s), lse = logsumexp(z/τ). Returns (z′ in the compute dtype, the
    :class:`LocaResult` with ``probs`` = p′). Valid at this τ only. Correct rows are returned unchanged.
    """
    res = loca_from_logits(logits, labels, alpha, tau)
    t = float(tau)
    z = logits.to(res.probs.dtype)
    y = labels.to(device=z.device, dtype=torch.long).view(-1, 1)
    lse = torch.logsumexp(z / t, dim=1, keepdim=True)
    new_py = res.probs.gather(1, y)
    new_zy = t * (lse + torch.log(new_py) - torch.log(res.scale.view(-1, 1)))
    z_out = z.clone()
    z_out.scatter_(1, y, torch.where(res.calibrated.view(-1, 1), new_zy, z.gather(1, y)))
    return z_out, res


def sparse_from_topk(topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
                     label_logit: torch.Tensor, labels: torch.Tensor, tau: float) -> SparseDist:
    """Build the exact sparse tempered distribution from a top-k cache.

    p_i = exp(z_i/τ − lse) with lse = logsumexp(z/τ) over all C classes (stored at cache time);
    column K = the label (p_y if outside the top-k, else 0); tail = max(0, 1 − Σ kept).

    Validated: Σ kept ≤ 1 + ``PROB_SUM_TOL`` (1e-2) per row, else :class:`ConfigError` — an lse taken at
    another τ is the usual cause (it gives "probabilities" far above 1); a ±inf lse is a
    :class:`NumericsError`. (An lse that is too large cannot be told from a teacher with a heavy tail.)
    """
    t = _check_tau(tau)
    if topk_logits.ndim != 2 or topk_ids.shape != topk_logits.shape:
        raise ConfigError(f"topk_logits and topk_ids must both be (batch, k); got {tuple(topk_logits.shape)} "
                          f"and {tuple(topk_ids.shape)}")
    B, K = topk_logits.shape
    if K < 1:
        raise ConfigError("top-k must keep at least one class; got k = 0")
    if lse.shape != (B,) or label_logit.shape != (B,):
        raise ConfigError(f"lse and label_logit must be ({B},) (one value per row at this tau); got "
                          f"{tuple(lse.shape)} and {tuple(label_logit.shape)}. If lse holds several "
                          f"temperatures, select the column for tau={t}")
    if topk_ids.is_floating_point():
        raise ConfigError(f"topk_ids must be integer class ids; got dtype {topk_ids.dtype} (fp16 ids "
                          f"overflow above 2048 classes)")
    labels = _check_labels(labels, B, 2**62, topk_logits.device)
    dt = _compute_dtype(topk_logits)
    zk = topk_logits.to(dt)
    lse = lse.to(device=zk.device, dtype=dt).view(-1, 1)
    zy = label_logit.to(device=zk.device, dtype=dt).view(-1, 1)
    for name, v in (("topk_logits", zk), ("lse", lse), ("label_logit", zy)):
        if v.numel() and bool(torch.isnan(v).any()):
            _raise_nan(v, f"sparse teacher {name}")
    ids_k = topk_ids.to(device=zk.device, dtype=torch.long)
    y = labels.view(-1, 1)
    in_top = (ids_k == y).any(1, keepdim=True)
    pk = torch.exp(zk / t - lse)
    py = torch.where(in_top, torch.zeros_like(zy), torch.exp(zy / t - lse))
    probs = torch.cat([pk, py], dim=1)
    ids = torch.cat([ids_k, y], dim=1)
    kept = probs.sum(1)
    if B and not bool(torch.isfinite(lse).all()):
        rows = torch.nonzero(~torch.isfinite(lse.view(-1))).flatten().tolist()
        raise NumericsError(f"sparse teacher lse is ±inf in {len(rows)} row(s) {rows[:20]}; lse must be the "
                            f"finite logsumexp(z/tau) over all classes — re-cache the teacher")
    if B and float(kept.max()) > 1.0 + PROB_SUM_TOL:
        bad = kept > 1.0 + PROB_SUM_TOL
        raise ConfigError(f"sparse teacher is not a distribution: the kept probabilities exp(z/tau - lse) of "
                          f"{int(bad.sum())} row(s) sum to up to {float(kept.max()):.4g} (expected <= 1 + "
                          f"{PROB_SUM_TOL}). lse must be logsumexp(z/tau) over all classes at this same "
                          f"tau={t}: select the store's lse column for tau={t} (TeacherView.tau_index)")
    tail = (1.0 - kept).clamp_min(0.0)
    return SparseDist(ids, probs, tail)


def _check_sparse(sd: SparseDist, labels: torch.Tensor) -> tuple[SparseDist, torch.Tensor]:
    if not isinstance(sd, SparseDist):
        raise ConfigError(f"expected a SparseDist(ids, probs, tail); got {type(sd).__name__}")
    ids, probs, tail = sd
    if ids.ndim != 2 or probs.shape != ids.shape or ids.shape[1] < 2 or tail.shape != (ids.shape[0],):
        raise ConfigError(f"SparseDist must hold ids (B, K+1), probs (B, K+1) and tail (B,) with K >= 1; got "
                          f"{tuple(ids.shape)}, {tuple(probs.shape)}, {tuple(tail.shape)}")
    B = ids.shape[0]
    labels = _check_labels(labels, B, 2**62, ids.device)
    if B and not bool((ids[:, -1] == labels).all()):
        raise ConfigError("SparseDist column K must hold the label id of each row (build it with "
                          "sparse_from_topk); the last id column does not match the labels")
    dt = _compute_dtype(probs)
    p, tl = probs.to(dt), tail.to(device=probs.device, dtype=dt)
    if B and (bool(torch.isnan(p).any()) or bool(torch.isnan(tl).any())):
        _raise_nan(torch.cat([p, tl.view(-1, 1)], 1), "sparse teacher probabilities")
    if B:
        lo = min(float(p.min()), float(tl.min()))
        total = p.sum(1) + tl
        dev = float((total - 1.0).abs().max())
        if lo < 0.0 or dev > PROB_SUM_TOL:
            raise ConfigError(f"SparseDist is not a distribution: probs and tail must be >= 0 and sum to 1 per row "
                              f"(within {PROB_SUM_TOL}); got a minimum of {lo:.4g} and a row off by {dev:.4g}. "
                              f"Build it with sparse_from_topk from the lse at the same tau")
    return SparseDist(ids.long(), p, tl), labels


def loca_sparse(sd: SparseDist, labels: torch.Tensor, alpha: float) -> tuple[SparseDist, LocaResult]:
    """LoCa on a sparse teacher (top-k ∪ {label} ∪ tail): exact for every kept entry.

    p_k is the largest non-label kept probability (the top-1, or the top-2 when the label is the top-1);
    scaling is linear, so the tail bucket (non-label classes only) is scaled by s as well.
    Returns (calibrated SparseDist, LocaResult with ``probs`` = the calibrated (B, K+1) probabilities).
    With K = 1 and the label as top-1, a tie with an unstored class is invisible and the row counts as
    correct.
    """
    a = check_alpha(alpha)
    sd, labels = _check_sparse(sd, labels)
    ids, p, tail = sd
    pos, p_y, p_k = _sparse_label_and_rival(ids, p, labels)
    mis, s, new_py = _mask_and_scale(p_y, p_k, a)
    out = (p * s).scatter_(1, pos, new_py)
    tail_out = tail * s.view(-1)
    return SparseDist(ids, out, tail_out), LocaResult(out, mis.view(-1), s.view(-1))


def swap(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Swapped-logit correction (arXiv 2504.20108, the teacher-side swap): on every mis-instructed row
    (:func:`mis_instruction_mask`: the label is not the strict winner), exchange the label's entry with the
    largest other entry (the first such class on a tie). Returns (swapped tensor, (B,) bool: rows swapped).

    A per-row permutation of the entries, so it is the same operation on logits and on their probabilities
    at any τ (softmax commutes with a permutation) and exact in any dtype: the row's multiset of values is
    unchanged, the label then holds the row's maximum, and correct rows are returned bit for bit. On a tie
    (label = best other) the two values are equal, so the row does not change and the label stays tied.
    """
    x, labels = _check_2d(logits_or_probs, labels, "logits_or_probs")
    if x.shape[0] == 0:
        return x.clone(), torch.zeros(0, dtype=torch.bool, device=x.device)
    y = labels.view(-1, 1)
    x_y = x.gather(1, y)
    rival = x.scatter(1, y, -math.inf)
    k = rival.argmax(1, keepdim=True)  # first maximum among i != y
    x_k = rival.gather(1, k)
    if bool(torch.isnan(x_y).any() | torch.isnan(x_k).any()):
        _raise_nan(x, "teacher logits/probabilities")
    mis = _is_mis(x_y, x_k)
    out = x.clone()
    out.scatter_(1, y, torch.where(mis, x_k, x_y))
    out.scatter_(1, k, torch.where(mis, x_y, x_k))
    return out, mis.view(-1)


def swap_sparse(sd: SparseDist, labels: torch.Tensor) -> tuple[SparseDist, torch.Tensor]:
    """:func:`swap` on a sparse teacher (top-k ∪ {label} ∪ tail), exact for every row: the label's mass is
    always kept (column K, or its top-k column) and the largest other probability is the stored top-1 (the
    top-2 when the label is the top-1), so the swap exchanges two kept probabilities and leaves the tail
    alone. (With K = 1 and the label as top-1, a tie with an unstored class is invisible, as in
    :func:`loca_sparse`.) Returns (swapped SparseDist, (B,) bool: rows swapped)."""
    sd, labels = _check_sparse(sd, labels)
    ids, p, tail = sd
    if ids.shape[0] == 0:
        return sd, torch.zeros(0, dtype=torch.bool, device=ids.device)
    pos, p_y, p_k = _sparse_label_and_rival(ids, p, labels)
    is_lab_top = (ids == labels.view(-1, 1))[:, :-1]
    kcol = p[:, :-1].masked_fill(is_lab_top, -1.0).argmax(1, keepdim=True)
    mis = _is_mis(p_y, p_k)
    out = p.clone()
    out.scatter_(1, pos, torch.where(mis, p_k, p_y))
    out.scatter_(1, kcol, torch.where(mis, p_y, p_k))
    return SparseDist(ids, out, tail), mis.view(-1)


def loca_calibrate_blocks(logits: Any, labels: Any, alpha: float, tau: float, *, out: Any,
                          block_rows: int | None = None, inputs: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """Offline LoCa over a large (N, C) array, one block of rows at a time.

    ``logits`` / ``out``: anything sliceable by rows that yields / accepts numpy arrays (numpy, memmap,
    zarr). ``inputs``: "logits" (p = softmax(z/τ) computed per block) or "probs" (already tempered;
    ``tau`` is then ignored). Each block is computed in fp32 and written in ``out``'s dtype. ``block_rows``
    defaults to ~4 MB of fp32 per block (1,048 rows for C = 1000): cache-sized blocks measured fastest
    (benchmarks/bench_losses.py). Peak extra memory is a few fp32 copies of one block.
    Returns (calibrated (N,) bool, scale (N,) float32).
    """
    a = check_alpha(alpha)
    if inputs not in ("logits", "probs"):
        raise ConfigError(f"inputs must be 'logits' or 'probs'; got {inputs!r}")
    t = _check_tau(tau) if inputs == "logits" else 1.0
    N, C = logits.shape[0], logits.shape[1]
    if block_rows is None:
        block_rows = max(1, (4 << 20) // (4 * max(1, C)))
    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1; got {block_rows}")
    if tuple(out.shape) != tuple(logits.shape):
        raise ConfigError(f"out must have the input's shape {tuple(logits.shape)}; got {tuple(out.shape)}")
    labels = np.asarray(labels)
    if labels.shape != (N,) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be ({N},) integer class ids to match the array; got {labels.shape} "
                          f"{labels.dtype}")
    calibrated = np.zeros(N, dtype=bool)
    scale = np.ones(N, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LocaWarning)  # already warned once above
        for start in range(0, N, block_rows):
            stop = min(N, start + block_rows)
            x = torch.from_numpy(np.ascontiguousarray(logits[start:stop]))
            yb = torch.from_numpy(labels[start:stop].astype(np.int64, copy=False))
            if inputs == "logits":
                res = loca_from_logits(x, yb, a, t)
            else:
                res = loca(x, yb, a)
            if isinstance(out, np.ndarray) and out.dtype in _TORCH_OK:
                torch.from_numpy(out[start:stop]).copy_(res.probs)  # cast + write in one pass
            else:
                out[start:stop] = res.probs.numpy().astype(out.dtype, copy=False)
            calibrated[start:stop] = res.calibrated.numpy()
            scale[start:stop] = res.scale.numpy()
    return calibrated, scale
