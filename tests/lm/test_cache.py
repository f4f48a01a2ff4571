"""The causal-LM token store: stored values equal a live teacher's, prompts are never stored, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("draws, threaded", [(0, False), (12, False), (12, True)])
def test_resume_is_identical(tmp_path, monkeypatch, teacher, tok, enc, draws, threaded):
    from loca_pipe.pipeline import caching

    if threaded:  # summaries in the Summarizer thread beside the next forward (large batches), same bytes
        monkeypatch.setattr(caching, "SMALL_OP_ELEMENTS", 0)
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
    if threaded:  # the threaded summaries write the bytes the inline ones do
        monkeypatch.setattr(caching, "SMALL_OP_ELEMENTS", 1 << 18)
        _cache(tmp_path / "inline", teacher, tok, enc, **kw)
        c = cache.open_lm_cache(str(tmp_path / "inline"))
        for k in ("topk_logits", "topk_ids", "lse", "label_logit", "sampled_ids", "sampled_counts", "greedy_ids"):
            np.testing.assert_array_equal(getattr(a, k), getattr(c, k), err_msg=k)


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


def _reference_sample_sparse(logits, draws, tau, generator):
    """The per-row implementation the vectorised sampler replaced (np.unique per row): the exact reference."""
    p = torch.softmax(logits.float() / tau, dim=-1)
    idx = torch.multinomial(p, draws, replacement=True, generator=generator)
    R = idx.shape[0]
    ids, counts = np.full((R, draws), -1, np.int32), np.zeros((R, draws), np.int32)
    srt = torch.sort(idx, dim=1).values.numpy()
    for r in range(R):
        u, c = np.unique(srt[r], return_counts=True)
        order = np.lexsort((u, -c))
        ids[r, :len(u)], counts[r, :len(u)] = u[order], c[order]
    return ids, counts


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 300), draws=st.integers(1, 40), tau=st.sampled_from([0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 2.0, 8.0]))
def test_vectorised_sampler_equals_the_per_row_reference(rows, vocab, draws, tau, seed, scale):
    z = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    got = cache.sample_sparse(z, draws, tau, torch.Generator().manual_seed(seed + 1))
    ids, counts = _reference_sample_sparse(z, draws, tau, torch.Generator().manual_seed(seed + 1))
    np.testing.assert_array_equal(got["sampled_ids"].numpy(), ids)
    np.testing.assert_array_equal(got["sampled_counts"].numpy(), counts)
    again = cache.sample_sparse(z, draws, tau, torch.Generator().manual_seed(seed + 1))  # same seed, same draws
    assert torch.equal(again["sampled_ids"], got["sampled_ids"])


def test_sampler_counts_follow_p_chi_square():
    """Pooled counts of 4,000 rows × 16 draws match p = softmax(z/τ) (chi-square, 20 bins, p-value > 1e-3)."""
    z = torch.linspace(-3, 3, 20).view(1, -1)
    tau = 1.5
    out = cache.sample_sparse(z.repeat(4000, 1), 16, tau, torch.Generator().manual_seed(7))
    ids, cnt = out["sampled_ids"].numpy(), out["sampled_counts"].numpy()
    obs = np.bincount(ids[cnt > 0], weights=cnt[cnt > 0], minlength=20)
    exp = torch.softmax(z[0].double() / tau, 0).numpy() * obs.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    pvalue = float(torch.special.gammaincc(torch.tensor(19 / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    assert pvalue > 1e-3, (stat, pvalue)
    assert (np.diff(cnt, axis=1) <= 0).all()  # most drawn first


def test_shards_fill_one_token_store_identically(tmp_path, teacher, tok, enc):
    """lm-cache through the engine: two shards (polling, no process group) write exactly the one-process store."""
    kw = dict(sample_draws=6, seed=1, greedy_max_new_tokens=4, greedy_chunk=7)
    one = _cache(tmp_path / "one", teacher, tok, enc, **kw)
    a = _cache(tmp_path / "sh", teacher, tok, enc, shard=0, num_shards=2, **kw)
    assert not a.complete and a.chunks_written == -(-one.chunks_written // 2)
    b = _cache(tmp_path / "sh", teacher, tok, enc, shard=1, num_shards=2, **kw)
    assert b.complete and a.chunks_written + b.chunks_written == one.chunks_written
    x, y = cache.open_lm_cache(str(tmp_path / "one")), cache.open_lm_cache(str(tmp_path / "sh"))
    for k in ("sample_id", "label", "topk_logits", "topk_ids", "lse", "label_logit", "sampled_ids",
              "sampled_counts", "greedy_ids"):
        np.testing.assert_array_equal(getattr(x, k), getattr(y, k), err_msg=k)


_KILL_SCRIPT = r"""
import sys, time, numpy as np, torch
from loca_pipe.pipeline.lm import cache, models
from loca_pipe.pipeline.lm.tokenizer import Encoded
torch.set_num_threads(1)
model = models.build_lm("llama", 97, 16, 1, 2, 24, None, seed=0).eval()
if len(sys.argv) > 2:
    model.register_forward_hook(lambda *a: time.sleep(float(sys.argv[2])))
