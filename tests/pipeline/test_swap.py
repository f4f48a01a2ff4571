"""The swap correction (arXiv 2504.20108): reference loop, properties, sparse exactness, the methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.calibration import mis_instruction_mask, sparse_from_topk, swap, swap_sparse
from loca_pipe.pipeline.errors import ConfigError, NumericsError
from loca_pipe.pipeline.losses import LossConfig, compute_loss, kd_loss


def swap_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An explicit loop: where the label is not the strict winner, exchange it with the first largest other."""
    out = x.clone()
    for r in range(x.shape[0]):
        row = x[r].tolist()
        lab = int(y[r])
        best, k = -math.inf, None
        for i, v in enumerate(row):
            if i != lab and v > best:
                best, k = v, i
        if row[lab] <= best:
            out[r, lab], out[r, k] = row[k], row[lab]
    return out


def _case(B: int, C: int, seed: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    if ties:
        z = z.round()
    return z, torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("ties", [False, True])
def test_swap_matches_the_reference_loop(ties):
    z, y = _case(64, 7, 0, ties)
    out, swapped = swap(z, y)
    assert torch.equal(out, swap_reference(z, y))
    assert torch.equal(swapped, mis_instruction_mask(z, y))
    assert swapped.any() and (~swapped).any()


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 12), C=st.integers(2, 9), seed=st.integers(0, 10_000), ties=st.booleans())
def test_swap_properties(B, C, seed, ties):
    z, y = _case(B, C, seed, ties)
    out, swapped = swap(z, y)
    # the label holds the row's maximum; the strict winner wherever the row had a unique maximum
    assert torch.equal(out.gather(1, y.view(-1, 1)).view(-1), out.max(1).values)
    unique_max = (z == z.max(1, keepdim=True).values).sum(1) == 1
    assert torch.equal(out.argmax(1)[unique_max], y[unique_max])
    # a permutation of each row: the multiset of values is unchanged
    assert torch.equal(out.sort(1).values, z.sort(1).values)
    # correct rows untouched, bit for bit; swapped rows differ in exactly the label's and one other entry
    assert torch.equal(out[~swapped], z[~swapped])
    assert ((out != z).sum(1)[swapped] <= 2).all()
    # the same operation on probabilities at any τ
    p = torch.softmax(z / 4.0, 1)
    assert torch.allclose(swap(p, y)[0], torch.softmax(out / 4.0, 1), rtol=0, atol=1e-12)


def test_swap_sparse_equals_dense_on_kept_entries():
    """Every row (label inside or outside the top-k): the swapped sparse teacher is the dense swap gathered."""
    z, y = _case(200, 10, 3)
    tau, K = 2.0, 3
    top = (z / tau).topk(K, 1)
    lse = torch.logsumexp(z / tau, 1)
    sd = sparse_from_topk(top.values * tau, top.indices, lse, z.gather(1, y.view(-1, 1)).view(-1), y, tau)
    out, swapped = swap_sparse(sd, y)
    dense = torch.softmax(swap(z, y)[0] / tau, 1)
    K1 = K + 1
    in_top = (top.indices == y.view(-1, 1)).any(1)
    assert (~in_top).any() and in_top.any()
    ref = dense.gather(1, out.ids)
    ref[:, K1 - 1] = torch.where(in_top, 0.0, ref[:, K1 - 1])  # the label column is 0 when the label is kept
    assert torch.allclose(out.probs, ref, atol=1e-12, rtol=0)
    assert torch.equal(out.tail, sd.tail)
    assert torch.equal(swapped, mis_instruction_mask(z, y))


def test_swap_refuses_bad_input():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        swap(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="labels must lie"):
        swap(torch.zeros(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(NumericsError, match="NaN"):
        swap(torch.tensor([[float("nan"), 0.0]]), torch.tensor([1]))


def test_swap_method_is_kd_on_the_swapped_teacher():
    zs = torch.randn(32, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    zt, y = _case(32, 6, 2)
    zt = zt.float()
    cfg = LossConfig(tau=3.0, beta=0.7, gamma=0.3)
    got = compute_loss("swap", zs, y, teacher_logits=zt, cfg=cfg)
    want = 0.7 * kd_loss(zs, swap_reference(zt, y), 3.0, teacher_is="logits") + 0.3 * F.cross_entropy(zs, y)
    assert torch.allclose(got, want, atol=1e-6)
    p = torch.softmax(zt / 3.0, 1)
    assert torch.allclose(compute_loss("swap", zs, y, teacher_probs=p, cfg=cfg), want, atol=1e-5)
    # DKD on the swapped teacher is DKD with the swapped logits
    d1 = compute_loss("dkd_swap", zs, y, teacher_logits=zt, cfg=cfg)
    d2 = compute_loss("dkd", zs, y, teacher_logits=swap_reference(zt, y), cfg=cfg)
    assert torch.allclose(d1, d2, atol=1e-6)
    # no mis-instructed row: swap is KD
    good = zt.clone()
    good.scatter_(1, y.view(-1, 1), 100.0)
    assert torch.equal(compute_loss("swap", zs, y, teacher_logits=good, cfg=cfg),
                       compute_loss("kd", zs, y, teacher_logits=good, cfg=cfg))


def test_swap_method_on_a_sparse_teacher_is_sparse_kd_on_the_swapped_one():
    from loca_pipe.pipeline.losses import sparse_kd_loss

    z, y = _case(40, 8, 5)
    z = z.float()
    tau, K = 2.0, 3
    top = (z / tau).topk(K, 1)
    sd = sparse_from_topk(top.values * tau, top.indices, torch.logsumexp(z / tau, 1), z.gather(1, y.view(-1, 1)).view(-1),
                          y, tau)
    zs = torch.randn(40, 8, generator=torch.Generator().manual_seed(6))
    cfg = LossConfig(tau=tau, beta=1.0, gamma=0.0)
    got = compute_loss("swap", zs, y, teacher_sparse=sd, cfg=cfg)
    assert torch.allclose(got, sparse_kd_loss(zs, swap_sparse(sd, y)[0], tau), atol=1e-6)
    assert not torch.allclose(got, compute_loss("kd", zs, y, teacher_sparse=sd, cfg=cfg))
