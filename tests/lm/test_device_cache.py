"""The LM teacher at a device and a dtype: load_lm's options, bf16 caching (summaries in fp32 from the bf16
logits), the provenance a store records, and the user errors through the installed `loca-pipe`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.lm import cache, models, text
from loca_pipe.pipeline.store import LogitStore
from tests.helpers import zarr_arrays

EXE = str(Path(sys.executable).with_name("loca-pipe"))
DATASET = {"name": "t", "fingerprint": "f"}


def _cli(args, cwd):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_error_line(res) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), res.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, teacher, tok):
    out = tmp_path_factory.mktemp("teacher")
    models.save_lm(teacher, tok, out)
    return out


def test_load_lm_defaults_stay_fp32_on_the_cpu(teacher_dir):
    m = models.load_lm(teacher_dir)
    where = models.placement(m)
    assert where["dtype"] == "float32" and where["device"] == "cpu" and where["device_map"] is None
    assert all(p.dtype is torch.float32 for p in m.parameters())


def test_load_lm_dtype_and_attention_pass_through(teacher_dir, enc, tok):
    m = models.load_lm(teacher_dir, device="cpu", dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert models.placement(m)["attn_implementation"] == "eager"
    z, _ = models.response_logits(m, enc.ids[:2], enc.prompt_len[:2], tok.pad_token_id)
    assert z.dtype is torch.bfloat16
    sdpa = models.load_lm(teacher_dir, attn_implementation="sdpa")
    assert models.placement(sdpa)["attn_implementation"] == "sdpa"
    with pytest.raises(ConfigError, match="unknown attn_implementation 'fast'; expected one of auto, sdpa, eager"):
        models.load_lm(teacher_dir, attn_implementation="fast")
    with pytest.raises(ConfigError, match="unknown device_map 'balanced'"):
        models.load_lm(teacher_dir, device_map="balanced")


def test_device_map_auto_loads_through_accelerate(teacher_dir, enc, tok, monkeypatch):
    """device_map='auto' goes to from_pretrained (accelerate places the model; on this GPU-less machine all of
    it stays on the CPU, so transformers records no device map) and the logits are the one-device ones."""
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    m = models.load_lm(teacher_dir, device_map="auto")
    assert seen[-1]["device_map"] == "auto"
    assert models.input_device(m) == torch.device("cpu")
    z, y = models.response_logits(m, enc.ids[:3], enc.prompt_len[:3], tok.pad_token_id)
    ref, _ = models.response_logits(models.load_lm(teacher_dir), enc.ids[:3], enc.prompt_len[:3], tok.pad_token_id)
    assert "device_map" not in seen[-1]
    torch.testing.assert_close(z, ref)


def test_bf16_forward_summaries_equal_fp32_maths_on_the_same_bf16_logits(tmp_path, teacher_dir, tok, enc):
    """The store's lse per τ, label logit and top-k from a bf16 teacher are computed in fp32 from its bf16 logits:
    equal (to fp32 rounding of the reduction) to an independent fp32 computation on those same logits, and
    measurably different from the fp32 teacher's (so the test would see an fp32 forward or a bf16 reduction)."""
    taus = (1.0, 2.0)
    m16 = models.load_lm(teacher_dir, dtype=torch.bfloat16)
    rep = cache.cache_teacher(str(tmp_path / "s.zarr"), "t", m16, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                              top_k=5, temperatures=taus, dataset=DATASET, provenance={}, chunk_rows=100_000,
                              batch_size=len(enc))
    c = cache.open_lm_cache(str(tmp_path / "s.zarr"))
    with torch.inference_mode():  # the same single batch the cache ran
        z16, y = models.response_logits(m16, enc.ids, enc.prompt_len, tok.pad_token_id)
        z32, _ = models.response_logits(models.load_lm(teacher_dir), enc.ids, enc.prompt_len, tok.pad_token_id)
    assert z16.dtype is torch.bfloat16
    z = z16.double()  # reference in float64 from the bf16 values: no fp32 reduction-order question
    for t, tau in enumerate(taus):
        ref = torch.logsumexp(z / tau, dim=1).numpy()
        np.testing.assert_allclose(c.lse[:, t], ref, rtol=2e-6, atol=2e-6)
        fp32_teacher = torch.logsumexp(z32.double() / tau, dim=1).numpy()
        assert np.abs(c.lse[:, t] - fp32_teacher).max() > 1e-3  # a bf16 forward, not the fp32 one
    np.testing.assert_array_equal(c.label_logit, z.gather(1, y.view(-1, 1)).squeeze(1).float().numpy())
    np.testing.assert_array_equal(c.label, y.numpy())
    np.testing.assert_array_equal(c.topk_logits, torch.topk(z16.float(), 5, dim=1).values.numpy())
    # the stored ids point at those logits (bf16 ties may order equal values either way)
    np.testing.assert_array_equal(np.take_along_axis(z16.float().numpy(), c.topk_ids.astype(np.int64), 1), c.topk_logits)
    attrs = LogitStore.open(str(tmp_path / "s.zarr")).teacher_attrs("t")
    assert attrs["dtype"] == "bfloat16" and attrs["run"]["device"] == "cpu" and attrs["run"]["num_processes"] == 1
    assert rep.extra["dtype"] == "bfloat16" and rep.extra["num_processes"] == 1


