"""#21: the examples under examples/ run as a user runs them (a subprocess), and each one's student learns:
its KD loss over the last steps is below the first step's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["plain_pytorch_loop.py", "hf_trainer.py"])
def test_example_runs_and_its_student_learns(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"steps (\d+) loss first ([\d.]+) last ([\d.]+)", res.stdout)
    assert m, res.stdout[-2000:]
    steps, first, last = int(m[1]), float(m[2]), float(m[3])
    assert steps == 24 and last < 0.8 * first
