"""analyze on a dask LocalCluster of 2 worker processes, and train-student under torchrun with DDP (2 ranks,
gloo on CPU): both equal to one process (DDP: up to float summation order, documented in docs/scale-out.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from loca_pipe.stages.cache_logits import CacheParams, run

from .conftest import REPO, subprocess_env, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student_store(tmp_path_factory) -> str:
    """The toy student data set (240 samples, 10 classes) cached by the toy linear teacher, two teachers."""
    path = tmp_path_factory.mktemp("dist") / "s.zarr"
    for name in ("teacher", "teacher_b"):
        run(CacheParams(teacher=f"toy_cache_module:{name}", dataset="toy_student_module:dataset", store=str(path),
                        top_k=3, temperatures=(1.0, 4.0), chunk_rows=64, batch_size=64, device="cpu", num_workers=0,
                        progress=False, name=name))
    return str(path)


def test_analyze_on_local_cluster_equals_single_process(student_store, tmp_path):
    from loca_pipe.stages.analyze import AnalyzeParams, run as analyze

    res = subprocess.run([sys.executable, "-m", "tests.dist.cluster_analyze", student_store, str(tmp_path / "cluster")],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cluster = json.loads(res.stdout.strip().splitlines()[-1])["teachers"]
    single = analyze(AnalyzeParams(store=student_store, out=str(tmp_path / "single"), tau=4.0, alpha=(0.9, 0.95),
                                   figures=False, samples=True))["teachers"]
    single = json.loads(json.dumps(single, default=str))
    assert set(cluster) == {"teacher", "teacher_b"}
    for t in cluster:
        assert cluster[t] == single[t], t
        assert cluster[t]["rows"] == 240
    for f in ("per_class.csv", "confusions.csv", "histograms.csv", "teachers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cluster" / f), pd.read_csv(tmp_path / "single" / f))


def test_ddp_two_ranks_match_one_process(student_store, tmp_path):
    from loca_pipe.stages.train_student import TrainStudentParams
    from loca_pipe.stages.train_student import run as train

    # batch 25: 240 = 9·25 + 15, so ranks get 13 and 12 rows of a batch (unequal shards, weighted exactly)
    kw = dict(teacher="teacher", dataset="toy_student_module:dataset", student="mlp_small", epochs=2,
              batch_size=25, lr=0.1, device="cpu", method="loca", alpha=0.9)
    one = train(TrainStudentParams(store=student_store, out_dir=str(tmp_path / "one"), progress=False, threads=1, **kw))
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump({"train_student": {**kw, "store": student_store,
                                                        "out_dir": str(tmp_path / "ddp")}}))
    res = subprocess.run(torchrun(2, "train-student", "--params", str(params), "--no-progress"),
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 reports
    run_dir = tmp_path / "ddp" / "loca-a0.9-s0"
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["data_order"] == one["data_order"]  # hashed from the global batches, before sharding
    for k in ("train_loss", "train_top1"):  # over every rank's rows: the whole epoch
        assert ddp[k] == pytest.approx(one[k], rel=1e-4, abs=1e-4), k
    assert abs(ddp["test_top1"] - one["test_top1"]) <= 100 / 120 + 1e-9  # at most one of 120 test images
    w1 = torch.load(tmp_path / "one" / "loca-a0.9-s0" / "checkpoint.pt", weights_only=False)["model"]
    w2 = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert w1.keys() == w2.keys()  # rank 0 saved the unwrapped model (no "module." prefix)
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), rtol=0, atol=2e-5, err_msg=k)
