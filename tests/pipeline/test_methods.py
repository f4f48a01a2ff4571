"""The method registry as the one source of method facts, and KD* (KD without mis-instructed rows)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.calibration import mis_instruction_mask, sparse_from_topk
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.losses import METHODS, LossConfig, compute_loss, get_method, kd_loss, kd_star_loss
from loca_pipe.pipeline.soft_labels import TARGET_METHODS


def ref_kd_star(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Row by row in fp64 Python: τ²/B · Σ over rows whose label strictly beats every other class."""
    B, C = zs.shape
    total = 0.0
    for i in range(B):
        t = [float(v) / tau for v in zt[i].double()]
        s = [float(v) / tau for v in zs[i].double()]
        yi = int(y[i])
        if not all(t[yi] > t[j] for j in range(C) if j != yi):
            continue  # mis-instructed (ties included): dropped from the KD term
        mt, ms = max(t), max(s)
        zt_ = sum(math.exp(v - mt) for v in t)
        zs_ = sum(math.exp(v - ms) for v in s)
        p = [math.exp(v - mt) / zt_ for v in t]
        q = [math.exp(v - ms) / zs_ for v in s]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    return tau * tau * total / B


def _batch(B=16, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g), 3 * torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_star_matches_row_by_row_reference(tau):
    zs, zt, y = _batch()
    mis = mis_instruction_mask(zt, y)
    assert 0 < int(mis.sum()) < len(y)  # the batch has both kinds of rows, so the drop matters
    got = kd_star_loss(zs, zt, y, tau, teacher_is="logits").item()
    assert got == pytest.approx(ref_kd_star(zs, zt, y, tau), rel=1e-5)
    assert got < kd_loss(zs, zt, tau, teacher_is="logits").item()
    cfg = LossConfig(tau=tau, beta=0.5, gamma=0.5)
    ce = torch.nn.functional.cross_entropy(zs, y).item()
    total = compute_loss("kd_star", zs, y, teacher_logits=zt, cfg=cfg).item()
    assert total == pytest.approx(0.5 * ref_kd_star(zs, zt, y, tau) + 0.5 * ce, rel=1e-5)


def test_kd_star_counts_a_tie_as_mis_instructed():
    zs = torch.zeros(2, 3)
    zt = torch.tensor([[2.0, 2.0, 0.0], [3.0, 1.0, 0.0]])  # row 0: the label ties the maximum
    y = torch.tensor([0, 0])
    got = kd_star_loss(zs, zt, y, 1.0, teacher_is="logits").item()
    only_row1 = kd_loss(zs[1:], zt[1:], 1.0, teacher_is="logits").item() / 2
    assert got == pytest.approx(only_row1, rel=1e-6)
    assert got == pytest.approx(ref_kd_star(zs, zt, y, 1.0), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1.0, 2.0, 4.0]))
def test_kd_star_without_mis_instruction_is_kd(seed, tau):
    zs, zt, _ = _batch(seed=seed)
    y = zt.argmax(1)  # the teacher is right on every row
    assert not bool(mis_instruction_mask(zt, y).any())
    a = compute_loss("kd_star", zs, y, teacher_logits=zt, cfg=LossConfig(tau=tau))
    b = compute_loss("kd", zs, y, teacher_logits=zt, cfg=LossConfig(tau=tau))
    assert torch.equal(a, b)


def test_kd_star_all_rows_mis_instructed_is_ce_only():
    zs, zt, _ = _batch()
    y = zt.argmin(1)
    cfg = LossConfig(tau=4.0, beta=0.9, gamma=0.1)
    got = compute_loss("kd_star", zs, y, teacher_logits=zt, cfg=cfg).item()
    assert got == pytest.approx(0.1 * torch.nn.functional.cross_entropy(zs, y).item(), rel=1e-6)


@pytest.mark.parametrize("k", [6, 2])
def test_kd_star_same_on_logits_probs_and_sparse(k):
    zs, zt, y = _batch()
    tau = 2.0
    cfg = LossConfig(tau=tau)
    dense = compute_loss("kd_star", zs, y, teacher_logits=zt, cfg=cfg)
    probs = compute_loss("kd_star", zs, y, teacher_probs=torch.softmax(zt / tau, 1), cfg=cfg)
    assert probs.item() == pytest.approx(dense.item(), rel=1e-5)
    top = zt.topk(k, dim=1)
    sd = sparse_from_topk(top.values, top.indices, torch.logsumexp(zt / tau, 1), zt.gather(1, y[:, None])[:, 0], y,
                          tau)
    sparse = compute_loss("kd_star", zs, y, teacher_sparse=sd, cfg=cfg)
    if k == zt.shape[1]:
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    # the mask is the dense one in both cases (the top-2 holds the best class other than the label)
    kept_kd = compute_loss("kd_star", zs, y, teacher_sparse=sd, cfg=LossConfig(tau=tau, beta=1.0, gamma=0.0))
    assert kept_kd.item() > 0


# --------------------------------------------------------------------------------------------------
# the registry


def test_every_method_declares_its_facts():
    for name, m in METHODS.items():
        assert m.name == name and m.label and m.description
        assert m.base is None or m.base in METHODS, name
        assert m.targets_loss is None or m.targets_loss in METHODS, name
        assert m.needs_teacher == (m.distill is not None)
        if m.loca:
            assert METHODS[m.base].loca is False, f"{name} pairs against a method without α"
    assert METHODS["ce"].base is None and not METHODS["ce"].needs_teacher
    assert METHODS["kd_star"].label == "KD*" and METHODS["kd_star"].base == "kd"
    assert len({m.label for m in METHODS.values()}) == len(METHODS)


def test_target_methods_are_derived_from_the_registry():
    assert TARGET_METHODS == {n: m.targets_loss for n, m in METHODS.items() if m.targets_loss}
    assert TARGET_METHODS["loca"] == "kd" and TARGET_METHODS["kd_star"] == "kd_star"


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown loss method 'kdstar'; valid methods: ce, kd, loca, kd_star"):
        get_method("kdstar")


# --------------------------------------------------------------------------------------------------
# training-loop facts the comparisons rest on


def test_short_cpu_milestone_scales_with_epochs():
    from loca_pipe.pipeline.training import preset_config

    assert preset_config("short-cpu").milestones == (4,)
    assert preset_config("short-cpu", epochs=20).milestones == (16,)
    assert preset_config("short-cpu", epochs=20, milestones=[3]).milestones == (3,)
    assert preset_config("paper-cifar", epochs=240).milestones == (150, 180, 210)
    assert preset_config("paper-cifar", epochs=24).milestones == (15, 18, 21)


def test_same_seed_same_data_order_for_every_source():
    """Paired comparisons: CE (PlainSource) and a teacher signal (TensorSource) see the same sample order."""
    from loca_pipe.pipeline.soft_labels import PlainSource, TensorSource

    a = [b.sample_index for b in PlainSource(50).batches(3, 16, seed=7)]
    b = [b.sample_index for b in TensorSource(torch.zeros(50, 4)).batches(3, 16, seed=7)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 4
