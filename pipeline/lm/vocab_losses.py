"""Vocabulary-scale KD losses: computed over token chunks, optionally fused with the student's output projection.

For T tokens and a V-word vocabulary the plain losses (:func:`loca_pipe.pipeline.losses.sparse_kd_loss`,
``kd_loss``) materialise the student's (T, V) logits and, through autograd, several (T, V) temporaries
(log-softmax, the scatter for the tail mass, their gradients). Here the loss of each chunk of rows and its
gradient with respect to the chunk's logits are written in closed form, so only one chunk of (rows, V)
work buffers exists at a time:

- :func:`chunked_kd_loss` takes the student's logits (T, V) (they and their gradient stay, nothing else);
- :func:`fused_linear_kd_loss` takes the student's last hidden states h (T, d) and output projection
  W (V, d) (+ bias): logits z = h Wᵀ + b exist one chunk at a time. ``recompute=True`` (default) recomputes
  each chunk's logits in backward (nothing of size T × V is kept between the passes); ``recompute=False``
  computes the gradients with respect to h and W during forward and keeps them (Liger-Kernel's fused linear
  losses, here in plain torch: one matmul fewer, the same memory order).

Per row, with s = z/τ, q = softmax(s), the target weights w_j on kept ids (sparse top-k ∪ {label}, LoCa-
calibrated or not, or Sparse Logit Sampling counts / S) and the tail mass t (sparse only, the teacher's mass
outside the kept ids, scored against the student's own mass there, q_tail = Σ_{i ∉ kept} q_i):

    L = β τ² [ Σ_j w_j log w_j + t log t − Σ_j w_j log q_{id_j} − t log q_tail ] + γ CE(z, y)

    ∂L/∂z_i = β τ [ (Σ_j w_j + t) q_i − Σ_{j: id_j = i} w_j − t [i ∉ kept] q_i / q_tail ] + γ (softmax(z)_i − [i = y])

(the dense teacher is the case "every id kept, t = 0"). The loss is the mean over rows, as in the plain
losses; tests check losses and gradients (with respect to logits, hidden states, W and b) against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from loca_pipe.pipeline.calibration import SparseDist, loca_from_logits
from loca_pipe.pipeline.errors import ConfigError

# Rows per chunk: (rows × V) fp32 work buffers, 2 of them: 256 × 32,000 × 4 B × 2 = 64 MiB at a 32k vocabulary
DEFAULT_CHUNK_ROWS = 256


@dataclass
class KDTarget:
    """What a student row is distilled towards.

    Sparse (``ids``/``weights``/``tail``): the teacher's probabilities at the kept ids and its tail mass;
    duplicate ids are allowed (the label column of a SparseDist repeats a top-k id with weight 0).
    Dense (``teacher_logits``): p = softmax(z_T/τ), LoCa-calibrated first when ``alpha`` is given.
    ``labels`` + ``gamma``: an added γ·CE(z, y) term (at τ = 1, as the students use it).
    """

    ids: Optional[torch.Tensor] = None       # (T, K) int64
    weights: Optional[torch.Tensor] = None   # (T, K) float
    tail: Optional[torch.Tensor] = None      # (T,) float, or None (no tail bucket: sampled targets)
    teacher_logits: Optional[torch.Tensor] = None  # (T, V)
    alpha: Optional[float] = None            # dense only: LoCa α
    labels: Optional[torch.Tensor] = None    # (T,) int64
    beta: float = 1.0
    gamma: float = 0.0

    @classmethod
    def sparse(cls, sd: SparseDist, labels: torch.Tensor | None = None, beta: float = 1.0, gamma: float = 0.0):
        """From a :class:`SparseDist` (``sparse_from_topk``, optionally ``loca_sparse``-calibrated)."""
        return cls(ids=sd.ids.long(), weights=sd.probs.float(), tail=sd.tail.float(), labels=labels, beta=beta,
                   gamma=gamma)

    @classmethod
    def sampled(cls, ids: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor | None = None,
                beta: float = 1.0, gamma: float = 0.0):
        """Sparse Logit Sampling: p̂ = counts / Σ counts at the drawn ids (unused slots: count 0, id −1)."""
        c = counts.float()
        return cls(ids=ids.long().clamp_min(0), weights=c / c.sum(1, keepdim=True), tail=None, labels=labels,
                   beta=beta, gamma=gamma)

    @classmethod
    def dense(cls, teacher_logits: torch.Tensor, alpha: float | None = None, labels: torch.Tensor | None = None,
              beta: float = 1.0, gamma: float = 0.0):
        return cls(teacher_logits=teacher_logits, alpha=alpha, labels=labels, beta=beta, gamma=gamma)

    @property
    def rows(self) -> int:
        return int((self.ids if self.ids is not None else self.teacher_logits).shape[0])

    def check(self, T: int, V: int) -> None:
        if self.ids is None and self.teacher_logits is None:
            raise ConfigError("a KD target needs sparse ids/weights or dense teacher logits")
        if self.rows != T:
            raise ConfigError(f"the KD target has {self.rows} rows but the student has {T}")
        if self.ids is not None and self.ids.numel() and int(self.ids.max()) >= V:
            raise ConfigError(f"the KD target holds token id {int(self.ids.max())} but the student outputs {V} "
                              f"logits; teacher and student must share the vocabulary")
        if self.teacher_logits is not None and self.teacher_logits.shape[1] != V:
            raise ConfigError(f"teacher logits have {self.teacher_logits.shape[1]} classes, the student {V}")
        if (self.gamma and self.labels is None) or (self.labels is not None and self.labels.shape[0] != T):
            raise ConfigError("gamma > 0 needs one label per row")


def _chunk_loss_grad(z: torch.Tensor, tg: KDTarget, sl: slice, tau: float, need_grad: bool):
    """Loss rows (n,) and, if asked, ∂(Σ rows)/∂z (n, V) for logits ``z`` of rows ``sl`` (fp32, not kept).

    Buffers: a few (n, V) fp32 tensors, freed on return."""
    z = z.float()
    s = z / tau if tau != 1.0 else z
    lse = torch.logsumexp(s, 1)
    n = z.shape[0]
    loss = torch.zeros(n, dtype=torch.float32, device=z.device)
    g = None
    q = torch.exp(s - lse[:, None]) if (need_grad or (tg.gamma and tau == 1.0)) else None
    if tg.beta:
        k = tg.beta * tau * tau
        if tg.teacher_logits is not None:  # dense: every id kept, no tail
            zt = tg.teacher_logits[sl]
            if tg.alpha is not None:
                p = loca_from_logits(zt, tg.labels[sl], tg.alpha, tau).probs.float()
            else:
                p = torch.softmax(zt.float() / tau, 1)
            ent = torch.special.xlogy(p, p).sum(1)
            cross = (p * s).sum(1) - p.sum(1) * lse
            loss = loss + k * (ent - cross)
            if need_grad:
                g = (q - p).mul_(tg.beta * tau)  # Σ p = 1
            del p
        else:
            ids, w = tg.ids[sl], tg.weights[sl].float()
            tiny = torch.finfo(torch.float32).tiny
            ent = (w * w.clamp_min(tiny).log()).sum(1)
            wsum = w.sum(1)
            cross = (w * s.gather(1, ids)).sum(1) - wsum * lse
            total = wsum
            q0 = ratio = None
            if tg.tail is not None:
                # the student's own mass outside the kept ids, q_tail = Σ_{i ∉ kept} q_i: a sum of small
                # positives (no cancellation); rows where it underflows fp32 get logsumexp over those ids
                q = q if q is not None else torch.exp(s - lse[:, None])
                q0 = q.scatter(1, ids, 0.0)
                q_tail = q0.sum(1)
                t = tg.tail[sl].float()
                log_tail = torch.log(q_tail)
                low = torch.nonzero((t > 0) & (q_tail < 1e-30)).view(-1)
                if low.numel():  # exact: log q_tail = logsumexp_{i ∉ kept}(s_i) − lse
                    s0 = s[low].scatter(1, ids[low], float("-inf"))
                    lse_nk = torch.logsumexp(s0, 1)
                    log_tail[low] = lse_nk - lse[low]
                    ratio = (low, torch.exp(s0 - torch.where(torch.isfinite(lse_nk), lse_nk, 0.0)[:, None]))
                has = (t > 0) & torch.isfinite(log_tail)
                t = torch.where(has, t, 0.0)
                ent = ent + torch.where(has, t * t.clamp_min(tiny).log(), 0.0)
                cross = cross + torch.where(has, t * log_tail, 0.0)
                total = wsum + t
            loss = loss + k * (ent - cross)
            if need_grad:
                g = q * total[:, None]
                if q0 is not None:  # − t · [i ∉ kept] q_i / q_tail
                    g.sub_(q0.mul_((t / q_tail.clamp_min(tiny))[:, None]))
                    if ratio is not None:
                        low, r = ratio
                        g[low] = q[low] * total[low, None] - r * t[low, None]
                g.scatter_add_(1, ids, -w)
                g.mul_(tg.beta * tau)
            del q0
    if tg.gamma:
        y = tg.labels[sl].long()
        if tau == 1.0:
            lse1 = lse
        else:
            lse1 = torch.logsumexp(z, 1)
        loss = loss + tg.gamma * (lse1 - z.gather(1, y[:, None])[:, 0])
        if need_grad:
            p1 = q if tau == 1.0 else torch.exp(z - lse1[:, None])
            if g is None:
                g = p1 * tg.gamma
            else:
                g.add_(p1, alpha=tg.gamma)
            g.scatter_add_(1, y[:, None], torch.full((n, 1), -float(tg.gamma), device=z.device))
    if need_grad and g is None:
        g = torch.zeros_like(z)
    return loss, g


def _chunks(T: int, rows: int):
    for a in range(0, T, rows):
        yield slice(a, min(T, a + rows))


class _ChunkedKD(torch.autograd.Function):
    """Loss from given logits; backward recomputes each chunk's gradient (no (T, V) autograd temporaries)."""

    @staticmethod
    def forward(ctx, logits, tg: KDTarget, tau: float, rows: int):
        T = logits.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        with torch.no_grad():
            for sl in _chunks(T, rows):
                total += _chunk_loss_grad(logits[sl], tg, sl, tau, False)[0].sum()
        ctx.save_for_backward(logits)
        ctx.tg, ctx.tau, ctx.rows = tg, tau, rows
        return total / max(T, 1)

    @staticmethod
    def backward(ctx, go):
        (logits,) = ctx.saved_tensors
        T = logits.shape[0]
        grad = torch.empty_like(logits)
        scale = go / max(T, 1)
        with torch.no_grad():
            for sl in _chunks(T, ctx.rows):
                _, g = _chunk_loss_grad(logits[sl], ctx.tg, sl, ctx.tau, True)
                grad[sl] = (g * scale).to(grad.dtype)
        return grad, None, None, None


