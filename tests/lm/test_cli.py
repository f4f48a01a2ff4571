"""The lm-* commands end to end on a tiny configuration, through typer's CliRunner, plus user errors."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from loca_pipe.cli.main import app

TINY = {
    "lm_base": {"workdir": "w", "seed": 0, "template": "chat", "max_length": 40, "threads": 1},
    "lm_prepare": {"source": "default", "text_chars": 60000, "train_size": 40, "val_size": 8, "test_size": 8},
    "lm_tokenizer": {"vocab_size": 300},
    "lm_train_teacher": {"d_model": 32, "n_layers": 1, "n_heads": 2, "steps": 5, "batch_size": 8, "max_new_tokens": 5},
    "lm_cache": {"top_k": 4, "temperatures": [1.0], "sample_draws": 4, "greedy_max_new_tokens": 5, "chunk_rows": 128},
    "lm_analyze": {"tau": 1.0},
    "lm_train_student": {"d_model": 32, "n_layers": 1, "n_heads": 2, "steps": 3, "batch_size": 8, "max_new_tokens": 5},
}


def _run(args, cwd):
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    return r


@pytest.mark.slow
def test_lm_pipeline_through_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import importlib

    from loca_pipe.stages import Report

    returned: dict[str, str] = {}
    for name in ("prepare", "tokenizer", "train_teacher", "cache", "analyze", "train_student", "report"):
        mod = importlib.import_module(f"loca_pipe.stages.lm.{name}")

        def checked(p, _run=mod.run, _name=name):  # what each stage's run really returns (the contract)
            rep = _run(p)
            returned[_name] = type(rep).__name__ if not isinstance(rep, Report) else rep.stage
            return rep

        monkeypatch.setattr(mod, "run", checked)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    for cmd in (["lm-prepare"], ["lm-tokenizer"], ["lm-train-teacher"], ["lm-cache"], ["lm-analyze"],
                ["lm-train-student", "--method", "loca", "--seed", "1"],
                ["lm-train-student", "--method", "seqkd", "--seed", "0"], ["lm-report"]):
        r = _run(cmd, tmp_path)
        assert r.exit_code == 0, (cmd, r.output)
    assert returned == {n: f"lm_{n}" for n in ("prepare", "tokenizer", "train_teacher", "cache", "analyze",
                                                "train_student", "report")}, returned
    w = tmp_path / "w"
    rep = json.loads((w / "cache_report.json").read_text())
    assert rep["complete"] and rep["prompt_tokens_stored"] == 0 and rep["rows"] > 0
    table = (w / "report" / "table.md").read_text()
    assert _run(["lm-report", "--quiet"], tmp_path).stdout == f"report: {w.relative_to(tmp_path) / 'report' / 'table.md'}\n"
    assert "| loca | 1 |" in table and "| seqkd | 1 |" in table
    assert json.loads((w / "analysis" / "metrics.json").read_text())["tokens"] == rep["rows"]
    # a second lm-cache run finds everything written: nothing to redo
    r = _run(["lm-cache"], tmp_path)
    assert r.exit_code == 0 and json.loads(r.stdout)["chunks_written"] == 0
    # --overwrite re-caches a complete teacher (#14); --codec stores it compactly; readers decode it
    r = _run(["lm-cache", "--overwrite", "--codec", "compact"], tmp_path)
    assert r.exit_code == 0 and json.loads(r.stdout)["chunks_written"] > 0, r.output
    from loca_pipe.pipeline.errors import StoreConflictError
    from loca_pipe.pipeline.lm.cache import open_lm_cache

    assert open_lm_cache(str(w / "store.zarr")).attrs["codec"]["name"] == "compact"
    assert "codec compact v2" in _run(["info", str(w / "store.zarr")], tmp_path).output
    assert _run(["lm-analyze"], tmp_path).exit_code == 0
    with pytest.raises(StoreConflictError, match="written with codec 'compact'; this run asks for codec 'lossless'"):
        _run(["lm-cache"], tmp_path)
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("loca-pipe"))  # the installed console script: one line, exit 1
    res = subprocess.run([exe, "lm-cache", "--codec", "q8"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: teacher 'teacher' in ") and \
        "was written with codec 'compact'; this run asks for codec 'q8'; resume with --codec compact" in res.stderr


def test_cli_user_errors(tmp_path, monkeypatch):
    from loca_pipe.pipeline.errors import ConfigError, DataError

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "lm_prepare": {"source": str(bad), "val_size": 0,
                                                                                 "test_size": 0}}))
    with pytest.raises(DataError, match="bad.jsonl line 2: not valid JSON"):
        _run(["lm-prepare"], tmp_path)
    r = _run(["lm-prepare", "--on-bad-line", "skip"], tmp_path)
    assert r.exit_code == 0 and json.loads(r.stdout) == {"sizes": {"val": 0, "test": 0, "train": 1}, "bad_lines": 1}
    with pytest.raises(ConfigError, match="--temperatures takes comma-separated values"):
        _run(["lm-cache", "--temperatures", "1,x"], tmp_path)
    (tmp_path / "p2.yaml").write_text(yaml.safe_dump({"lm_base": {"max_lenght": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_lenght'\]"):
        _run(["lm-report", "--params", "p2.yaml"], tmp_path)
