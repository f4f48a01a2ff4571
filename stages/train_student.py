"""Stage three: train one student from a logit store (or a targets store, or a live teacher).

``run(params)`` trains one (method, α, seed) run and writes::

    <out_dir>/<run name>/
        metrics.json     final test top-1/top-5, best top-1, identity of the run (dvc metrics)
        log.csv          one row per epoch: lr, train loss/top-1, test loss/top-1/top-5, seconds (dvc plots)
        checkpoint.pt    model, optimizer, scheduler, RNG states, log — rewritten atomically each epoch

The run name comes from :func:`run_name` only: ``<method>-s<seed>`` (``ce-s0``, ``kd-s1``), with the α for
LoCa methods (``loca-a0.9-s2``, ``loca_dkd-a0.95-s0``) and an ``-online`` suffix for live-teacher runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

AUGMENTS = ("none", "crop-flip")
MISMATCH_WARNING = (
    "augment={aug!r} with a store of un-augmented teacher logits: the student trains on augmented images while "
    "the teacher's signal describes the clean image it never sees (a known mismatch, DESIGN.md §4). Cache "
    "augmented views (cache-logits views: V) to replay exactly what the teacher saw, or use augment: none")


@dataclass(frozen=True)
class TrainStudentParams:
    """The ``train_student`` section of params.yaml (every key optional)."""

    store: str | None = "data/logits/fashion-mnist-train.zarr"  # logit store from `loca-pipe cache-logits`
    teacher: str | None = None            # teacher name in the store (None: the store's only teacher)
    targets: str | None = None            # targets store from `loca-pipe calibrate` (instead of logits)
    method: str = "kd"                    # a name in loca_pipe.pipeline.losses.METHODS
    alpha: float = 0.9                    # LoCa α (used by loca* methods and to pick targets)
    tau: float = 4.0                      # KD temperature
    beta: float = 0.9                     # KD loss weight
    gamma: float = 0.1                    # CE loss weight
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    ls_tau: float | None = None           # logit standardisation's base τ (ls, loca_ls; None: the library's 2.0)
    warmup_epochs: int | None = None      # DKD warm-up (None: the loss library's default)
    form: str = "auto"                    # teacher signal: auto | logits | topk
    view_policy: str = "cycle"            # cached views: cycle (epoch e → view e mod V) | random
    student: str = "mlp_small"            # model zoo name or module:callable
    dataset: str = "fashion-mnist"
    root: str | None = None
    split: str = "train"
    eval_split: str = "test"
    augment: str = "none"                 # plain augmentation when the store has no views
    preset: str = "short-cpu"             # short-cpu | paper-cifar; the keys below override it
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    milestones: tuple[int, ...] | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True                      # fp16 autocast on CUDA
    out_dir: str = "data/students"
    online: bool = False                  # run the live teacher instead of reading the store
    teacher_checkpoint: str | None = None  # for online mode (arch read from its .json sidecar)
    resume: bool = False
    memory_limit_gb: float = 4.0          # teacher signal above this is streamed chunk by chunk
    progress: bool = True
    threads: int | None = None            # torch CPU threads (None: 1 for short-cpu on CPU — tiny models run
                                          # faster single-threaded, and far faster on a busy machine — else torch's)
    # sweep (one process, runs in turn): every method × seed, LoCa methods × every α; None = the single values
    methods: tuple[str, ...] | None = None
    alphas: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None


def run_name(method: str, alpha: float, seed: int, online: bool = False) -> str:
    """The one place a run's folder name is derived (see the module docstring)."""
    a = f"-a{alpha:g}" if method.startswith("loca") else ""
    return f"{method}{a}-s{seed}{'-online' if online else ''}"


def expand(p: TrainStudentParams, methods: list[str] | None = None, alphas: list[float] | None = None,
           seeds: list[int] | None = None) -> list[TrainStudentParams]:
    """The runs of a sweep: methods × seeds, LoCa methods also × α (arguments win over the params' lists)."""
    ms = list(methods or p.methods or [p.method])
    al = list(alphas or p.alphas or [p.alpha])
    ss = list(seeds or p.seeds or [p.seed])
    out = []
    for m in ms:
        for a in (al if m.startswith("loca") else [p.alpha]):
            for s in ss:
                out.append(dataclasses.replace(p, method=m, alpha=float(a), seed=int(s), methods=None, alphas=None,
                                               seeds=None))
    return out


