"""#21: lm-export — Parquet that `datasets` reads in Axolotl's column convention; the exported log-probs equal the
store's re-derived ones to fp32 precision; LoCa recomputed from the export equals the store's; bad input through
the installed CLI (a τ the store lacks, another tokenizer, a newer codec version) is one error line, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loca_pipe.pipeline.lm import cache
from loca_pipe.pipeline.lm.dataset import TokenStoreDataset
from loca_pipe.pipeline.lm.export import PAD_LOGPROB, export_parquet


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained_teacher, tok, enc):
    path = tmp_path_factory.mktemp("exp") / "s.zarr"
    cache.cache_teacher(str(path), "t", trained_teacher, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        top_k=4, temperatures=(1.0, 2.0), dataset={"name": "x", "split": "train", "fingerprint": "f"},
                        provenance={}, chunk_rows=32, batch_size=8, codec="compact")
    return str(path)


def test_distillkit_export_round_trips_through_lm_import(store, enc, tmp_path):
    """lm-export --format distillkit → lm-import gives the store back to the precision the format allows: the same
    rows, positions and labels, ids exactly, log-probs z − lse_1 to fp32 rounding, the label's log-prob where it is
    in the top-k and a flag (unknown, bounded by the tail) exactly where it is not. The names list is the CLI's."""
    from loca_pipe.pipeline import names
    from loca_pipe.pipeline.lm import export, import_distillkit as imp
    from loca_pipe.pipeline.lm.streaming import TokenTeacher

    assert tuple(export.FORMATS) == names.LM_EXPORT_FORMATS
    info = export_parquet(TokenStoreDataset(store, enc, tau=1.0), tmp_path / "dk.parquet", rows_per_group=7,
                          format="distillkit")
    d = _load(tmp_path / "dk.parquet")
    assert set(d.column_names) == {"input_ids", "labels", "token_ids", "top_values"} and info["format"] == "distillkit"
    assert all(len(d[i]["token_ids"]) == len(enc.ids[i]) - 1 for i in range(len(enc)))
    c = cache.open_lm_cache(store)
    imp.import_distillkit(str(tmp_path / "dk.parquet"), str(tmp_path / "back.zarr"), vocab_size=c.num_classes,
                          chunk_rows=13)
    t = TokenTeacher(str(tmp_path / "back.zarr"))
    b = t.read(0, t.num_rows)
    np.testing.assert_array_equal(t.offsets, c.offsets)
    for k in ("sample_id", "position", "label"):
        np.testing.assert_array_equal(b[k], getattr(c, k))
    np.testing.assert_array_equal(b["topk_ids"], c.topk_ids)
    ref = c.topk_logits.astype(np.float64) - c.lse[:, :1].astype(np.float64)
    np.testing.assert_allclose(b["topk_logits"], ref, rtol=2e-7, atol=2e-6)
    hit = c.topk_ids == c.label[:, None]
    inside = hit.any(1)
    assert 0 < inside.sum() < len(inside)
    np.testing.assert_array_equal(b["import_flags"] & imp.LABEL_UNKNOWN, np.where(inside, 0, imp.LABEL_UNKNOWN))
    np.testing.assert_allclose(b["label_logit"][inside], ref[hit], rtol=2e-7, atol=2e-6)


def _load(path):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def test_export_round_trips_to_fp32_precision(store, enc, tmp_path):
    info = export_parquet(TokenStoreDataset(store, enc, tau=2.0), tmp_path / "e.parquet", rows_per_group=5)
    assert info["sequences"] == len(enc) and info["codec"]["name"] == "compact"
    d = _load(tmp_path / "e.parquet")
    assert {"input_ids", "labels", "attention_mask", "target_token_ids", "target_logprobs", "target_mask",
            "label_logprob", "tail_mass", "label_in_topk", "sample_id"} <= set(d.column_names)
    c = cache.open_lm_cache(store)  # the store, decoded: the reference is z/τ − lse_τ in fp64
    ref_lp = c.topk_logits.astype(np.float64) / 2.0 - c.lse[:, 1:2].astype(np.float64)
    # the label: its exact stored logit outside the top-k, its (decoded) top-k entry inside it
    hit = c.topk_ids == c.label[:, None]
    zl = np.where(hit.any(1), (c.topk_logits * hit).sum(1), c.label_logit).astype(np.float64)
    ref_label = zl / 2.0 - c.lse[:, 1].astype(np.float64)
    for i in range(len(enc)):
        row = d[i]
        P, L = int(enc.prompt_len[i]), len(enc.ids[i])
        assert row["sample_id"] == i and row["input_ids"] == enc.ids[i].tolist()
        assert row["labels"] == [-100] * P + enc.ids[i][P:].tolist()
        mask = np.array(row["target_mask"])
        assert mask.shape == (L, 4) and (mask[:, 0] == [P - 1 <= j < L - 1 for j in range(L)]).all()
        lp, ids = np.array(row["target_logprobs"], np.float32), np.array(row["target_token_ids"])
        at = slice(P - 1, L - 1)
        r = slice(int(c.offsets[i]), int(c.offsets[i + 1]))
        np.testing.assert_array_equal(ids[at], c.topk_ids[r])  # row j → token j + 1
        assert (np.abs(lp[at] - ref_lp[r]) <= np.spacing(np.abs(ref_lp[r]).astype(np.float32))).all()  # ≤ 1 fp32 ulp
        lab = np.array(row["label_logprob"], np.float32)[at]
        assert (np.abs(lab - ref_label[r]) <= np.spacing(np.abs(ref_label[r]).astype(np.float32))).all()
        assert (lp[mask == 0] == np.float32(PAD_LOGPROB)).all()
    meta = json.loads(__import__("pyarrow.parquet", fromlist=["x"]).read_schema(tmp_path / "e.parquet")
                      .metadata[b"loca_pipe"])
    assert meta["tau"] == 2.0 and meta["alpha"] is None and meta["top_k"] == 4


