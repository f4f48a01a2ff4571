"""Logit-distillation losses: CE, KD, LoCa-KD, DKD, logit standardisation, their LoCa variants, sparse KD,
the swap correction (KD / DKD on the swapped teacher) and Block-KD's terms over the stepping-stone hybrids.

Each loss is a pure function of tensors. The teacher is a constant target (detached). Everything is
computed in fp32 (fp64 stays fp64) whatever the input dtype. The registry :data:`METHODS` and
:func:`compute_loss` combine a distillation term with CE: L = beta·L_distill + gamma·CE (method ``ce``:
CE only). docs/maths.md gives every formula as implemented.

LoCa-KD is computed without materialising the calibrated (B, C) distribution: with p′_i = s·p_i (i ≠ y),

    KL(p′‖q) = s·KL(p‖q) + (s·p_y − p′_y)·log q_y + [s·log s·(1 − p_y) + p′_y·log p′_y − s·p_y·log p_y],

where the bracket and the coefficient of log q_y depend on the teacher only. Correct rows have s = 1,
p′_y = p_y, so their KL is the KD row bit for bit. This keeps LoCa-KD at one extra masked max over the
teacher on top of KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from loca_pipe.pipeline.calibration import (
    SparseDist,
    _check_labels,
    _check_probs,
    _check_sparse,
    _check_tau,
    _mask_and_scale,
    check_alpha,
    loca_sparse,
    mis_instruction_mask,
    swap,
    swap_sparse,
)
from loca_pipe.pipeline.errors import ConfigError, NumericsError

__all__ = [
    "METHODS",
    "CROSS_DISTANCES",
    "LossConfig",
    "Method",
    "blockkd_terms",
    "ce_loss",
    "compute_loss",
    "dkd_loss",
    "get_method",
    "kd_star_loss",
    "method_help",
    "dkd_warmup",
    "kd_loss",
    "loca_kd_loss",
    "ls_kd_loss",
    "sparse_kd_loss",
    "standardize_logits",
]


# ---------------------------------------------------------------------------------------------------
# configuration

#: Block-KD's cross-term distances (LossConfig.cross_distance).
CROSS_DISTANCES = ("kl", "mse")


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of every method (defaults: the paper's CIFAR-100 KD/LoCa setting).

    tau: KD temperature (CIFAR-100 4.0, ImageNet 1.0). alpha: LoCa α in (0, 1) (0.9–0.999; ≥ 1 warns).
    beta: weight of the distillation term; gamma: weight of CE (CIFAR-100 0.9/0.1, ImageNet 0.5/0.5).
    dkd_alpha, dkd_beta: DKD's TCKD/NCKD weights (mdistiller CIFAR-100: 1.0, 8.0); warmup_epochs: DKD's
    linear warm-up (20). To reproduce mdistiller's DKD total (CE + warm-up·DKD) set beta = gamma = 1.
    ls_tau: base temperature of logit standardisation (Sun et al.: 2.0; their CIFAR-100 runs use KD
    weight 9 and CE weight 0.1, i.e. beta = 9, gamma = 0.1).
    Block-KD (methods ``blockkd*``): L = gamma·L_task + beta·L_distill + cross·L_cross (the paper's α, β, γ
    are gamma, beta, cross here, so Block-KD and KD share the recipe's weights); cross_distance: "kl"
    (τ²·KL(mean hybrid ‖ output) at tau) or "mse" (mean squared logit difference). The default cross weight
    was chosen on the validation split (docs/students.md).
    """

    tau: float = 4.0
    alpha: float = 0.9
    beta: float = 0.9
    gamma: float = 0.1
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    warmup_epochs: int = 20
    ls_tau: float = 2.0
    cross: float = 0.0  # chosen on the validation split: 0 > 0.5 > 1 (docs/students.md)
    cross_distance: str = "kl"

    def __post_init__(self) -> None:
        if self.cross_distance not in CROSS_DISTANCES:
            raise ConfigError(f"LossConfig.cross_distance must be one of {list(CROSS_DISTANCES)}; got "
                              f"{self.cross_distance!r}")
        for f in fields(self):
            if f.name == "cross_distance":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"LossConfig.{f.name} must be a number; got {v!r}")
            if not math.isfinite(v):
                raise ConfigError(f"LossConfig.{f.name} must be finite; got {v!r}")
        for name in ("tau", "ls_tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LossConfig.{name} is a temperature and must be > 0; got {getattr(self, name)}")
        if self.alpha <= 0:
            raise ConfigError(f"LossConfig.alpha (LoCa) must be in (0, 1), e.g. 0.95; got {self.alpha}")
        for name in ("beta", "gamma", "dkd_alpha", "dkd_beta", "warmup_epochs", "cross"):
            if getattr(self, name) < 0:
                raise ConfigError(f"LossConfig.{name} is a weight and must be >= 0; got {getattr(self, name)}")
        if int(self.warmup_epochs) != self.warmup_epochs:
            raise ConfigError(f"LossConfig.warmup_epochs must be a whole number; got {self.warmup_epochs}")


