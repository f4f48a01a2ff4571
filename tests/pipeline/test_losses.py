"""Losses against independent references: explicit F.kl_div, a loop re-derivation of DKD (fp64), mdistiller's
masked-logit DKD, Sun et al.'s normalize(); sparse vs dense; registry and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline import (
    ConfigError,
    METHODS,
    LossConfig,
    NumericsError,
    SparseDist,
    ce_loss,
    compute_loss,
    dkd_loss,
    dkd_warmup,
    kd_loss,
    loca,
    loca_from_logits,
    loca_kd_loss,
    ls_kd_loss,
    sparse_from_topk,
    sparse_kd_loss,
    standardize_logits,
)


def _batch(B=6, C=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g)
    zt = torch.randn(B, C, generator=g) * scale
    y = torch.randint(0, C, (B,), generator=g)
    return zs, zt, y


def ref_kd(zs, p_teacher, tau):
    """The explicit formula: τ² · F.kl_div(log_softmax(z_S/τ), p_T, batchmean)."""
    return F.kl_div(F.log_softmax(zs / tau, 1), p_teacher, reduction="batchmean") * tau**2


def ref_dkd_loop(zs, p, y, tau, a, b):
    """DKD re-derived sample by sample in fp64 from probabilities: binary target KL + non-target KL."""
    zs, p = zs.double(), p.double()
    tck, nck = [], []
    for i in range(zs.shape[0]):
        q = torch.softmax(zs[i] / tau, 0)
        yi = int(y[i])
        bt = torch.stack([p[i, yi], 1 - p[i, yi]])
        bs = torch.stack([q[yi], 1 - q[yi]])
        tck.append(sum(float(bt[j]) * math.log(float(bt[j]) / float(bs[j])) for j in range(2) if bt[j] > 0))
        others = [j for j in range(zs.shape[1]) if j != yi]
        ph = p[i, others] / p[i, others].sum()
        qh = q[others] / q[others].sum()
        nck.append(sum(float(ph[j]) * math.log(float(ph[j]) / float(qh[j])) for j in range(len(others)) if ph[j] > 0))
    return (a * np.mean(tck) + b * np.mean(nck)) * tau**2


def ref_dkd_mdistiller(zs, zt, y, tau, a, b):
    """mdistiller's dkd_loss (gt masked with −1000), written out here in fp64."""
    zs, zt = zs.double(), zt.double()
    gt = F.one_hot(y, zs.shape[1]).bool()
    ps, pt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)

    def cat_mask(t):
        return torch.stack([(t * gt).sum(1), (t * ~gt).sum(1)], 1)

    tckd = F.kl_div(torch.log(cat_mask(ps)), cat_mask(pt), reduction="sum") * tau**2 / zs.shape[0]
    pt2 = F.softmax(zt / tau - 1000.0 * gt, 1)
    ls2 = F.log_softmax(zs / tau - 1000.0 * gt, 1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * tau**2 / zs.shape[0]
    return float(a * tckd + b * nckd)


def ref_normalize(z):
    """Sun et al. (CVPR 2024) code: (z − mean) / (1e-7 + std), std unbiased."""
    return (z - z.mean(dim=-1, keepdims=True)) / (1e-7 + z.std(dim=-1, keepdims=True))


# ------------------------------------------------------------------------------------------------
# KD and LoCa-KD


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_explicit_kl_div_values_and_grads(tau):
    zs, zt, _ = _batch()
    zs.requires_grad_(True)
    ours = kd_loss(zs, zt, tau, teacher_is="logits")
    ref = ref_kd(zs, F.softmax(zt / tau, 1), tau)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    g1, = torch.autograd.grad(ours, zs)
    g2, = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    # teacher as tempered probabilities, explicit and auto-detected
    p = F.softmax(zt / tau, 1)
    assert kd_loss(zs, p, tau, teacher_is="probs").item() == pytest.approx(ref.item(), rel=1e-6)
    assert kd_loss(zs, p, tau).item() == pytest.approx(ref.item(), rel=1e-6)
    assert kd_loss(zs, zt, tau).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("scale, tau", [(3.0, 4.0), (3.0, 1.0), (0.0, 4.0), (1e4, 1.0), (1e4, 4.0)])
def test_loca_kd_matches_kl_div_on_calibrated_teacher(scale, tau):
    zs, zt, y = _batch(B=16, C=12, seed=1, scale=1.0)
    zt = torch.round(zt) * scale  # scale 0: all-equal logits (ties); 1e4: one-hot teachers, p_y = 0
    zs.requires_grad_(True)
    pc = loca_from_logits(zt, y, 0.95, tau).probs
    ref = ref_kd(zs, pc, tau)
    ours = loca_kd_loss(zs, zt, y, tau, 0.95, teacher_is="logits")
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g1, = torch.autograd.grad(ours, zs)
    g2, = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    # from tempered probabilities too
    p = F.softmax(zt / tau, 1)
    assert loca_kd_loss(zs, p, y, tau, 0.95, teacher_is="probs").item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 32), st.integers(2, 60), st.integers(0, 2**31 - 1), st.floats(0.05, 0.999),
       st.sampled_from([1.0, 2.0, 4.0]))