class _FusedLinearKD(torch.autograd.Function):
    """Loss from hidden states and the output projection; logits exist one chunk at a time."""

    @staticmethod
    def forward(ctx, h, W, b, tg: KDTarget, tau: float, rows: int, recompute: bool):
        T = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = gW = gb = None
        if not recompute:
            gh = torch.empty_like(h)
            gW = torch.zeros_like(W)
            gb = torch.zeros_like(b) if b is not None else None
        with torch.no_grad():
            for sl in _chunks(T, rows):
                z = F.linear(h[sl], W, b)
                loss, g = _chunk_loss_grad(z, tg, sl, tau, not recompute)
                total += loss.sum()
                del z
                if not recompute:
                    g = g.to(h.dtype)
                    gh[sl] = g @ W
                    gW.addmm_(g.t(), h[sl])
                    if gb is not None:
                        gb += g.sum(0)
        ctx.tg, ctx.tau, ctx.rows, ctx.recompute, ctx.has_b = tg, tau, rows, recompute, b is not None
        if recompute:
            ctx.save_for_backward(h, W, b if b is not None else torch.empty(0))
        else:
            ctx.save_for_backward(gh, gW, gb if gb is not None else torch.empty(0))
        return total / max(T, 1)

    @staticmethod
    def backward(ctx, go):
        a, c, d = ctx.saved_tensors
        if not ctx.recompute:
            gh, gW, gb = a, c, d
            T = gh.shape[0]
            s = go / max(T, 1)
            return gh * s, gW * s, (gb * s if ctx.has_b else None), None, None, None, None
        h, W, b = a, c, (d if ctx.has_b else None)
        T = h.shape[0]
        s = go / max(T, 1)
        gh = torch.empty_like(h)
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(b) if b is not None else None
        with torch.no_grad():
            for sl in _chunks(T, ctx.rows):
                z = F.linear(h[sl], W, b)
                _, g = _chunk_loss_grad(z, ctx.tg, sl, ctx.tau, True)
                del z
                g = (g * s).to(h.dtype)
                gh[sl] = g @ W
                gW.addmm_(g.t(), h[sl])
                if gb is not None:
                    gb += g.sum(0)
        return gh, gW, gb, None, None, None, None