# ---------------------------------------------------------------------------------------------------
# helpers


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_student(student_logits: torch.Tensor, what: str = "student_logits") -> torch.Tensor:
    if not isinstance(student_logits, torch.Tensor) or student_logits.ndim != 2:
        shape = tuple(student_logits.shape) if isinstance(student_logits, torch.Tensor) else type(student_logits)
        raise ConfigError(f"{what} must be a (batch, classes) tensor; got {shape}")
    if not student_logits.is_floating_point():
        raise ConfigError(f"{what} must be floating point; got dtype {student_logits.dtype}")
    if student_logits.shape[0] == 0:
        raise ConfigError(f"{what} is an empty batch (0 rows, shape {tuple(student_logits.shape)}); a loss needs at "
                          f"least one sample: skip empty batches before calling the loss")
    return _float(student_logits)


_PROBS_FIX = "pass them as teacher_logits (compute_loss) or teacher_is='logits'"


def _check_teacher_probs(p: torch.Tensor) -> None:
    """A teacher given as probabilities must be one: in [0, 1], rows summing to 1 within PROB_SUM_TOL (1e-2),
    the rule :func:`~loca_pipe.pipeline.calibration.loca` applies."""
    _check_probs(p, "teacher probabilities", fix=_PROBS_FIX)


