"""Chunked and fused vocabulary-scale KD losses against the plain (unfused) ones: losses and gradients with
respect to logits, hidden states, the projection weight and its bias, within fp32 tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.calibration import loca_sparse, sparse_from_topk
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.lm import students
from loca_pipe.pipeline.lm.vocab_losses import KDTarget, chunked_kd_loss, fused_linear_kd_loss
from loca_pipe.pipeline.losses import kd_loss, loca_kd_loss, sparse_kd_loss

TOL = dict(rtol=2e-5, atol=2e-6)


def _problem(T=37, V=53, d=8, K=5, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * 0.7
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    zt = torch.randn(T, V, generator=g) * 2.5
    y = torch.randint(0, V, (T,), generator=g)
    y[::4] = zt[::4].argmax(1)  # some rows correct, some mis-instructed
    return h, W, b, zt, y, K


def _sd(zt, y, K, tau, alpha=None):
    top = zt.topk(K, 1)
    lse = torch.logsumexp(zt / tau, 1)
    sd = sparse_from_topk(top.values, top.indices, lse, zt.gather(1, y[:, None])[:, 0], y, tau)
    return loca_sparse(sd, y, alpha)[0] if alpha is not None else sd


def _cases(zt, y, K, tau):
    """(name, KDTarget, reference loss as a function of the student's logits)."""
    beta, gamma = 0.7, 0.3
    sd, sdl = _sd(zt, y, K, tau), _sd(zt, y, K, tau, alpha=0.9)
    g = torch.Generator().manual_seed(5)
    sids = torch.multinomial(torch.softmax(zt / tau, 1), 6, replacement=True, generator=g)
    uniq = [torch.unique(r, return_counts=True) for r in sids]
    ids = torch.full((len(y), 6), -1, dtype=torch.long)
    cnt = torch.zeros((len(y), 6), dtype=torch.long)
    for r, (u, c) in enumerate(uniq):
        ids[r, :len(u)], cnt[r, :len(u)] = u, c
    ce = lambda z: gamma * F.cross_entropy(z, y)  # noqa: E731
    return [
        ("sparse", KDTarget.sparse(sd, y, beta, gamma), lambda z: beta * sparse_kd_loss(z, sd, tau) + ce(z)),
        ("loca-sparse", KDTarget.sparse(sdl, y, beta, gamma), lambda z: beta * sparse_kd_loss(z, sdl, tau) + ce(z)),
        ("sampled", KDTarget.sampled(ids, cnt, y, beta, gamma), lambda z: beta * students.sampled_kd(z, ids, cnt, tau) + ce(z)),
        ("dense", KDTarget.dense(zt, None, y, beta, gamma), lambda z: beta * kd_loss(z, zt, tau, teacher_is="logits") + ce(z)),
        ("loca-dense", KDTarget.dense(zt, 0.9, y, beta, gamma),
         lambda z: beta * loca_kd_loss(z, zt, y, tau, 0.9, teacher_is="logits") + ce(z)),
        ("kd-only", KDTarget.sparse(sd), lambda z: sparse_kd_loss(z, sd, tau)),
    ]


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("recompute", [True, False])
def test_fused_and_chunked_equal_unfused_losses_and_gradients(tau, recompute):
    h0, W0, b0, zt, y, K = _problem()
    for name, tg, ref in _cases(zt, y, K, tau):
        h, W, b = (x.clone().requires_grad_(True) for x in (h0, W0, b0))
        want = ref(F.linear(h, W, b))
        want.backward()
        gh, gW, gb = h.grad.clone(), W.grad.clone(), b.grad.clone()
        for rows in (1, 8, 64):
            h2, W2, b2 = (x.clone().requires_grad_(True) for x in (h0, W0, b0))
            got = fused_linear_kd_loss(h2, W2, b2, tg, tau, chunk_rows=rows, recompute=recompute)
            got.backward()
            torch.testing.assert_close(got, want.detach(), **TOL, msg=f"{name} loss rows={rows}")
            torch.testing.assert_close(h2.grad, gh, **TOL, msg=f"{name} dL/dh rows={rows}")
            torch.testing.assert_close(W2.grad, gW, **TOL, msg=f"{name} dL/dW rows={rows}")
            torch.testing.assert_close(b2.grad, gb, **TOL, msg=f"{name} dL/db rows={rows}")
        z = F.linear(h0, W0, b0).requires_grad_(True)
        ref(z).backward()
        z2 = z.detach().clone().requires_grad_(True)
        got = chunked_kd_loss(z2, tg, tau, chunk_rows=10)
        (2.0 * got).backward()  # the incoming gradient is applied
        torch.testing.assert_close(got, want.detach(), **TOL, msg=name)
        torch.testing.assert_close(z2.grad, 2.0 * z.grad, **TOL, msg=f"{name} dL/dz")


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 20), V=st.integers(2, 40), K=st.integers(1, 6), seed=st.integers(0, 10_000),
       tau=st.sampled_from([0.5, 1.0, 3.0]))
def test_sparse_fused_equals_unfused_property(T, V, K, seed, tau):
    K = min(K, V)
    h0, W0, _, zt, y, _ = _problem(T, V, 4, K, seed, bias=False)
    sd = _sd(zt, y, K, tau)
    h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
    want = sparse_kd_loss(F.linear(h, W), sd, tau)
    want.backward()
    h2, W2 = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
    got = fused_linear_kd_loss(h2, W2, None, KDTarget.sparse(sd), tau, chunk_rows=7)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=5e-5, atol=5e-6)
    torch.testing.assert_close(h2.grad, h.grad, rtol=5e-5, atol=5e-6)
    torch.testing.assert_close(W2.grad, W.grad, rtol=5e-5, atol=5e-6)


def test_bad_inputs_are_refused():
    h, W, b, zt, y, K = _problem()
    sd = _sd(zt, y, K, 1.0)
    with pytest.raises(ConfigError, match="the student outputs 10 logits; teacher and student must share"):
        fused_linear_kd_loss(h, W[:10], None, KDTarget.sparse(sd), 1.0)
    with pytest.raises(ConfigError, match="has 37 rows but the student has 5"):
        chunked_kd_loss(torch.zeros(5, 53), KDTarget.sparse(sd), 1.0)
    with pytest.raises(ConfigError, match="tau must be a positive"):
        chunked_kd_loss(torch.zeros(37, 53), KDTarget.sparse(sd), 0.0)


def test_student_tail_mass_below_fp32_range_matches_the_logsumexp_reference():
    """A very confident student: its mass outside the kept ids underflows fp32 (q_tail < 1e-38), so the tail
    term takes the exact logsumexp branch; loss and gradient still equal the plain loss."""
    h0, W0, b0, zt, y, K = _problem(T=12, V=30)
    sd = _sd(zt, y, K, 1.0)
    z0 = F.linear(h0, W0, b0).detach()
    z0.scatter_(1, sd.ids[:, :1], 200.0)  # the teacher's top-1 gets a huge student logit
    z = z0.clone().requires_grad_(True)
    want = sparse_kd_loss(z, sd, 1.0)
    want.backward()
    q = torch.softmax(z0, 1).scatter(1, sd.ids, 0.0).sum(1)
    assert (q < 1e-30).all()  # the branch is taken
    z2 = z0.clone().requires_grad_(True)
    got = chunked_kd_loss(z2, KDTarget.sparse(sd), 1.0, chunk_rows=5)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-5, atol=1e-6)
