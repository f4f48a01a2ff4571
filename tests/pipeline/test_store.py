"""The logit store: layout, completion protocol, identity checks, exact probabilities, error messages."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.errors import IncompleteStoreError, NumericsError, StoreConflictError, StoreError
from loca_pipe.pipeline.store import (
    LogitStore,
    StoreInfo,
    default_chunk_rows,
    id_dtype,
    io_guard,
    one_thread,
    summarize_logits,
)

C, K, TAUS = 10, 3, (1.0, 4.0)


def _info(n: int = 10, chunk: int = 4, fingerprint: str = "fp-a", views: int = 1, aug: tuple[str, ...] = ()) -> StoreInfo:
    return StoreInfo(task="classification", num_samples=n, num_views=views, num_rows=n * views, num_classes=C,
                     chunk_rows=chunk, dataset={"name": "toy", "split": "train", "fingerprint": fingerprint,
                                                "view_seed": None}, aug_param_names=aug)


def _batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return (g.normal(0, 3, (n, C)).astype(np.float32), g.integers(0, C, n).astype(np.int64))


def _fill(store: LogitStore, name: str, z: np.ndarray, y: np.ndarray, chunks=None, sha: str = "abc",
          logits_dtype: str | None = "float32"):
    w = store.begin_teacher(name, {"checkpoint_sha256": sha}, K, TAUS, logits_dtype=logits_dtype)
    for c in (w.pending_chunks() if chunks is None else chunks):
        sl = store.info.chunk_slice(c)
        store.write_rows(c, np.arange(sl.start, sl.stop), y[sl], np.zeros(sl.stop - sl.start))
        s = summarize_logits(torch.from_numpy(z[sl]), torch.from_numpy(y[sl]), K, TAUS)
        arrays = {k: v.numpy() for k, v in s.items()}
        arrays["logits"] = z[sl]
        w.write_chunk(c, arrays)
    return w


def _ref_logsumexp(z: np.ndarray, tau: float) -> np.ndarray:
    z = z.astype(np.float64) / tau
    return np.array([math.log(sum(math.exp(v) for v in row)) for row in z])


def test_summarize_matches_independent_reference():
    z, y = _batch(6)
    s = summarize_logits(torch.from_numpy(z), torch.from_numpy(y), K, TAUS)
    order = np.argsort(-z, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(s["topk_ids"].numpy(), order)
    np.testing.assert_array_equal(s["topk_logits"].numpy(), np.take_along_axis(z, order, 1))
    for t, tau in enumerate(TAUS):
        np.testing.assert_allclose(s["lse"][:, t].numpy(), _ref_logsumexp(z, tau), rtol=1e-6)
    np.testing.assert_array_equal(s["label_logit"].numpy(), z[np.arange(6), y])


@pytest.mark.parametrize("logits, labels, k, match", [
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0], [0.0, float("inf")]]), torch.tensor([0, 1, 0]), 1,
     r"NaN or inf logits for 2 row\(s\) \[70, 72\]"),
    (torch.zeros(2, 3, 1), torch.tensor([0, 1]), 1, r"must be \(batch, classes\); got shape \(2, 3, 1\)"),
    (torch.zeros(2, 3), torch.tensor([0, 1]), 4, r"top-k must be in \[1, 3\].*got 4"),
    (torch.zeros(2, 3), torch.tensor([0, 1]), 0, r"top-k must be in \[1, 3\].*got 0"),
    (torch.zeros(2, 3), torch.tensor([0, 3]), 1, r"labels must lie in \[0, 3\); got values \[3\]"),
    (torch.zeros(2, 3), torch.tensor([-1, 0]), 1, r"labels must lie in \[0, 3\); got values \[-1\]"),
])
def test_summarize_bad_input(logits, labels, k, match):
    with pytest.raises((StoreError, NumericsError), match=match):
        summarize_logits(logits, labels, k, TAUS, row_ids=torch.arange(70, 70 + len(logits)))


def test_round_trip_and_exact_probabilities(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    w = _fill(store, "t", z, y)
    assert w.finalize()
    view = LogitStore.open(str(tmp_path / "s.zarr")).teacher("t")
    np.testing.assert_array_equal(view["logits"][:], z)
    np.testing.assert_array_equal(view["label"][:], y)
    np.testing.assert_array_equal(view["sample_id"][:], np.arange(10))
    assert view["topk_ids"].dtype == np.int16
    for tau in TAUS:
        ref = torch.softmax(torch.from_numpy(z).double() / tau, dim=1).numpy()
        np.testing.assert_allclose(view.probs(tau), ref, rtol=1e-6, atol=1e-9)
        sp = view.sparse(tau)
        np.testing.assert_allclose(sp["topk_probs"], np.take_along_axis(ref, sp["topk_ids"], 1), rtol=1e-5)
        np.testing.assert_allclose(sp["label_prob"], ref[np.arange(10), y], rtol=1e-5)
    # a τ not declared: exact from full logits
    ref = torch.softmax(torch.from_numpy(z).double() / 2.5, dim=1).numpy()
    np.testing.assert_allclose(view.sparse(2.5, rows=[1, 7])["label_prob"], ref[[1, 7], y[[1, 7]]], rtol=1e-5)


def test_topk_only_store_refuses_undeclared_tau(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    w = store.begin_teacher("t", {}, K, TAUS, logits_dtype=None)
    for c in w.pending_chunks():
        sl = store.info.chunk_slice(c)
        store.write_rows(c, np.arange(sl.start, sl.stop), y[sl], np.zeros(sl.stop - sl.start))
        w.write_chunk(c, {k: v.numpy() for k, v in summarize_logits(torch.from_numpy(z[sl]), torch.from_numpy(y[sl]), K, TAUS).items()})
    w.finalize()
    view = store.teacher("t")
    assert not view.has_full_logits and "logits" not in view.group
    with pytest.raises(StoreError, match=r"temperature 2.0 was not declared.*--temperatures including 2.0"):
        view.sparse(2.0)
    with pytest.raises(StoreError, match="keeps only top-3 logits"):
        view.probs(1.0)


def test_incomplete_teacher_refused_until_every_chunk_done(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    w = _fill(store, "t", z, y, chunks=[0, 2])
    assert w.pending_chunks() == [1]
    assert not w.finalize()
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(1 of 3 chunks not written\).*re-run the same"):
        LogitStore.open(str(tmp_path / "s.zarr")).teacher("t")
    assert store.teacher("t", allow_incomplete=True)["logits"].shape == (10, C)
    # resume: reopening the same teacher writes only the missing chunk
    w2 = _fill(store, "t", z, y)
    assert w2.finalize()
    np.testing.assert_array_equal(store.teacher("t")["logits"][:], z)


def test_store_identity_conflict_and_overwrite(tmp_path):
    path = str(tmp_path / "s.zarr")
    z, y = _batch(10)
    store = LogitStore.create_or_open(path, _info())
    _fill(store, "t", z, y).finalize()
    with pytest.raises(StoreConflictError, match=r"another data set.*dataset.fingerprint: store has 'fp-a', this run has 'fp-b'"):
        LogitStore.create_or_open(path, _info(fingerprint="fp-b"))
    with pytest.raises(StoreConflictError, match=r"num_samples: store has 10, this run has 12"):
        LogitStore.create_or_open(path, _info(n=12))
    assert LogitStore.create_or_open(path, _info()).teachers == ["t"]  # same identity: reopened, kept
    fresh = LogitStore.create_or_open(path, _info(fingerprint="fp-b"), overwrite=True)
    assert fresh.teachers == [] and fresh.info.dataset["fingerprint"] == "fp-b"


def test_teacher_settings_conflict(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    _fill(store, "t", z, y, sha="abc").finalize()
    with pytest.raises(StoreConflictError, match=r"teacher 't' already in .*checkpoint_sha256: store has 'abc', this run has 'xyz'.*--overwrite"):
        store.begin_teacher("t", {"checkpoint_sha256": "xyz"}, K, TAUS)
    with pytest.raises(StoreConflictError, match="top_k: store has 3, this run has 4"):
        store.begin_teacher("t", {"checkpoint_sha256": "abc"}, 4, TAUS)
    # run-only keys (device, batch size) may differ on resume
    store.begin_teacher("t", {"checkpoint_sha256": "abc", "run": {"device": "cuda"}}, K, TAUS)
    w = store.begin_teacher("t", {"checkpoint_sha256": "xyz"}, K, TAUS, overwrite=True)
    assert w.pending_chunks() == [0, 1, 2] and not store.is_complete("t")


def test_second_teacher_shares_rows_and_checks_them(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    _fill(store, "a", z, y).finalize()
    _fill(store, "b", z * 2, y).finalize()
    assert store.teachers == ["a", "b"]
    np.testing.assert_array_equal(store.teacher("b")["logits"][:], z * 2)
    with pytest.raises(StoreConflictError, match=r"rows 0..3 of 'label' differ.*another sample order, labels"):
        store.write_rows(0, np.arange(4), (y[:4] + 1) % C, np.zeros(4))
    with pytest.raises(StoreError, match="holds 2 teachers"):
        store.teacher()


def test_write_chunk_checks(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    w = store.begin_teacher("t", {}, K, TAUS, logits_dtype="float16")
    s = {k: v.numpy() for k, v in summarize_logits(torch.from_numpy(z[:4]), torch.from_numpy(y[:4]), K, TAUS).items()}
    with pytest.raises(StoreError, match="chunk 0: missing array 'logits'"):
        w.write_chunk(0, s)
    with pytest.raises(StoreError, match="chunk 0: logits has 3 rows, the chunk has 4"):
        w.write_chunk(0, {**s, "logits": z[:3]})
    big = z[:4].copy()
    big[2, 1] = 1e5
    with pytest.raises(NumericsError, match=r"logits of rows \[2\] overflow float16"):
        w.write_chunk(0, {**s, "logits": big})
    assert w.pending_chunks() == [0, 1, 2]
    with pytest.raises(StoreError, match="--top-k must be in"):
        store.begin_teacher("u", {}, C + 1, TAUS)
    with pytest.raises(StoreError, match="temperatures must be positive"):
        store.begin_teacher("u", {}, K, (1.0, 0.0))
    with pytest.raises(StoreError, match="logits dtype must be one of"):
        store.begin_teacher("u", {}, K, TAUS, logits_dtype="bfloat16")


def test_views_need_aug_params(tmp_path):
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info(n=3, views=2, aug=("dx", "dy", "flip")))
    assert store.group["aug_params"].shape == (6, 3)
    with pytest.raises(StoreError, match="aug_params are required"):
        store.write_rows(0, np.zeros(4), np.zeros(4), np.zeros(4))
    store.write_rows(0, [0, 0, 1, 1], [1, 1, 2, 2], [0, 1, 0, 1], np.arange(12, dtype=np.float32).reshape(4, 3))
    np.testing.assert_array_equal(store.group["aug_params"][:4], np.arange(12).reshape(4, 3))


def test_open_missing_or_foreign(tmp_path):
    with pytest.raises(StoreError, match="no logit store at"):
        LogitStore.open(str(tmp_path / "nope.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(2,), dtype="i4")
    with pytest.raises(StoreError, match="is not a loca-pipe logit store"):
        LogitStore.open(str(tmp_path / "other.zarr"))
    with pytest.raises(StoreConflictError, match="holds something that is not a loca-pipe store"):
        LogitStore.create_or_open(str(tmp_path / "other.zarr"), _info())


def test_corrupted_chunk_fails_loudly(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    _fill(store, "t", z, y).finalize()
    chunk = Path(tmp_path, "s.zarr", "teachers", "t", "logits", "c", "1", "0")
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    view = LogitStore.open(str(tmp_path / "s.zarr")).teacher("t")
    np.testing.assert_array_equal(view["logits"][0:4], z[0:4])  # other chunks intact
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        view["logits"][4:8]


def test_interrupted_teacher_creation_is_redone(tmp_path):
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    store.group.require_group("teachers").create_group("t")  # killed before arrays / attributes
    assert store.teachers == ["t"] and store.pending_chunks("t") == [0, 1, 2]
    w = store.begin_teacher("t", {}, K, TAUS)
    assert w.pending_chunks() == [0, 1, 2] and "topk_ids" in w.group


def test_interrupted_store_creation_is_redone(tmp_path):
    path = str(tmp_path / "s.zarr")
    g = zarr.open_group(path, mode="w")  # killed after the row arrays, before the attributes
    g.create_array("sample_id", shape=(10,), dtype="i8")
    store = LogitStore.create_or_open(path, _info())
    assert store.info.num_rows == 10 and "rows_done" in store.group


def test_describe(tmp_path):
    z, y = _batch(10)
    store = LogitStore.create_or_open(str(tmp_path / "s.zarr"), _info())
    _fill(store, "t", z, y, chunks=[0])
    d = store.describe()
    assert d["num_rows"] == 10 and d["num_chunks"] == 3
    assert d["teachers"]["t"]["chunks_done"] == 1 and d["teachers"]["t"]["complete"] is False
    assert d["teachers"]["t"]["top_k"] == K and d["teachers"]["t"]["temperatures"] == list(TAUS)


@pytest.mark.parametrize("code, match", [
    (errno.ENOSPC, r"the disk is full \(ENOSPC"),
    (errno.EROFS, r"the file system is read-only \(EROFS"),
    (errno.EACCES, r"permission denied \(EACCES"),
])
def test_io_guard_messages(code, match):
    with pytest.raises(StoreError, match=match + r".*chunks already finished are kept.*same command again to resume"):
        with io_guard("/x/s.zarr", "writing chunk 3"):
            raise OSError(code, "boom")


def test_dtypes_and_chunking():
    assert id_dtype(10) == np.int16 and id_dtype(32768) == np.int16
    assert id_dtype(32769) == np.int32 and id_dtype(50257) == np.int32
    assert default_chunk_rows(10) == 8192  # capped: resume granularity for few classes
    assert default_chunk_rows(1000) == (4 << 20) // 4000
    assert default_chunk_rows(1_000_000) == 256


def test_one_thread_restores_the_thread_count():
    n = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with pytest.raises(RuntimeError):
        with one_thread():
            raise RuntimeError("boom")
    assert torch.get_num_threads() == n
    with one_thread(enabled=False):
        assert torch.get_num_threads() == n


# ----------------------------------------------------------------------------------------------------
# the fast checked read (chunk files read in place, CRC32C verified) against zarr's own read


def _raw_array(tmp_path, shape=(301, 7), chunk=64, dtype=np.float16, seed=0):
    from zarr.codecs import BytesCodec, Crc32cCodec

    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    a = g.create_array("x/y", shape=shape, chunks=(chunk,) + shape[1:], dtype=dtype, fill_value=0,
                       serializer=BytesCodec(), compressors=[Crc32cCodec()])
    data = (np.random.default_rng(seed).normal(size=shape) * 100).astype(dtype)
    a[:] = data
    return a, data


@settings(max_examples=40, deadline=None)
@given(lo=st.integers(0, 301), n=st.integers(0, 301))
def test_fast_checked_read_equals_zarr_for_any_row_range(tmp_path_factory, lo, n):
    from loca_pipe.pipeline.store import CheckedArray, raw_chunks, read_checked

    a, data = _raw_array(tmp_path_factory.mktemp("f"))
    assert raw_chunks(a) is not None  # the fast path applies to this layout
    hi = min(301, lo + n)
    np.testing.assert_array_equal(read_checked(a, slice(lo, hi)), a[lo:hi])
    np.testing.assert_array_equal(CheckedArray(a)[lo:hi, 2], data[lo:hi, 2])
    np.testing.assert_array_equal(read_checked(a), data)


def test_fast_read_fill_value_truncation_and_other_layouts(tmp_path):
    import os

    from loca_pipe.pipeline.store import CheckedArray, raw_chunks, read_checked

    a, data = _raw_array(tmp_path, dtype=np.float32)
    ca = CheckedArray(a)
    np.testing.assert_array_equal(ca.read_chunk(4), data[256:301])  # the edge chunk: padding not returned
    f = tmp_path / "a.zarr" / "x" / "y" / "c" / "1" / "0"
    os.remove(f)  # zarr writes no chunk equal to the fill value: a missing file reads as fill
    np.testing.assert_array_equal(read_checked(a, slice(60, 130)), a[60:130])
    assert (read_checked(a)[64:128] == 0).all()
    g = tmp_path / "a.zarr" / "x" / "y" / "c" / "2" / "0"
    g.write_bytes(g.read_bytes()[:-10])  # torn: bytes lost
    with pytest.raises(StoreError, match=r"array 'x/y' .*chunk 2 \(rows 128\.\.191, file 'x/y/c/2/0'\) has") as err:
        read_checked(a)
    assert f"loca-pipe verify {tmp_path / 'a.zarr'} --repair" in str(err.value)  # the fix, as the zarr path says it
    z = zarr.open_group(str(tmp_path / "b.zarr"), mode="w").create_array("z", shape=(10,), chunks=(4,), dtype="i8")
    assert raw_chunks(z) is None  # zstd-compressed (zarr's default): read through zarr
def test_one_tau_rule_for_image_and_token_readers():
    """#15: TeacherView and LMTeacherCache find a τ by the same rule (store.find_tau, relative 1e-6)."""
    from loca_pipe.pipeline.lm.cache import LMTeacherCache
    from loca_pipe.pipeline.store import find_tau

    temps = [1.0, 4.0, 1e-3]
    assert find_tau(temps, 4.0 * (1 + 5e-7)) == 1 and find_tau(temps, 4.0 * (1 + 5e-6)) is None
    assert find_tau(temps, 1e-3 + 5e-7) is None  # relative, not absolute: the old LM rule accepted this
    e = np.zeros(0)
    lm = LMTeacherCache(e, e, e, e, e, e, e, e, temps, 3, {}, {})
    for tau in (4.0 * (1 + 5e-7), 1e-3 * (1 + 5e-7), 1.0):
        assert lm.tau_index(tau) == find_tau(temps, tau)
    with pytest.raises(StoreError, match="was not declared"):
        lm.tau_index(1e-3 + 5e-7)


def test_large_cpu_batches_are_summarised_in_blocks_with_the_same_bytes(monkeypatch):
    from loca_pipe.pipeline import caching

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(37, 50, generator=g) * 4, torch.randint(0, 50, (37,), generator=g)
    whole = summarize_logits(z, y, 5, TAUS)
    monkeypatch.setattr(caching, "CPU_BLOCK_ELEMENTS", 4 * 50)  # blocks of 4 rows (the last one partial)
    blocked = summarize_logits(z, y, 5, TAUS)
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k
    z[22, 3] = float("nan")
    with pytest.raises(NumericsError, match=r"NaN or inf logits for 1 row\(s\) \[22\]"):
        summarize_logits(z, y, 5, TAUS)  # the row number is the batch's, not the block's
