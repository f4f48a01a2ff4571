"""The causal-LM token store: stored values equal a live teacher's, prompts are never stored, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError, IncompleteStoreError, ModelError, StoreConflictError, StoreError
from loca_pipe.pipeline.lm import cache, models

TAUS = (1.0, 2.0)


def _cache(path, teacher, tok, enc, **kw):
    args = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, top_k=5, temperatures=TAUS,
                dataset={"name": "test", "split": "train", "fingerprint": "fp0"}, provenance={"teacher_sha256": "x"},
                chunk_rows=64, batch_size=5)
    args.update(kw)
    return cache.cache_teacher(str(path), "t", teacher, enc, **args)


def test_store_matches_live_teacher(tmp_path, teacher, tok, enc):
    rep = _cache(tmp_path / "s", teacher, tok, enc)
    assert rep.complete and rep.rows == int(enc.response_len.sum())
    c = cache.open_lm_cache(str(tmp_path / "s"), expect_fingerprint="fp0")
    assert c.topk_ids.dtype == np.int16  # 300-token vocabulary → int16 ids
    for i, seq in enumerate(enc.ids):
        # the live teacher on this sequence alone (no padding, no batching)
        with torch.no_grad():
            z = teacher(input_ids=torch.as_tensor(seq)[None]).logits[0]  # (L, V)
        P = int(enc.prompt_len[i])
        z = z[P - 1:len(seq) - 1]  # logits predicting each response token
        rows = slice(c.offsets[i], c.offsets[i + 1])
        top = torch.topk(z, 5, dim=1)
        np.testing.assert_array_equal(c.topk_ids[rows], top.indices.numpy())
        np.testing.assert_allclose(c.topk_logits[rows], top.values.numpy(), atol=2e-5, rtol=1e-5)
        for t, tau in enumerate(TAUS):
            np.testing.assert_allclose(c.lse[rows, t], torch.logsumexp(z / tau, 1).numpy(), atol=2e-5, rtol=1e-5)
        nxt = torch.as_tensor(seq[P:])
        np.testing.assert_array_equal(c.label[rows], seq[P:])
        np.testing.assert_allclose(c.label_logit[rows], z.gather(1, nxt.view(-1, 1)).squeeze(1).numpy(), atol=2e-5)
        np.testing.assert_array_equal(c.position[rows], np.arange(len(seq) - P))
        assert (c.sample_id[rows] == i).all()


def test_prompt_tokens_never_stored(tmp_path, teacher, tok, pairs):
    from loca_pipe.pipeline.lm import text, tokenizer

    # prompts made of a marker word that no response contains: its token ids must never be a stored label
    marked = [text.Example("Zebulunzz " + p.instruction, p.response) for p in pairs]
    enc = tokenizer.encode_examples(tok, marked, "chat", 60)
    _cache(tmp_path / "s", teacher, tok, enc)
    c = cache.open_lm_cache(str(tmp_path / "s"))
    assert len(c.label) == int(enc.response_len.sum()) < sum(len(s) for s in enc.ids)
    prompt_only = set(np.concatenate([s[:p] for s, p in zip(enc.ids, enc.prompt_len)]).tolist()) - set(
        np.concatenate([s[p:] for s, p in zip(enc.ids, enc.prompt_len)]).tolist())
    assert prompt_only  # the marker and template produce prompt-only tokens
    assert not prompt_only & set(c.label.tolist())
    assert tok.bos_token_id not in set(c.label.tolist())


@pytest.mark.parametrize("draws", [0, 12])
def test_resume_is_identical(tmp_path, teacher, tok, enc, draws):
    kw = dict(sample_draws=draws, sample_tau=1.0, seed=3, greedy_max_new_tokens=6, greedy_chunk=10)
    full = _cache(tmp_path / "full", teacher, tok, enc, **kw)
    assert full.complete
    part = _cache(tmp_path / "part", teacher, tok, enc, max_chunks=2, **kw)
    assert not part.complete and part.chunks_written == 2
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        cache.open_lm_cache(str(tmp_path / "part"))
    rest = _cache(tmp_path / "part", teacher, tok, enc, **kw)
    assert rest.complete and rest.chunks_skipped == 2 and rest.chunks_written == full.chunks_written - 2
    a, b = cache.open_lm_cache(str(tmp_path / "full")), cache.open_lm_cache(str(tmp_path / "part"))
    for k in ("offsets", "position", "sample_id", "label", "topk_logits", "topk_ids", "lse", "label_logit",
              "sampled_ids", "sampled_counts", "greedy_ids"):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None) == (y is None) == (k.startswith("sampled") and draws == 0)
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=k)


def test_sampled_form_counts_and_unbiased(tok):
    torch.manual_seed(0)
    z = torch.randn(3, 40) * 2
    g = torch.Generator().manual_seed(0)
    out = {k: v.numpy() for k, v in cache.sample_sparse(z.repeat(2000, 1), 12, 1.0, g).items()}
    assert (out["sampled_counts"].sum(1) == 12).all()
    ids, cnt = out["sampled_ids"], out["sampled_counts"]
    assert ((ids >= 0) == (cnt > 0)).all()
    # counts/12 averaged over many rows estimates p (unbiased), row type r = row % 3
    est = np.zeros((3, 40))
    for r in range(ids.shape[0]):
        m = ids[r] >= 0
        np.add.at(est[r % 3], ids[r][m], cnt[r][m] / 12)
    est /= 2000
    np.testing.assert_allclose(est, torch.softmax(z, 1).numpy(), atol=0.02)


def test_greedy_cache_matches_single_prompt_decoding(tmp_path, teacher, tok, enc):
    _cache(tmp_path / "s", teacher, tok, enc, greedy_max_new_tokens=8, greedy_chunk=7)
    c = cache.open_lm_cache(str(tmp_path / "s"))
    got = c.greedy_responses()
    assert len(set(np.concatenate(got).tolist())) > 3  # the teacher does not decode one constant token
    for i in (0, 5, 13):
        x = torch.as_tensor(enc.ids[i][:enc.prompt_len[i]])[None]
        ref = []
        with torch.no_grad():
            for _ in range(8):  # no KV cache, no padding: the plain definition of greedy decoding
                nxt = int(teacher(input_ids=x).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ref.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], 1)
        assert got[i].tolist() == ref


def test_bad_inputs(tmp_path, teacher, tok, enc):
    with pytest.raises(ConfigError, match=r"top_k must be in \[1, 300\].*got 301"):
        _cache(tmp_path / "a", teacher, tok, enc, top_k=301)
    with pytest.raises(StoreError, match="40000 tokens but int16 ids hold at most 32768"):
        cache.check_id_dtype(40000, "int16")
    cache.check_id_dtype(40000, "int32")
    with pytest.raises(ConfigError, match="id dtype must be one of"):
        cache.check_id_dtype(10, "float16")
    small = models.build_lm("llama", 280, 32, 1, 2, 64, tok)
    with pytest.raises(StoreError, match="holds token id .* but the teacher scores only 280 tokens"):
        _cache(tmp_path / "b", small, tok, enc)
    _cache(tmp_path / "c", teacher, tok, enc)
    with pytest.raises(StoreConflictError, match="fingerprint"):
        cache.open_lm_cache(str(tmp_path / "c"), expect_fingerprint="other")
    with pytest.raises(StoreConflictError, match="another data set"):
        _cache(tmp_path / "c", teacher, tok, enc, dataset={"name": "x", "split": "train", "fingerprint": "fp1"})
    with pytest.raises(StoreError, match="not declared at cache time"):
        cache.open_lm_cache(str(tmp_path / "c")).tau_index(4.0)


def test_overwrite_replaces_only_what_conflicts(tmp_path, teacher, tok, enc):
    p = tmp_path / "s"
    assert _cache(p, teacher, tok, enc, max_chunks=2).chunks_written == 2
    # identical settings + overwrite: the half-written teacher is kept and resumed, not restarted
    rep = _cache(p, teacher, tok, enc, overwrite=True)
    assert rep.complete and rep.chunks_skipped == 2
    with pytest.raises(StoreConflictError, match="already in .* with other settings.*top_k"):
        _cache(p, teacher, tok, enc, top_k=7)
    rep = _cache(p, teacher, tok, enc, top_k=7, overwrite=True)
    assert rep.complete and rep.chunks_skipped == 0
    assert cache.open_lm_cache(str(p)).topk_ids.shape[1] == 7
    # other data + overwrite: the whole store is replaced
    rep = _cache(p, teacher, tok, enc, overwrite=True, dataset={"name": "y", "split": "train", "fingerprint": "f2"})
    assert rep.complete and cache.open_lm_cache(str(p), expect_fingerprint="f2").topk_ids.shape[1] == 5


def test_any_hf_folder_gpt2_roundtrip(tmp_path, tok, enc):
    from .conftest import spread

    g = spread(models.build_lm("gpt2", len(tok), 32, 1, 2, 64, tok, seed=0), seed=2)
    models.save_lm(g, tok, tmp_path / "gpt2")
    loaded = models.load_lm(tmp_path / "gpt2")
    assert loaded.config.model_type == "gpt2" and models.model_vocab(loaded) == len(tok)
    few = tokenizer_subset(enc, 6)
    _cache(tmp_path / "s", loaded, tok, few)
    c = cache.open_lm_cache(str(tmp_path / "s"))
    with torch.no_grad():
        z = g(input_ids=torch.as_tensor(few.ids[0])[None]).logits[0]
    P = int(few.prompt_len[0])
    np.testing.assert_array_equal(c.topk_ids[:c.offsets[1]], torch.topk(z[P - 1:-1], 5, 1).indices.numpy())
    with pytest.raises(ModelError, match="no causal LM at"):
        models.load_lm(tmp_path / "nothing")


def tokenizer_subset(enc, n):
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    return Encoded(enc.ids[:n], enc.prompt_len[:n])


def test_second_job_on_the_same_teacher_refuses(tmp_path, teacher, tok, enc, monkeypatch):
    """The token store takes the same writer lease as the image path: another live job's lease is refused,
    and nothing already written is touched."""
    from loca_pipe.pipeline.distributed import WriterLease

    path = tmp_path / "lease"
    _cache(path, teacher, tok, enc)
    before = cache.open_lm_cache(str(path)).topk_logits
    monkeypatch.setenv("LOCA_JOB_ID", "other-job")
    WriterLease(str(path), "t").acquire()  # a live job (this pid) holds the teacher
    monkeypatch.setenv("LOCA_JOB_ID", "this-job")
    with pytest.raises(StoreConflictError, match="being written by another job .*other-job"):
        _cache(path, teacher, tok, enc)
    np.testing.assert_array_equal(cache.open_lm_cache(str(path)).topk_logits, before)


def test_corrupted_token_chunk_is_named(tmp_path, teacher, tok, enc):
    """A flipped bit in a stored top-k chunk fails its CRC32C on read, with the array and chunk named."""
    path = tmp_path / "corrupt"
    _cache(path, teacher, tok, enc)
    chunk = path / "teachers" / "t" / "topk_logits" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x40
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"array 'teachers/t/topk_logits' .*chunk 1 .*CRC32C"):
        cache.open_lm_cache(str(path))