def test_loca_kd_property_equals_explicit(B, C, seed, alpha, tau):
    zs, zt, y = _batch(B, C, seed, 4.0)
    pc = loca_from_logits(zt, y, alpha, tau).probs
    ours = loca_kd_loss(zs, zt, y, tau, alpha, teacher_is="logits").item()
    assert ours == pytest.approx(ref_kd(zs, pc, tau).item(), rel=1e-4, abs=1e-5)


def test_loca_kd_equals_kd_bit_for_bit_without_mis_instruction():
    zs, zt, _ = _batch(B=8, C=10)
    y = zt.argmax(1)  # every row correct
    assert torch.equal(loca_kd_loss(zs, zt, y, 4.0, 0.9, teacher_is="logits"),
                       kd_loss(zs, zt, 4.0, teacher_is="logits"))


def test_loca_is_idempotent_on_calibrated_targets():
    zs, zt, y = _batch(B=8, C=10)
    pc = loca_from_logits(zt, y, 0.9, 4.0).probs
    cfg = LossConfig()
    assert torch.equal(compute_loss("loca", zs, y, teacher_probs=pc, cfg=cfg),
                       compute_loss("kd", zs, y, teacher_probs=pc, cfg=cfg))


def test_loca_kd_gradcheck_fp64():
    zs, zt, y = _batch(B=3, C=5, seed=4)
    zs = zs.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loca_kd_loss(s, zt.double(), y, 2.0, 0.9, teacher_is="logits"), (zs,))


def _hybrids(method: str, zs: torch.Tensor) -> dict:
    """Block-KD methods take the stepping-stone logits too: two made from the student's (NaN stays NaN)."""
    return {"hybrids": [zs * 0.5, zs.flip(1)]} if METHODS[method].blocks else {}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    zs, zt, y = _batch()
    zs_h, zt_h = zs.to(dtype), zt.to(dtype)
    out = kd_loss(zs_h, zt_h, 4.0, teacher_is="logits")
    assert out.dtype == torch.float32
    assert torch.equal(out, kd_loss(zs_h.float(), zt_h.float(), 4.0, teacher_is="logits"))
    cfg = LossConfig()
    for m in METHODS:
        a = compute_loss(m, zs_h, y, teacher_logits=zt_h, cfg=cfg, **_hybrids(m, zs_h))
        b = compute_loss(m, zs_h.float(), y, teacher_logits=zt_h.float(), cfg=cfg, **_hybrids(m, zs_h.float()))
        assert a.dtype == torch.float32 and torch.equal(a, b), m


# ------------------------------------------------------------------------------------------------
# DKD


@pytest.mark.parametrize("tau, a, b", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0)])
def test_dkd_matches_loop_rederivation_and_mdistiller(tau, a, b):
    zs, zt, y = _batch(B=7, C=9, seed=2)
    ours = dkd_loss(zs, zt, y, tau, alpha=a, beta=b, teacher_is="logits").item()
    assert ours == pytest.approx(ref_dkd_loop(zs, F.softmax(zt.double() / tau, 1), y, tau, a, b), rel=1e-5)
    assert ours == pytest.approx(ref_dkd_mdistiller(zs, zt, y, tau, a, b), rel=1e-5)
    p = F.softmax(zt / tau, 1)
    assert dkd_loss(zs, p, y, tau, alpha=a, beta=b, teacher_is="probs").item() == pytest.approx(ours, rel=1e-5)


