"""Stage `train-teacher`: train a baseline teacher on a data set and write its checkpoint.

Outputs, all written atomically (temporary file, then ``os.replace``), for checkpoint path ``OUT``:

* ``OUT`` — the plain state dict (``torch.save(model.state_dict())``);
* ``OUT.json`` — sidecar: arch, num_classes, in_channels, image_size, dataset, split, fingerprint,
  transform, test_top1 and train_top1 (percent), sha256 of ``OUT``, the training params and package versions;
* ``OUT`` with suffix ``.metrics.json`` — metrics for DVC (test/train top-1, mis-instruction rate on the
  training set, seconds, samples/s).

Deterministic for a seed on a given machine: the weights are initialised after ``torch.manual_seed(seed)``
and the order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.augment import make_augmenter
from loca_pipe.pipeline.data import DatasetSpec, get_batch, open_dataset
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.guard import CHECKPOINT, FILE, check_outputs
from loca_pipe.pipeline.io import atomic_save, versions, write_json
from loca_pipe.pipeline.models import build_model, check_model_name, file_sha256, resolve_device, sidecar_path
from loca_pipe.pipeline.progress import progress_bar
from loca_pipe.pipeline.threads import torch_threads
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

def _batches(spec: DatasetSpec, indices: np.ndarray, batch_size: int, num_workers: int
             ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(sample ids, images, labels) in the order of ``indices``."""
    if callable(getattr(spec.dataset, "get_batch", None)) or num_workers == 0:
        for start in range(0, len(indices), batch_size):
            ids = indices[start:start + batch_size]
            x, y = get_batch(spec.dataset, ids)
            yield ids, x, y
        return
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(spec.dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, persistent_workers=False)
    for start, (x, y) in zip(range(0, len(indices), batch_size), loader):
        yield indices[start:start + batch_size], x, torch.as_tensor(y, dtype=torch.int64)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, spec: DatasetSpec, n: int, batch_size: int, device: torch.device,
             num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on the first ``n`` samples of ``spec``, in percent."""
    model.eval()
    correct = 0
    for _, x, y in _batches(spec, np.arange(n), batch_size, num_workers):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return 100.0 * correct / max(n, 1)


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
    device = resolve_device(p.device)
    train = open_dataset(p.dataset, "train", p.root)
    test = open_dataset(p.dataset, "test", p.root)
    n_train = min(len(train), p.max_samples or len(train))
    n_test = min(len(test), p.max_samples or len(test))

    torch.manual_seed(p.seed)
    model = build_model(p.arch, train.num_classes, train.in_channels, train.image_size).to(device)
    if p.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0,
                              weight_decay=p.weight_decay)
    steps = p.epochs * math.ceil(n_train / p.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if p.schedule == "cosine" else (lambda s: 1.0))
    augmenter = make_augmenter(p.augment, p.seed, train.image_size)

    bar = progress_bar(total=p.epochs * n_train, desc=f"train {p.name or p.arch}", unit="img", enabled=p.progress)
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum, loss_n = 0.0, 0
    for epoch in range(p.epochs):
        model.train()
        g = np.random.default_rng([p.seed, epoch])
        order = g.permutation(n_train)
        loss_sum, loss_n = 0.0, 0
        for ids, x, y in _batches(train, order, p.batch_size, p.num_workers):
            if augmenter is not None:
                x = augmenter.apply(x, augmenter.sample_params(ids, view=epoch))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            loss_n += len(y)
            bar.update(len(y))
            bar.set_postfix(epoch=f"{epoch + 1}/{p.epochs}", loss=f"{loss_sum / loss_n:.3f}", refresh=False)
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, p.epochs, loss_sum / max(loss_n, 1))
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    test_top1 = evaluate(model, test, n_test, p.eval_batch_size, device, p.num_workers)
    train_top1 = evaluate(model, train, n_train, p.eval_batch_size, device, p.num_workers)

    ckpt = p.checkpoint
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, ckpt)
    metrics = {
        "test_top1": test_top1, "train_top1": train_top1, "train_mis_instruction": 1.0 - train_top1 / 100.0,
        "final_train_loss": loss_sum / max(loss_n, 1), "train_seconds": round(seconds, 3),
        "train_cpu_seconds": round(cpu_seconds, 3),  # all threads; a fairer measure on a busy machine
        "samples_per_second": round(p.epochs * n_train / max(seconds, 1e-9), 1), "num_train": n_train,
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
