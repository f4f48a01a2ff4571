"""LoCa calibration: the five invariants (hypothesis), a hand-derived 100-class case, the sparse form,
numerical edge cases and bad-input messages. References are written independently (numpy, fp64, loops)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline import (
    ConfigError,
    LocaWarning,
    NumericsError,
    SparseDist,
    loca,
    loca_calibrate,
    loca_calibrate_blocks,
    loca_from_logits,
    loca_label_logit,
    loca_sparse,
    mis_instruction_mask,
    sparse_from_topk,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _strict_winner_ref(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent reference of the mask: True where the label is NOT the unique maximum (loop)."""
    out = np.zeros(len(y), dtype=bool)
    for b in range(len(y)):
        others = np.delete(p[b], y[b])
        out[b] = not (p[b, y[b]] > others.max())
    return out


@st.composite
def teacher_batches(draw):
    """Random (logits, labels, alpha, tau) of any shape, including ties and huge logits."""
    B = draw(st.integers(1, 64))
    C = draw(st.integers(2, 200))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "wide", "ties", "huge"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        z = torch.randn(B, C, generator=g) * 3
    elif kind == "wide":
        z = torch.randn(B, C, generator=g) * 40  # p_y and others underflow to 0 at small tau
    elif kind == "ties":
        z = torch.randint(0, 3, (B, C), generator=g).float()  # many exact ties
    else:
        z = torch.randint(-1, 2, (B, C), generator=g).float() * 1e4
    y = torch.randint(0, C, (B,), generator=g)
    alpha = draw(st.floats(1e-3, 0.999))
    tau = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    return z, y, alpha, tau


@SETTINGS
@given(teacher_batches())
def test_five_invariants(batch):
    z, y, alpha, tau = batch
    p = torch.softmax(z / tau, dim=1)
    res = loca(p, y, alpha)
    q, mis, s = res.probs, res.calibrated, res.scale
    pn, qn, yn = p.double().numpy(), q.double().numpy(), y.numpy()
    B, C = p.shape

    # the mask is the independent "label is not the strict winner" reference
    np.testing.assert_array_equal(mis.numpy(), _strict_winner_ref(p.numpy(), yn))
    assert torch.all(torch.isfinite(q))

    # (1) sums to 1 (fp32 summation over <= 200 entries)
    np.testing.assert_allclose(qn.sum(1), 1.0, atol=2e-5)

    # (2) values in (0, 1): every entry in [0, 1]; strictly positive wherever the input is (above the
    # fp32 denormal range, where s·p_i could round to 0); the label strictly below 1 on calibrated rows
    assert (qn >= 0).all() and (qn <= 1).all()
    assert (qn[pn > 1e-30] > 0).all()
    assert (qn[np.arange(B), yn] > 0).all()
    if mis.any():
        assert (qn[mis.numpy()] < 1).all()

    # (3) argmax is the label, with margin exactly 1 − alpha on calibrated rows
    for b in range(B):
        others = np.delete(qn[b], yn[b])
        assert qn[b, yn[b]] > others.max()
        if mis[b]:
            assert abs((qn[b, yn[b]] - others.max()) - (1 - alpha)) < 2e-6

    # (4) non-target ratios unchanged: q_i = s·p_i, hence q_i/q_j = p_i/p_j
    for b in range(B):
        keep = np.delete(np.arange(C), yn[b])
        pi, qi = pn[b, keep], qn[b, keep]
        ok = pi > 1e-30
        if ok.sum() >= 2:
            ref = pi[ok] / pi[ok].max()
            np.testing.assert_allclose(qi[ok] / qi[ok].max(), ref, rtol=2e-6)
        np.testing.assert_allclose(qi, s[b].item() * pi, rtol=1e-6, atol=1e-45)

    # (5) correct rows unchanged bit for bit, scale 1
    ok_rows = ~mis
    assert torch.equal(q[ok_rows], p[ok_rows])
    assert torch.all(s[ok_rows] == 1.0)
    # the scale is alpha·sigma on calibrated rows (fp64 reference)
    for b in np.nonzero(mis.numpy())[0]:
        others = np.delete(pn[b], yn[b])
        sigma = 1.0 / (1.0 - pn[b, yn[b]] + others.max())
        assert abs(s[b].item() - alpha * sigma) < 1e-6


@SETTINGS
@given(teacher_batches())
def test_from_logits_equals_dense_on_softmax(batch):
    z, y, alpha, tau = batch
    a = loca_from_logits(z, y, alpha, tau)
    b = loca(torch.softmax(z / tau, 1), y, alpha)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.calibrated, b.calibrated)