def test_loca_dkd_is_dkd_on_calibrated_probs():
    zs, zt, y = _batch(B=10, C=8, seed=3)
    pc = loca_from_logits(zt, y, 0.95, 4.0).probs
    ref = ref_dkd_loop(zs, pc.double(), y, 4.0, 1.0, 8.0)
    assert dkd_loss(zs, zt, y, 4.0, loca_alpha=0.95, teacher_is="logits").item() == pytest.approx(ref, rel=1e-5)
    assert dkd_loss(zs, pc, y, 4.0, teacher_is="probs").item() == pytest.approx(ref, rel=1e-5)
    # LoCa leaves NCKD alone: with dkd_alpha = 0 LoCa-DKD equals DKD
    assert dkd_loss(zs, zt, y, 4.0, alpha=0.0, loca_alpha=0.95).item() == pytest.approx(
        dkd_loss(zs, zt, y, 4.0, alpha=0.0).item(), rel=1e-6)


def test_dkd_one_hot_teacher_and_huge_logits_finite():
    zs, _, y = _batch(B=4, C=6)
    zt = F.one_hot(y, 6).float() * 1e4
    zs = zs * 1e4
    out = dkd_loss(zs.requires_grad_(True), zt, y, 1.0, loca_alpha=0.9)
    assert torch.isfinite(out)
    assert torch.isfinite(torch.autograd.grad(out, zs)[0]).all()
    p = F.one_hot(y, 6).float()  # teacher probabilities with no non-target mass
    assert torch.isfinite(dkd_loss(zs, p, y, 1.0, teacher_is="probs"))


def test_dkd_one_hot_probability_teacher_has_zero_nckd():
    # docs/maths.md: a teacher with no non-target mass contributes NCKD = 0 (a clamp at finfo.tiny made p̂
    # near-uniform and gave NCKD ≈ 0.19-0.36 here)
    zs, _, y = _batch(B=5, C=10, seed=4)
    p = F.one_hot(y, 10).float()
    for la in (None, 0.9):
        assert dkd_loss(zs, p, y, 1.0, alpha=0.0, beta=1.0, teacher_is="probs", loca_alpha=la).item() == 0.0
    # TCKD alone is the fp64 reference's (= −log q_y)
    z = zs.clone().requires_grad_(True)
    out = dkd_loss(z, p, y, 2.0, teacher_is="probs")
    assert out.item() == pytest.approx(ref_dkd_loop(zs, p, y, 2.0, 1.0, 8.0), rel=1e-5)
    assert torch.isfinite(torch.autograd.grad(out, z)[0]).all()


def _saturated(B=6, C=10, margin=95.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g)
    zt = torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    zt.scatter_(1, y.view(-1, 1), zt.max(1, keepdim=True).values + margin)
    return zs, zt, y


@pytest.mark.parametrize("la", [None, 0.9])
def test_dkd_saturated_fp32_probabilities_match_logits_and_fp64(la):
    # margin 95 at τ = 1: in fp32 p_y rounds to 1 and every other p_i is subnormal (1e-42..1e-44), so
    # 1 − p_y = 0 and a clamp at finfo.tiny flattens p̂; the exact logs keep ~12 bits of each subnormal
    zs, zt, y = _saturated()
    p = F.softmax(zt, 1)
    assert bool((p.gather(1, y.view(-1, 1)) == 1).all()) and 0 < float(p[p < 1].min()) < torch.finfo().tiny
    ref = ref_dkd_loop(zs, F.softmax(zt.double(), 1) if la is None else loca_from_logits(zt.double(), y, la, 1.0).probs,
                       y, 1.0, 1.0, 8.0)
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    from_logits = dkd_loss(z1, zt, y, 1.0, teacher_is="logits", loca_alpha=la)
    from_probs = dkd_loss(z2, p, y, 1.0, teacher_is="probs", loca_alpha=la)
    assert from_logits.item() == pytest.approx(ref, rel=1e-5)
    assert from_probs.item() == pytest.approx(ref, rel=1e-3)  # subnormal p: ~2^-12 relative precision
    g1, g2 = torch.autograd.grad(from_logits, z1)[0], torch.autograd.grad(from_probs, z2)[0]
    assert torch.isfinite(g2).all()
    # the smallest subnormals carry only a few bits: compare on the gradient's own scale
    assert float((g2 - g1).abs().max()) <= 1e-3 * float(g1.abs().max())


