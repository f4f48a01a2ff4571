"""`python -m benchmarks gpu` (benchmarks/gpu.py): one clear line and status 3 where no GPU exists, and every
part of the check — LM teacher caching in bf16, an LM student step from the store, image cache-logits and a
student epoch — run on tiny models on the CPU (`--device cpu --tiny`), so the code paths are tested here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    res = _bench(tmp_path=tmp_path)
    assert res.returncode == 3 and res.stdout == "", res.stderr[-2000:]
    assert res.stderr.strip() == ("benchmarks gpu: this check needs a CUDA GPU: device 'cuda' asked for, but this "
                                  "machine has no CUDA GPU (devices here: cpu); use --device cpu or auto "
                                  "(`--device cpu --tiny` runs its code paths on tiny models)")
    res = _bench("--device", "cpu", tmp_path=tmp_path)
    assert res.returncode == 3 and "--device cpu runs only with --tiny" in res.stderr


@pytest.mark.slow
def test_tiny_cpu_run_goes_through_every_part(tmp_path):
    res = _bench("--device", "cpu", "--tiny", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for part in ("[LM teacher]", "[LM student]", "[image teacher]", "[image student]"):
        assert part in out, out
    assert "bfloat16, sdpa, on cpu" in out and out.count("RATIO caching ÷ forward") == 2
    assert "ms/step" in out and "img/s" in out and '"num_processes": 1' in out
    assert not list(tmp_path.glob("loca_gpu_check_*"))  # its temporary folder is removed
