"""#21: the token store as a map-style Dataset: items against an independent recomputation from the teacher's
full logits, LoCa on request, the collator, the block-shuffled epoch (every sequence once, each block decoded once),
and a store read through another tokenizer refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.errors import StoreConflictError
from loca_pipe.pipeline.lm import cache
from loca_pipe.pipeline.lm.dataset import BlockShuffleSampler, Collator, TokenStoreDataset, kd_target
from loca_pipe.pipeline.lm.models import response_logits


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained_teacher, tok, enc):
    path = tmp_path_factory.mktemp("ds") / "s.zarr"
    cache.cache_teacher(str(path), "t", trained_teacher, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        top_k=4, temperatures=(1.0, 2.0), dataset={"name": "x", "split": "train", "fingerprint": "f"},
                        provenance={}, chunk_rows=32, batch_size=8)
    return str(path)


def _full_logits(model, enc, tok, i):
    with torch.inference_mode():
        z, y = response_logits(model, enc.ids[i:i + 1], enc.prompt_len[i:i + 1], tok.pad_token_id)
    return z.double(), y


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_items_equal_the_teachers_own_distribution(store, trained_teacher, tok, enc, tau):
    ds = TokenStoreDataset(store, enc, tau=tau)
    assert len(ds) == len(enc)
    for i in (0, 5, len(enc) - 1):
        it = ds[i]
        P, L = int(enc.prompt_len[i]), len(enc.ids[i])
        assert it["input_ids"].tolist() == enc.ids[i].tolist()
        assert (it["labels"][:P] == -100).all() and it["labels"][P:].tolist() == enc.ids[i][P:].tolist()
        m = it["teacher_mask"]
        assert m.tolist() == [P - 1 <= j < L - 1 for j in range(L)]  # position j predicts token j + 1
        z, y = _full_logits(trained_teacher, enc, tok, i)
        logp = torch.log_softmax(z / tau, 1)  # the reference: the teacher's full logits, recomputed
        top = torch.topk(z, 4, 1).indices
        assert torch.equal(it["teacher_ids"][m], top)
        np.testing.assert_allclose(it["teacher_logprobs"][m].numpy(), logp.gather(1, top).numpy(), atol=2e-5)
        np.testing.assert_allclose(it["label_logprob"][m].numpy(), logp.gather(1, y[:, None])[:, 0].numpy(), atol=2e-5)
        kept = logp.exp().gather(1, top).sum(1) + torch.where((top == y[:, None]).any(1), 0.0, logp.exp().gather(1, y[:, None])[:, 0])
        np.testing.assert_allclose(it["tail_mass"][m].numpy(), (1 - kept).clamp_min(0).numpy(), atol=2e-5)
        assert it["label_in_topk"][m].tolist() == (top == y[:, None]).any(1).tolist()
        assert not it["teacher_mask"][~m].any() and (it["tail_mass"][~m] == 0).all()


def test_loca_on_request_follows_the_formula(store, trained_teacher, tok, enc):
    """α: mis-instructed rows get p'_i = s p_i (i ≠ y), p'_y = 1 − s(1 − p_y), s = α/(1 − p_y + p_k); correct rows untouched."""
    alpha = 0.8
    plain, cal = TokenStoreDataset(store, enc, tau=2.0), TokenStoreDataset(store, enc, tau=2.0, alpha=alpha)
    seen_mis = seen_ok = 0
    for i in range(len(enc)):
        a, b = plain[i], cal[i]
        m = a["teacher_mask"]
        p, q = a["teacher_logprobs"][m].double().exp(), b["teacher_logprobs"][m].double().exp()
        py, qy = a["label_logprob"][m].double().exp(), b["label_logprob"][m].double().exp()
        ids, y = a["teacher_ids"][m], torch.roll(a["input_ids"], -1)[m]
        mis = ids[:, 0] != y
        pk = torch.where(ids[:, 0] == y, p[:, 1], p[:, 0])
        s = alpha / (1 - py + pk)
        not_y = ids != y[:, None]
        want = torch.where(not_y, s[:, None] * p, (1 - s * (1 - py))[:, None])
        np.testing.assert_allclose(q[mis].numpy(), want[mis].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(qy[mis].numpy(), (1 - s * (1 - py))[mis].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b["tail_mass"][m][mis].numpy(), (s * a["tail_mass"][m].double())[mis].numpy(),
                                   rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(q[~mis].numpy(), p[~mis].numpy())
        seen_mis, seen_ok = seen_mis + int(mis.sum()), seen_ok + int((~mis).sum())
    assert seen_mis > 0 and seen_ok > 0


def test_collator_pads_and_kd_target_matches_the_items(store, enc, tok):
    ds = TokenStoreDataset(store, enc, tau=1.0)
    items = [ds[i] for i in (0, 3, 7)]
    b = Collator(tok.pad_token_id)(items)
    L = max(len(it["input_ids"]) for it in items)
    assert b["input_ids"].shape == (3, L) and b["teacher_ids"].shape == (3, L, 4)
    for n, it in enumerate(items):
        k = len(it["input_ids"])
        assert b["attention_mask"][n].tolist() == [1] * k + [0] * (L - k)
        assert (b["input_ids"][n, k:] == tok.pad_token_id).all() and (b["labels"][n, k:] == -100).all()
        assert not b["teacher_mask"][n, k:].any()
    tg = kd_target(b)
    rows = int(b["teacher_mask"].sum())
    assert tg.ids.shape == (rows, 5) and tg.tail.shape == (rows,)
    total = tg.weights.double().sum(1) + tg.tail.double()
    np.testing.assert_allclose(total.numpy(), 1.0, atol=1e-5)  # top-k ∪ {label} ∪ tail is a distribution
    assert tg.labels.tolist() == torch.cat([it["input_ids"][1:][it["teacher_mask"][:-1]] for it in items]).tolist()


def test_block_shuffled_epoch_reads_each_block_once(store, enc):
    ds = TokenStoreDataset(store, enc, cache_blocks=2, block_rows=32)  # one store chunk a block
    s = BlockShuffleSampler(ds, window_blocks=2, seed=3)
    order = list(s)
    assert sorted(order) == list(range(len(ds)))  # every sequence once
    for i in order:
        ds[i]
    assert ds.blocks_read == len(ds.block_seqs) > 1  # each block decoded once, at most 2 held
    assert len(ds._cache) <= 2
    s.set_epoch(1)
    assert list(s) != order


def test_another_tokenizer_or_other_data_is_refused(store, enc):
    ids = [s.copy() for s in enc.ids]
    ids[2][-1] = (ids[2][-1] + 1) % 300  # one response token differs: another tokenizer's ids
    with pytest.raises(StoreConflictError, match=r"next-token labels differ .* \(is the tokenizer the store's\?\)"):
        TokenStoreDataset(store, ids, enc.prompt_len)
    with pytest.raises(StoreConflictError, match=r"holds 24 sequences"):
        TokenStoreDataset(store, enc.ids[:-1], enc.prompt_len[:-1])


def test_sidecar_items_equal_the_store_and_follow_a_recache(tmp_path, trained_teacher, tok, enc):
    """The memory-mapped sidecar serves the same items; another τ/α or a re-cached store gets a new one."""
    path = tmp_path / "s.zarr"
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, top_k=4, temperatures=(1.0, 2.0),
              dataset={"name": "x", "split": "train", "fingerprint": "f"}, provenance={}, chunk_rows=32, batch_size=8)
    cache.cache_teacher(str(path), "t", trained_teacher, enc, **kw)
    plain = TokenStoreDataset(str(path), enc, tau=2.0, alpha=0.9)
    side = TokenStoreDataset(str(path), enc, tau=2.0, alpha=0.9, sidecar=True)
    assert side.sidecar_path.parent == tmp_path / "s.zarr.dataset-sidecar" and side.blocks_read == 0
    for i in range(len(enc)):
        a, b = plain[i], side[i]
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert side.blocks_read == 0 and [p.name for p in side.sidecar_path.parent.iterdir() if p.name.startswith(".")] == []
    again = TokenStoreDataset(str(path), enc, tau=2.0, alpha=0.9, sidecar=True)
    assert again.sidecar_path == side.sidecar_path  # reused, not rebuilt
    assert TokenStoreDataset(str(path), enc, tau=1.0, sidecar=True).sidecar_path != side.sidecar_path
    cache.cache_teacher(str(path), "t", trained_teacher, enc, overwrite=True, recache=True, **kw)
    fresh = TokenStoreDataset(str(path), enc, tau=2.0, alpha=0.9, sidecar=True)
    assert fresh.sidecar_path != side.sidecar_path