rng = np.random.default_rng(0)
enc = Encoded([rng.integers(3, 97, 20).astype(np.int64) for _ in range(30)], np.full(30, 6, np.int64))
cache.cache_teacher(sys.argv[1], "t", model, enc, pad_id=0, eos_id=2, top_k=4, temperatures=(1.0, 2.0),
                    dataset={"name": "k", "split": "train", "fingerprint": "k"}, provenance={}, chunk_rows=32,
                    batch_size=3, sample_draws=5, seed=2)
"""


@pytest.mark.slow
def test_token_cache_kill_and_resume_is_bit_identical(tmp_path):
    import subprocess
    import sys

    from tests.helpers import kill_after_done_chunks

    killed = tmp_path / "killed"
    slow = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(killed), "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kill_after_done_chunks(slow, killed / "teachers" / "t" / "done" / "c", timeout=120)
    from loca_pipe.pipeline.store import LogitStore

    pending = LogitStore.open(str(killed)).pending_chunks("t")
    assert 0 < len(pending) < LogitStore.open(str(killed)).info.num_chunks
    for path in (killed, tmp_path / "ref"):  # the same command resumes; an uninterrupted run is the reference
        res = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(path)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = cache.open_lm_cache(str(killed)), cache.open_lm_cache(str(tmp_path / "ref"))
    for k in ("offsets", "position", "sample_id", "label", "topk_logits", "topk_ids", "lse", "label_logit",
              "sampled_ids", "sampled_counts"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and np.array_equal(x, y), k


@pytest.mark.parametrize("codec", ["q8", "compact6"])
def test_codec_store_reads_back_within_bound_and_refuses_another_codec(tmp_path, teacher, tok, enc, codec):
    ref = cache.open_lm_cache(str(_cache(tmp_path / "lossless", teacher, tok, enc, top_k=8).store))
    _cache(tmp_path / "c", teacher, tok, enc, top_k=8, codec=codec)
    got = cache.open_lm_cache(str(tmp_path / "c"))
    assert got.attrs["codec"]["name"] == codec
    for k in ("lse", "label_logit", "label", "sample_id"):  # kept exact by every codec
        np.testing.assert_array_equal(getattr(got, k), getattr(ref, k), err_msg=k)
    span = ref.topk_logits[:, :1] - ref.topk_logits[:, -1:]
    same_ids = (np.sort(got.topk_ids, 1) == np.sort(ref.topk_ids, 1)).all()
    if codec == "q8":
        bound = span / 510
    else:  # the row's compander scale β, as stored
        from loca_pipe.pipeline.codecs import BETAS
        from loca_pipe.pipeline.lm.streaming import TokenTeacher

        beta = BETAS[TokenTeacher(str(tmp_path / "c"))._coded["topk_beta"][:].astype(int)]
        bound = beta * np.expm1(span / beta) / (2 * 63)
    # the codecs' stated bounds (τ0 = 1), doubled by the mass guard's shift; ids matched by value order
    assert same_ids and (np.abs(got.topk_logits - ref.topk_logits) <= 2 * bound + 1e-5).all()
    with pytest.raises(StoreConflictError, match=rf"written with codec '{codec}'; this run asks for codec 'lossless'"):
        _cache(tmp_path / "c", teacher, tok, enc, top_k=8)


def test_xarray_opens_a_compact_token_store(tmp_path, teacher, tok, enc):
    """dimension_names on the codec, sampled, greedy and index arrays: xarray.open_zarr reads every group."""
    xr = pytest.importorskip("xarray")
    _cache(tmp_path / "s", teacher, tok, enc, top_k=8, codec="compact", sample_draws=4, greedy_max_new_tokens=3)
    t = xr.open_zarr(str(tmp_path / "s"), group="teachers/t", consolidated=False)
    root = xr.open_zarr(str(tmp_path / "s"), consolidated=False)
    R = int(enc.response_len.sum())
    assert t.sizes["row"] == root.sizes["row"] == R and t.sizes["draw"] == 4
    assert {"topk_code", "topk_idlo", "sampled_ids", "greedy_ids", "lse"} <= set(t.data_vars)
    assert {"offsets", "position", "label"} <= set(root.data_vars)
