"""Students from local Hugging Face folders (GPT-2, LLaMA, Qwen2 configs built here), the vocabulary check
before training, and the fused vocabulary-scale loss in the students (equal to the unfused one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from loca_pipe.pipeline.errors import ModelError
from loca_pipe.pipeline.lm import cache, models, streaming, students, text, tokenizer, trainer
from tests.helpers import small_token_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher, tok, enc):
    return small_token_store(tmp_path_factory.mktemp("hfstore"), teacher, tok, enc)


def _folder(tmp_path, arch, vocab, tok=None):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    small = dict(vocab_size=vocab)
    cfg = {"gpt2": GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, **small),
           "llama": LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=64, **small),
           "qwen2": Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=64, **small)}[arch]
    torch.manual_seed(0)
    out = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_student_from_a_hf_folder_trains_with_the_fused_loss(tmp_path, store, tok, enc, arch):
    # Qwen2's tokenizer class (chosen by transformers from the model type) adds <|endoftext|> to a saved BPE, so
    # the check would rightly refuse it: that folder carries no tokenizer and is checked by its output size
    folder = _folder(tmp_path, arch, len(tok), tok if arch != "qwen2" else None)
    model = models.load_lm(folder)
    students.check_student_vocab(model, folder, tok, len(tok))
    src = streaming.open_teacher(store, "t", memory_limit_mb=0.02)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = trainer.train(model, enc, students.make_loss("loca", src, students.KDSettings(tau=2.0), fused=True),
                         trainer.TrainSettings(batch_size=4, steps=3, lr=1e-3, log_every=1),
                         pad_id=tok.pad_token_id, out_dir=tmp_path / "ck", teacher=src)
    assert np.isfinite(trainer.final_loss(hist))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["kd", "loca", "kd_sampled", "kd_star"])
def test_fused_student_loss_and_gradients_equal_the_unfused(store, tok, enc, method):
    c = cache.open_lm_cache(store, "t")
    kd = students.KDSettings(tau=1.0 if method == "kd_sampled" else 2.0, alpha=0.9, beta=0.6, gamma=0.4)
    model = models.build_lm("gpt2", len(tok), 32, 1, 2, 64, tok, seed=3).eval()  # eval: no dropout noise
    idx = np.array([1, 4, 9, 2])
    seqs = [enc.ids[i] for i in idx]

    def grads(fused):
        model.zero_grad()
        if fused:
            h, y = models.response_hidden(model, seqs, enc.prompt_len[idx], tok.pad_token_id)
            loss = students.make_loss(method, c, kd, fused=True, chunk_rows=5)(h, y, idx, model.get_output_embeddings())
        else:
            z, y = models.response_logits(model, seqs, enc.prompt_len[idx], tok.pad_token_id)
            loss = students.make_loss(method, c, kd)(z, y, idx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=2e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=2e-6, msg=n)


def test_tokenizer_and_vocabulary_mismatches_are_refused(tmp_path, tok, lm_text):
    other = tokenizer.train_tokenizer(text.sentences(lm_text), 320, tmp_path / "tok320")
    folder = _folder(tmp_path, "gpt2", 320, other)
    with pytest.raises(ModelError, match=r"first differing token id \d+: teacher has .*, student has .* \(teacher "
                                         rf"vocabulary {len(tok)}, student 320\)"):
        students.check_student_vocab(models.load_lm(folder), folder, tok, len(tok))
    bare = _folder(tmp_path / "bare", "llama", len(tok) + 64)  # no tokenizer, padded embeddings
    with pytest.raises(ModelError, match=rf"outputs {len(tok) + 64} logits but the teacher's vocabulary has {len(tok)}"):
        students.check_student_vocab(models.load_lm(bare), bare, tok, len(tok))


def test_identical_tokenizer_under_other_file_names_is_accepted(tmp_path, tok):
    """The student's folder keeps the same BPE as vocab.json + merges.txt (GPT-2 files) instead of tokenizer.json."""
    folder = _folder(tmp_path, "gpt2", len(tok))
    tok.backend_tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": tok.bos_token,
        "eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.eos_token}))
    names = sorted(p.name for p in folder.iterdir())
    assert "tokenizer.json" not in names and {"vocab.json", "merges.txt"} <= set(names)
    student_tok = tokenizer.load_tokenizer(folder)
    assert student_tok.get_vocab() == tok.get_vocab()
    students.check_student_vocab(models.load_lm(folder), folder, tok, len(tok))  # no error


def test_a_folder_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import T5Config

    folder = tmp_path / "t5"  # an encoder-decoder: a common wrong folder to hand a causal-LM student
    T5Config(vocab_size=300, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(str(folder))
    with pytest.raises(ModelError, match=r"is not a causal language model: its config is model_type 't5'"):
        models.load_lm(folder)


@pytest.mark.slow
def test_console_script_streams_a_store_above_the_limit_and_refuses_bad_students(tmp_path):
    """Through the installed `loca-pipe`: a student whose teacher store exceeds memory_limit_mb streams it (and
    says so); a limit below one block, a folder that is not a causal LM and a student with another vocabulary
    each get one `error:` line, exit 1, before any training."""
    from tests.lm.test_cli import TINY

    exe = shutil.which("loca-pipe", path=str(Path(sys.executable).parent))

    def run(*args, params="params.yaml"):
        return subprocess.run([exe, *args, "--params", params], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    for cmd in ("lm-prepare", "lm-tokenizer", "lm-train-teacher", "lm-cache"):
        r = run(cmd)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    store = tmp_path / "w" / "store.zarr"
    rows = int(json.loads((tmp_path / "w" / "cache_report.json").read_text())["rows"])

    def with_student(name, **kw):
        p = {**TINY, "lm_train_student": {**TINY["lm_train_student"], "method": "loca", **kw}}
        (tmp_path / name).write_text(yaml.safe_dump(p))
        return run("lm-train-student", params=name)

    limit = rows * 4 * (4 + 4 + 1 + 1) / 2**20 / 3  # a third of the loca arrays (k=4 logits + ids, lse, label)
    r = with_student("stream.yaml", memory_limit_mb=limit)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "w" / "students" / "loca-s0" / "metrics.json").read_text())
    assert m["teacher_rows"] == "streamed" and m["teacher_buffer_peak_mib"] <= limit
    r = with_student("tiny.yaml", memory_limit_mb=1e-6)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: memory_limit_mb=1e-06 is below one block")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    from transformers import T5Config

    T5Config(vocab_size=300, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(str(tmp_path / "t5"))
    r = with_student("t5.yaml", init_from=str(tmp_path / "t5"))
    assert r.returncode == 1 and "error: " in r.stderr and "is not a causal language model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _folder(tmp_path, "llama", 364)  # no tokenizer, another vocabulary size
    r = with_student("v.yaml", init_from=str(tmp_path / "llama"))
    assert r.returncode == 1 and "outputs 364 logits but the teacher's vocabulary has 300 tokens" in r.stderr
    assert store.exists()