def test_dkd_probabilities_with_exact_zeros_match_fp64_reference():
    # some non-target entries exactly 0 (0·log 0 = 0), one row with every non-target entry 0, one row
    # whose label has probability 0 (a mis-instruction row for LoCa)
    zs, zt, y = _batch(B=6, C=8, seed=6)
    p = F.softmax(zt / 2.0, 1)
    p[0, (int(y[0]) + 1) % 8] = 0.0
    p[1, [(int(y[1]) + k) % 8 for k in (1, 2, 3)]] = 0.0
    p[2] = 0.0
    p[2, int(y[2])] = 1.0
    p[3, int(y[3])] = 0.0
    p = p / p.sum(1, keepdim=True)
    for la in (None, 0.95):
        target = p if la is None else loca(p, y, la).probs
        z = zs.clone().requires_grad_(True)
        out = dkd_loss(z, p, y, 2.0, teacher_is="probs", loca_alpha=la)
        assert out.item() == pytest.approx(ref_dkd_loop(zs, target, y, 2.0, 1.0, 8.0), rel=1e-5)
        assert torch.isfinite(torch.autograd.grad(out, z)[0]).all()
        # the registry goes through the same code
        m = "dkd" if la is None else "loca_dkd"
        cfg = LossConfig(tau=2.0, beta=1.0, gamma=0.0, warmup_epochs=0, alpha=la or 0.9)
        assert compute_loss(m, zs, y, teacher_probs=p, cfg=cfg).item() == pytest.approx(out.item(), rel=1e-6)


@pytest.mark.parametrize("epoch, warmup, expected", [(0, 20, 0.05), (9, 20, 0.5), (19, 20, 1.0), (50, 20, 1.0),
                                                     (0, 0, 1.0)])