def _check_pair(zs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if not isinstance(teacher, torch.Tensor) or teacher.shape != zs.shape:
        shape = tuple(teacher.shape) if isinstance(teacher, torch.Tensor) else type(teacher)
        raise ConfigError(f"teacher must have the student's shape {tuple(zs.shape)} (batch, classes); got "
                          f"{shape}. A store with another class count belongs to another data set")
    if not teacher.is_floating_point():
        raise ConfigError(f"teacher logits/probabilities must be floating point; got dtype {teacher.dtype}")
    return _float(teacher.detach()).to(zs.dtype)


def _finite(loss: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(loss.detach())):
        raise NumericsError(f"{what} is {loss.item()}: the student or teacher inputs contain NaN/inf (or a "
                            f"probability row with zero mass). Check the teacher store with `loca-pipe cache "
                            f"info` and the student for divergence (lower the learning rate)")
    return loss


def _resolve_teacher_is(teacher: torch.Tensor, teacher_is: str) -> str:
    if teacher_is == "probs":
        _check_teacher_probs(teacher)
    if teacher_is in ("logits", "probs"):
        return teacher_is
    if teacher_is != "auto":
        raise ConfigError(f"teacher_is must be 'auto', 'logits' or 'probs'; got {teacher_is!r}")
    # auto: probabilities iff non-negative and every row sums to 1 (±1e-3). Pass it explicitly in hot loops.
    if teacher.numel() == 0:
        return "logits"
    is_probs = bool(teacher.min() >= 0) and bool(((teacher.sum(1) - 1).abs() <= 1e-3).all())
    return "probs" if is_probs else "logits"


def _teacher_dist(teacher: torch.Tensor, tau: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, log p) of the tempered teacher, no grad. For probabilities, log p uses p clamped at the
    smallest normal number so that p·log p = 0 where p = 0 (harmless in KD's Σ p·log p; DKD renormalises
    the non-target part and takes exact logs instead, see :func:`_dkd_parts`)."""
    with torch.no_grad():
        if kind == "logits":
            lp = F.log_softmax(teacher / tau, dim=1)
            return lp.exp(), lp
        return teacher, teacher.clamp_min(torch.finfo(teacher.dtype).tiny).log()


class _LocaRow(NamedTuple):
    mis: torch.Tensor  # (B, 1) bool
    s: torch.Tensor  # (B, 1) scale, 1 on correct rows
    log_s: torch.Tensor  # (B, 1), 0 on correct rows
    p_y: torch.Tensor  # (B, 1) original
    new_py: torch.Tensor  # (B, 1) p′_y (= p_y on correct rows)
    log_new_py: torch.Tensor  # (B, 1) log p′_y (= log p_y on correct rows)


def _loca_rows(p: torch.Tensor, lp: torch.Tensor, y1: torch.Tensor, alpha: float,
               lp_masked: torch.Tensor | None = None, from_probs: bool = False) -> _LocaRow:
    """Per-row LoCa quantities from the tempered teacher (p, log p); teacher-only, no grad.

    The mask and s use p_y and p_k = max_{i≠y} p_i exactly as :func:`loca` does, with p_k = exp(max log p)
    (the same number when p = exp(log p), as for a logits teacher; for given probabilities, from_probs=True,
    p_k is taken from p itself so the mask is exactly :func:`loca`'s). Rows whose label and best other class
    differ by less than one rounding step of softmax may be classified differently from
    :func:`loca_from_logits`, which decides on softmax's own rounding.
    """
    with torch.no_grad():
        lp_y = lp.gather(1, y1)
        if lp_masked is None:
            lp_masked = lp.scatter(1, y1, -math.inf)
        if from_probs:
            p_k = p.scatter(1, y1, -1.0).amax(1, keepdim=True)
        else:
            p_k = lp_masked.amax(1, keepdim=True).exp()
        p_y = p.gather(1, y1)
        mis, s, new_py = _mask_and_scale(p_y, p_k, alpha)
        log_s = s.log()
        tiny = torch.finfo(p.dtype).tiny
        log_new = torch.where(mis, new_py.clamp_min(tiny).log(), lp_y)
    return _LocaRow(mis, s, log_s, p_y, new_py, log_new)


def _kl_rows(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (p * (lp - lq)).sum(1, keepdim=True)  # (B, 1)


def _negative_label_prob(alpha: float, n: int) -> None:
    raise NumericsError(f"LoCa alpha={alpha} >= 1 makes the label's calibrated probability negative for {n} "
                        f"row(s) (s·(1 − p_y) > 1 when p_k is small); use alpha < 1")


def _loca_kd_rows(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, y1: torch.Tensor, alpha: float,
                  from_probs: bool = False) -> torch.Tensor:
    """(B, 1) rows of KL(LoCa(p) ‖ q) = s·KL(p‖q) + (s − 1)·log q_y + c0 (module docstring; s·p_y − p′_y = s − 1).

    Written for few tensor ops (small batches are dominated by per-op overhead): the teacher-only terms
    are computed once (no autograd graph: p, lp are detached), and correct rows get s = 1, c0 = 0, so their KL is KD's bit for bit.
    The mask is :func:`~loca_pipe.pipeline.calibration.mis_instruction_mask`'s rule applied to the numbers
    this loss uses: log p for a logits teacher, p itself for given probabilities (exactly :func:`loca`'s).
    """
    # p, lp are teacher-only (built under no_grad and detached): these ops record no autograd graph
    lp_y = lp.gather(1, y1)
    if from_probs:
        p_y = p.gather(1, y1)
        p_k = p.scatter(1, y1, -1.0).amax(1, keepdim=True)
        ok = p_y > p_k
    else:
        lp_k = lp.scatter(1, y1, -math.inf).amax(1, keepdim=True)
        ok = lp_y > lp_k
        p_y, p_k = lp_y.exp(), lp_k.exp()
    rest = 1.0 - p_y
    s = (alpha / (rest + p_k)).masked_fill_(ok, 1.0)
    new_py = 1.0 - s * rest
    if alpha >= 1.0 and bool((new_py < 0).any()):
        _negative_label_prob(alpha, int((new_py < 0).sum()))
    c0 = (torch.xlogy(s, s) * rest + torch.xlogy(new_py, new_py) - s * p_y * lp_y).masked_fill_(ok, 0.0)
    c1 = s - 1.0
    return torch.addcmul(torch.addcmul(c0, c1, lq.gather(1, y1)), s, _kl_rows(p, lp, lq))


# ---------------------------------------------------------------------------------------------------
# public losses


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy CE(z_S, y), batch mean, in fp32."""
    zs = _check_student(student_logits)
    y = _check_labels(labels, *zs.shape)
    return _finite(F.cross_entropy(zs, y), "CE loss")


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, tau: float, *,
            teacher_is: str = "auto") -> torch.Tensor:
    """Hinton KD: τ² · mean_batch KL(p_T ‖ p_S), p_S = softmax(z_S/τ) (as mdistiller's ``kd_loss``).

    ``teacher``: logits (p_T = softmax(z_T/τ)) or the tempered teacher probabilities at τ (e.g.
    precomputed, possibly LoCa-calibrated targets). ``teacher_is="auto"`` treats a tensor as
    probabilities iff it is non-negative with rows summing to 1 (±1e-3); pass it explicitly when known.
    """
    t = _check_tau(tau)
    zs = _check_student(student_logits)
    zt = _check_pair(zs, teacher)
    p, lp = _teacher_dist(zt, t, _resolve_teacher_is(zt, teacher_is))
    lq = F.log_softmax(zs / t, dim=1)
    return _finite(_kl_rows(p, lp, lq).mean() * (t * t), "KD loss")


def loca_kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float,
                 alpha: float, *, teacher_is: str = "auto") -> torch.Tensor:
    """KD against the LoCa-calibrated tempered teacher: τ² · mean KL(LoCa(p_T) ‖ p_S).

    Equal to ``kd_loss(student, loca(p_T, labels, alpha).probs, tau, teacher_is="probs")`` without
    building the calibrated (B, C) tensor (module docstring).
    """
    t = _check_tau(tau)
    a = check_alpha(alpha)
    zs = _check_student(student_logits)
    zt = _check_pair(zs, teacher)
    y1 = _check_labels(labels, *zs.shape).view(-1, 1)
    kind = _resolve_teacher_is(zt, teacher_is)
    p, lp = _teacher_dist(zt, t, kind)
    lq = F.log_softmax(zs / t, dim=1)
    return _finite(_loca_kd_rows(p, lp, lq, y1, a, kind == "probs").mean() * (t * t), "LoCa-KD loss")


def _dkd_parts(zs: torch.Tensor, p: torch.Tensor, lp: torch.Tensor, y1: torch.Tensor, tau: float,
               loca_alpha: float | None, from_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) batch means (without τ²), DKD written on probabilities so LoCa composes.

    b_T = [p_y, 1 − p_y], b_S = [q_y, 1 − q_y]: TCKD = KL(b_T ‖ b_S).
    p̂_i = p_i / Σ_{j≠y} p_j, q̂_i = q_i / Σ_{j≠y} q_j for i ≠ y: NCKD = KL(p̂ ‖ q̂).
    LoCa scales every non-target p_i by s, so p̂ is unchanged and only b_T moves to [p′_y, s(1 − p_y)].
    0·log 0 = 0 throughout (exact zeros contribute nothing); the non-target mass is a logsumexp of the
    non-target log-probabilities, exact for saturated rows (p_y = 1 in floating point, subnormal rest);
    a row with no non-target mass has NCKD = 0.
    """
    lq = F.log_softmax(zs / tau, dim=1)
    lq_y = lq.gather(1, y1)
    lq_masked = lq.scatter(1, y1, -math.inf)
    lq_rest = torch.logsumexp(lq_masked, dim=1, keepdim=True)  # log(1 − q_y), stable
    with torch.no_grad():
        if from_probs:
            # exact logs of the given probabilities: −inf at exact zeros (0·log 0 = 0 is handled below,
            # xlogy-style), subnormals keep their true log. A clamp at finfo.tiny would turn zeros and
            # subnormal entries into a near-uniform p̂ once the non-target part is renormalised.
            lp = p.log()
        lp_y = lp.gather(1, y1)
        lp_masked = lp.scatter(1, y1, -math.inf)
        # log Σ_{i≠y} p_i from the non-target entries themselves (never 1 − p_y, which is 0 on a saturated
        # row whose p_y rounds to 1): −inf iff the teacher has no non-target mass
        lp_rest = torch.logsumexp(lp_masked, dim=1, keepdim=True)
        if loca_alpha is not None:
            r = _loca_rows(p, lp, y1, loca_alpha, lp_masked, from_probs)
            t_y, lt_y = r.new_py, r.log_new_py
            lt_rest = lp_rest + r.log_s
        else:
            t_y, lt_y, lt_rest = lp_y.exp(), lp_y, lp_rest
        t_rest = lt_rest.exp()
        # a one-hot teacher has no non-target information: NCKD = 0. The guards below test "== 0" (and
        # "!= −inf") so that a NaN teacher stays NaN and reaches the finiteness check
        empty = lp_rest == -math.inf
        # non-target teacher distribution p̂ (label column and exact zeros: p̂ = 0, log p̂ = −inf)
        lp_hat = torch.where(empty, -math.inf, lp_masked - lp_rest)
        p_hat = lp_hat.exp()
    tckd = (torch.where(t_y == 0, 0.0, t_y * (lt_y - lq_y))
            + torch.where(t_rest == 0, 0.0, t_rest * (lt_rest - lq_rest)))
    lq_hat = lq_masked - lq_rest
    diff = torch.where(p_hat == 0, 0.0, lp_hat - lq_hat)
    nckd = (p_hat * diff).sum(1, keepdim=True)
    return tckd.mean(), nckd.mean()


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's linear warm-up factor for a 0-based epoch: min((epoch + 1) / warmup_epochs, 1).

    mdistiller uses min(epoch / warmup, 1) with epochs counted from 1; this is the same schedule.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min((int(epoch) + 1) / warmup_epochs, 1.0)


def dkd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float, *,
             alpha: float = 1.0, beta: float = 8.0, teacher_is: str = "auto",
             loca_alpha: float | None = None) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): τ² · (alpha·TCKD + beta·NCKD), batch mean, no warm-up.

    Matches mdistiller's ``dkd_loss`` (which masks the label with −1000; here it is masked exactly).
    ``loca_alpha``: apply LoCa to the tempered teacher first (paper Table 8); only TCKD changes.
    """
    t = _check_tau(tau)
    la = None if loca_alpha is None else check_alpha(loca_alpha)
    zs = _check_student(student_logits)
    zt = _check_pair(zs, teacher)
    y1 = _check_labels(labels, *zs.shape).view(-1, 1)
    kind = _resolve_teacher_is(zt, teacher_is)
    p, lp = _teacher_dist(zt, t, kind)
    tckd, nckd = _dkd_parts(zs, p, lp, y1, t, la, kind == "probs")
    return _finite((alpha * tckd + beta * nckd) * (t * t), "DKD loss")


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row: (z − mean) / (std + eps), std with Bessel's correction (Sun et al., CVPR 2024)."""
    z = _float(z)
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def ls_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0, *,
               labels: torch.Tensor | None = None, loca_alpha: float | None = None) -> torch.Tensor:
    """Logit-standardised KD: KD at base temperature τ between z-scored student and teacher logits,
    τ² · mean KL(softmax(ẑ_T/τ) ‖ softmax(ẑ_S/τ)). ``loca_alpha`` (needs ``labels``): LoCa on the
    standardised teacher distribution first."""
    t = _check_tau(tau)
    zs = _check_student(student_logits)
    zt = _check_pair(zs, teacher_logits)
    if zs.shape[1] < 2:
        raise ConfigError("logit standardisation needs at least 2 classes")
    p, lp = _teacher_dist(standardize_logits(zt), t, "logits")
    lq = F.log_softmax(standardize_logits(zs) / t, dim=1)
    if loca_alpha is None:
        rows = _kl_rows(p, lp, lq)
    else:
        if labels is None:
            raise ConfigError("ls_kd_loss with loca_alpha needs labels")
        y1 = _check_labels(labels, *zs.shape).view(-1, 1)
        rows = _loca_kd_rows(p, lp, lq, y1, check_alpha(loca_alpha))
    return _finite(rows.mean() * (t * t), "LS-KD loss")


