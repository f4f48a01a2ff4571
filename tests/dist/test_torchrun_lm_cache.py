"""`lm-cache` under torchrun: 2 real concurrent ranks (gloo, CPU) write one token store — row chunks and the
greedy responses sharded between them — bit-identical to a single-process `lm-cache` of the same data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loca_pipe.pipeline.store import LogitStore
from tests.helpers import zarr_arrays

from .conftest import subprocess_env, torchrun


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """data/train.jsonl, tokenizer/ and a tiny LLaMA teacher folder, as a user brings them."""
    from loca_pipe.pipeline.lm import models, text, tokenizer

    root = tmp_path_factory.mktemp("lm-torchrun")
    raw = text.default_text(40_000)
    tokenizer.train_tokenizer(text.sentences(raw), 300, root / "tokenizer")
    tok = tokenizer.load_tokenizer(root / "tokenizer")
    text.write_jsonl(root / "data" / "train.jsonl", text.continuation_pairs(raw)[:40])
    models.save_lm(models.build_lm("llama", len(tok), 32, 1, 2, 64, tok, seed=3), tok, root / "teacher")
    return root


def _workdir(user_folder: Path, name: str) -> Path:
    w = user_folder / name
    shutil.copytree(user_folder / "data", w / "data")
    shutil.copytree(user_folder / "tokenizer", w / "tokenizer")
    return w


@pytest.mark.slow
def test_two_ranks_write_the_one_process_token_store(user_folder):
    params = user_folder / "params.yaml"
    params.write_text(yaml.safe_dump({
        "lm_base": {"max_length": 40, "threads": 1, "device": "cpu"},
        "lm_cache": {"teacher": str(user_folder / "teacher"), "top_k": 4, "temperatures": [1.0, 2.0],
                     "sample_draws": 4, "greedy_max_new_tokens": 4, "chunk_rows": 64, "batch_size": 8}}))
    exe = str(Path(sys.executable).with_name("loca-pipe"))
    one = _workdir(user_folder, "one")
    res = subprocess.run([exe, "lm-cache", "--params", str(params), "--workdir", str(one)], cwd=user_folder,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = _workdir(user_folder, "two")
    res = subprocess.run(torchrun(2, "lm-cache", "--params", str(params), "--workdir", str(two)), cwd=user_folder,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = zarr_arrays(one / "store.zarr"), zarr_arrays(two / "store.zarr")
    assert want.keys() == got.keys() and {"teachers/teacher/sampled_ids", "teachers/teacher/greedy_ids"} <= want.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k
    store = LogitStore.open(str(two / "store.zarr"))
    assert store.info.num_chunks > 2 and store.is_complete("teacher")
    assert store.teacher_attrs("teacher")["run"]["num_processes"] == 2
    assert LogitStore.open(str(one / "store.zarr")).teacher_attrs("teacher")["run"]["num_processes"] == 1
    rep = json.loads((two / "cache_report.json").read_text())  # written once, by rank 0
    assert rep["complete"] and rep["num_processes"] == 2
