"""`loca-pipe lm-plan` and the paper preset (lm/presets/paper-llama7b-tinyllama.yaml): the dry run reads model
configs and tokenizers, never weights, and its numbers are checked against independent references — the
LLaMA parameter formula, the arrays a real `lm-cache` writes, the tokens it caches."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loca_pipe.pipeline.lm import models, text

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "lm" / "presets" / "paper-llama7b-tinyllama.yaml"
EXE = str(Path(sys.executable).with_name("loca-pipe"))


def _cli(args, cwd):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def llama_parameters(V: int, d: int, layers: int, heads: int, kv_heads: int, ff: int, tied: bool) -> int:
    """LLaMA's parameter count by hand: embeddings (+ an untied output layer), per layer q/k/v/o, the SwiGLU's
    three matrices and two RMSNorms, and the final norm."""
    kv = d // heads * kv_heads
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * d
    return V * d * (1 if tied else 2) + layers * per_layer + d


def _config_only_folder(path: Path, tok, **cfg) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))


LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


@pytest.mark.slow
def test_paper_preset_plans_from_configs_alone(tmp_path, tok, pairs):
    """The preset as shipped, on folders holding only config.json + tokenizer (no weights) and a tiny Dolly file
    (the split sizes scaled down): LLaMA-7B's 6.74 B parameters, 13.5 GB in bf16, TinyLLaMA's 1.1 B, the store's
    bytes per token, 20 student runs; nothing written."""
    p = yaml.safe_load(PRESET.read_text())
    assert p["lm_base"]["max_length"] == 512 and p["lm_train_student"]["batch_size"] == 60
    assert p["lm_train_student"]["lr"] == 1e-5 and p["lm_train_student"]["epochs"] == 10
    assert len(p["lm_plan"]["seeds"]) == 5 and p["lm_prepare"]["train_size"] == 14000
    _config_only_folder(tmp_path / p["lm_cache"]["teacher"], tok, **LLAMA_7B)
    _config_only_folder(tmp_path / p["lm_train_student"]["init_from"], tok, **TINYLLAMA)
    text.write_jsonl(tmp_path / p["lm_prepare"]["source"], pairs)
    p["lm_prepare"].update(train_size=16, val_size=4, test_size=4)
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(p))
    res = _cli(["lm-plan", "--params", "paper.yaml"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads(res.stdout)
    t, s = plan["teacher"], plan["student"]
    assert t["parameters"] == llama_parameters(32000, 4096, 32, 32, 32, 11008, tied=False) == 6_738_415_616
    assert t["dtype"] == "bfloat16" and t["weights_gb"] == pytest.approx(6_738_415_616 * 2 / 1e9)
    assert t["weight_files"] == []  # configs only: the plan never needed weights
    assert s["parameters"] == llama_parameters(32000, 2048, 22, 32, 4, 5632, tied=False) == 1_100_048_384
    c = plan["cache"]
    # k = 20 fp32 values + int16 ids, one lse, the label logit; sample_id, label (int64), view (int16), position
    assert c["bytes_per_token"] == 20 * (4 + 2) + 4 + 4 + 8 + 8 + 2 + 4
    assert plan["train_sequences"] == 16 and c["response_tokens"] > 16
    assert c["store_gb"] == pytest.approx((c["response_tokens"] * c["bytes_per_token"] + 16 * (8 + 4 * 256)) / 1e9)
    assert c["teacher_forward_tflop"] == pytest.approx(2 * 6_738_415_616 * c["forward_tokens"] / 1e12)
    assert plan["students"]["runs"] == 20 and plan["students"]["steps_per_run"] == math.ceil(16 / 60) * 10
    assert plan["problems"] == [] and not (tmp_path / p["lm_base"]["workdir"]).exists()


@pytest.mark.slow
def test_plan_lists_every_missing_piece_in_one_line(tmp_path):
    res = _cli(["lm-plan", "--params", str(PRESET)], tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: lm-plan found 4 problem(s): teacher folder 'models/llama-7b-dolly' has no "
                           "config.json; student folder 'models/tinyllama-1.1b' has no config.json"), line
    assert "lm_prepare.source 'data/databricks-dolly-15k.jsonl' does not exist" in line
    assert json.loads(res.stdout)["problems"]  # the plan itself is printed first


@pytest.mark.slow
def test_plan_on_tiny_folders_matches_what_lm_cache_writes(tmp_path, teacher, tok, pairs):
    """The same code path on a real tiny teacher: the plan's response tokens and truncations are the ones
    `lm-cache` then caches, and its bytes per token is the sum over the row arrays the store really has."""
    from loca_pipe.pipeline.store import LogitStore

    w = tmp_path / "w"
    models.save_lm(teacher, tok, tmp_path / "teacher")
    tok.save_pretrained(str(w / "tokenizer"))
    text.write_jsonl(tmp_path / "dolly.jsonl", pairs)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "lm_base": {"workdir": "w", "max_length": 24, "threads": 1, "device": "cpu"},
        "lm_prepare": {"source": "dolly.jsonl", "train_size": 16, "val_size": 4, "test_size": 4},
        "lm_cache": {"teacher": str(tmp_path / "teacher"), "top_k": 5, "temperatures": [1.0, 2.0],
                     "sample_draws": 3, "greedy_max_new_tokens": 0, "chunk_rows": 64}}))
    res = _cli(["lm-plan"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads(res.stdout)
    assert plan["teacher"]["dtype"] == "float32" and plan["teacher"]["parameters"] == sum(
        x.numel() for x in teacher.parameters())
    for cmd in (["lm-prepare"], ["lm-cache"]):
        r = _cli(cmd, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((w / "cache_report.json").read_text())
    assert plan["cache"]["response_tokens"] == rep["tokens"] and plan["train_sequences"] == rep["sequences"]
    assert plan["cache"]["truncated_sequences"] == rep["truncated_sequences"] > 0
    store = LogitStore.open(str(w / "store.zarr"))
    row_bytes = 0
    for group in (store.group, store.group["teachers"]["teacher"]):
        for name, arr in group.arrays():
            if arr.shape and arr.shape[0] == rep["tokens"] and name not in ("done", "rows_done"):
                row_bytes += np.dtype(arr.dtype).itemsize * math.prod(arr.shape[1:])
    assert plan["cache"]["bytes_per_token"] == row_bytes


@pytest.mark.slow
def test_plan_of_the_default_pipeline_before_it_ran(tmp_path):
    """lm/params.yaml with an empty workdir: the teacher and tokenizer are the pipeline's own outputs, so their
    absence is no problem; the split is the default text's 3,000 training pairs."""
    res = _cli(["lm-plan", "--params", str(ROOT / "lm" / "params.yaml"), "--workdir", str(tmp_path / "w")], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert plan["teacher"]["note"].startswith("made by lm-train-teacher") and plan["tokenizer"]["path"] is None
    assert plan["train_sequences"] == 3000 and plan["students"]["runs"] == 15 and plan["problems"] == []
    assert not (tmp_path / "w").exists()