def _check(tau: float, rows: int) -> tuple[float, int]:
    if not (float(tau) > 0):
        raise ConfigError(f"tau must be a positive temperature; got {tau}")
    if int(rows) < 1:
        raise ConfigError(f"chunk_rows must be ≥ 1; got {rows}")
    return float(tau), int(rows)


def chunked_kd_loss(logits: torch.Tensor, target: KDTarget, tau: float,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """β·τ²·KD + γ·CE from the student's logits (T, V), computed ``chunk_rows`` rows at a time."""
    tau, rows = _check(tau, chunk_rows)
    if logits.ndim != 2:
        raise ConfigError(f"student logits must be (tokens, vocabulary); got {tuple(logits.shape)}")
    target.check(*logits.shape)
    return _ChunkedKD.apply(logits, target, tau, rows)


def fused_linear_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: KDTarget,
                         tau: float, chunk_rows: int = DEFAULT_CHUNK_ROWS, recompute: bool = True) -> torch.Tensor:
    """β·τ²·KD + γ·CE of the logits ``hidden @ weight.T + bias`` without ever holding them whole.

    hidden (T, d), weight (V, d) (the student's output projection, e.g. ``model.get_output_embeddings()``),
    bias (V,) or None. Gradients flow to ``hidden``, ``weight`` and ``bias``."""
    tau, rows = _check(tau, chunk_rows)
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(f"hidden (T, d) and weight (V, d) must share d; got {tuple(hidden.shape)} and "
                          f"{tuple(weight.shape)}")
    target.check(hidden.shape[0], weight.shape[0])
    return _FusedLinearKD.apply(hidden, weight, bias, target, tau, rows, bool(recompute))


__all__ = ["KDTarget", "chunked_kd_loss", "fused_linear_kd_loss", "DEFAULT_CHUNK_ROWS"]
