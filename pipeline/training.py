"""The student training loop: index-based batching, any method from the loss registry, exact resume.

Speed comes from doing nothing per item: the data set's images are pre-loaded once as one tensor
(Fashion-MNIST's 60k×1×28×28 floats are 188 MB), every epoch is a seeded permutation of indices, and a
batch is one gather from that tensor plus one gather from the teacher signal (:mod:`soft_labels`) — so an
epoch from the store costs about an epoch of CE. There is no DataLoader and no per-sample Python.

Determinism: the order of epoch ``e`` is a pure function of (seed, e); model init uses ``seed``; the
checkpoint written after every epoch (atomically) holds the model, optimizer, scheduler, grad scaler, the
RNG states and the log so far. Resuming from it runs exactly the same operations as the uninterrupted run,
so on CPU the final weights and metrics are bit-identical.

The same loop runs on CPU and CUDA (``device``); on CUDA the student's forward runs under fp16 autocast
with a GradScaler (``TrainConfig.amp``). The loss is always computed in fp32.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from loca_pipe.pipeline.augment import make_augmenter
from loca_pipe.pipeline.errors import ConfigError, NumericsError, StoreError
from loca_pipe.pipeline.io import atomic_save, atomic_write_text
from loca_pipe.pipeline.models import build_model
from loca_pipe.pipeline.soft_labels import PlainSource, numpy_permutation

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG_CSV = "log.csv"
METRICS_JSON = "metrics.json"
LOG_FIELDS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds",
              "samples_per_s")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (SGD with momentum, step decay ×``lr_decay`` at each milestone epoch)."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    nesterov: bool = False
    seed: int = 0
    amp: bool = True            # fp16 autocast + GradScaler on CUDA; ignored on CPU
    eval_batch_size: int = 1024

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"epochs must be ≥ 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1; got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number; got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"need weight_decay ≥ 0 and 0 ≤ momentum < 1; got {self.weight_decay}, {self.momentum}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing epochs; got {list(self.milestones)}")
        return self


OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine", "constant")


def make_optimizer(params: Iterable[Any], cfg: TrainConfig, optimizer: str = "sgd") -> torch.optim.Optimizer:
    """``sgd`` (momentum, Nesterov when ``cfg.nesterov``) or ``adam`` (Adam's own β; ``cfg.momentum`` unused)
    at ``cfg.lr`` with L2 weight decay ``cfg.weight_decay``."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}; got {optimizer!r}")


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, schedule: str, steps_per_epoch: int
                  ) -> tuple[Any, bool]:
    """The learning-rate schedule and whether it steps after every optimizer step (else after every epoch):
    ``step`` ×``cfg.lr_decay`` at each milestone epoch (the students'); ``cosine`` per-step cosine decay from
    ``cfg.lr`` to 0 over the run; ``constant`` (the teachers' two)."""
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.lr_decay), False
    if schedule == "cosine":
        steps = cfg.epochs * max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))), True
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), True
    raise ConfigError(f"schedule must be one of {list(SCHEDULES)}; got {schedule!r}")


# The paper's CIFAR recipe (after CRD/DKD): SGD 0.9, wd 5e-4, batch 64, 240 epochs, ×0.1 at 150/180/210,
# lr 0.05 — 0.01 for MobileNet/ShuffleNet students.
# short-cpu: the same recipe shape squeezed to a few seconds per epoch for the Fashion-MNIST default
# (MLP student, 2 CPU cores): one setting for every method, chosen once, never per method.
# A preset's milestones belong to its epoch count: when only the epochs are overridden they are scaled with
# them (short-cpu: decay after 4 of 5 epochs → after 16 of 20), see :func:`preset_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar": dict(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        milestones=(150, 180, 210), lr_decay=0.1),
    "short-cpu": dict(epochs=5, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
                      milestones=(4,), lr_decay=0.1),
}
SMALL_LR_ARCHS = ("mobilenet", "shufflenet", "shufflev")