def _sparse_kd(zs: torch.Tensor, sd: SparseDist, tau: float) -> torch.Tensor:
    return _sparse_kd_rows(zs, sd, tau).mean()


def _sparse_kd_rows(zs: torch.Tensor, sd: SparseDist, tau: float) -> torch.Tensor:
    """(B,) per-row sparse KL (without τ²); :func:`sparse_kd_loss` is their mean times τ²."""
    ids, p, tail = sd
    B, C = zs.shape
    K = ids.shape[1] - 1
    lq = F.log_softmax(zs / tau, dim=1)  # normalised over ALL classes, then gathered
    lq_ids = lq.gather(1, ids)
    # the student's own mass outside the kept ids, log Σ_{i ∉ kept} q_i; a finite fill (not −inf) keeps the
    # backward pass NaN-free when every class is kept
    lq_tail = torch.logsumexp(lq.scatter(1, ids, torch.finfo(lq.dtype).min), dim=1)
    with torch.no_grad():
        tiny = torch.finfo(p.dtype).tiny
        in_top = (ids[:, :K] == ids[:, K:]).any(1)
        n_kept = K + (~in_top).long()
        has_tail = (n_kept < C) & (tail > 0)
        lp = p.clamp_min(tiny).log()
        ent = (p * lp).sum(1) + torch.where(has_tail, tail * tail.clamp_min(tiny).log(), 0.0)
    cross = (p * lq_ids).sum(1) + torch.where(has_tail, tail * lq_tail, 0.0)
    return ent - cross