def test_paper_setting_tau4_alpha095_100_classes():
    """Hand-derived: 98 classes at logit 0, the teacher's pick k=3 at 4·ln 9, the label y=7 at 4·ln 3.

    At tau=4: exp(z/4) is 1, 9, 3 → Z = 110, p_k = 9/110, p_y = 3/110, others 1/110.
    sigma = 1/(1 − 3/110 + 9/110) = 110/116, s = 0.95·110/116; p′_other = 0.95/116, p′_k = 8.55/116,
    p′_y = 1 − 0.95·107/116 = 14.35/116, margin 5.8/116 = 0.05. Row 2 is a correct row (label = k).
    """
    z = torch.zeros(2, 100)
    z[:, 3] = 4 * math.log(9)
    z[:, 7] = 4 * math.log(3)
    y = torch.tensor([7, 3])
    res = loca_from_logits(z, y, 0.95, 4.0)
    q = res.probs.double()
    other = [i for i in range(100) if i not in (3, 7)]
    assert res.calibrated.tolist() == [True, False]
    assert res.scale[0].item() == pytest.approx(0.95 * 110 / 116, abs=1e-7)
    assert res.scale[1].item() == 1.0
    np.testing.assert_allclose(q[0, other].numpy(), 0.95 / 116, rtol=1e-6)
    assert q[0, 3].item() == pytest.approx(8.55 / 116, rel=1e-6)
    assert q[0, 7].item() == pytest.approx(14.35 / 116, rel=1e-6)
    assert (q[0, 7] - q[0, 3]).item() == pytest.approx(0.05, abs=1e-6)
    np.testing.assert_allclose(q[1].numpy(), [9 / 110 if i == 3 else 3 / 110 if i == 7 else 1 / 110
                                              for i in range(100)], rtol=1e-6)


def test_ties_all_equal_logits_label_wins():
    z = torch.zeros(5, 10)
    y = torch.tensor([0, 3, 9, 5, 0])
    res = loca_from_logits(z, y, 0.9, 4.0)
    assert res.calibrated.all()
    q = res.probs
    assert torch.equal(q.argmax(1), y)
    # p_y = p_k = 0.1 → sigma = 1, s = alpha; p′_y = 1 − 0.9·0.9 = 0.19, others 0.09
    np.testing.assert_allclose(q[torch.arange(5), y].numpy(), 0.19, rtol=1e-6)
    assert mis_instruction_mask(z, y).all()


def test_mask_matches_argmax_without_ties():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 7, generator=g)
    y = torch.randint(0, 7, (50,), generator=g)
    assert torch.equal(mis_instruction_mask(z, y), z.argmax(1) != y)
    assert torch.equal(mis_instruction_mask(torch.softmax(z, 1), y), z.argmax(1) != y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(16, 30, generator=g) * 5).to(dtype)
    y = torch.randint(0, 30, (16,), generator=g)
    res = loca_from_logits(z, y, 0.95, 4.0)
    ref = loca_from_logits(z.float(), y, 0.95, 4.0)
    assert res.probs.dtype == torch.float32
    assert torch.equal(res.probs, ref.probs)
    p = torch.softmax(z.float(), 1).to(dtype)  # probabilities stored in half precision
    out = loca_calibrate(p, y, 0.95)
    assert out.dtype == torch.float32 and torch.equal(out.argmax(1), y)


def test_fp64_stays_fp64():
    z = torch.randn(4, 6, dtype=torch.float64)
    assert loca_from_logits(z, torch.tensor([0, 1, 2, 3]), 0.9, 2.0).probs.dtype == torch.float64


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_huge_logits_and_label_underflow(tau):
    z = torch.tensor([[1e4, -1e4, 0.0, 0.0], [-1e4, 1e4, -1e4, 0.0], [1e4, 1e4, -1e4, -1e4]])
    y = torch.tensor([1, 1, 2])  # row 0: p_y = 0 exactly; row 1 correct; row 2: p_y = 0, tie at top
    p = torch.softmax(z / tau, 1)
    assert p[0, 1] == 0 and p[2, 2] == 0
    res = loca_from_logits(z, y, 0.9, tau)
    q = res.probs
    assert torch.all(torch.isfinite(q))
    assert res.calibrated.tolist() == [True, False, True]
    assert torch.equal(q.argmax(1), y)
    # row 0: p_k = 1 → sigma = 1/2, s = 0.45, p′_y = 0.55, p′_k = 0.45
    assert q[0, 1].item() == pytest.approx(0.55, abs=1e-6)
    assert q[0, 0].item() == pytest.approx(0.45, abs=1e-6)
    assert torch.equal(q[1], p[1])
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, atol=1e-6)