def run_dir(p: TrainStudentParams) -> Path:
    return Path(p.out_dir) / run_name(p.method, p.alpha, p.seed, p.online)


def loss_config(p: TrainStudentParams) -> Any:
    """The losses library's LossConfig from the params (only the fields it declares)."""
    from loca_pipe.pipeline.losses import LossConfig

    names = {f.name for f in dataclasses.fields(LossConfig)}
    values = {"tau": p.tau, "alpha": p.alpha, "beta": p.beta, "gamma": p.gamma, "dkd_alpha": p.dkd_alpha,
              "dkd_beta": p.dkd_beta, "warmup_epochs": p.warmup_epochs, "ls_tau": p.ls_tau}
    return LossConfig(**{k: v for k, v in values.items() if k in names and v is not None})


def check_params(p: TrainStudentParams) -> None:
    from loca_pipe.pipeline.losses import METHODS

    if p.method not in METHODS:
        raise ConfigError(f"unknown method {p.method!r}; valid methods: {sorted(METHODS)}")
    if p.augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {p.augment!r}; valid values: {list(AUGMENTS)}")
    if not (p.tau > 0 and math.isfinite(p.tau)):
        raise ConfigError(f"tau must be a positive number; got {p.tau}")
    if p.method.startswith("loca") and not p.alpha > 0:
        raise ConfigError(f"LoCa α must be > 0 (the paper uses 0.9–0.99); got {p.alpha}")
    if p.online and not p.teacher_checkpoint:
        raise ConfigError("online mode runs the live teacher: set train_student.teacher_checkpoint "
                          "(--teacher-checkpoint PATH, a file from `loca-pipe train-teacher`)")
    if p.memory_limit_gb < 0:
        raise ConfigError(f"memory_limit_gb must be ≥ 0; got {p.memory_limit_gb}")


def _teacher_accuracy(meta: dict[str, Any], checkpoint: str | None) -> float | None:
    """The teacher's test top-1 in % as recorded by train-teacher (a fraction there), when it can be found."""
    v = _teacher_accuracy_raw(meta, checkpoint)
    return None if v is None else (100.0 * v if v <= 1.0 else v)


def _teacher_accuracy_raw(meta: dict[str, Any], checkpoint: str | None) -> float | None:
    from loca_pipe.pipeline.models import read_sidecar

    prov = meta.get("provenance") or {}
    run_info = prov.get("run") or {}
    for d in (prov, run_info.get("sidecar") or {}):
        if isinstance(d.get("test_top1"), (int, float)):
            return float(d["test_top1"])
    for ck in (checkpoint, run_info.get("checkpoint"), prov.get("checkpoint")):
        if ck:
            try:
                v = read_sidecar(ck).get("test_top1")
                return float(v) if v is not None else None
            except Exception:  # noqa: BLE001 - the accuracy is informational only
                continue
    return None


