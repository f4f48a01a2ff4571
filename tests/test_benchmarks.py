"""Smoke test of the benchmark entry point the README gives (`python -m benchmarks`), in quick mode.

It checks that every benchmark runs and prints its ratios — never how fast anything is (timed assertions
have no place on a shared, noisy machine; the numbers are read by people).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _names() -> list[str]:
    from benchmarks.__main__ import available

    return available()


def test_the_benchmarks_the_readme_names_exist():
    assert {"cache", "losses", "analyze", "train", "lm"} <= set(_names())


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_every_benchmark_runs_in_quick_mode(tmp_path, name):
    """One process per benchmark (as `python -m benchmarks NAME` runs it), so each is its own test."""
    env = {**os.environ, "LOCA_BENCH_QUICK": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", name], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"=== {name} done" in out, f"benchmark {name} did not finish:\n{out[-3000:]}"
    body = proc.stdout.split(f"=== benchmark: {name} ===", 1)[-1].split(f"=== {name} done", 1)[0]
    assert len([line for line in body.splitlines() if line.strip()]) >= 2, f"benchmark {name} printed no results:\n{out}"


def test_unknown_benchmark_lists_the_valid_ones():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "available:" in proc.stderr and "losses" in proc.stderr