def sparse_kd_loss(student_logits: torch.Tensor, sd: SparseDist, tau: float) -> torch.Tensor:
    """KD against a sparse teacher (top-k ∪ {label} ∪ tail): τ² · mean over the batch of

        Σ_{j kept} p_j log(p_j / q_j) + p_tail · log(p_tail / q_tail),

    with q = softmax(z_S/τ) over all C classes gathered at the kept ids, and q_tail = the student's mass
    on every class not kept. Equals :func:`kd_loss` when k = C.
    """
    t = _check_tau(tau)
    zs = _check_student(student_logits)
    sd, _ = _check_sparse(sd, sd.ids[:, -1] if isinstance(sd, SparseDist) else None)
    if sd.ids.shape[0] != zs.shape[0]:
        raise ConfigError(f"sparse teacher has {sd.ids.shape[0]} rows but the student batch has {zs.shape[0]}")
    if sd.ids.numel() and int(sd.ids.max()) >= zs.shape[1]:
        raise ConfigError(f"sparse teacher holds class id {int(sd.ids.max())} but the student outputs "
                          f"{zs.shape[1]} classes; pick the store that matches the student")
    sd = SparseDist(sd.ids, sd.probs.to(zs.dtype), sd.tail.to(zs.dtype))
    return _finite(_sparse_kd(zs, sd, t) * (t * t), "sparse KD loss")


def sparse_kept_dense(sd: SparseDist, num_classes: int) -> torch.Tensor:
    """(B, C) the probabilities a sparse teacher keeps (top-k and the label), −inf for every other class.

    The top-k holds the largest probabilities, so the label-vs-best-other comparison on this tensor is the
    one on the full distribution (only a tie between the label and a class in the tail is invisible)."""
    ids, probs, _ = sd
    K = ids.shape[1] - 1
    dense = torch.full((ids.shape[0], int(num_classes)), -math.inf, dtype=probs.dtype, device=probs.device)
    dense.scatter_(1, ids[:, K:], probs[:, K:])  # the label column (0 when the label is in the top-k) ...
    dense.scatter_(1, ids[:, :K], probs[:, :K])  # ... is overwritten by its top-k entry then
    return dense