def run(p: TrainStudentParams) -> dict[str, Any]:
    """Train one student; returns its final metrics (also written to ``<run dir>/metrics.json``)."""
    import torch

    from loca_pipe.pipeline.augment import make_augmenter
    from loca_pipe.pipeline.data import open_dataset
    from loca_pipe.pipeline.models import build_model, load_checkpoint, read_sidecar, resolve_device
    from loca_pipe.pipeline.soft_labels import PlainSource, load_soft_labels, load_targets
    from loca_pipe.pipeline.training import ImageSet, preset_config, seed_everything, train_student

    check_params(p)
    device = resolve_device(p.device)
    from loca_pipe.pipeline.distributed import init_from_env

    init_from_env(device.type)  # under torchrun: DDP over the ranks (pipeline.training), else one process
    threads = p.threads if p.threads is not None else (1 if p.preset == "short-cpu" and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(int(threads))
    cfg = preset_config(p.preset, p.student, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, milestones=p.milestones, seed=p.seed,
                        amp=p.amp)
    spec = open_dataset(p.dataset, p.split, p.root)
    eval_spec = open_dataset(p.dataset, p.eval_split, p.root)
    C = int(spec.num_classes)
    method = p.method
    teacher_model = None
    meta: dict[str, Any] = {}
    if p.online:
        side = read_sidecar(p.teacher_checkpoint)
        teacher_model = build_model(side["arch"], int(side.get("num_classes", C)), spec.in_channels, spec.image_size)
        sha = load_checkpoint(teacher_model, p.teacher_checkpoint)
        if int(side.get("num_classes", C)) != C:
            raise ConfigError(f"teacher checkpoint {p.teacher_checkpoint!r} has {side.get('num_classes')} classes but "
                              f"data set {p.dataset!r} has {C}; use a teacher trained on this data set")
        source: Any = PlainSource(len(spec))
        meta = {"teacher": side["arch"], "provenance": {**side, "sha256": sha}}
    elif method == "ce":
        source = PlainSource(len(spec))
    elif p.targets:
        source = load_targets(p.targets, spec, method=method, alpha=p.alpha, tau=p.tau, student_classes=C,
                              teacher=p.teacher, memory_limit_bytes=int(p.memory_limit_gb * (1 << 30)),
                              view_policy=p.view_policy)
        method = source.method  # targets already hold (calibrated) probabilities: plain KD on them
        meta = source.meta
    else:
        if not p.store:
            raise ConfigError(f"method {method!r} needs a teacher: set train_student.store (a logit store), "
                              f"train_student.targets, or online: true with a teacher_checkpoint")
        source = load_soft_labels(p.store, spec, teacher=p.teacher, student_classes=C, tau=p.tau, form=p.form,
                                  memory_limit_bytes=int(p.memory_limit_gb * (1 << 30)), view_policy=p.view_policy)
        meta = source.meta
    replay = augmenter = None
    if getattr(source, "has_views", False):
        ds_meta = meta.get("dataset") or {}
        kind = ds_meta.get("augment") or "crop-flip"
        replay = make_augmenter(kind, int(ds_meta.get("view_seed") or 0), int(spec.image_size))
        if p.augment != "none":
            log.info("the store caches augmented views; replaying them and ignoring augment=%r", p.augment)
    elif p.augment != "none":
        augmenter = make_augmenter(p.augment, p.seed, int(spec.image_size))
        if meta and not p.online:
            log.warning(MISMATCH_WARNING.format(aug=p.augment))
    seed_everything(p.seed)
    model = build_model(p.student, C, int(spec.in_channels), int(spec.image_size))
    identity = {"method": p.method, "loss_method": method, "alpha": p.alpha if p.method.startswith("loca") else None,
                "tau": p.tau, "beta": p.beta, "gamma": p.gamma, "seed": p.seed, "student": p.student,
                "dataset": p.dataset, "split": p.split, "eval_split": p.eval_split, "fingerprint": spec.fingerprint,
                "store": None if method == "ce" and not p.targets else (p.targets or p.store),
                "teacher": meta.get("teacher"), "online": p.online, "augment": p.augment, "preset": p.preset,
                "form": getattr(source, "kind", None), "view_policy": p.view_policy,
                "train": dataclasses.asdict(cfg)}
    if p.method in ("dkd", "loca_dkd"):
        identity.update(dkd_alpha=p.dkd_alpha, dkd_beta=p.dkd_beta, warmup_epochs=p.warmup_epochs)
    if p.method in ("ls", "loca_ls"):
        identity.update(ls_tau=loss_config(p).ls_tau)
    out = run_dir(p)
    images = ImageSet(spec.dataset, device)
    eval_images = ImageSet(eval_spec.dataset, device)
    labels = torch.as_tensor(spec.labels, dtype=torch.int64)
    eval_labels = torch.as_tensor(eval_spec.labels, dtype=torch.int64)
    log.info("training %s (%s, student %s, %d samples, %s) → %s", run_name(p.method, p.alpha, p.seed, p.online),
             method, p.student, len(source), device, out)
    res = train_student(model, images=images, labels=labels, source=source, method=method, loss_cfg=loss_config(p),
                        cfg=cfg, eval_images=eval_images, eval_labels=eval_labels, out_dir=out,
                        teacher_model=teacher_model, replay=replay, augmenter=augmenter, resume=p.resume,
                        identity={**identity, "run": out.name,
                                  "teacher_test_top1": _teacher_accuracy(meta, p.teacher_checkpoint)},
                        progress=p.progress)
    return res.metrics