def preset_config(preset: str, student: str = "", **overrides: Any) -> TrainConfig:
    """The preset's TrainConfig, with the paper's lr 0.01 for MobileNet/ShuffleNet students, then overrides
    (None values ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    if preset == "paper-cifar" and any(k in student.lower() for k in SMALL_LR_ARCHS):
        values["lr"] = 0.01
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "milestones" not in given and int(given["epochs"]) != values["epochs"]:
        values["milestones"] = scale_milestones(values["milestones"], values["epochs"], int(given["epochs"]))
    values.update(given)
    if "milestones" in values:
        values["milestones"] = tuple(int(m) for m in values["milestones"])
    return TrainConfig(**values).validate()


def scale_milestones(milestones: tuple[int, ...], epochs: int, new_epochs: int) -> tuple[int, ...]:
    """The preset's milestones at the same fractions of a new epoch count (rounded, at least epoch 1,
    strictly increasing, and before the last epoch when the preset's were): 4 of 5 → 16 of 20."""
    out: list[int] = []
    for m in milestones:
        v = max(1, round(m * new_epochs / epochs))
        if m < epochs:
            v = min(v, max(1, new_epochs - 1))
        if out and v <= out[-1]:
            continue
        out.append(v)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# images


class ImageSet:
    """Images of a data set addressed by index. Pre-loaded as one tensor when it fits (the fast path);
    otherwise items are read from the Dataset per batch (correct, slow — for data that does not fit)."""

    def __init__(self, dataset: Any, device: torch.device, preload_limit_bytes: int = 8 << 30,
                 tensor: torch.Tensor | None = None):
        self.dataset, self.device = dataset, torch.device(device)
        self.images: torch.Tensor | None = tensor
        if tensor is None:
            x0, _ = dataset[0]
            need = len(dataset) * x0.numel() * x0.element_size()
            if need <= preload_limit_bytes:
                self.images = preload(dataset)
            else:
                log.warning("data set needs %.1f GB as one tensor (limit %.1f GB): reading items per batch, "
                            "which is slow", need / 1e9, preload_limit_bytes / 1e9)
        if self.images is not None and self.device.type == "cuda":
            if self.images.numel() * self.images.element_size() <= (2 << 30):
                self.images = self.images.to(self.device)
            else:
                self.images = self.images.pin_memory()

    def __len__(self) -> int:
        return len(self.dataset) if self.images is None else int(self.images.shape[0])

    def get(self, index: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images of data-set indices ``index`` on the training device."""
        if self.images is not None:
            x = self.images[index.to(self.images.device)]
        else:
            x = torch.stack([self.dataset[int(i)][0] for i in index])
        return x.to(self.device, non_blocking=True)


def preload(dataset: Any, batch_size: int = 8192, n: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """The first ``n`` (default: all) images of ``dataset`` as one (n, C, H, W) float32 tensor, read once in
    data-set order (through the data set's batched ``get_batch`` when it has one: no per-item Python; else a
    DataLoader with ``num_workers`` workers)."""
    n = len(dataset) if n is None else min(int(n), len(dataset))
    fast = getattr(dataset, "get_batch", None)
    if callable(fast):
        return torch.cat([fast(np.arange(i, min(n, i + batch_size)))[0].float() for i in range(0, n, batch_size)])
    if n < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return torch.cat([x.float() for x, _ in loader])


# ----------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: nn.Module, images: ImageSet, labels: torch.Tensor, batch_size: int = 1024,
             amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean CE on a held-out split."""
    was = model.training
    model.eval()
    n, c1, c5, loss = len(labels), 0, 0, 0.0
    dev = images.device
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        x, y = images.get(idx), labels[idx].to(dev)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp and dev.type == "cuda"):
            out = model(x)
        out = out.float()
        loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(1).sum())
    model.train(was)
    return {"top1": 100.0 * c1 / max(1, n), "top5": 100.0 * c5 / max(1, n), "loss": loss / max(1, n)}


# ----------------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_log(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOG_FIELDS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Hooks:
    """Optional callbacks (tests and benchmarks): after each step and after each finished epoch."""

    on_step: Callable[[int, int, Any, torch.Tensor], None] | None = None   # (epoch, step, batch, loss)
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None      # (epoch, log row)


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _alpha_at_fault(method: str, loss_cfg: Any) -> bool:
    """True when a numerics error can come from LoCa's α ≥ 1 (label probability pushed below 0)."""
    from loca_pipe.pipeline.losses import METHODS

    m = METHODS.get(method)
    return bool(m is not None and m.loca and float(getattr(loss_cfg, "alpha", 0.0)) >= 1.0)