def _teacher_mis_mask(teacher: "_Teacher", y: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """(B,) mis-instruction mask of the teacher (label not the strict winner, ties counted), always through
    :func:`~loca_pipe.pipeline.calibration.mis_instruction_mask`."""
    with torch.no_grad():
        x = teacher.value.probs if teacher.kind == "sparse" else teacher.value
        if bool(torch.isnan(x).any()):  # keep every row: the loss is then NaN and _finite says so
            return torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        if teacher.kind == "sparse":
            sd = teacher.value
            C = int(num_classes if num_classes is not None else int(sd.ids.max()) + 1)
            return mis_instruction_mask(sparse_kept_dense(sd, C), y)
        return mis_instruction_mask(teacher.value, y)


def _kd_star_mean(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ over kept rows / B: every kept row weighs what it weighs in KD, dropped rows contribute 0."""
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum() / max(1, rows.numel())


def kd_star_loss(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float, *,
                 teacher_is: str = "auto") -> torch.Tensor:
    """KD* (paper Table 1): Hinton KD with the teacher's mis-instructed rows dropped from the KD term,

        τ² · (1/B) · Σ_{i : label strictly wins} KL(p_T,i ‖ p_S,i),

    i.e. KD's per-row terms, each kept row with KD's weight 1/B and mis-instructed rows contributing 0
    (the batch's CE term, added by :func:`compute_loss`, still covers every row). The mask is
    :func:`~loca_pipe.pipeline.calibration.mis_instruction_mask` on the teacher (ties count as
    mis-instructed). With no mis-instructed row it equals :func:`kd_loss`.
    """
    t = _check_tau(tau)
    zs = _check_student(student_logits)
    zt = _check_pair(zs, teacher)
    y = _check_labels(labels, *zs.shape)
    kind = _resolve_teacher_is(zt, teacher_is)
    p, lp = _teacher_dist(zt, t, kind)
    rows = _kl_rows(p, lp, F.log_softmax(zs / t, dim=1)).view(-1)
    keep = ~_teacher_mis_mask(_Teacher(kind, zt), y)
    return _finite(_kd_star_mean(rows, keep) * (t * t), "KD* loss")


# ---------------------------------------------------------------------------------------------------
# registry


class _Teacher(NamedTuple):
    kind: str  # "logits" | "probs" | "sparse"
    value: object


@dataclass(frozen=True)
class Method:
    """One training objective and every fact the rest of the project needs about it (the CLI's choices
    and help, the stages, the report's labels and pairing, precomputed targets): a new method is one entry
    of :data:`METHODS`.

    ``distill(zs, labels, teacher, cfg, epoch)`` returns the unweighted distillation term (None: CE only);
    ``teachers`` lists the teacher forms it accepts; ``loca``: it takes LoCa's α (run names and report rows
    carry α); ``label``: the report's row label; ``base``: the method its paired difference is taken
    against (same seeds); ``targets_loss``: the loss to apply to precomputed targets (``loca-pipe
    calibrate``; None: cannot train from them), whose LoCa targets at α are read when ``loca`` is set.
    ``blocks``: a Block-KD method, trained with the teacher's blocks online (pipeline/blockkd.py) and its
    ``distill`` applied to the student and every hybrid (:func:`blockkd_terms`).
    """

    name: str
    distill: Callable[..., torch.Tensor] | None
    teachers: tuple[str, ...]
    loca: bool
    description: str
    label: str = ""
    base: str | None = None
    targets_loss: str | None = None
    blocks: bool = False  # Block-KD: ``distill`` is applied to the student and every stepping-stone hybrid

    @property
    def needs_teacher(self) -> bool:
        return self.distill is not None


def _dense(zs, teacher: _Teacher, tau):
    return _teacher_dist(_check_pair(zs, teacher.value), tau, teacher.kind)


def _m_kd(zs, y, teacher, cfg, epoch):
    if teacher.kind == "sparse":
        return _sparse_kd(zs, teacher.value, cfg.tau) * cfg.tau ** 2
    p, lp = _dense(zs, teacher, cfg.tau)
    return _kl_rows(p, lp, F.log_softmax(zs / cfg.tau, dim=1)).mean() * cfg.tau ** 2


def _m_loca(zs, y, teacher, cfg, epoch):
    a = check_alpha(cfg.alpha)
    if teacher.kind == "sparse":
        sd, _ = loca_sparse(teacher.value, y, a)
        return _sparse_kd(zs, sd, cfg.tau) * cfg.tau ** 2
    p, lp = _dense(zs, teacher, cfg.tau)
    lq = F.log_softmax(zs / cfg.tau, dim=1)
    return _loca_kd_rows(p, lp, lq, y.view(-1, 1), a, teacher.kind == "probs").mean() * cfg.tau ** 2


def _m_kd_star(zs, y, teacher, cfg, epoch):
    keep = ~_teacher_mis_mask(teacher, y, zs.shape[1])
    if teacher.kind == "sparse":
        rows = _sparse_kd_rows(zs, teacher.value, cfg.tau)
    else:
        p, lp = _dense(zs, teacher, cfg.tau)
        rows = _kl_rows(p, lp, F.log_softmax(zs / cfg.tau, dim=1)).view(-1)
    return _kd_star_mean(rows, keep) * cfg.tau ** 2


def _swapped(teacher: _Teacher, y: torch.Tensor) -> _Teacher:
    """The teacher with the swap correction applied (:func:`~loca_pipe.pipeline.calibration.swap`): a
    permutation of each mis-instructed row, so it applies to logits, probabilities and sparse teachers alike."""
    with torch.no_grad():
        x = teacher.value.probs if teacher.kind == "sparse" else teacher.value
        if bool(torch.isnan(x).any()):  # leave it: the loss is then NaN and _finite says so
            return teacher
        if teacher.kind == "sparse":
            return _Teacher("sparse", swap_sparse(teacher.value, y)[0])
        return _Teacher(teacher.kind, swap(teacher.value.detach(), y)[0])


def _m_swap(zs, y, teacher, cfg, epoch):
    return _m_kd(zs, y, _swapped(teacher, y), cfg, epoch)


def _m_dkd(zs, y, teacher, cfg, epoch, loca_alpha=None):
    p, lp = _dense(zs, teacher, cfg.tau)
    tckd, nckd = _dkd_parts(zs, p, lp, y.view(-1, 1), cfg.tau, loca_alpha, teacher.kind == "probs")
    w = dkd_warmup(epoch, int(cfg.warmup_epochs))
    return w * (cfg.dkd_alpha * tckd + cfg.dkd_beta * nckd) * cfg.tau ** 2


def _m_loca_dkd(zs, y, teacher, cfg, epoch):
    return _m_dkd(zs, y, teacher, cfg, epoch, loca_alpha=check_alpha(cfg.alpha))


def _m_dkd_swap(zs, y, teacher, cfg, epoch):
    return _m_dkd(zs, y, _swapped(teacher, y), cfg, epoch)


def _m_ls(zs, y, teacher, cfg, epoch, loca_alpha=None):
    zt = _check_pair(zs, teacher.value)
    p, lp = _teacher_dist(standardize_logits(zt), cfg.ls_tau, "logits")
    lq = F.log_softmax(standardize_logits(zs) / cfg.ls_tau, dim=1)
    if loca_alpha is None:
        rows = _kl_rows(p, lp, lq)
    else:
        rows = _loca_kd_rows(p, lp, lq, y.view(-1, 1), loca_alpha)
    return rows.mean() * cfg.ls_tau ** 2


def _m_loca_ls(zs, y, teacher, cfg, epoch):
    return _m_ls(zs, y, teacher, cfg, epoch, loca_alpha=check_alpha(cfg.alpha))


def _cross_rows(o: torch.Tensor, mean: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Block-KD's cross distance of outputs ``o`` to the hybrids' mean logits (a constant target)."""
    if cfg.cross_distance == "mse":
        return ((o - mean) ** 2).mean()
    t = cfg.tau
    lp = F.log_softmax(mean / t, dim=1)
    return _kl_rows(lp.exp(), lp, F.log_softmax(o / t, dim=1)).mean() * t * t


def blockkd_terms(m: "Method", zs: torch.Tensor, y: torch.Tensor, teacher: "_Teacher", hybrids: list[torch.Tensor],
                  cfg: LossConfig, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_task, L_distill, L_cross) of Block-KD (arXiv 2411.01547) for student logits ``zs`` and hybrid
    logits N_1 … N_n, each hybrid's terms weighted w_i = 1/2^(n−i) (the student's weight is 1):

        L_task = CE(zs) + Σ w_i CE(N_i),   L_distill = D(zs) + Σ w_i D(N_i),
        L_cross = d(zs, N̄) + Σ w_i d(N_i, N̄),   N̄ = (1/n) Σ N_i (detached: a target),

    D = the method's distillation term against the stored teacher (KD, LoCa, KD*, swap)."""
    n = len(hybrids)
    outs = [zs, *hybrids]
    ws = [1.0] + [0.5 ** (n - i) for i in range(1, n + 1)]
    mean = torch.stack([h.detach() for h in hybrids]).mean(0)
    task = sum(w * F.cross_entropy(o, y) for w, o in zip(ws, outs))
    distill = sum(w * m.distill(o, y, teacher, cfg, epoch) for w, o in zip(ws, outs))
    cross = sum(w * _cross_rows(o, mean, cfg) for w, o in zip(ws, outs))
    return task, distill, cross


_ALL = ("logits", "probs", "sparse")
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ce", None, (), False, "cross-entropy only (no teacher)", label="Student (CE)"),
        Method("kd", _m_kd, _ALL, False,
               "Hinton KD at tau; with precomputed (e.g. LoCa-calibrated) teacher_probs it is KD on those",
               label="KD", base="ce", targets_loss="kd"),
        Method("loca", _m_loca, _ALL, True, "KD against the LoCa-calibrated teacher",
               label="LoCa", base="kd", targets_loss="kd"),
        Method("kd_star", _m_kd_star, _ALL, False,
               "KD with the teacher's mis-instructed rows dropped from the KD term (paper Table 1, 'KD*')",
               label="KD*", base="kd", targets_loss="kd_star"),
        Method("dkd", _m_dkd, ("logits", "probs"), False,
               "decoupled KD: dkd_alpha·TCKD + dkd_beta·NCKD at tau, linear warm-up",
               label="DKD", base="ce", targets_loss="dkd"),
        Method("loca_dkd", _m_loca_dkd, ("logits", "probs"), True, "DKD with a LoCa-calibrated teacher",
               label="DKD+LoCa", base="dkd", targets_loss="dkd"),
        Method("swap", _m_swap, _ALL, False,
               "KD against the swapped teacher: where its top-1 is not the label, the label's and the top "
               "logit are exchanged (arXiv 2504.20108)", label="Swap", base="kd"),
        Method("dkd_swap", _m_dkd_swap, ("logits", "probs"), False, "DKD against the swapped teacher",
               label="DKD+Swap", base="dkd"),
        Method("blockkd", _m_kd, _ALL, False,
               "Block-KD (arXiv 2411.01547): KD on the student and every stepping-stone hybrid (student blocks → "
               "connector → the teacher's later blocks), targets from the store; needs the teacher checkpoint",
               label="Block-KD", base="kd", blocks=True),
        Method("blockkd_loca", _m_loca, _ALL, True, "Block-KD against the LoCa-calibrated teacher",
               label="Block-KD+LoCa", base="blockkd", blocks=True),
        Method("blockkd_kd_star", _m_kd_star, _ALL, False,
               "Block-KD with the teacher's mis-instructed rows dropped from every KD term",
               label="Block-KD*", base="blockkd", blocks=True),
        Method("blockkd_swap", _m_swap, _ALL, False, "Block-KD against the swapped teacher",
               label="Block-KD+Swap", base="blockkd", blocks=True),
        Method("ls", _m_ls, ("logits",), False, "KD on z-scored logits at ls_tau (logit standardisation)",
               label="KD+LS", base="ce"),
        Method("loca_ls", _m_loca_ls, ("logits",), True, "logit standardisation with LoCa on the teacher",
               label="LS+LoCa", base="ls"),
    )
}


