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


def _roundtrip(name, v, i, lse, C):
    codec = get_codec(name)
    stored = {k: np.asarray(a) for k, a in encode_checked(codec, v, i, lse, TEMPS, C).items()}
    widths = codec.arrays(C, v.shape[1], len(TEMPS))
    assert set(stored) == set(widths)
    for k, (w, dt, _) in widths.items():
        assert stored[k].shape == (len(v), w), k
        stored[k] = stored[k].astype(dt)  # what the zarr array holds
    return codec.decode(stored, lse, TEMPS, C, v.shape[1])


def _by_id(z, ids):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(z, order, 1)


case = dict(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), C=st.sampled_from([40, 300, 5000, 32000]),
            K=st.sampled_from([30, 64, 128]), scale=st.sampled_from([0.3, 2.0, 6.0]))


@settings(max_examples=30, deadline=None)
@given(**case)
def test_each_codec_round_trips_within_its_bound(seed, n, C, K, scale):
    K = min(K, C)
    z, v, i, lse = _rows(seed, n, C, K, scale)
    span = (v[:, :1] - v[:, -1:]).astype(np.float64)
    for name in CODECS:
        if name == "polytail" and K <= 24:
            continue
        dz, di = _roundtrip(name, v, i, lse, C)
        assert dz.dtype == np.float32 and dz.shape == v.shape and di.shape == i.shape
        assert (np.diff(dz, axis=1) <= 0).all(), name  # readers get the top-k descending
        ids_back, z_back = _by_id(dz.astype(np.float64), di)
        ids_true, z_true = _by_id(v.astype(np.float64), i)
        np.testing.assert_array_equal(ids_back, ids_true, err_msg=name)  # every codec keeps the ids exactly
        err = np.abs(z_back - z_true)
        lp = np.abs(v / TEMPS[0] - lse[:, :1]).astype(np.float64)
        if name == "lossless":
            assert np.array_equal(dz, v) and np.array_equal(di, i)
        elif name == "fp16":
            assert (err <= TEMPS[0] * (np.abs(_by_id(lp, i)[1]) * 2.0**-11 + 1e-4)).all()
        elif name == "bf16":
            assert (err <= TEMPS[0] * (np.abs(_by_id(lp, i)[1]) * 2.0**-8 + 1e-4)).all()
        elif name == "q8":
            np.testing.assert_array_equal(dz[:, :4], v[:, :4])  # the first m exact
            assert (err <= span / 510 + 1e-5).all()
        elif name.startswith("compact"):
            np.testing.assert_array_equal(dz[:, 0], v[:, 0])  # the row maximum exact
            M = 2 ** codec_bits(name) - 1
            bound = np.broadcast_to(3 * TEMPS[0] * np.expm1(span / (3 * TEMPS[0])) / (2 * M), v.shape)
            assert (err <= bound * (1 + 1e-6) + 1e-5).all()
        elif name == "polytail":
            head = np.abs(dz[:, :16].astype(np.float64) - v[:, :16])  # the first 16 as fp16 log-probs
            assert (head <= TEMPS[0] * (lp[:, :16] * 2.0**-11 + 1e-4)).all()  # the tail is a fit: no bound


def codec_bits(name):
    return get_codec(name).bits


def test_bit_packing_round_trips():
    x = np.random.default_rng(0).integers(0, 2**15, (7, 128))
    assert pack_bits(x, 15).shape == (7, 240)
    np.testing.assert_array_equal(unpack_bits(pack_bits(x, 15), 128, 15), x)


def _dense_kl_reference(z, labels, zk, ids, tau):
    """Row by row, a dense q over the whole vocabulary, then Σ p log(p/q) — fp64, no shared code."""
    out, dpl = [], []
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
    return np.mean(out), np.max(out), np.mean(dpl)


@pytest.mark.parametrize("name", ["lossless", "q8", "compact6", "polytail"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_figure_matches_a_dense_fp64_reference(name, tau):
    z, v, i, lse = _rows(3, 6, 500, 40, 3.0)
    labels = np.array([int(i[0, 0]), int(i[1, 7]), 3, 4, 5, int(i[5, 39])])  # in the top-k and outside it
    dz, di = _roundtrip(name, v, i, lse, 500)
    got = reconstruction_error(z.numpy(), labels, dz, di, tau)
    kl, kl_max, dpl = _dense_kl_reference(z.numpy(), labels, dz, di, tau)
    assert got["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
    assert got["kl_max"] == pytest.approx(kl_max, rel=1e-6, abs=1e-12)
    assert got["dp_label"] == pytest.approx(dpl, rel=1e-6, abs=1e-12)
    if name == "lossless":
        assert got["dp_label"] < 1e-7  # only the top-k truncation remains


def test_bad_codec_inputs():
    with pytest.raises(ConfigError, match=r"unknown codec 'zip'; choose one of \['bf16', 'compact'"):
        get_codec("zip")
    with pytest.raises(ConfigError, match=r"holds vocabularies of at most 65536 ids; this teacher has 70000"):
        get_codec("compact").check(70000, 128)
    with pytest.raises(ConfigError, match=r"needs top-k > 24, got 20"):
        get_codec("polytail").check(32000, 20)
    with pytest.raises(StoreError, match=r"codec 'q8' version 2; this loca-pipe reads that codec up to version 1"):
        codec_of({"codec": {"name": "q8", "version": 2}})
    with pytest.raises(StoreError, match=r"codec 'zz9' \(version 1\), which this loca-pipe does not know"):
        codec_of({"codec": {"name": "zz9", "version": 1}})
    _, v, i, lse = _rows(0, 3, 50, 8, 1.0)
    v[1, 2] = np.nan
    with pytest.raises(NumericsError, match=r"rows \[1\] of the chunk hold NaN or inf"):
        encode_checked(get_codec("q8"), v, i, lse, TEMPS, 50)


def test_image_stores_keep_lossless(tmp_path):
    from loca_pipe.pipeline.store import LogitStore, StoreInfo

    info = StoreInfo(task="classification", num_samples=4, num_views=1, num_rows=4, num_classes=10, chunk_rows=2,
                     dataset={"fingerprint": "f", "split": "train"})
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), info)
    with pytest.raises(StoreError, match=r"codec 'q8' is for token stores \(lm-cache\)"):
        store.begin_teacher("t", {}, 3, (1.0,), None, codec="q8")
    assert "t" not in store.teachers or not store.teacher_attrs("t")
