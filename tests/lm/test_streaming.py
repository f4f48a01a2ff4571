"""The token store streamed: LM analysis block by block equals the in-memory version; students read batches of
sequences from a shuffle buffer with bounded memory; a bad chunk mid-stream is named and loses nothing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError, StoreError
from loca_pipe.pipeline.lm import analysis, cache, models, streaming, students, trainer
from tests.helpers import small_token_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained_teacher, tok, enc):
    return small_token_store(tmp_path_factory.mktemp("tokstore"), trained_teacher, tok, enc)


@pytest.mark.parametrize("block_rows", [32, 96, 1 << 16])
def test_streamed_analysis_equals_in_memory(store, tmp_path, block_rows):
    c = cache.open_lm_cache(store, "t")
    tab = analysis.token_table(c, 2.0, 0.9)
    ref = analysis.summarize(tab)
    assert 0 < ref["mis_instructed"] < ref["tokens"]
    got = analysis.analyze_streamed(streaming.TokenTeacher(store, "t"), 2.0, 0.9, tmp_path, block_rows=block_rows)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-6), k  # float64 running sums vs numpy's float32 mean
        else:
            assert got[k] == v, k  # counts, ratios of counts, buckets: exactly
    t = pq.read_table(tmp_path / "tokens.parquet").to_pydict()
    for k, v in tab.items():
        assert np.array_equal(np.asarray(t[k]), v), k  # every per-token value bit for bit
    assert json.loads((tmp_path / "metrics.json").read_text())["tokens"] == ref["tokens"]


def _corrupt(store, array="topk_logits", chunk=2):
    from pathlib import Path

    f = Path(store) / "teachers" / "t" / array / "c" / str(chunk) / "0"
    raw = bytearray(f.read_bytes())
    raw[7] ^= 0x10
    f.write_bytes(bytes(raw))
    return f, raw


def test_bad_chunk_mid_stream_is_named_and_previous_outputs_stay(store, tmp_path_factory, tmp_path):
    import shutil

    s2 = str(tmp_path_factory.mktemp("bad") / "s.zarr")
    shutil.copytree(store, s2)
    out = tmp_path / "analysis"
    analysis.analyze_streamed(streaming.TokenTeacher(s2, "t"), 1.0, 0.9, out, block_rows=32)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    _corrupt(s2, chunk=2)
    with pytest.raises(StoreError, match=r"array 'teachers/t/topk_logits' .*chunk 2 \(rows 64\.\.95.*CRC32C"):
        analysis.analyze_streamed(streaming.TokenTeacher(s2, "t"), 1.0, 0.9, out, block_rows=32)
    after = {f.name: f.read_bytes() for f in out.iterdir() if not f.name.endswith(".tmp")}
    assert after == before  # nothing written before is lost or half-replaced
    # a student streaming the same store meets the chunk when its block is read, and names it
    src = streaming.open_teacher(s2, "t", memory_limit_mb=0.02, seed=0)
    assert isinstance(src, streaming.StreamedTeacher)
    with pytest.raises(StoreError, match=r"chunk 2 \(rows 64\.\.95"):
        for _ in range(200):
            src.batch(src.next_batch(4))


def test_streamed_batches_cover_every_sequence_once_per_epoch_with_bounded_memory(store):
    t = streaming.TokenTeacher(store, "t")
    limit_mb = 0.02  # 20 KiB: the whole teacher (~ tens of KiB) does not fit
    assert t.nbytes() > limit_mb * 2**20
    src = streaming.open_teacher(store, "t", memory_limit_mb=limit_mb, seed=3)
    assert isinstance(src, streaming.StreamedTeacher) and src.buffer_blocks >= 1
    mem = cache.open_lm_cache(store, "t")
    seen = []
    while len(seen) < t.num_sequences:
        idx = src.next_batch(5)
        got = src.batch(idx)
        want = students.teacher_rows(mem, idx)
        for k in ("topk_logits", "topk_ids", "lse", "label_logit", "sampled_ids", "sampled_counts"):
            assert np.array_equal(got[k], want[k]), k
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(t.num_sequences))  # one epoch: each sequence exactly once
    assert src.peak_buffer_bytes <= limit_mb * 2**20
    assert src.next_batch(5).size  # the next epoch starts
    whole = streaming.open_teacher(store, "t", memory_limit_mb=64)
    assert isinstance(whole, streaming.InMemoryTeacher)  # fits: loaded whole, batches as before streaming


def test_student_loss_streamed_equals_in_memory_and_trains(store, tok, enc, tmp_path):
    mem = cache.open_lm_cache(store, "t")
    src = streaming.open_teacher(store, "t", memory_limit_mb=0.02, seed=0)
    kd = students.KDSettings(tau=2.0, alpha=0.9)
    student = models.build_lm("llama", len(tok), 32, 1, 2, 64, tok, seed=2)
    idx = src.next_batch(6)
    zs, ys = models.response_logits(student, [enc.ids[i] for i in idx], enc.prompt_len[idx], tok.pad_token_id)
    for method in ("kd", "loca", "kd_sampled"):
        kd_m = kd if method != "kd_sampled" else students.KDSettings(tau=1.0)
        a = students.make_loss(method, src, kd_m)(zs, ys, idx)
        b = students.make_loss(method, mem, kd_m)(zs, ys, idx)
        assert torch.equal(a, b), method
    hist = trainer.train(student, enc, students.make_loss("loca", src, kd), trainer.TrainSettings(
        batch_size=4, steps=4, lr=1e-3, log_every=1), pad_id=tok.pad_token_id, out_dir=tmp_path / "ck", teacher=src)
    assert np.isfinite(trainer.final_loss(hist))


def test_memory_limit_below_one_block_is_refused(store):
    with pytest.raises(ConfigError, match=r"memory_limit_mb=1e-05 is below one block of the token store"):
        streaming.open_teacher(store, "t", memory_limit_mb=1e-5)
    with pytest.raises(ConfigError, match="memory_limit_mb must be a positive"):
        streaming.open_teacher(store, "t", memory_limit_mb=0)