def get_method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name's error lists the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown loss method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_help() -> str:
    """One line for the CLI: every method name with its report label."""
    return ", ".join(f"{m.name} ({m.label})" for m in METHODS.values())


def compute_loss(method: str, student_logits: torch.Tensor, labels: torch.Tensor, *,
                 teacher_logits: torch.Tensor | None = None, teacher_probs: torch.Tensor | None = None,
                 teacher_sparse: SparseDist | None = None, cfg: LossConfig = LossConfig(),
                 epoch: int = 0, hybrids: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Total training loss (scalar): beta·L_distill + gamma·CE, or CE alone for ``ce``.

    Exactly one teacher form for the distillation methods: ``teacher_logits`` (B, C), ``teacher_probs``
    (B, C) = tempered teacher probabilities at cfg.tau, or ``teacher_sparse`` (a :class:`SparseDist` at
    cfg.tau). ``epoch`` is 0-based (DKD warm-up). Raises NumericsError if the loss is not finite.
    ``teacher_probs`` and ``teacher_sparse`` must be distributions: entries in [0, 1], each row (kept
    entries + tail for sparse) summing to 1 within ``PROB_SUM_TOL`` = 1e-2, as :func:`loca` requires;
    anything else (raw logits passed as probabilities) is a ConfigError. An empty batch is a ConfigError.
    Block-KD methods (``blockkd*``) need ``hybrids``, the stepping-stone logits N_1 … N_n
    (:class:`~loca_pipe.pipeline.blockkd.BlockKD`), and return gamma·L_task + beta·L_distill + cross·L_cross
    (:func:`blockkd_terms`); other methods refuse them.
    """
    m = get_method(method)
    if not isinstance(cfg, LossConfig):
        raise ConfigError(f"cfg must be a LossConfig; got {type(cfg).__name__}")
    zs = _check_student(student_logits)
    y = _check_labels(labels, *zs.shape)
    ce = F.cross_entropy(zs, y)
    if m.distill is None:
        return _finite(ce, "CE loss")
    given = [(k, v) for k, v in (("logits", teacher_logits), ("probs", teacher_probs),
                                 ("sparse", teacher_sparse)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"method {method!r} needs exactly one of teacher_logits, teacher_probs, teacher_sparse; "
                          f"got {len(given)} ({', '.join('teacher_' + k for k, _ in given) or 'none'})")
    kind, value = given[0]
    if kind not in m.teachers:
        raise ConfigError(f"method {method!r} cannot use teacher_{kind}; it accepts "
                          f"{', '.join('teacher_' + k for k in m.teachers)}"
                          + (" (logit standardisation needs the full logits)" if method in ("ls", "loca_ls") else "")
                          + (" (DKD needs the full distribution; cache full logits)" if "dkd" in method else ""))
    if kind == "sparse":
        sd, _ = _check_sparse(value, y)
        if sd.ids.shape[0] != zs.shape[0] or (sd.ids.numel() and int(sd.ids.max()) >= zs.shape[1]):
            raise ConfigError(f"sparse teacher (rows {sd.ids.shape[0]}, max id {int(sd.ids.max()) if sd.ids.numel() else -1})"
                              f" does not fit the student batch {tuple(zs.shape)}")
        value = SparseDist(sd.ids, sd.probs.to(zs.dtype), sd.tail.to(zs.dtype))
    elif kind == "probs" and isinstance(value, torch.Tensor) and value.is_floating_point():
        _check_teacher_probs(_float(value.detach()))
    if m.blocks:
        if not hybrids:
            raise ConfigError(f"method {method!r} is Block-KD: it needs the stepping-stone hybrids' logits "
                              f"(hybrids=, from pipeline.blockkd.BlockKD); train it with `loca-pipe train-student "
                              f"--method {method} --teacher-checkpoint PATH`")
        hs = [_check_student(h, "hybrid logits") for h in hybrids]
        if any(h.shape != zs.shape for h in hs):
            raise ConfigError(f"every hybrid's logits must have the student's shape {tuple(zs.shape)}; got "
                              f"{[tuple(h.shape) for h in hs]}")
        task, distill, cross = blockkd_terms(m, zs, y, _Teacher(kind, value), hs, cfg, epoch)
        return _finite(cfg.gamma * task + cfg.beta * distill + cfg.cross * cross, f"{method} loss")
    if hybrids is not None:
        raise ConfigError(f"method {method!r} takes no hybrids (only the Block-KD methods do)")
    distill = m.distill(zs, y, _Teacher(kind, value), cfg, epoch)
    return _finite(cfg.beta * distill + cfg.gamma * ce, f"{method} loss")