def test_dkd_warmup(epoch, warmup, expected):
    assert dkd_warmup(epoch, warmup) == pytest.approx(expected)
    zs, zt, y = _batch()
    cfg = LossConfig(warmup_epochs=warmup, beta=1.0, gamma=0.0)
    full = dkd_loss(zs, zt, y, cfg.tau, alpha=cfg.dkd_alpha, beta=cfg.dkd_beta).item()
    assert compute_loss("dkd", zs, y, teacher_logits=zt, cfg=cfg, epoch=epoch).item() == pytest.approx(
        expected * full, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# logit standardisation


def test_ls_matches_sun_et_al_and_loca_ls_matches_calibrated():
    zs, zt, y = _batch(B=8, C=10, seed=5)
    t = 2.0
    ref = ref_kd(ref_normalize(zs), F.softmax(ref_normalize(zt) / t, 1), t)
    torch.testing.assert_close(standardize_logits(zt), ref_normalize(zt))
    assert ls_kd_loss(zs, zt, t).item() == pytest.approx(ref.item(), rel=1e-5)
    pc = loca_from_logits(ref_normalize(zt), y, 0.9, t).probs
    ref2 = ref_kd(ref_normalize(zs), pc, t)
    assert ls_kd_loss(zs, zt, t, labels=y, loca_alpha=0.9).item() == pytest.approx(ref2.item(), rel=1e-5)
    cfg = LossConfig(ls_tau=t, beta=9.0, gamma=0.1)
    ce = F.cross_entropy(zs, y)
    assert compute_loss("ls", zs, y, teacher_logits=zt, cfg=cfg).item() == pytest.approx(
        (9.0 * ref + 0.1 * ce).item(), rel=1e-5)
    assert compute_loss("loca_ls", zs, y, teacher_logits=zt, cfg=cfg).item() == pytest.approx(
        (9.0 * ref2 + 0.1 * ce).item(), rel=1e-5)
    # z-scoring makes LS invariant to the logits' scale and shift
    assert ls_kd_loss(zs * 3 + 1, zt * 0.5 - 2, t).item() == pytest.approx(ref.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# sparse KD


def _sparse(zt, y, k, tau):
    topv, topi = zt.topk(k, 1)
    return sparse_from_topk(topv, topi, torch.logsumexp(zt / tau, 1), zt.gather(1, y[:, None])[:, 0], y, tau)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_sparse_equals_dense_when_k_is_c(tau):
    zs, zt, y = _batch(B=9, C=11, seed=6)
    zs.requires_grad_(True)
    sd = _sparse(zt, y, 11, tau)
    ours = sparse_kd_loss(zs, sd, tau)
    dense = kd_loss(zs, zt, tau, teacher_is="logits")
    assert ours.item() == pytest.approx(dense.item(), rel=1e-5)
    g1, = torch.autograd.grad(ours, zs)
    g2, = torch.autograd.grad(dense, zs)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    cfg = LossConfig(tau=tau)
    for m in ("kd", "loca"):
        assert compute_loss(m, zs, y, teacher_sparse=sd, cfg=cfg).item() == pytest.approx(
            compute_loss(m, zs, y, teacher_logits=zt, cfg=cfg).item(), rel=1e-5)


def test_sparse_topk_matches_explicit_bucketed_kl():
    """Reference: collapse both full distributions onto (kept ids, one tail bucket) in fp64 and take KL."""
    zs, zt, y = _batch(B=12, C=20, seed=7)
    tau, k = 2.0, 4
    sd = _sparse(zt, y, k, tau)
    p = F.softmax(zt.double() / tau, 1)
    q = F.softmax(zs.double() / tau, 1)
    total = 0.0
    for b in range(12):
        kept = sorted(set(sd.ids[b].tolist()))
        rest = [i for i in range(20) if i not in kept]
        pb = [float(p[b, i]) for i in kept] + [float(p[b, rest].sum())]
        qb = [float(q[b, i]) for i in kept] + [float(q[b, rest].sum())]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(pb, qb) if pi > 0)
    ref = total / 12 * tau**2
    assert sparse_kd_loss(zs, sd, tau).item() == pytest.approx(ref, rel=1e-5)
    # the public bug: normalising the student over the kept ids only gives a different (wrong) number
    wrong = 0.0
    for b in range(12):
        ids = sd.ids[b, :k]
        pk = p[b, ids] / p[b, ids].sum()
        qk = F.softmax(zs[b, ids].double() / tau, 0)
        wrong += float((pk * (pk / qk).log()).sum())
    assert abs(wrong / 12 * tau**2 - ref) > 1e-3


def test_sparse_loca_matches_dense_loca_bucketed():
    zs, zt, y = _batch(B=12, C=20, seed=8)
    tau, k = 4.0, 3
    sd = _sparse(zt, y, k, tau)
    cfg = LossConfig(tau=tau, beta=1.0, gamma=0.0)
    pc = loca(F.softmax(zt.double() / tau, 1), y, 0.9).probs
    q = F.softmax(zs.double() / tau, 1)
    total = 0.0
    for b in range(12):
        kept = sorted(set(sd.ids[b].tolist()))
        rest = [i for i in range(20) if i not in kept]
        pb = [float(pc[b, i]) for i in kept] + [float(pc[b, rest].sum())]
        qb = [float(q[b, i]) for i in kept] + [float(q[b, rest].sum())]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(pb, qb) if pi > 0)
    ref = total / 12 * tau**2
    assert compute_loss("loca", zs, y, teacher_sparse=sd, cfg=cfg).item() == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# registry, totals, bad inputs


def test_total_is_beta_distill_plus_gamma_ce():
    zs, zt, y = _batch()
    cfg = LossConfig(tau=4.0, alpha=0.95, beta=0.9, gamma=0.1)
    ce = F.cross_entropy(zs, y)
    assert compute_loss("ce", zs, y, cfg=cfg).item() == pytest.approx(ce.item(), rel=1e-7)
    assert ce_loss(zs, y).item() == pytest.approx(ce.item(), rel=1e-7)
    kd = ref_kd(zs, F.softmax(zt / 4, 1), 4.0)
    assert compute_loss("kd", zs, y, teacher_logits=zt, cfg=cfg).item() == pytest.approx(
        (0.9 * kd + 0.1 * ce).item(), rel=1e-6)
    lk = ref_kd(zs, loca_from_logits(zt, y, 0.95, 4.0).probs, 4.0)
    assert compute_loss("loca", zs, y, teacher_logits=zt, cfg=cfg).item() == pytest.approx(
        (0.9 * lk + 0.1 * ce).item(), rel=1e-5)
    assert set(METHODS) >= {"ce", "kd", "loca", "dkd", "loca_dkd", "ls", "loca_ls"}


