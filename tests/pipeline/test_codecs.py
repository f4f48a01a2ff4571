"""Top-k codecs: each round-trips within its stated bound, lossless bit-exact, the KL figure against a dense
fp64 reference, and the bad inputs (vocabulary too large, k too small, newer version, NaN rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.codecs import (
    CODECS,
    codec_of,
    encode_checked,
    get_codec,
    pack_bits,
    reconstruction_error,
    unpack_bits,
)
from loca_pipe.pipeline.errors import ConfigError, NumericsError, StoreError

TEMPS = (1.0, 2.0)


def _rows(seed: int, n: int, C: int, K: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64).float() * scale
    v, i = torch.topk(z, K, dim=1)
    lse = torch.stack([torch.logsumexp(z / t, 1) for t in TEMPS], 1)
    return z, v.numpy(), i.numpy(), lse.numpy()


def _roundtrip(name, v, i, lse, C, stored_out=None):
    codec = get_codec(name)
    stored = {k: np.asarray(a) for k, a in encode_checked(codec, v, i, lse, TEMPS, C).items()}
    widths = codec.arrays(C, v.shape[1], len(TEMPS))
    assert set(stored) == set(widths)
    for k, (w, dt, _) in widths.items():
        assert stored[k].shape == (len(v), w), k
        stored[k] = stored[k].astype(dt)  # what the zarr array holds
    if stored_out is not None:
        stored_out.update(stored)
    return codec.decode(stored, lse, TEMPS, C, v.shape[1])


def _by_id(z, ids):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(z, order, 1)


case = dict(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), C=st.sampled_from([40, 300, 5000, 32000]),
            K=st.sampled_from([30, 64, 128]), scale=st.sampled_from([0.3, 2.0, 6.0]))


@settings(max_examples=30, deadline=None)
@given(**case)
def test_each_codec_round_trips_within_its_bound(seed, n, C, K, scale):
    """Each value within the codec's own bound b, plus the mass guard's shift (≤ the row's largest b)."""
    from loca_pipe.pipeline.codecs import BETAS

    K = min(K, C)
    z, v, i, lse = _rows(seed, n, C, K, scale)
    span = (v[:, :1] - v[:, -1:]).astype(np.float64)
    for name in CODECS:
        if name == "polytail" and K <= 24:
            continue
        stored: dict = {}
        dz, di = _roundtrip(name, v, i, lse, C, stored)
        assert dz.dtype == np.float32 and dz.shape == v.shape and di.shape == i.shape
        assert (np.diff(dz, axis=1) <= 0).all(), name  # readers get the top-k descending
        ids_back, z_back = _by_id(dz.astype(np.float64), di)
        ids_true, z_true = _by_id(v.astype(np.float64), i)
        np.testing.assert_array_equal(ids_back, ids_true, err_msg=name)  # every codec keeps the ids exactly
        err = np.abs(z_back - z_true)
        lp = np.abs(v / TEMPS[0] - lse[:, :1]).astype(np.float64)
        b = None
        if name == "lossless":
            assert np.array_equal(dz, v) and np.array_equal(di, i)
        elif name == "fp16":
            b = TEMPS[0] * (np.abs(_by_id(lp, i)[1]) * 2.0**-11 + 1e-4)
        elif name == "bf16":
            b = TEMPS[0] * (np.abs(_by_id(lp, i)[1]) * 2.0**-8 + 1e-4)
        elif name == "q8":
            np.testing.assert_array_equal(dz[:, :4], v[:, :4])  # the first m exact: the guard never moves them
            b = np.broadcast_to(span / 510 + 1e-5, v.shape)
        elif name.startswith("compact"):
            np.testing.assert_array_equal(dz[:, 0], v[:, 0])  # the row maximum exact
            M = 2 ** codec_bits(name) - 1
            beta = BETAS[stored["topk_beta"][:, :1].astype(int)] * TEMPS[0]  # the row's compander scale
            with np.errstate(over="ignore"):
                b = np.broadcast_to(beta * np.expm1(span / beta) / (2 * M) * (1 + 1e-6) + 1e-5, v.shape)
        elif name == "polytail":
            # the first 16 as fp16 log-probs, all moved by the guard's one shift (the tail is a fit: no bound)
            head = dz[:, :16].astype(np.float64) - v[:, :16]
            hb = TEMPS[0] * (lp[:, :16] * 2.0**-11 + 1e-4)
            assert (head.max(1) - head.min(1) <= 2 * hb.max(1) + 1e-5).all()
        if b is not None:
            assert (err <= b + b.max(axis=1, keepdims=True) + 1e-5).all(), name


def codec_bits(name):
    return get_codec(name).bits


def test_bit_packing_round_trips():
    x = np.random.default_rng(0).integers(0, 2**15, (7, 128))
    assert pack_bits(x, 15).shape == (7, 240)
    np.testing.assert_array_equal(unpack_bits(pack_bits(x, 15), 128, 15), x)


def _dense_kl_reference(z, labels, zk, ids, tau):
    """Row by row, a dense q over the whole vocabulary, then Σ p log(p/q) — fp64, no shared code."""
    out, dpl, tv = [], [], []
    for r in range(z.shape[0]):
        zz = z[r].astype(np.float64) / tau
        lse = np.log(np.exp(zz - zz.max()).sum()) + zz.max()
        p = np.exp(zz - lse)
        q = np.full_like(p, np.nan)
        q[ids[r]] = np.exp(zk[r].astype(np.float64) / tau - lse)
        y = int(labels[r])
        if y not in set(ids[r].tolist()):
            q[y] = p[y]
        rest = np.isnan(q)
        q[rest] = max(0.0, 1.0 - q[~rest].sum()) / rest.sum()
        out.append(float((p * (np.log(p) - np.log(q))).sum()))
        dpl.append(abs(q[y] - p[y]))
        tv.append(0.5 * np.abs(p - q).sum())
    return np.mean(out), np.max(out), np.mean(dpl), np.mean(tv)


@pytest.mark.parametrize("name", ["lossless", "q8", "compact6", "compact", "polytail"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_figure_matches_a_dense_fp64_reference(name, tau):
    z, v, i, lse = _rows(3, 6, 500, 40, 3.0)
    labels = np.array([int(i[0, 0]), int(i[1, 7]), 3, 4, 5, int(i[5, 39])])  # in the top-k and outside it
    dz, di = _roundtrip(name, v, i, lse, 500)
    got = reconstruction_error(z.numpy(), labels, dz, di, tau)
    kl, kl_max, dpl, tv = _dense_kl_reference(z.numpy(), labels, dz, di, tau)
    assert got["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
    assert got["kl_max"] == pytest.approx(kl_max, rel=1e-6, abs=1e-12)
    assert got["dp_label"] == pytest.approx(dpl, rel=1e-6, abs=1e-12)
    assert got["tv"] == pytest.approx(tv, rel=1e-6, abs=1e-12)
    if name == "lossless":
        assert got["dp_label"] < 1e-7  # only the top-k truncation remains


def test_bad_codec_inputs():
    with pytest.raises(ConfigError, match=r"unknown codec 'zip'; choose one of \['bf16', 'compact'"):
        get_codec("zip")
    with pytest.raises(ConfigError, match=r"holds vocabularies of at most 65536 ids; this teacher has 70000"):
        get_codec("compact").check(70000, 128)
    with pytest.raises(ConfigError, match=r"needs top-k > 24, got 20"):
        get_codec("polytail").check(32000, 20)
    with pytest.raises(StoreError, match=r"codec 'q8' version 3; this loca-pipe reads that codec up to version 2"):
        codec_of({"codec": {"name": "q8", "version": 3}})
    with pytest.raises(StoreError, match=r"codec 'zz9' \(version 1\), which this loca-pipe does not know"):
        codec_of({"codec": {"name": "zz9", "version": 1}})
    _, v, i, lse = _rows(0, 3, 50, 8, 1.0)
    v[1, 2] = np.nan
    with pytest.raises(NumericsError, match=r"rows \[1\] of the chunk hold NaN or inf"):
        encode_checked(get_codec("q8"), v, i, lse, TEMPS, 50)


def _heavy_rows(seed: int, n: int, C: int, K: int, profile: str):
    """Heavy-tailed rows (the profiles of benchmarks/bench_codecs.py, small): Gumbel logits of scale 1–3, or
    one peaked token holding 0.5–0.95 of the mass above Gumbel(2) logits."""
    rng = np.random.default_rng(seed)
    if profile == "peaked":
        z = 2 * rng.gumbel(size=(n, C))
        top = z.argmax(1)
        z[np.arange(n), top] = -np.inf
        rest = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        p1 = rng.uniform(0.5, 0.95, n)
        z[np.arange(n), top] = rest + np.log(p1 / (1 - p1))
    else:
        z = float(profile) * rng.gumbel(size=(n, C))
    zt = torch.as_tensor(z, dtype=torch.float32)
    v, i = torch.topk(zt, K, dim=1)
    lse = torch.stack([torch.logsumexp(zt.double() / t, 1) for t in TEMPS], 1).float()
    return v.numpy(), i.numpy(), lse.numpy()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), C=st.sampled_from([300, 5000, 32000]),
       K=st.sampled_from([32, 128]), profile=st.sampled_from(["1", "2", "3", "6", "peaked"]))
def test_no_codec_decodes_more_top_k_mass_than_the_exact_lse_leaves(seed, n, C, K, profile):
    """#21: at every declared τ, Σ_topk exp(ẑ/τ − lse_τ) ≤ Σ_topk exp(z/τ − lse_τ) = 1 − (exact tail), row by row
    (fp64 sums of the stored fp32 values; 1e-12 relative is the sums' own rounding)."""
    from loca_pipe.pipeline.codecs import topk_log_mass

    v, i, lse = _heavy_rows(seed, n, C, K, profile)
    exact = topk_log_mass(v, lse, TEMPS)
    for name in CODECS:
        if name == "polytail" and K <= 24:
            continue
        dz, _ = _roundtrip(name, v, i, lse, C)
        got = topk_log_mass(dz, lse, TEMPS)
        assert (got <= exact + 1e-12).all(), (name, (got - exact).max())
        assert np.isfinite(dz).all(), name


def test_mass_guard_reference():
    """The guard against a hand computation: one row, two τ, the head kept; the binding τ is met exactly."""
    from loca_pipe.pipeline.codecs import mass_guard

    z = np.array([[3.0, 1.0, 0.5, -1.0]])
    lse = np.array([[4.0, 2.5]])
    want_mass = np.array([[np.log(0.9), np.log(0.8)]])
    out = mass_guard(z, want_mass, lse, (1.0, 2.0), head=1).astype(np.float64)
    assert out[0, 0] == 3.0  # the head is never moved
    s = out[0, 1:] - z[0, 1:]
    assert np.allclose(s, s[0])  # one shift for the rest
    masses = [np.exp(out[0] / t - lse[0, j]).sum() for j, t in enumerate((1.0, 2.0))]
    # by hand: each τ's own shift s_τ = τ·log((M_τ − head_τ)/rest_τ); the smaller one binds
    s_t = [t * np.log((np.exp(want_mass[0, j]) - np.exp(3.0 / t - lse[0, j])) /
                      np.exp(z[0, 1:] / t - lse[0, j]).sum()) for j, t in enumerate((1.0, 2.0))]
    assert s[0] == pytest.approx(min(s_t), abs=1e-5)
    assert max(m - np.exp(w) for m, w in zip(masses, want_mass[0])) <= 1e-12
    assert min(abs(m - np.exp(w)) for m, w in zip(masses, want_mass[0])) < 1e-5


def test_older_codec_versions_read_as_written():
    """A compact v1 store (β = 3, no guard, no topk_beta/topk_mass arrays) still decodes with its own rules."""
    from dataclasses import replace

    _, v, i, lse = _rows(1, 4, 300, 32, 2.0)
    old = replace(get_codec("compact"), version=1)
    assert "topk_beta" not in old.arrays(300, 32, 2) and "topk_mass" not in old.arrays(300, 32, 2)
    stored = {k: np.asarray(a) for k, a in old.encode(v, i, lse, TEMPS, 300).items()}
    reader = codec_of({"codec": {"name": "compact", "version": 1, "bits": 8}})
    assert reader.version == 1
    dz, di = reader.decode(stored, lse, TEMPS, 300, 32)
    span = (v[:, :1] - v[:, -1:]).astype(np.float64)
    ids_back, z_back = _by_id(dz.astype(np.float64), di)
    _, z_true = _by_id(v.astype(np.float64), i)
    assert (np.abs(z_back - z_true) <= 3 * np.expm1(span / 3) / (2 * 255) + 1e-5).all()


def test_image_stores_keep_lossless(tmp_path):
    from loca_pipe.pipeline.store import LogitStore, StoreInfo

    info = StoreInfo(task="classification", num_samples=4, num_views=1, num_rows=4, num_classes=10, chunk_rows=2,
                     dataset={"fingerprint": "f", "split": "train"})
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), info)
    with pytest.raises(StoreError, match=r"codec 'q8' is for token stores \(lm-cache\)"):
        store.begin_teacher("t", {}, 3, (1.0,), None, codec="q8")
    assert "t" not in store.teachers or not store.teacher_attrs("t")
