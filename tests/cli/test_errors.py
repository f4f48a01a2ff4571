"""The error table of the command line, through the installed console script in a subprocess: every bad
invocation prints exactly one `error: …` line (usage errors add the usage line and the --help hint), never a
traceback, and exits with the documented code (2 usage, 1 bad input or state, 0 help)."""

from __future__ import annotations

import pytest

from .conftest import run_cli

USAGE, ERROR = 2, 1


def _fill(args, **where):
    return [a.format(**where) for a in args]


def _one_error_line(r, code: int, match: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert "Traceback" not in out, out
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert match.lower() in errors[0].lower(), errors[0]


# Usage errors: found by the parser before any library import (each case is a fraction of a second).
USAGE_CASES = [
    ("unknown-option", ["analyze", "s.zarr", "--alpah", "0.9"], "no such option: --alpah"),
    ("unknown-option-suggests", ["analyze", "s.zarr", "--alpah", "0.9"], "--alpha"),
    ("unknown-command", ["analyse", "s.zarr"], "no such command 'analyse'. did you mean 'analyze'"),
    ("not-an-integer", ["train-student", "--epochs", "abc"], "invalid value for '--epochs'"),
    ("not-a-number", ["analyze", "--tau", "warm"], "invalid value for '--tau'"),
    ("bad-choice", ["cache-logits", "--logits-dtype", "bf16"], "'bf16' is not one of 'float32', 'float16', 'none'"),
    ("bad-choice-preset", ["train-student", "--preset", "fast"], "invalid value for '--preset'"),
    ("missing-option-value", ["calibrate", "s.zarr", "--alpha"], "option '--alpha' requires an argument"),
    ("extra-argument", ["info", "a.zarr", "b.zarr"], "unexpected extra argument"),
    ("unknown-root-option", ["--colour"], "no such option: --colour"),
]


@pytest.mark.parametrize("key, args, match", USAGE_CASES, ids=[c[0] for c in USAGE_CASES])
def test_usage_errors(key, args, match):
    r = run_cli(args)
    _one_error_line(r, USAGE, match)
    assert r.stderr.splitlines()[1].startswith("Usage: loca-pipe"), r.stderr
    assert "--help' for help" in r.stderr


@pytest.mark.parametrize("args", [[], ["--help"]], ids=["bare", "help"])
def test_bare_command_prints_help_and_exits_0(args):
    r = run_cli(args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "Usage: loca-pipe" in r.stdout and "cache-logits" in r.stdout and "verify" in r.stdout


def test_version():
    r = run_cli(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("loca-pipe ")


# Bad input found by the commands (each case imports the library: a few seconds).
@pytest.mark.slow
@pytest.mark.parametrize("key, args, match", [
    ("two-stores", ["info", "a.zarr", "--store", "b.zarr"], "two stores given: 'a.zarr' as the argument and 'b.zarr'"),
    ("folder-not-a-store", ["info", "{tmp}"], "is not a loca-pipe logit store: a folder without zarr.json"),
    ("nothing-there", ["analyze", "--store", "{tmp}/nothing.zarr"], "no logit store at"),
    ("misspelled-section", ["analyze", "{store}", "--params", "{tmp}/bad.yaml"],
     "unknown section 'analyse'; did you mean 'analyze'?"),
    ("bad-comma-list", ["calibrate", "{store}", "--alpha", "0.9;0.95", "--out", "{tmp}/t.zarr"],
     "--alpha takes comma-separated values"),
    ("plots-not-a-project", ["plots", "--repo", "{tmp}"], "no dvc.yaml in"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "{" not in v else None)
def test_bad_input(key, args, match, tmp_path, toy_store):
    (tmp_path / "bad.yaml").write_text("analyse:\n  alpha: [0.9]\n")
    r = run_cli(_fill(args, store=toy_store, tmp=tmp_path), cwd=tmp_path)
    _one_error_line(r, ERROR, match)


# Unwritable outputs: refused in one line before the expensive work (nothing written, nothing trained).
@pytest.mark.slow
@pytest.mark.parametrize("key, args, match", [
    ("analyze", ["analyze", "{store}", "--out", "{ro}/analysis"], "cannot write analysis results to '{ro}/analysis'"),
    ("calibrate", ["calibrate", "{store}", "--out", "{ro}/t.zarr", "--metrics", "{tmp}/c.json"],
     "cannot write the targets store to '{ro}/t.zarr'"),
    ("calibrate-metrics", ["calibrate", "{store}", "--out", "{tmp}/t.zarr", "--metrics", "{ro}/c.json"],
     "cannot write the calibrate metrics to '{ro}/c.json'"),
    ("train-student", ["train-student", "--store", "{store}", "--out-dir", "{ro}/students", "--epochs", "1"],
     "cannot write student runs to '{ro}/students'"),
    ("report", ["report", "--runs-dir", "{tmp}/runs", "--out-dir", "{ro}/report"], "cannot write the report to"),
    ("train-teacher", ["train-teacher", "--arch", "toy_cache_module:teacher", "--dataset", "toy_cache_module:dataset",
                       "--out", "{ro}/t.pt", "--epochs", "1"], "cannot write the teacher checkpoint to '{ro}/t.pt'"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "{" not in v else None)
def test_unwritable_outputs(key, args, match, tmp_path, toy_store, readonly_dir):
    where = dict(store=toy_store, ro=readonly_dir, tmp=tmp_path)
    r = run_cli(_fill(args, **where), cwd=tmp_path)
    _one_error_line(r, ERROR, match.format(**where))
    assert "read-only" in r.stderr or "permission denied" in r.stderr
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "c.json").exists()  # nothing begun