def test_unknown_method_lists_valid_ones():
    zs, zt, y = _batch()
    with pytest.raises(ConfigError, match="unknown loss method 'kdd'; valid methods: ce, kd, loca, kd_star, dkd"):
        compute_loss("kdd", zs, y, teacher_logits=zt)


@pytest.mark.parametrize("method, kwargs, match", [
    ("kd", {}, "needs exactly one of teacher_logits, teacher_probs, teacher_sparse; got 0"),
    ("kd", {"teacher_logits": "zt", "teacher_probs": "p"}, "got 2 \\(teacher_logits, teacher_probs\\)"),
    ("ls", {"teacher_probs": "p"}, "cannot use teacher_probs.*logit standardisation needs the full logits"),
    ("dkd", {"teacher_sparse": "sd"}, "cannot use teacher_sparse.*cache full logits"),
    ("kd", {"teacher_logits": "short"}, "teacher must have the student's shape \\(6, 10\\)"),
])
def test_bad_teacher_arguments(method, kwargs, match):
    zs, zt, y = _batch()
    vals = {"zt": zt, "p": F.softmax(zt, 1), "sd": _sparse(zt, y, 3, 4.0), "short": zt[:, :5]}
    with pytest.raises(ConfigError, match=match):
        compute_loss(method, zs, y, **{k: vals[v] for k, v in kwargs.items()})


@pytest.mark.parametrize("field, value, match", [
    ("tau", 0.0, "tau is a temperature and must be > 0"),
    ("ls_tau", -1.0, "ls_tau is a temperature"),
    ("alpha", 0.0, "alpha \\(LoCa\\) must be in \\(0, 1\\)"),
    ("beta", -0.1, "beta is a weight and must be >= 0"),
    ("warmup_epochs", 2.5, "warmup_epochs must be a whole number"),
    ("gamma", float("nan"), "gamma must be finite"),
    ("tau", "4", "tau must be a number"),
])
def test_bad_loss_config(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**{field: value})


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_inputs_raise(which):
    zs, zt, y = _batch()
    (zs if which == "student" else zt)[2, 3] = float("nan")
    for m in METHODS:
        if m == "ce" and which == "teacher":
            continue
        with pytest.raises(NumericsError, match="contain NaN/inf"):
            compute_loss(m, zs, y, teacher_logits=zt, **_hybrids(m, zs))
    with pytest.raises(NumericsError, match="KD loss is nan"):
        kd_loss(zs, zt, 4.0)


def test_bad_labels_and_shapes():
    zs, zt, y = _batch()
    with pytest.raises(ConfigError, match="labels must lie in \\[0, 10\\) for 10 classes; got values in \\[0, 10\\]"):
        compute_loss("kd", zs, torch.tensor([0, 1, 2, 3, 4, 10]), teacher_logits=zt)
    with pytest.raises(ConfigError, match="labels must be a \\(6,\\) tensor"):
        loca_kd_loss(zs, zt, y[:3], 4.0, 0.9)
    with pytest.raises(ConfigError, match="student_logits must be a \\(batch, classes\\) tensor"):
        kd_loss(zs[0], zt[0], 4.0)
    with pytest.raises(ConfigError, match="teacher_is must be 'auto', 'logits' or 'probs'"):
        kd_loss(zs, zt, 4.0, teacher_is="prob")
    with pytest.raises(ConfigError, match="tau must be a finite temperature > 0"):
        kd_loss(zs, zt, 0.0)
    sd = _sparse(zt, y, 3, 4.0)
    with pytest.raises(ConfigError, match="student outputs 5 classes"):
        sparse_kd_loss(zs[:, :5], sd, 4.0)
    with pytest.raises(ConfigError, match="column K must hold the label id"):
        compute_loss("kd", zs, (y + 1) % 10, teacher_sparse=sd)
    assert isinstance(sd, SparseDist)


def test_alpha_above_one_that_leaves_the_simplex_raises():
    # 100 classes, label and k at low probability: s·(1 − p_y) > 1 for alpha = 1.5
    zt = torch.zeros(1, 100)
    zt[0, 3] = 0.5
    y = torch.tensor([7])
    zs = torch.zeros(1, 100)
    with pytest.warns(UserWarning, match="no longer guaranteed"):
        with pytest.raises(NumericsError, match="alpha=1.5 >= 1 makes the label's calibrated probability negative"):
            loca_kd_loss(zs, zt, y, 1.0, 1.5, teacher_is="logits")
    with pytest.warns(UserWarning, match="no longer guaranteed"):
        with pytest.raises(NumericsError, match="negative"):
            loca_from_logits(zt, y, 1.5, 1.0)