def _loss_fn() -> Callable[..., torch.Tensor]:
    from loca_pipe.pipeline.losses import compute_loss

    return compute_loss


def train_student(model: nn.Module, *, images: ImageSet, labels: torch.Tensor, source: Any, method: str,
                  loss_cfg: Any, cfg: TrainConfig, eval_images: ImageSet | None = None,
                  eval_labels: torch.Tensor | None = None, out_dir: str | Path | None = None,
                  teacher_model: nn.Module | None = None, replay: Any = None, augmenter: Any = None,
                  resume: bool = False, identity: dict[str, Any] | None = None, hooks: Hooks | None = None,
                  progress: bool = False, loss_fn: Callable[..., torch.Tensor] | None = None,
                  do_eval: bool = True, progress_desc: str | None = None, blockkd: nn.Module | None = None,
                  optimizer: str = "sgd", schedule: str = "step") -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs and return the final metrics.

    ``source`` yields :class:`~loca_pipe.pipeline.soft_labels.Batch` es: a ``SoftLabels`` (teacher signal
    from a store) or a ``PlainSource`` (CE; or online KD when ``teacher_model`` is given, which then runs on
    every batch's student inputs). ``replay`` is the Augmenter that replays a batch's stored ``aug_params``;
    ``augmenter`` a plain augmentation for batches without them (view = epoch). ``identity`` is a JSON
    dict describing the run; a resume refuses a checkpoint whose identity differs. ``out_dir`` receives
    ``checkpoint.pt`` (every epoch), ``log.csv`` and ``metrics.json``.

    ``blockkd`` (a :class:`~loca_pipe.pipeline.blockkd.BlockKD` wrapping ``model``): the Block-KD methods'
    forward, which returns the student's logits and the stepping-stone hybrids' (passed to the loss as
    ``hybrids``); the optimizer then holds the student's and the connectors' parameters (never the
    teacher's), and the checkpoint the connectors too.

    ``optimizer`` / ``schedule``: :func:`make_optimizer` / :func:`make_schedule` (the students' SGD with step
    decay by default; teachers pass theirs, see :func:`fit_teacher`).

    ``metrics["data_order"]`` (and ``data_order`` of every history row) fingerprints the sample ids the
    loop was handed, in order, epoch by epoch (:func:`order_fingerprint`): two runs with the same value saw
    the same samples in the same order, so a paired comparison of them is paired in data order too.
    """
    cfg = cfg.validate()
    compute_loss = loss_fn or _loss_fn()
    device = images.device
    # DDP (under torchrun, once a process group is initialised): rank r trains on rows r, r+W, … of every
    # global batch of cfg.batch_size, the gradient is averaged to the global-batch mean, rank 0 evaluates
    # and writes checkpoint / log / metrics (docs/scale-out.md lists the differences to one process).
    from loca_pipe.pipeline import distributed as _dist

    ddp = _dist.active()
    rank, world = _dist.world() if ddp else (0, 1)
    main = rank == 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps(identity or {}, default=str))
    model.to(device)
    if blockkd is not None:
        if getattr(blockkd, "student", None) is not model:
            raise ConfigError("train_student: blockkd must wrap the model being trained (BlockKD(student=model, ...))")
        blockkd.to(device)
    trained = blockkd if blockkd is not None else model
    opt = make_optimizer(trained.parameters(), cfg, optimizer)
    sched, per_step = make_schedule(opt, cfg, schedule, math.ceil(len(source) / cfg.batch_size))
    optim = {"optimizer": optimizer, "schedule": schedule}
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict[str, Any]] = []
    start = 0
    ckpt_path = out / CHECKPOINT if out is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("identity") != identity:
            old, new = ck.get("identity") or {}, identity
            diffs = [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k)]
            raise ConfigError(f"cannot resume from {str(ckpt_path)!r}: it belongs to another run ({'; '.join(diffs)}); "
                              f"use another output folder or run without --resume to start over")
        if ck.get("optim", {"optimizer": "sgd", "schedule": "step"}) != optim:
            raise ConfigError(f"cannot resume from {str(ckpt_path)!r}: it was trained with {ck.get('optim')}, this run "
                              f"asks {optim}; use another output folder or run without --resume to start over")
        model.load_state_dict(ck["model"])
        if blockkd is not None:
            blockkd.connectors.load_state_dict(ck["connectors"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        history, start = list(ck["history"]), int(ck["epoch"])
        log.info("resuming %s from epoch %d", out, start)
    net: nn.Module = trained
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher_model is not None:
        teacher_model.to(device).eval()
    if labels.device != device and device.type == "cuda":
        labels_dev = labels.to(device)
    else:
        labels_dev = labels
    n_train = len(source)
    t_total = sum(r.get("seconds", 0.0) for r in history)
    from loca_pipe.pipeline.progress import progress_bar

    # one bar for the whole run (every remaining epoch): throughput and the run's ETA, live loss / accuracy
    bar = progress_bar(total=n_train * (cfg.epochs - start), desc=progress_desc or "train", unit="sample",
                       enabled=bool(progress) and main)
    for epoch in range(start, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        order = hashlib.blake2b(digest_size=8)  # the epoch's sample-id sequence (the global batch under DDP)
        for step, batch in enumerate(source.batches(epoch, cfg.batch_size, cfg.seed)):
            global_b = int(batch.sample_index.numel())
            order.update(np.ascontiguousarray(batch.sample_index.cpu().numpy(), dtype="<i8").tobytes())
            if ddp:
                batch = shard_batch(batch, rank, world)
            idx = batch.sample_index
            x = images.get(idx)
            y = labels_dev[idx.to(labels_dev.device)].to(device)
            if batch.aug_params is not None:
                if replay is None:
                    raise StoreError("the store caches augmented views but no augmenter was given to replay them")
                x = replay.apply(x, batch.aug_params.to(device))
            elif augmenter is not None:
                x = augmenter.apply(x, torch.as_tensor(augmenter.sample_params(idx.numpy(), epoch)).to(device))
            batch.inputs = x
            teacher = {k: _to(v, device) for k, v in batch.teacher.items()}
            if teacher_model is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    teacher = {"teacher_logits": teacher_model(x).float()}
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = net(x)
            if blockkd is not None:  # (student logits, [N_1 … N_n])
                logits, hybrids = logits
                teacher["hybrids"] = [h.float() for h in hybrids]
            try:
                if idx.numel() == 0:  # DDP, a last batch smaller than the world: no rows here, zero gradient
                    loss = logits.float().sum() * 0.0
                else:
                    loss = compute_loss(method, logits.float(), y, cfg=loss_cfg, epoch=epoch, **teacher)
                bad = None if bool(torch.isfinite(loss)) else f"loss is {float(loss.detach())}"
            except NumericsError as exc:  # the loss library's own finiteness check
                if _alpha_at_fault(method, loss_cfg):
                    raise ConfigError(f"{exc} (at epoch {epoch + 1}, step {step}); this comes from LoCa's α = "
                                      f"{loss_cfg.alpha:g} ≥ 1, not from the optimiser: use α < 1 (the paper's "
                                      f"range is 0.9–0.999; 1.0 and 1.01 are its Table-6 arms)") from None
                bad = str(exc)
            if bad is not None:
                last = f"{str(ckpt_path)!r} (after epoch {start_of(history)})" if ckpt_path and ckpt_path.exists() \
                    else "none (no epoch finished yet)"
                raise NumericsError(
                    f"{bad} at epoch {epoch + 1}, step {step} (batch {step} of this epoch, sample ids "
                    f"{idx[:8].tolist()}{' …' if idx.numel() > 8 else ''}); training stopped, last good checkpoint: "
                    f"{last}. Lower the learning rate, check the teacher signal for NaN, or disable amp")
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over W ranks; weighting rank r's batch mean by W·b_r/b makes that average
            # the mean over the whole global batch of b rows, also when b is not a multiple of W
            scaled = loss * (world * idx.numel() / max(1, global_b)) if ddp else loss
            scaler.scale(scaled).backward()
            scaler.step(opt)
            scaler.update()
            if per_step:
                sched.step()
            if hooks and hooks.on_step:
                hooks.on_step(epoch, step, batch, loss.detach())
            b = idx.numel()
            loss_sum += loss.detach() * b
            correct += (logits.detach().argmax(1) == y).sum()
            seen += b
            if bar.disable is False:
                if step % 50 == 0:
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{float(loss_sum) / max(1, seen):.4f}",
                                    acc=f"{100.0 * float(correct) / max(1, seen):.2f}", refresh=False)
                bar.update(b)
        if ddp:  # train loss / accuracy over every rank's rows
            tot = torch.stack([loss_sum.double(), correct.double(),
                               torch.tensor(float(seen), dtype=torch.float64, device=device)])
            torch.distributed.all_reduce(tot)
            loss_sum, correct, seen = tot[0], tot[1], int(tot[2].item())
        lr = opt.param_groups[0]["lr"]
        if not per_step:
            sched.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / max(1, seen),
                               "train_top1": 100.0 * float(correct) / max(1, seen), "data_order": order.hexdigest()}
        train_s = time.perf_counter() - t0
        if do_eval and main and eval_images is not None and eval_labels is not None:
            ev = evaluate(model, eval_images, eval_labels, cfg.eval_batch_size, amp=use_amp)
            row.update(test_loss=ev["loss"], test_top1=ev["top1"], test_top5=ev["top5"])
        row.update(seconds=train_s, samples_per_s=seen / max(train_s, 1e-9))
        t_total += train_s
        history.append(row)
        if out is not None and main:
            atomic_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                         "history": history, "identity": identity, "config": asdict(cfg), "optim": optim,
                         **({"connectors": blockkd.connectors.state_dict()} if blockkd is not None else {})},
                        ckpt_path)
            write_log(out / LOG_CSV, history)
        if bar.disable is False:
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{row['train_loss']:.4f}",
                            acc=f"{row['train_top1']:.2f}",
                            **({"test": f"{row['test_top1']:.2f}"} if "test_top1" in row else {}))
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                            for k, v in row.items()})
        if hooks and hooks.on_epoch_end:
            hooks.on_epoch_end(epoch, row)
    bar.close()
    last = history[-1] if history else {}
    metrics = {**identity, "epochs": cfg.epochs, "train_loss": last.get("train_loss"),
               "train_top1": last.get("train_top1"), "test_top1": last.get("test_top1"),
               "test_top5": last.get("test_top5"),
               "best_test_top1": max((r["test_top1"] for r in history if "test_top1" in r), default=None),
               "train_seconds": t_total, "data_order": order_fingerprint(history)}
    if ddp:
        metrics["world_size"] = world
    if out is not None and main:
        atomic_write_text(out / METRICS_JSON, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return TrainResult(metrics=metrics, history=history)


def order_fingerprint(history: list[dict[str, Any]]) -> str | None:
    """16 hex digits over the per-epoch digests of the sample-id sequence (``data_order`` of each history
    row); None when a row lacks one (a run resumed from a checkpoint written before the key existed)."""
    digests = [r.get("data_order") for r in history]
    if not digests or any(not d for d in digests):
        return None
    return hashlib.blake2b(",".join(digests).encode(), digest_size=8).hexdigest()


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Rows rank, rank+world, … of a batch (its sample indices, aug params, rows and teacher tensors)."""
    n = int(batch.sample_index.numel())
    sel = torch.arange(rank, n, world)

    def take(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
            return v[sel.to(v.device)]
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(take(t) for t in v))
        return v

    return replace(batch, sample_index=batch.sample_index[sel],
                   aug_params=None if batch.aug_params is None else batch.aug_params[sel],
                   rows=None if batch.rows is None else batch.rows[sel],
                   teacher={k: take(v) for k, v in batch.teacher.items()})


def start_of(history: list[dict[str, Any]]) -> int:
    return int(history[-1]["epoch"]) if history else 0


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # NamedTuple such as SparseDist
        return type(v)(*(_to(t, device) for t in v))
    return v


def config_with(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


# ----------------------------------------------------------------------------------------------------
# teachers: the same loop with a CE source


@dataclass
class TeacherFit:
    """A trained image teacher and what ``train-teacher`` reports about it."""

    model: nn.Module
    metrics: dict[str, Any]  # test/train top-1 (%), final_train_loss, seconds, samples/s, num_train/test, epochs
    history: list[dict[str, Any]] = field(default_factory=list)


def fit_teacher(arch: str, train: Any, test: Any, cfg: TrainConfig, *, optimizer: str = "adam",
                schedule: str = "cosine", augment: str = "none", device: str | torch.device = "cpu",
                max_samples: int | None = None, progress: bool = False, progress_desc: str | None = None,
                num_workers: int = 0, out_dir: str | Path | None = None, resume: bool = False, identity: dict[str, Any] | None = None
                ) -> TeacherFit:
    """Train teacher ``arch`` with cross-entropy on the first ``max_samples`` (default all) samples of
    ``train`` (a ``DatasetSpec``) through :func:`train_student` (method ``ce``), then evaluate it on the
    first ``max_samples`` of ``test`` and of ``train`` with :func:`evaluate`.

    The weights are initialised after ``torch.manual_seed(cfg.seed)``, epoch ``e`` visits the samples in
    :func:`~loca_pipe.pipeline.soft_labels.numpy_permutation` order of ``(cfg.seed, e)``, view ``e`` of a
    sample's ``augment`` is drawn from ``(cfg.seed, id, e)``, and the schedule steps after every optimizer
    step: the operations, in the order, of the stage loop this replaced (tests/pipeline/test_training_teacher.py
    checks the weights bit for bit against an independent loop). ``out_dir`` (optional) receives the
    loop's per-epoch ``checkpoint.pt`` / ``log.csv`` / ``metrics.json``, which is what ``resume`` continues.
    """
    device = torch.device(device)
    n_train = min(len(train.dataset), max_samples or len(train.dataset))
    n_test = min(len(test.dataset), max_samples or len(test.dataset))
    torch.manual_seed(cfg.seed)
    model = build_model(arch, train.num_classes, train.in_channels, train.image_size).to(device)
    images = ImageSet(None, device, tensor=preload(train.dataset, n=n_train, num_workers=num_workers))
    labels = torch.as_tensor(np.asarray(train.labels[:n_train]), dtype=torch.int64)
    eval_images = ImageSet(None, device, tensor=preload(test.dataset, n=n_test, num_workers=num_workers))
    eval_labels = torch.as_tensor(np.asarray(test.labels[:n_test]), dtype=torch.int64)
    from loca_pipe.pipeline.losses import LossConfig  # deferred like the loop's own loss import (_loss_fn)

    # the last epoch's mean loss in float64, summed as the stage loop did (loss.item() × batch size)
    sums: dict[int, list[float]] = {}

    def on_step(epoch: int, step: int, batch: Any, loss: torch.Tensor) -> None:
        s = sums.setdefault(epoch, [0.0, 0])
        s[0] += loss.item() * int(batch.sample_index.numel())
        s[1] += int(batch.sample_index.numel())

    t0, c0 = time.perf_counter(), time.process_time()
    res = train_student(model, images=images, labels=labels, source=PlainSource(n_train, order=numpy_permutation),
                        method="ce", loss_cfg=LossConfig(), cfg=cfg, out_dir=out_dir, resume=resume,
                        identity=identity, augmenter=make_augmenter(augment, cfg.seed, train.image_size),
                        hooks=Hooks(on_step=on_step), progress=progress, do_eval=False, progress_desc=progress_desc,
                        optimizer=optimizer, schedule=schedule)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    test_top1 = evaluate(model, eval_images, eval_labels, cfg.eval_batch_size)["top1"]
    train_top1 = evaluate(model, images, labels, cfg.eval_batch_size)["top1"]
    last = sums.get(cfg.epochs - 1, [0.0, 0])
    final_loss = last[0] / max(last[1], 1) if last[1] else res.metrics.get("train_loss")
    epochs_run = len(sums)  # epochs trained by this call (fewer when it resumed)
    return TeacherFit(model, {
        "test_top1": test_top1, "train_top1": train_top1, "final_train_loss": final_loss,
        "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
        "samples_per_second": epochs_run * n_train / max(seconds, 1e-9), "num_train": n_train, "num_test": n_test,
        "epochs": cfg.epochs}, res.history)
