"""Stage `train-teacher`: train a baseline teacher on a data set and write its checkpoint.

Outputs, all written atomically (temporary file, then ``os.replace``), for checkpoint path ``OUT``:

* ``OUT`` — the plain state dict (``torch.save(model.state_dict())``);
* ``OUT.json`` — sidecar: arch, num_classes, in_channels, image_size, dataset, split, fingerprint,
  transform, test_top1 and train_top1 (percent), sha256 of ``OUT``, the training params and package versions;
* ``OUT`` with suffix ``.metrics.json`` — metrics for DVC (test/train top-1, mis-instruction rate on the
  training set, seconds, samples/s).

Training is :func:`loca_pipe.pipeline.training.fit_teacher`: cross-entropy through the students' loop
(``train_student``, with the NaN guard), with this stage's optimizer (adam / sgd) and per-step schedule.
Deterministic for a seed on a given machine: the weights are initialised after ``torch.manual_seed(seed)``
and the order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from loca_pipe.pipeline.data import open_dataset
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.guard import CHECKPOINT, FILE, check_outputs
from loca_pipe.pipeline.io import atomic_save, versions, write_json
from loca_pipe.pipeline.models import check_model_name, file_sha256, resolve_device, sidecar_path
from loca_pipe.pipeline.threads import torch_threads
from loca_pipe.pipeline.training import TrainConfig, fit_teacher
from loca_pipe.stages import Report
from loca_pipe.stages.config import check_writable

log = logging.getLogger(__name__)
SECTION = "train_teacher"


@dataclass(frozen=True)
class TrainTeacherParams:
    """One teacher's training run (section ``train_teacher``, optionally one entry of its ``teachers``)."""

    name: str | None = None  # teacher key; names the default output file
    arch: str = "cnn"  # build_model name or module:callable
    dataset: str = "fashion-mnist"
    root: str | None = None  # data set root (fashion-mnist default: data/fashion-mnist)
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: Literal["sgd", "adam"] = "adam"
    momentum: float = 0.9  # sgd only (Nesterov)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"  # per-step cosine decay to 0
    augment: Literal["none", "crop-flip"] = "none"  # view e of sample i in epoch e, replayable
    seed: int = 0
    device: str = "auto"
    out_dir: str = "models/teachers"
    out: str | None = None  # checkpoint path; default <out_dir>/<name or arch>.pt
    num_workers: int = 0  # DataLoader workers for data sets without an in-memory batch path
    max_samples: int | None = None  # use only the first N train and N test samples (tiny runs)
    eval_batch_size: int = 1000
    threads: int | None = None  # torch CPU threads for this run (None: torch's default, one per core)
    progress: bool = True

    @property
    def checkpoint(self) -> Path:
        return Path(self.out) if self.out else checkpoint_path(self.out_dir, self.name or self.arch.replace(':', '_'))


def checkpoint_path(out_dir: str | Path, name: str) -> Path:
    """Where teacher ``name`` is written under ``out_dir`` (and where ``cache.teachers_dir`` reads it): the
    one spelling of ``<dir>/<name>.pt``."""
    return Path(out_dir) / f"{name}.pt"


def metrics_path(checkpoint: str | Path) -> Path:
    """``models/teachers/cnn.pt`` → ``models/teachers/cnn.metrics.json``."""
    return Path(checkpoint).with_suffix(".metrics.json")


def load_params(params: dict[str, Any] | str | Path = "params.yaml", name: str | None = None,
                overrides: dict[str, Any] | None = None) -> TrainTeacherParams:
    """Params of section ``train_teacher``. The section may hold ``teachers: {KEY: {values}}``; ``name``
    picks the entry whose values override the section's common ones (``name`` defaults to KEY).
    ``overrides`` (CLI options; None = unset) apply last."""
    from loca_pipe.stages.config import build, read_params

    if not isinstance(params, dict):
        params = read_params(params)
    section = dict(params.get(SECTION) or {})
    teachers = section.pop("teachers", None) or {}
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not isinstance(teachers, dict):
        raise ConfigError(f"{SECTION}.teachers must map a teacher key to its values; got {type(teachers).__name__}")
    if name is None:
        if teachers:
            raise ConfigError(f"{SECTION}.teachers has entries {list(teachers)}; pick one with --name KEY")
        return build(TrainTeacherParams, {**section, **over}, SECTION)
    if teachers and name not in teachers:
        raise ConfigError(f"{SECTION}.teachers has no entry {name!r}; it has {list(teachers)}")
    entry = dict(teachers.get(name) or {})
    return build(TrainTeacherParams, {**section, "name": name, **entry, **over}, f"{SECTION}.teachers.{name}")