def test_loca_recomputed_from_the_export_equals_the_stores(store, enc, tmp_path):
    alpha = 0.7
    export_parquet(TokenStoreDataset(store, enc, tau=1.0), tmp_path / "p.parquet")
    export_parquet(TokenStoreDataset(store, enc, tau=1.0, alpha=alpha), tmp_path / "c.parquet")
    plain, cal = _load(tmp_path / "p.parquet"), _load(tmp_path / "c.parquet")
    n_mis = 0
    for i in range(len(enc)):
        a, b = plain[i], cal[i]
        m = np.array(a["target_mask"])[:, 0] == 1
        ids = np.array(a["target_token_ids"])[m]
        y = np.array(a["input_ids"])[1:][m[:-1]]
        p = np.exp(np.array(a["target_logprobs"], np.float64)[m])
        py = np.exp(np.array(a["label_logprob"], np.float64)[m])
        tail = np.array(a["tail_mass"], np.float64)[m]
        # LoCa from the exported columns alone (DESIGN §2): mis-instructed rows (top-1 ≠ y) only
        mis = ids[:, 0] != y
        pk = np.where(ids[:, 0] == y, p[:, 1], p[:, 0])
        s = alpha / (1 - py + pk)
        want = np.where(mis[:, None], np.where(ids == y[:, None], (1 - s * (1 - py))[:, None], s[:, None] * p), p)
        want_y = np.where(mis, 1 - s * (1 - py), py)
        want_tail = np.where(mis, s * tail, tail)
        np.testing.assert_allclose(np.exp(np.array(b["target_logprobs"], np.float64)[m]), want, rtol=2e-6, atol=1e-9)
        np.testing.assert_allclose(np.exp(np.array(b["label_logprob"], np.float64)[m]), want_y, rtol=2e-6, atol=1e-9)
        np.testing.assert_allclose(np.array(b["tail_mass"], np.float64)[m], want_tail, rtol=2e-6, atol=1e-7)
        n_mis += int(mis.sum())
    assert n_mis > 0


TINY = {
    "lm_base": {"workdir": "w", "seed": 0, "template": "plain", "max_length": 40, "threads": 1},
    "lm_prepare": {"source": "default", "text_chars": 60000, "train_size": 24, "val_size": 4, "test_size": 4},
    "lm_tokenizer": {"vocab_size": 300},
    "lm_train_teacher": {"d_model": 32, "n_layers": 1, "n_heads": 2, "steps": 5, "batch_size": 8, "max_new_tokens": 5},
    "lm_cache": {"top_k": 4, "temperatures": [1.0, 2.0], "chunk_rows": 64},
}


def _cli(args, cwd):
    exe = Path(sys.executable).parent / "loca-pipe"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_lm_export_through_the_installed_cli(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    for cmd in ("lm-prepare", "lm-tokenizer", "lm-train-teacher", "lm-cache"):
        r = _cli([cmd], tmp_path)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    r = _cli(["lm-export", "--tau", "2", "--alpha", "0.9"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "w" / "export" / "teacher-tau2-loca0.9.parquet"
    d = _load(out)
    assert len(d) == 24 and json.loads(r.stdout)["sequences"] == 24
    before = out.read_bytes()

    # a τ the store lacks
    r = _cli(["lm-export", "--tau", "3", "--out", str(out)], tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert "3.0" in r.stderr and "[1.0, 2.0]" in r.stderr, r.stderr
    # a tokenizer that is not the store's
    other = tmp_path / "other_tok"
    from loca_pipe.pipeline.lm import text, tokenizer

    tokenizer.train_tokenizer(text.sentences(text.default_text(20_000)), 280, other)
    r = _cli(["lm-export", "--tokenizer", str(other), "--out", str(out)], tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "is not the one the store was cached with" in r.stderr, r.stderr
    # a store written by a newer codec version
    import zarr

    g = zarr.open_group(str(tmp_path / "w" / "store.zarr" / "teachers" / "teacher"), mode="r+")
    key = next(k for k in g.attrs if isinstance(g.attrs[k], dict) and "temperatures" in g.attrs[k])
    a = dict(g.attrs[key])
    a["codec"] = {"name": "compact", "version": 99, "bits": 8}
    g.attrs[key] = a
    r = _cli(["lm-export", "--out", str(out)], tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "codec 'compact' version 99; this loca-pipe reads that codec up to version 2" in r.stderr, r.stderr
    assert out.read_bytes() == before  # nothing already written is lost
    assert not out.with_name(out.name + ".tmp").exists()
    shutil.rmtree(other)
