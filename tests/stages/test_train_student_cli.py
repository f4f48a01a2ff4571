"""train-student's bad input through the installed console script: one `error:` line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LOCA_PIPE = str(Path(sys.executable).parent / "loca-pipe")
DS = "toy_student_module:dataset"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from test_train_student import make_store, make_teacher

    tmp = tmp_path_factory.mktemp("cli")
    _, teacher = make_teacher(tmp)
    return make_store(tmp, teacher)


def cli(tmp_path: Path, store: str, *args: str) -> subprocess.CompletedProcess:
    base = [LOCA_PIPE, "train-student", "--store", store, "--dataset", DS, "--student", "mlp_small", "--epochs", "1",
            "--batch-size", "64", "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=600, env=env)


def _one_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


def test_a_second_run_into_the_same_folder_is_refused_then_overwritten(tmp_path, store):
    assert cli(tmp_path, store, "--method", "loca", "--alpha", "0.9").returncode == 0
    first = (tmp_path / "runs" / "loca-a0.9-s0" / "metrics.json").stat().st_mtime_ns
    proc = cli(tmp_path, store, "--method", "loca", "--alpha", "0.9", "--tau", "2")
    _one_error(proc, "already holds a run (metrics.json, checkpoint.pt); pass --resume to continue it, --overwrite")
    assert (tmp_path / "runs" / "loca-a0.9-s0" / "metrics.json").stat().st_mtime_ns == first  # untouched
    assert cli(tmp_path, store, "--method", "loca", "--alpha", "0.9", "--tau", "2", "--overwrite").returncode == 0
    assert json.loads((tmp_path / "runs" / "loca-a0.9-s0" / "metrics.json").read_text())["tau"] == 2.0


def test_duplicate_runs_in_one_sweep_are_refused(tmp_path, store):
    _one_error(cli(tmp_path, store, "--methods", "kd", "--seeds", "0,0"), "two runs of this sweep would both write")
    assert not (tmp_path / "runs").exists()


def test_student_with_the_wrong_output_count_names_both_numbers(tmp_path, store):
    proc = cli(tmp_path, store, "--method", "ce", "--student", "toy_student_module:five_outputs")
    _one_error(proc, "student 'toy_student_module:five_outputs' outputs 5 classes but data set "
                     "'toy_student_module:dataset' has 10 classes")


def test_alpha_above_one_warns_runs_and_names_alpha_not_the_learning_rate(tmp_path, store):
    ok = cli(tmp_path, store, "--method", "loca", "--alpha", "1.0")
    assert ok.returncode == 0, ok.stderr
    assert "alpha" in ok.stderr.lower() or "α" in ok.stderr  # the loud warning of the calibration library
    bad = cli(tmp_path, store, "--method", "loca", "--alpha", "1.2")
    if bad.returncode == 0:
        pytest.skip("α = 1.2 kept every label probability ≥ 0 on this toy store")  # pragma: no cover
    _one_error(bad, "α = 1.2 ≥ 1, not from the optimiser: use α < 1")
    assert "learning rate" not in bad.stderr
    assert "LoCa α=1.2 ≥ 1: prediction correctness" in bad.stderr.split("error:")[0]  # warned before training
    assert not (tmp_path / "runs" / "loca-a1.2-s0").exists()  # and no empty run folder is left (issue #20)


def test_unknown_group_is_named(tmp_path, store):
    _one_error(cli(tmp_path, store, "--teacher", "mlp_small", "--group", "loca"),
               "--group 'loca' needs train_student.groups to have an entry for teacher 'mlp_small'")