def test_batches_with_none_and_all_mis_instructed():
    z = torch.eye(6) * 5
    y_ok = torch.arange(6)
    res = loca_from_logits(z, y_ok, 0.9, 2.0)
    assert not res.calibrated.any() and torch.equal(res.probs, torch.softmax(z / 2, 1))
    y_bad = (y_ok + 1) % 6
    res = loca_from_logits(z, y_bad, 0.9, 2.0)
    assert res.calibrated.all() and torch.equal(res.probs.argmax(1), y_bad)
    empty = loca_from_logits(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 0.9, 2.0)
    assert empty.probs.shape == (0, 5)


def test_label_logit_form_reproduces_calibrated_probs():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 12, generator=g) * 3
    y = torch.randint(0, 12, (40,), generator=g)
    zz, res = loca_label_logit(z, y, 0.95, 4.0)
    np.testing.assert_allclose(torch.softmax(zz / 4, 1).numpy(), res.probs.numpy(), atol=1e-6)
    ok = ~res.calibrated
    assert torch.equal(zz[ok], z[ok])
    # only the label's logit moved
    moved = (zz != z)
    assert not moved[torch.arange(40), :].logical_and(
        torch.nn.functional.one_hot(y, 12).bool().logical_not()).any()


# ------------------------------------------------------------------------------------------------
# sparse form


def _sparse(z, y, k, tau):
    topv, topi = z.topk(k, 1)
    lse = torch.logsumexp(z / tau, 1)
    return sparse_from_topk(topv, topi, lse, z.gather(1, y[:, None])[:, 0], y, tau)


@SETTINGS
@given(st.integers(1, 32), st.integers(2, 120), st.integers(0, 2**31 - 1), st.floats(0.01, 0.999),
       st.sampled_from([1.0, 4.0]), st.data())
def test_sparse_loca_equals_dense_on_kept_ids(B, C, seed, alpha, tau, data):
    K = data.draw(st.integers(2, C)) if C > 2 else 2
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g) * 3  # continuous: no ties
    y = torch.randint(0, C, (B,), generator=g)
    sd = _sparse(z, y, K, tau)
    p = torch.softmax(z / tau, 1)
    # the sparse distribution is exact for what it keeps
    np.testing.assert_allclose(sd.probs[:, :K].numpy(), p.gather(1, sd.ids[:, :K]).numpy(), rtol=1e-5, atol=1e-7)
    assert torch.equal(sd.ids[:, K], y)
    in_top = (sd.ids[:, :K] == y[:, None]).any(1)
    assert torch.all(sd.probs[in_top, K] == 0)

    sd2, res = loca_sparse(sd, y, alpha)
    dense = loca(p, y, alpha)
    assert torch.equal(res.calibrated, dense.calibrated)
    np.testing.assert_allclose(res.scale.numpy(), dense.scale.numpy(), rtol=1e-5)
    # kept entries: values at unique ids (column K only when the label is outside the top-k)
    kept = dense.probs.gather(1, sd2.ids)
    kept[in_top, K] = 0
    np.testing.assert_allclose(sd2.probs.numpy(), kept.numpy(), rtol=1e-4, atol=2e-7)
    # the tail is the calibrated mass of everything not kept, and everything sums to 1
    keep_mask = torch.zeros(B, C, dtype=torch.bool).scatter_(1, sd2.ids, True)
    np.testing.assert_allclose(sd2.tail.numpy(), (dense.probs * ~keep_mask).sum(1).numpy(), atol=2e-6)
    np.testing.assert_allclose((sd2.probs.sum(1) + sd2.tail).numpy(), 1.0, atol=2e-6)
    # uncalibrated rows bit for bit
    ok = ~res.calibrated
    assert torch.equal(sd2.probs[ok], sd.probs[ok]) and torch.equal(sd2.tail[ok], sd.tail[ok])