# ----------------------------------------------------------------------------------------------------

def run(p: TrainTeacherParams) -> Report:
    """Train, evaluate and write checkpoint + sidecar + metrics; the metrics are the report."""
    if p.threads is None:
        return _run(p)
    if p.threads < 1:
        raise ConfigError(f"{SECTION}.threads must be ≥ 1 or null, got {p.threads}")
    with torch_threads(p.threads):  # the one thread helper, pipeline/threads.py
        return _run(p)


def _run(p: TrainTeacherParams) -> Report:
    if p.epochs < 1 or p.batch_size < 1 or p.lr <= 0 or (p.max_samples is not None and p.max_samples < 1):
        raise ConfigError(f"{SECTION}: epochs, batch_size, lr and max_samples must be positive; got epochs={p.epochs}, "
                          f"batch_size={p.batch_size}, lr={p.lr}, max_samples={p.max_samples}")
    check_model_name(p.arch)  # before the data set is opened
    opt_name = "--out" if p.out else "--out-dir"  # before training: a trained teacher must never be lost
    check_outputs({"--root": p.root}, {opt_name: (p.checkpoint, CHECKPOINT),
                                       f"{opt_name} (sidecar)": (sidecar_path(p.checkpoint), CHECKPOINT),
                                       f"{opt_name} (metrics)": (metrics_path(p.checkpoint), FILE)})
    for path in (p.checkpoint, sidecar_path(p.checkpoint), metrics_path(p.checkpoint)):
        check_writable(path, "the teacher checkpoint", opt_name, kind="file")
    train = open_dataset(p.dataset, "train", p.root)
    test = open_dataset(p.dataset, "test", p.root)
    cfg = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                      weight_decay=p.weight_decay, milestones=(), nesterov=p.momentum > 0, seed=p.seed,
                      amp=False, eval_batch_size=p.eval_batch_size)
    fit = fit_teacher(p.arch, train, test, cfg, optimizer=p.optimizer, schedule=p.schedule, augment=p.augment,
                      device=resolve_device(p.device), max_samples=p.max_samples, progress=p.progress,
                      num_workers=p.num_workers,
                      progress_desc=f"train {p.name or p.arch}")
    model, m = fit.model, fit.metrics
    test_top1, train_top1, n_train, n_test = m["test_top1"], m["train_top1"], m["num_train"], m["num_test"]
    seconds = m["train_seconds"]

    ckpt = p.checkpoint
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, ckpt)
    metrics = {
        "test_top1": test_top1, "train_top1": train_top1, "train_mis_instruction": 1.0 - train_top1 / 100.0,
        "final_train_loss": m["final_train_loss"], "train_seconds": round(seconds, 3),
        "train_cpu_seconds": round(m["train_cpu_seconds"], 3),  # all threads; a fairer measure on a busy machine
        "samples_per_second": round(m["samples_per_second"], 1), "num_train": n_train,
        "num_test": n_test, "epochs": p.epochs, "threads": torch.get_num_threads(),
    }
    sidecar = {
        "arch": p.arch, "num_classes": train.num_classes, "in_channels": train.in_channels,
        "image_size": train.image_size, "dataset": train.name, "split": "train", "root": train.root,
        "fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint, "transform": train.transform,
        "test_top1": test_top1, "train_top1": train_top1, "num_train": n_train, "sha256": file_sha256(ckpt),
        "params": dataclasses.asdict(p), "versions": versions(),
    }
    write_json(sidecar_path(ckpt), sidecar)
    write_json(metrics_path(ckpt), metrics)
    log.info("teacher %s: test top-1 %.2f%%, train top-1 %.2f%%, %.1f s -> %s", p.name or p.arch, test_top1,
             train_top1, seconds, ckpt)
    text = json.dumps({"checkpoint": str(ckpt), **{k: metrics[k] for k in
                       ("test_top1", "train_top1", "train_seconds", "samples_per_second")}})
    return Report(SECTION, metrics, {"checkpoint": str(ckpt), "sidecar": str(sidecar_path(ckpt)),
                                     "metrics": str(metrics_path(ckpt))}, text)
