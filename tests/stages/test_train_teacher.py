"""`loca-pipe prepare-data` and `loca-pipe train-teacher` through typer's CliRunner, on real Fashion-MNIST."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from loca_pipe.cli.main import app
from loca_pipe.pipeline import data as D
from loca_pipe.pipeline.data import get_batch, open_dataset
from loca_pipe.pipeline.errors import ConfigError, ModelError
from loca_pipe.pipeline.models import build_model, load_checkpoint
from loca_pipe.stages.train_teacher import TrainTeacherParams, load_params, metrics_path

pytestmark = pytest.mark.skipif(not (D.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist not installed")
runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("fm")
    result = runner.invoke(app, ["prepare-data", "--root", str(r)])
    assert result.exit_code == 0, result.output
    assert "fashion-mnist train: 60000 samples, 10 classes, 1x28x28" in result.output
    return r


def _train(root: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train-teacher", "--arch", "mlp_small", "--root", str(root), "--epochs", "1",
                               "--batch-size", "64", "--max-samples", "300", "--device", "cpu", "--no-progress", "--threads", "1",
                               "--out", str(out), *extra])


def test_prepare_data_records_fingerprints(root):
    fp = json.loads((root / "fingerprints.json").read_text())
    assert fp["splits"]["test"]["num_samples"] == 10000
    assert fp["splits"]["train"]["fingerprint"] == open_dataset("fashion-mnist", "train", str(root)).fingerprint


def test_train_teacher_writes_checkpoint_sidecar_and_metrics(root, tmp_path):
    out = tmp_path / "t" / "weak.pt"
    threads_before = torch.get_num_threads()
    result = _train(root, out, "--seed", "3")
    assert result.exit_code == 0, result.output
    side = json.loads(Path(f"{out}.json").read_text())
    metrics = json.loads(metrics_path(out).read_text())
    assert metrics_path(out) == tmp_path / "t" / "weak.metrics.json"
    assert {k: side[k] for k in ("arch", "num_classes", "in_channels", "image_size", "dataset", "num_train")} == {
        "arch": "mlp_small", "num_classes": 10, "in_channels": 1, "image_size": 28, "dataset": "fashion-mnist",
        "num_train": 300}
    assert side["fingerprint"] == open_dataset("fashion-mnist", "train", str(root)).fingerprint
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert side["params"]["seed"] == 3 and side["params"]["max_samples"] == 300
    assert not list(out.parent.glob(".*tmp*"))  # atomic writes leave no temporaries

    # the checkpoint loads into a fresh model, and its accuracy, recomputed here, is the recorded one
    model = build_model("mlp_small", 10, 1, 28)
    assert load_checkpoint(model, out) == side["sha256"]
    test = open_dataset("fashion-mnist", "test", str(root))
    x, y = get_batch(test.dataset, range(300))
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert side["test_top1"] == metrics["test_top1"] == pytest.approx(100 * acc, abs=1e-4)  # percent
    assert metrics["train_mis_instruction"] == pytest.approx(1 - metrics["train_top1"] / 100)
    assert metrics["threads"] == 1 and torch.get_num_threads() == threads_before  # restored after the run
    assert 0.3 < acc < 1.0  # 300 samples, one epoch: far better than chance (0.1)


@pytest.mark.slow
def test_train_teacher_is_deterministic_for_a_seed(root, tmp_path):
    sds = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _train(root, tmp_path / f"{name}.pt", "--seed", seed).exit_code == 0
        sds.append(torch.load(tmp_path / f"{name}.pt"))
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    assert not torch.equal(sds[0]["1.weight"], sds[2]["1.weight"])


def test_train_teacher_reads_one_teacher_entry_of_params(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_teacher": {
        "root": str(root), "epochs": 1, "max_samples": 200, "device": "cpu", "progress": False,
        "out_dir": str(tmp_path / "models"),
        "teachers": {"weak": {"arch": "mlp_small"}, "strong": {"arch": "cnn", "epochs": 3}}}}))
    p = load_params(str(params), name="strong")
    assert (p.name, p.arch, p.epochs, p.max_samples) == ("strong", "cnn", 3, 200)
    assert p.checkpoint == tmp_path / "models" / "strong.pt"
    result = runner.invoke(app, ["train-teacher", "--params", str(params), "--name", "weak", "--batch-size", "50"])
    assert result.exit_code == 0, result.output
    side = json.loads((tmp_path / "models" / "weak.pt.json").read_text())
    assert (side["arch"], side["params"]["batch_size"], side["num_train"]) == ("mlp_small", 50, 200)


@pytest.mark.parametrize("args, params, error, match", [
    (["--arch", "resnet21"], {}, ModelError, r"unknown model 'resnet21'"),
    (["--name", "nobody"], {"teachers": {"weak": {}}}, ConfigError, r"train_teacher.teachers has no entry 'nobody'; it has \['weak'\]"),
    ([], {"teachers": {"weak": {}}}, ConfigError, r"pick one with --name KEY"),
    ([], {"epochs": "two"}, ConfigError, r"train_teacher.epochs: expected an integer, got 'two'"),
    ([], {"learning_rate": 0.1}, ConfigError, r"unknown key\(s\) \['learning_rate'\]"),
    (["--epochs", "0"], {}, ConfigError, r"must be positive; got epochs=0"),
    (["--threads", "0"], {}, ConfigError, r"train_teacher.threads must be ≥ 1 or null, got 0"),
])
def test_train_teacher_bad_input(args, params, error, match, root, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train_teacher": {"root": str(root), "out_dir": str(tmp_path), **params}}))
    result = runner.invoke(app, ["train-teacher", "--params", str(path), "--max-samples", "50", "--no-progress", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, error)
    assert re.search(match, str(result.exception)), str(result.exception)


def test_params_defaults_are_the_fast_default_teacher():
    p = TrainTeacherParams()
    assert (p.arch, p.dataset, p.optimizer, p.checkpoint) == ("cnn", "fashion-mnist", "adam", Path("models/teachers/cnn.pt"))