def test_sparse_label_outside_topk_and_ties():
    z = torch.tensor([[5.0, 4.0, 0.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    y = torch.tensor([3, 0])
    sd = _sparse(z, y, 2, 1.0)
    sd2, res = loca_sparse(sd, y, 0.9)
    assert res.calibrated.tolist() == [True, True]  # row 1 ties with the label in the top-2
    lab = torch.where((sd2.ids[:, :2] == y[:, None]), sd2.probs[:, :2], 0).sum(1) + sd2.probs[:, 2]
    others = sd2.probs.clone()
    others[sd2.ids == y[:, None]] = -1
    np.testing.assert_allclose((lab - others.amax(1)).numpy(), 0.1, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# offline, block-wise


def test_blocks_match_whole_array(tmp_path):
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((53, 11)) * 4).astype(np.float16)
    y = rng.integers(0, 11, 53)
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float16, shape=z.shape)
    cal, scale = loca_calibrate_blocks(z, y, 0.95, 4.0, out=out, block_rows=7)
    ref = loca_from_logits(torch.from_numpy(z), torch.from_numpy(y), 0.95, 4.0)
    np.testing.assert_array_equal(np.asarray(out), ref.probs.numpy().astype(np.float16))
    np.testing.assert_array_equal(cal, ref.calibrated.numpy())
    np.testing.assert_array_equal(scale, ref.scale.numpy())
    out2 = np.zeros((53, 11), np.float32)
    loca_calibrate_blocks(torch.softmax(torch.from_numpy(z).float() / 4, 1).numpy(), y, 0.95, 0.0, out=out2,
                          inputs="probs", block_rows=10)
    np.testing.assert_allclose(out2, ref.probs.numpy(), atol=1e-7)


# ------------------------------------------------------------------------------------------------
# bad inputs


P4 = torch.full((2, 4), 0.25)
Y2 = torch.tensor([0, 1])


@pytest.mark.parametrize("alpha, match", [
    (0.0, "alpha must be a finite number in \\(0, 1\\)"),
    (-0.5, "alpha must be a finite number in \\(0, 1\\)"),
    (float("nan"), "alpha must be a finite number"),
    (float("inf"), "alpha must be a finite number"),
    ("abc", "alpha must be a number"),
])
def test_bad_alpha(alpha, match):
    with pytest.raises(ConfigError, match=match):
        loca(P4, Y2, alpha)


@pytest.mark.parametrize("alpha", [1.0, 1.01])
def test_alpha_at_least_one_warns_and_may_lose_correctness(alpha):
    with pytest.warns(LocaWarning, match="prediction correctness is no longer guaranteed"):
        res = loca(torch.tensor([[0.6, 0.4]]), torch.tensor([1]), alpha)
    # alpha = 1 gives a tie, alpha > 1 puts the wrong class first
    assert res.probs[0, 1] <= res.probs[0, 0] + 1e-7


@pytest.mark.parametrize("probs, labels, err, match", [
    (torch.full((4,), 0.25), torch.tensor([0]), ConfigError, "must be a \\(batch, classes\\) tensor"),
    (torch.ones(2, 1), Y2, ConfigError, "at least 2 classes"),
    (P4, torch.tensor([0]), ConfigError, "labels must be a \\(2,\\) tensor"),
    (P4, torch.tensor([0, 4]), ConfigError, "labels must lie in \\[0, 4\\)"),
    (P4, torch.tensor([0, -1]), ConfigError, "labels must lie in"),
    (P4, torch.tensor([0.0, 1.0]), ConfigError, "labels must be integer class ids"),
    (torch.tensor([[1.5, -0.5], [0.5, 0.5]]), Y2, ConfigError, "must lie in \\[0, 1\\].*loca_from_logits"),
    (torch.tensor([[0.2, 0.2], [0.5, 0.5]]), Y2, ConfigError, "must sum to 1"),
    (torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]), Y2, NumericsError, "contain NaN .* row\\(s\\) \\[0\\]"),
    (torch.tensor([[1, 0], [0, 1]]), Y2, ConfigError, "floating-point"),
])
def test_bad_dense_inputs(probs, labels, err, match):
    with pytest.raises(err, match=match):
        loca(probs, labels, 0.9)


@pytest.mark.parametrize("logits, tau, err, match", [
    (torch.tensor([[0.0, float("nan")]]), 1.0, NumericsError, "NaN"),
    (torch.tensor([[0.0, float("inf")]]), 1.0, NumericsError, "\\+inf"),
    (torch.tensor([[0.0, 1.0]]), 0.0, ConfigError, "tau must be a finite temperature > 0"),
    (torch.tensor([[0.0, 1.0]]), float("nan"), ConfigError, "tau must be a finite temperature > 0"),
])
def test_bad_logits(logits, tau, err, match):
    with pytest.raises(err, match=match):
        loca_from_logits(logits, torch.tensor([0]), 0.9, tau)
    if err is NumericsError:
        with pytest.raises(err, match="NaN"):
            mis_instruction_mask(logits * float("nan"), torch.tensor([0]))