def test_resuming_in_another_dtype_is_a_conflict(tmp_path, teacher_dir, tok, enc):
    from loca_pipe.pipeline.errors import StoreConflictError

    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, top_k=3, temperatures=(1.0,), dataset=DATASET,
              provenance={}, chunk_rows=64, max_chunks=1)
    cache.cache_teacher(str(tmp_path / "s.zarr"), "t", models.load_lm(teacher_dir), enc, **kw)
    with pytest.raises(StoreConflictError, match="dtype: store has 'float32', this run has 'bfloat16'"):
        cache.cache_teacher(str(tmp_path / "s.zarr"), "t", models.load_lm(teacher_dir, dtype=torch.bfloat16), enc, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, teacher_dir, tok, pairs):
    """A user's folder for the lm-* commands: data split, tokenizer, teacher folder, one params file."""
    root = tmp_path_factory.mktemp("user")
    w = root / "w"
    text.write_jsonl(w / "data" / "train.jsonl", pairs)
    tok.save_pretrained(str(w / "tokenizer"))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "lm_base": {"workdir": "w", "max_length": 40, "threads": 1},
        "lm_cache": {"teacher": str(teacher_dir), "top_k": 4, "temperatures": [1.0], "sample_draws": 0,
                     "greedy_max_new_tokens": 0, "chunk_rows": 128}}))
    return root


@pytest.mark.slow
def test_lm_cache_cli_bf16_records_the_run(workdir):
    res = _cli(["lm-cache", "--device", "cpu", "--dtype", "bfloat16", "--attn-implementation", "eager"], workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((workdir / "w" / "cache_report.json").read_text())
    assert rep["complete"] and rep["dtype"] == "bfloat16" and rep["device"] == "cpu"
    assert rep["attn_implementation"] == "eager" and rep["num_processes"] == 1 and rep["device_map"] is None
    attrs = LogitStore.open(str(workdir / "w" / "store.zarr")).teacher_attrs("teacher")
    assert attrs["dtype"] == "bfloat16" and attrs["attn_implementation"] == "eager"
    # a store whose τ list lacks the τ asked for: one line naming the cached ones
    line = _one_error_line(_cli(["lm-analyze", "--tau", "3"], workdir))
    assert "3" in line and "1.0" in line, line


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_device_and_dtype_errors(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    line = _one_error_line(_cli(["lm-cache", "--device", "cuda"], tmp_path))
    assert line == "error: device 'cuda' asked for, but this machine has no CUDA GPU (devices here: cpu); use " \
                   "--device cpu or auto", line
    line = _one_error_line(_cli(["lm-cache", "--device", "cpu", "--dtype", "float16"], tmp_path))
    assert "float16 is not supported on the CPU" in line
    assert not (tmp_path / "lm-work").exists() and not (tmp_path / "store.zarr").exists()  # nothing written


def test_length_buckets_write_the_same_store(tmp_path, teacher, tok, enc):
    """Batches grouped by length (windows of 12 sequences, batches of 4, chunks that cut sequences) write the
    store batches in data order write: every integer array (ids, labels, offsets, positions, flags, greedy
    responses) bit for bit, the float summaries to fp32 rounding (other batch shapes, other GEMM blocking) —
    and pad less."""
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, top_k=4, temperatures=(1.0, 2.0), dataset=DATASET,
              provenance={}, chunk_rows=150, batch_size=4, greedy_max_new_tokens=3, greedy_chunk=8)
    plain = cache.cache_teacher(str(tmp_path / "a.zarr"), "t", teacher, enc, **kw)
    bucketed = cache.cache_teacher(str(tmp_path / "b.zarr"), "t", teacher, enc, length_window=12, **kw)
    assert plain.complete and bucketed.complete and bucketed.extra["length_window"] == 12
    a, b = zarr_arrays(str(tmp_path / "a.zarr")), zarr_arrays(str(tmp_path / "b.zarr"))
    assert a.keys() == b.keys() and "teachers/t/lse" in a
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=2e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    info = LogitStore.open(str(tmp_path / "a.zarr")).info
    chunks = list(range(info.num_chunks))
    jobs = [cache.TokenJob(teacher, enc, tok.pad_token_id, 4, info, w) for w in (0, 12)]
    forward = [[s.tolist() for _, (s, _) in j.batches(chunks)] for j in jobs]
    assert len(chunks) > 1 and forward[0] != forward[1]  # the bucketed batches really are other batches
    assert jobs[1].padding(chunks) < jobs[0].padding(chunks)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 7), st.integers(0, 20),
       st.integers(0, 39), st.integers(1, 40))
def test_length_groups_cover_each_sequence_once_sorted_within_windows(lengths, batch, window, i0, span):
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    enc = Encoded([np.arange(n + 1) for n in lengths], np.ones(len(lengths), np.int64))
    i0 = min(i0, len(lengths) - 1)
    i1 = min(len(lengths), i0 + span)
    job = cache.TokenJob(None, enc, 0, batch, None, window)
    groups = job.groups(i0, i1)
    assert sorted(np.concatenate(groups).tolist()) == list(range(i0, i1))
    assert all(1 <= len(g) <= batch for g in groups)
    if window > 1:  # inside each window of `window` sequences the forward order is by length
        flat = np.concatenate(groups)
        for w in range(0, len(flat), window):
            L = job.lengths[flat[w:w + window]]
            assert (np.diff(L) >= 0).all()
