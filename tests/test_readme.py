"""The README cannot rot: every command in it is run by a test here or by CI.

- the walk-through block is run line by line on the real default data;
- the Python API block is executed;
- every other command line is mapped to the test (or CI) that runs it, and an unmapped one fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _walkthrough() -> list[str]:
    block = README.split("<!-- readme-walkthrough -->", 1)[1]
    return [ln for ln in re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1).splitlines() if ln.strip()]


# Commands run elsewhere: the line → where it runs.
ELSEWHERE = {
    "make repro": "tests/test_pipeline_dvc.py::test_make_repro_runs_the_whole_pipeline",
    "make test": ".ci/run (CI)",
    # ~9 min on the 2-core machine (~30 min under load), too long for the suite: its stages run on tiny
    # data in tests/lm/test_cli.py
    "make repro-lm": "tests/lm/test_cli.py (every lm-* stage, tiny data)",
    "make bench": "tests/test_benchmarks.py (quick mode, same entry point)",
    "dvc exp show --drop '.*' --keep 'Experiment|Created|analyze\\.alpha|[a-z]+\\.loca-a[0-9.]+\\.delta'":
        "tests/test_pipeline_dvc.py::test_make_repro_runs_the_whole_pipeline (the README line itself)",
    ".venv/bin/python -m benchmarks cache losses": "tests/test_benchmarks.py",
    "LOCA_BENCH_QUICK=1 .venv/bin/python -m benchmarks": "tests/test_benchmarks.py",
}


def test_every_readme_command_is_run_somewhere():
    walk = set(_walkthrough())
    missing = [ln for ln in _command_lines() if ln not in walk and ln not in ELSEWHERE]
    assert not missing, f"README commands no test runs: {missing}; add them to a test"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "$(BIN)/python -m pytest" in (ROOT / "Makefile").read_text()


def test_python_api_example_runs():
    (code,) = _blocks("python")
    exec(compile(code, "README.md", "exec"), {})


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="make setup installs dataset-fashion-mnist")
def test_walkthrough_runs_on_the_default_data(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for line in _walkthrough():
        proc = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README line failed: {line}\n{(proc.stdout + proc.stderr)[-3000:]}"
    report = (tmp_path / "data/walk-report/report.md").read_text()
    assert "KD" in report and "LoCa" in report
    assert (tmp_path / "data/walk-analysis/figures/mis_instruction.png").exists()