def test_bad_sparse_inputs():
    z = torch.randn(3, 6)
    y = torch.tensor([0, 1, 2])
    sd = _sparse(z, y, 2, 1.0)
    with pytest.raises(ConfigError, match="column K must hold the label id"):
        loca_sparse(sd, torch.tensor([1, 1, 1]) if not torch.equal(y, torch.tensor([1, 1, 1])) else y, 0.9)
    with pytest.raises(ConfigError, match="ids \\(B, K\\+1\\)"):
        loca_sparse(SparseDist(sd.ids[:, :1], sd.probs[:, :1], sd.tail), y, 0.9)
    bad = SparseDist(sd.ids, sd.probs.clone(), sd.tail)
    bad.probs[1, 0] = float("nan")
    with pytest.raises(NumericsError, match="row\\(s\\) \\[1\\]"):
        loca_sparse(bad, y, 0.9)
    with pytest.raises(ConfigError, match="integer class ids.*fp16 ids"):
        sparse_from_topk(z[:, :2], torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), y, 1.0)
    with pytest.raises(ConfigError, match="select the column for tau"):
        sparse_from_topk(z[:, :2], torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3), y, 1.0)


def test_no_warning_for_valid_alpha():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loca(P4, Y2, 0.999)


# ------------------------------------------------------------------------------------------------
# the one mis-instruction rule (issue #15): mis_instruction_mask == "LoCa changes this row"


def _tied_batch(B: int, C: int, seed: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer logits (ties everywhere) with forced ties of the label and the maximum on some rows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (B, C), generator=g).float() * tau
    y = torch.randint(0, C, (B,), generator=g)
    tie = torch.rand(B, generator=g) < 0.4
    rows = torch.nonzero(tie).flatten()
    z[rows, y[rows]] = z[rows].max(1).values  # label ties the maximum (or is it, when alone)
    allsame = torch.rand(B, generator=g) < 0.1
    z[allsame] = 1.0
    return z, y


@SETTINGS
@given(st.integers(1, 40), st.integers(2, 12), st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 4.0]),
       st.floats(0.5, 0.99))
def test_mask_is_exactly_the_rows_loca_changes(B, C, seed, tau, alpha):
    z, y = _tied_batch(B, C, seed, tau)
    res = loca_from_logits(z, y, alpha, tau)
    p = torch.softmax(z / tau, 1)
    changed = (res.probs != p).any(1)
    ref = torch.from_numpy(_strict_winner_ref(p.numpy(), y.numpy()))
    assert torch.equal(mis_instruction_mask(z, y, tau=tau), res.calibrated)
    assert torch.equal(res.calibrated, changed)
    assert torch.equal(res.calibrated, ref)
    assert torch.equal(mis_instruction_mask(p, y), loca(p, y, alpha).calibrated)
    # sparse teacher: the rule on the kept entries, as loca_sparse calibrates (k = C keeps everything)
    sd = _sparse(z, y, C, tau)
    sres = loca_sparse(sd, y, alpha)[1]
    assert torch.equal(mis_instruction_mask(sd, y), sres.calibrated)
    assert torch.equal(sres.calibrated, ref)
    k = max(1, C // 2)
    sdk = _sparse(z, y, k, tau)
    assert torch.equal(mis_instruction_mask(sdk, y), loca_sparse(sdk, y, alpha)[1].calibrated)


def test_mask_with_tau_follows_softmax_rounding_like_loca():
    # two logits that differ by less than softmax's rounding: on logits the label strictly wins, on the
    # probabilities LoCa calibrates it is a tie — with tau the mask is LoCa's
    z = torch.tensor([[1.0, 0.0, -5.0]], dtype=torch.float32)
    z[0, 1] = torch.nextafter(z[0, 0], torch.tensor(-math.inf))  # one ulp below the label's logit
    y = torch.tensor([0])
    p = torch.softmax(z / 4.0, 1)
    assert bool(p[0, 0] == p[0, 1])  # precondition: fp32 softmax at τ = 4 rounds the two to one number
    assert not bool(mis_instruction_mask(z, y)[0])
    assert bool(mis_instruction_mask(z, y, tau=4.0)[0]) and bool(loca_from_logits(z, y, 0.9, 4.0).calibrated[0])
    with pytest.raises(ConfigError, match="tau applies to dense logits only"):
        mis_instruction_mask(_sparse(z, y, 2, 4.0), y, tau=4.0)
