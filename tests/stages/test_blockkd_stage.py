"""Block-KD through the installed `loca-pipe train-student`, as a user runs it: a run, and every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
LOCA_PIPE = str(Path(sys.executable).parent / "loca-pipe")
DS = "toy_student_module:dataset"

pytestmark = pytest.mark.slow


def _teacher(tmp: Path, arch: str, seed: int, name: str) -> tuple[str, torch.nn.Module]:
    from loca_pipe.pipeline.data import open_dataset
    from loca_pipe.pipeline.models import build_model

    spec = open_dataset(DS, "train")
    torch.manual_seed(seed)
    t = build_model(arch, 10, 1, 8).eval()
    ck = tmp / f"{name}.pt"
    torch.save(t.state_dict(), ck)
    Path(f"{ck}.json").write_text(json.dumps({"arch": arch, "num_classes": 10, "dataset": DS,
                                              "fingerprint": spec.fingerprint}))
    return str(ck), t


def _store(tmp: Path, teacher: torch.nn.Module, arch: str, name: str) -> str:
    from helpers import write_teacher

    from loca_pipe.pipeline.caching import weights_sha256
    from loca_pipe.pipeline.data import open_dataset
    from loca_pipe.pipeline.store import LogitStore, StoreInfo

    spec = open_dataset(DS, "train")
    n = len(spec)
    info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=10, chunk_rows=64,
                     dataset={"name": DS, "split": "train", "fingerprint": spec.fingerprint})
    path = str(tmp / name)
    store = LogitStore.create_or_open(path, info)
    w = store.begin_teacher("t", {"teacher": arch, "weights_sha256": weights_sha256(teacher)}, top_k=3,
                            temperatures=(4.0,))
    with torch.no_grad():
        z = teacher(spec.dataset.x)
    write_teacher(store, w, z, spec.labels, 3, (4.0,))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    tmp = tmp_path_factory.mktemp("blockkd")
    ck, t = _teacher(tmp, "cnn", 0, "cnn")
    other, _ = _teacher(tmp, "cnn", 1, "other")
    flat_ck, flat = _teacher(tmp, "toy_blockkd_module:flat", 0, "flat")
    return {"tmp": tmp, "ck": ck, "other": other, "store": _store(tmp, t, "cnn", "s.zarr"),
            "flat_ck": flat_ck, "flat_store": _store(tmp, flat, "toy_blockkd_module:flat", "flat.zarr")}


def cli(env: dict, out: str, *args: str, store: str | None = None) -> subprocess.CompletedProcess:
    base = [LOCA_PIPE, "train-student", "--store", store or env["store"], "--dataset", DS, "--student", "cnn_small",
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out-dir", str(env["tmp"] / out),
            "--no-progress", "--no-amp"]
    pp = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": pp})


def _one_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


def test_blockkd_loca_trains_and_saves_the_connectors(env):
    proc = cli(env, "ok", "--methods", "blockkd,blockkd_loca", "--alpha", "0.9", "--teacher-checkpoint", env["ck"],
               "--cross", "0.25", "--cross-distance", "mse", "--max-samples", "100")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((env["tmp"] / "ok" / "blockkd_loca-a0.9-s0" / "metrics.json").read_text())
    assert m["method"] == "blockkd_loca" and m["cross"] == 0.25 and m["cross_distance"] == "mse"
    assert m["test_top1"] is not None and len(m["teacher_checkpoint_sha256"]) == 64
    assert m["train_size"] == 100 and m["max_samples"] == 100  # the first 100 of the 240 training images
    ck = torch.load(env["tmp"] / "ok" / "blockkd-s0" / "checkpoint.pt", weights_only=False)
    assert set(ck["connectors"]) >= {"0.0.weight", "1.1.running_mean"}
    assert not any(k.startswith("_teacher") for k in ck["model"])


def test_alpha_at_least_one_with_blockkd_loca_warns_and_runs(env):
    proc = cli(env, "a1", "--method", "blockkd_loca", "--alpha", "1.0", "--teacher-checkpoint", env["ck"])
    assert proc.returncode == 0, proc.stderr
    assert "alpha=1.0 >= 1" in proc.stderr


def test_refusals(env):
    _one_error(cli(env, "r1", "--method", "blockkd"), "is Block-KD: its stepping-stone hybrids run the teacher's blocks")
    _one_error(cli(env, "r2", "--method", "blockkd", "--teacher-checkpoint", env["other"]),
               "was cached from other weights")
    _one_error(cli(env, "r3", "--method", "blockkd", "--teacher-checkpoint", env["ck"], "--student", "mlp_small"),
               "same number of blocks in student and teacher; student 'mlp_small' declares 1, teacher 'cnn' declares 2")
    _one_error(cli(env, "r4", "--method", "blockkd", "--teacher-checkpoint", env["flat_ck"], store=env["flat_store"]),
               "architecture 'toy_blockkd_module:flat' declares no blocks")
    _one_error(cli(env, "r5", "--method", "blockkd", "--teacher-checkpoint", env["ck"], "--cross-distance", "l1"),
               "cross_distance must be one of ['kl', 'mse']")
    _one_error(cli(env, "r6", "--method", "kd", "--max-samples", "0"), "max_samples must be ≥ 1")
    for r in ("r1", "r2", "r3", "r4", "r5", "r6"):  # nothing written for a refused run
        assert not list((env["tmp"] / r).glob("*/metrics.json"))