# ------------------------------------------------------------------------------------------------
# teacher inputs that are not distributions (issue #15): refused with the tolerance and the fix


def test_sparse_from_topk_refuses_an_lse_at_another_tau():
    zs, zt, y = _batch(B=8, C=20, seed=7, scale=3.0)
    top = zt.topk(5, 1)
    zy = zt.gather(1, y.view(-1, 1)).view(-1)
    # the lse at τ = 4 used at τ = 1: the kept "probabilities" sum far above 1
    with pytest.raises(ConfigError, match=r"not a distribution.*expected <= 1 \+ 0\.01.*lse column for tau=1\.0"):
        sparse_from_topk(top.values, top.indices, torch.logsumexp(zt / 4.0, 1), zy, y, 1.0)
    with pytest.raises(NumericsError, match="lse is ±inf in 1 row"):
        lse = torch.logsumexp(zt, 1)
        lse[3] = float("inf")
        sparse_from_topk(top.values, top.indices, lse, zy, y, 1.0)
    # the right lse passes; so does one that rounds up to 1 + 1e-2 (fp rounding of the cache), not beyond
    sd = sparse_from_topk(top.values, top.indices, torch.logsumexp(zt, 1), zy, y, 1.0)
    assert float((sd.probs.sum(1) + sd.tail - 1).abs().max()) < 1e-6
    sparse_from_topk(top.values, top.indices, torch.logsumexp(zt, 1) - math.log(1.009), zy, y, 1.0)
    with pytest.raises(ConfigError, match="not a distribution"):
        sparse_from_topk(top.values, top.indices, torch.logsumexp(zt, 1) - math.log(1.02), zy, y, 1.0)


def test_sparse_kd_refuses_a_sparse_dist_that_is_not_a_distribution():
    zs, zt, y = _batch(B=8, C=20, seed=8)
    good = _sparse(zt, y, 4, 2.0)
    big = SparseDist(good.ids, good.probs * 300.0, good.tail)
    neg = SparseDist(good.ids, good.probs - good.probs.max(), good.tail)
    for bad in (big, neg):
        with pytest.raises(ConfigError, match=r"SparseDist is not a distribution.*within 0\.01.*sparse_from_topk"):
            sparse_kd_loss(zs, bad, 2.0)
        with pytest.raises(ConfigError, match="SparseDist is not a distribution"):
            compute_loss("kd", zs, y, teacher_sparse=bad, cfg=LossConfig(tau=2.0))
    assert torch.isfinite(sparse_kd_loss(zs, good, 2.0))


@pytest.mark.parametrize("method", ["kd", "loca", "dkd", "loca_dkd"])
def test_teacher_probs_that_are_logits_are_refused(method):
    # compute_loss(teacher_probs=<raw logits>) returned ~15,000; loca() refuses the same input
    zs, zt, y = _batch(B=6, C=10, seed=9)
    with pytest.raises(ConfigError, match=r"teacher probabilities must lie in \[0, 1\].*teacher_logits"):
        compute_loss(method, zs, y, teacher_probs=zt)
    off = F.softmax(zt, 1) * 1.05  # in [0, 1] but rows sum to 1.05
    with pytest.raises(ConfigError, match=r"must sum to 1 over classes \(within 0\.01\)"):
        compute_loss(method, zs, y, teacher_probs=off)
    with pytest.raises(ConfigError, match="teacher probabilities must lie in"):
        kd_loss(zs, zt, 4.0, teacher_is="probs")
    assert torch.isfinite(compute_loss(method, zs, y, teacher_probs=F.softmax(zt / 4.0, 1)))


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_has_its_own_message(method):
    zs, zt, y = _batch(B=0, C=10)
    with pytest.raises(ConfigError, match=r"empty batch \(0 rows"):
        compute_loss(method, zs, y, teacher_logits=zt)
    with pytest.raises(ConfigError, match="empty batch"):
        kd_loss(zs, zt, 4.0)
