"""One data order for every method of a seed (issue #23 item 6): CE and KD see the same sample sequence and
record the same ``data_order`` whether the teacher signal is in memory or streamed, and whatever order the
store's rows are in; the in-memory order is today's; the streamed (block) order is a seeded permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.soft_labels import (BlockOrder, PlainSource, epoch_permutation, load_soft_labels,
                                            run_order)
from loca_pipe.pipeline.store import LogitStore, StoreInfo, summarize_logits
from loca_pipe.pipeline.store.format import default_chunk_rows
from loca_pipe.pipeline.training import Hooks, ImageSet, TrainConfig, order_fingerprint, train_student
from tests.pipeline.test_training import C, CHUNK, LCFG, N, ToyData, make_model, spec_of

torch.set_num_threads(1)


def write_rows(path, ds, teacher, row_order):
    """A one-view store whose row r holds sample ``row_order[r]`` (data-set order when it is arange)."""
    info = StoreInfo(task="classification", num_samples=N, num_views=1, num_rows=N, num_classes=C, chunk_rows=CHUNK,
                     dataset={"fingerprint": "fp-toy", "split": "train", "augment": None, "view_seed": 0})
    store = LogitStore.create_or_open(str(path), info)
    w = store.begin_teacher("t", {"arch": "toy"}, top_k=3, temperatures=(4.0,), logits_dtype="float32")
    sid = np.asarray(row_order, np.int64)
    with torch.no_grad():
        z = teacher(ds.x[torch.from_numpy(sid)])
    y = ds.y[torch.from_numpy(sid)]
    for c in range(info.num_chunks):
        sl = info.chunk_slice(c)
        store.write_rows(c, sid[sl], y[sl].numpy(), np.zeros(len(sid[sl]), np.int64), None)
        arrays = {k: v.numpy() for k, v in summarize_logits(z[sl], y[sl], 3, (4.0,)).items()}
        arrays["logits"] = z[sl].numpy()
        w.write_chunk(c, arrays)
    w.finalize()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    ds, teacher = ToyData(), make_model(99).eval()
    d = tmp_path_factory.mktemp("order")
    write_rows(d / "sorted.zarr", ds, teacher, np.arange(N))
    write_rows(d / "shuffled.zarr", ds, teacher, np.random.default_rng(5).permutation(N))
    return ds, d


def sequence(ds, source, method, seed, epochs=2):
    """(sample ids in the order the loop trained on them, the run's metrics)."""
    seen = []
    cfg = TrainConfig(epochs=epochs, batch_size=24, lr=0.05, milestones=(), seed=seed)
    res = train_student(make_model(seed), images=ImageSet(ds, "cpu"), labels=ds.y, source=source, method=method,
                        loss_cfg=LCFG, cfg=cfg, do_eval=False,
                        hooks=Hooks(on_step=lambda e, s, b, loss: seen.append(b.sample_index.clone())))
    return torch.cat(seen), res.metrics


def test_the_run_order_is_the_permutation_when_full_logits_fit_else_store_chunk_blocks():
    assert run_order(N, C, N * C * 4) is epoch_permutation
    o = run_order(N, C, N * C * 4 - 1)
    assert isinstance(o, BlockOrder) and o.block_rows == default_chunk_rows(C) and o.buffer_blocks == 8
    assert isinstance(run_order(N, C, 0), BlockOrder)


@pytest.mark.parametrize("order", [BlockOrder(CHUNK, 2), run_order(N, C, 0), epoch_permutation],
                         ids=["blocks-of-a-chunk", "run-order-at-limit-0", "permutation"])
@pytest.mark.parametrize("store", ["sorted", "shuffled"])
def test_ce_and_kd_of_one_seed_see_one_sample_sequence(stores, order, store):
    ds, d = stores
    spec = spec_of(ds)
    runs = {}
    for seed in (3, 4):
        kd_src = load_soft_labels(str(d / f"{store}.zarr"), spec, tau=4.0, memory_limit_bytes=0, order=order)
        assert not kd_src.in_memory  # streamed
        kd_mem = load_soft_labels(str(d / f"{store}.zarr"), spec, tau=4.0, order=order)
        assert kd_mem.in_memory
        runs[seed] = [sequence(ds, PlainSource(N, order=order), "ce", seed),
                      sequence(ds, kd_src, "kd", seed), sequence(ds, kd_mem, "kd", seed)]
        (ce, ce_m), *kds = runs[seed]
        assert sorted(ce[:N].tolist()) == list(range(N)) and sorted(ce[N:].tolist()) == list(range(N))
        for kd, kd_m in kds:
            assert torch.equal(kd, ce)  # the same samples in the same order, epoch by epoch
            assert kd_m["data_order"] == ce_m["data_order"]
        assert ce_m["train_loss"] != kds[0][1]["train_loss"]  # the runs differ in what they learn, not in order
    assert not torch.equal(runs[3][0][0], runs[4][0][0])
    assert runs[3][0][1]["data_order"] != runs[4][0][1]["data_order"]


def test_the_in_memory_order_is_unchanged(stores):
    """A store in data-set order, in memory, with no order given: the rows of the permutation of (seed, e), as
    before the order became the run's; PlainSource likewise."""
    ds, d = stores
    sl = load_soft_labels(str(d / "sorted.zarr"), spec_of(ds), tau=4.0)
    for epoch in (0, 1):
        perm = epoch_permutation(N, 7, epoch)
        assert torch.equal(sl.epoch_rows(epoch, 7), sl.rows_of_view[0][perm])
        assert torch.equal(torch.cat([b.sample_index for b in PlainSource(N).batches(epoch, 24, 7)]), perm)


def test_data_order_fingerprints_the_sequence(stores):
    ds, _ = stores
    a, am = sequence(ds, PlainSource(N), "ce", 3)
    b, bm = sequence(ds, PlainSource(N, order=BlockOrder(CHUNK, 2)), "ce", 3)
    assert not torch.equal(a, b) and am["data_order"] != bm["data_order"]
    assert len(am["data_order"]) == 16 and int(am["data_order"], 16) >= 0
    assert order_fingerprint([{"data_order": "ab"}, {}]) is None  # a history without digests: no fingerprint


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), block=st.integers(1, 64), buffer=st.integers(1, 5), seed=st.integers(0, 9),
       epoch=st.integers(0, 3))
def test_block_order_is_a_seeded_permutation_of_whole_block_buffers(n, block, buffer, seed, epoch):
    o = BlockOrder(block, buffer)
    seq = o(n, seed, epoch)
    assert sorted(seq.tolist()) == list(range(n))
    assert torch.equal(seq, o(n, seed, epoch))  # a pure function of (seed, epoch)
    start = 0  # every buffer holds whole blocks, at most `buffer` of them
    while start < n:
        blocks = set()
        taken = 0
        for p in seq[start:].tolist():
            b = p // block
            if b not in blocks and len(blocks) == buffer:
                break
            blocks.add(b)
            taken += 1
        size = sum(min(n, (b + 1) * block) - b * block for b in blocks)
        assert taken == size  # the buffer is its blocks, complete, before the next buffer starts
        start += size
