"""Stage three: train one student from a logit store (or a targets store, or a live teacher).

``run(params)`` trains one (method, α, seed) run and writes::

    <out_dir>/<run name>/
        metrics.json     final test top-1/top-5, best top-1, identity of the run (dvc metrics)
        log.csv          one row per epoch: lr, train loss/top-1, test loss/top-1/top-5, seconds (dvc plots)
        checkpoint.pt    model, optimizer, scheduler, RNG states, log — rewritten atomically each epoch

The run name comes from :func:`run_name` only: ``<method>-s<seed>`` (``ce-s0``, ``kd-s1``), with the α for
LoCa methods (``loca-a0.9-s2``, ``loca_dkd-a0.95-s0``) and an ``-online`` suffix for live-teacher runs.
Names cannot collide silently: a sweep whose runs share a folder is refused before training, and a folder
that already holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set.

:func:`run_many` trains a sweep in one process, loading the data, the teacher signal and the teacher's
mis-instructed rows once. ``recipe`` (the output of ``loca-pipe select-recipe``) sets τ, β, γ (and epochs
or lr when it chose them). After training, ``metrics.json`` gains ``follow``: per teacher, the share of its
mis-instructed training rows where the student predicts the teacher's wrong class / the label
(:mod:`loca_pipe.pipeline.follow`; a CE student is measured against every teacher of the store).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.augment import AUGMENTATIONS
from loca_pipe.pipeline.errors import ConfigError, did_you_mean
from loca_pipe.pipeline.guard import FOLDER, check_outputs
from loca_pipe.stages import Report

log = logging.getLogger(__name__)
SECTION = "train_student"

AUGMENTS = AUGMENTATIONS  # pipeline/augment.py, the one list
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
    cross: float | None = None            # Block-KD cross-term weight (None: the loss library's default)
    cross_distance: str | None = None     # Block-KD cross-term distance: kl | mse (None: the library's kl)
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
    teacher_checkpoint: str | None = None  # online mode and Block-KD's hybrids (arch read from its .json sidecar)
    resume: bool = False
    overwrite: bool = False               # replace a run folder that already holds a run
    recipe: str | None = None             # recipe file from `loca-pipe select-recipe`: sets tau/beta/gamma(/epochs/lr)
    follow: bool = True                   # measure the follow rates on the teacher's mis-instructed training rows
    memory_limit_gb: float = 4.0          # teacher signal above this is streamed chunk by chunk
    max_samples: int | None = None        # train on the first N training samples only (full-logit stores; the
                                          # default's CNN pair uses it to fit make repro's time budget)
    progress: bool = True
    threads: int | None = None            # torch CPU threads (None: 1 for short-cpu on CPU — tiny models run
                                          # faster single-threaded, and far faster on a busy machine — else torch's)
    # sweep (one process, runs in turn): every method × seed, LoCa methods × every α; None = the single values
    methods: tuple[str, ...] | None = None
    alphas: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    # named method groups per teacher, for the DVC matrix: {teacher: {group: "kd,kd_star"}} (`--group NAME`)
    groups: dict[str, dict[str, str]] | None = None


def takes_alpha(method: str) -> bool:
    from loca_pipe.pipeline.losses import METHODS

    return bool(METHODS[method].loca) if method in METHODS else method.startswith("loca")


def run_name(method: str, alpha: float, seed: int, online: bool = False) -> str:
    """The one place a run's folder name is derived (see the module docstring)."""
    a = f"-a{alpha:g}" if takes_alpha(method) else ""
    return f"{method}{a}-s{seed}{'-online' if online else ''}"


RECIPE_KEYS = ("tau", "beta", "gamma", "epochs", "lr")


def read_recipe(path: str) -> dict[str, Any]:
    """The chosen recipe of a ``select-recipe`` output file: {key: value} for keys in RECIPE_KEYS."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path!r} does not exist; run `loca-pipe select-recipe` first or unset "
                          f"train_student.recipe") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"recipe file {path!r} is not JSON ({exc}); re-run `loca-pipe select-recipe`") from None
    chosen = doc.get("chosen") if isinstance(doc, dict) else None
    if not isinstance(chosen, dict) or not set(chosen) <= set(RECIPE_KEYS) or not chosen:
        raise ConfigError(f"recipe file {path!r} has no 'chosen' recipe with keys among {list(RECIPE_KEYS)}; "
                          f"re-run `loca-pipe select-recipe`")
    return dict(chosen)


def with_recipe(p: TrainStudentParams) -> TrainStudentParams:
    """``p`` with the recipe file's choice applied (the file wins over tau/beta/gamma given elsewhere)."""
    if not p.recipe:
        return p
    return dataclasses.replace(p, **read_recipe(p.recipe))


def expand(p: TrainStudentParams, methods: list[str] | None = None, alphas: list[float] | None = None,
           seeds: list[int] | None = None) -> list[TrainStudentParams]:
    """The runs of a sweep: methods × seeds, LoCa methods also × α (arguments win over the params' lists)."""
    ms = list(methods or p.methods or [p.method])
    al = list(alphas or p.alphas or [p.alpha])
    ss = list(seeds or p.seeds or [p.seed])
    out = []
    for m in ms:
        for a in (al if takes_alpha(m) else [p.alpha]):
            for s in ss:
                out.append(dataclasses.replace(p, method=m, alpha=float(a), seed=int(s), methods=None, alphas=None,
                                               seeds=None))
    return out


def group_methods(p: TrainStudentParams, group: str) -> list[str]:
    """The methods of group ``group`` of teacher ``p.teacher`` in ``p.groups``."""
    groups = p.groups or {}
    if p.teacher not in groups:
        raise ConfigError(f"--group {group!r} needs train_student.groups to have an entry for teacher {p.teacher!r}; "
                          f"it has {sorted(groups) or 'none'}")
    g = groups[p.teacher]
    if not isinstance(g, dict) or group not in g:
        raise ConfigError(f"train_student.groups.{p.teacher} has no group {group!r}; it has "
                          f"{sorted(g) if isinstance(g, dict) else g!r}")
    v = g[group]
    methods = [m.strip() for m in (v.split(",") if isinstance(v, str) else v) if str(m).strip()]
    if not methods:
        raise ConfigError(f"train_student.groups.{p.teacher}.{group} lists no methods; write e.g. \"kd,kd_star\"")
    return methods


def run_dir(p: TrainStudentParams) -> Path:
    return Path(p.out_dir) / run_name(p.method, p.alpha, p.seed, p.online)


def loss_config(p: TrainStudentParams) -> Any:
    """The losses library's LossConfig from the params (only the fields it declares)."""
    from loca_pipe.pipeline.losses import LossConfig

    names = {f.name for f in dataclasses.fields(LossConfig)}
    values = {"tau": p.tau, "alpha": p.alpha, "beta": p.beta, "gamma": p.gamma, "dkd_alpha": p.dkd_alpha,
              "dkd_beta": p.dkd_beta, "warmup_epochs": p.warmup_epochs, "ls_tau": p.ls_tau,
              "cross": p.cross, "cross_distance": p.cross_distance}
    return LossConfig(**{k: v for k, v in values.items() if k in names and v is not None})


_WARNED: set[float] = set()


def check_alpha_range(alpha: float, option: str) -> None:
    """LoCa α before any folder is made: refused outside (0, 2), warned (once per value) in [1, 2).

    s(1 − p_y) = α(1 − p_y)/(1 − p_y + p_k) exceeds 1 exactly when α > 1 + p_k/(1 − p_y), and
    p_k ≤ 1 − p_y, so α ≥ 2 makes the calibrated label probability negative (or 0) on every mis-instructed
    row: training could only stop at step 0. Between 1 and 2 it depends on the teacher's rows (docs/maths.md)."""
    if not (math.isfinite(alpha) and 0 < alpha < 2):
        raise ConfigError(f"LoCa α must be in (0, 2) — the paper uses 0.9–0.99; α ≥ 1 runs with a warning and α ≥ 2 "
                          f"makes every mis-instructed row's label probability ≤ 0 — got {alpha:g} in {option}")
    if alpha >= 1 and alpha not in _WARNED:
        _WARNED.add(alpha)
        log.warning("LoCa α=%g ≥ 1: prediction correctness is no longer guaranteed (the paper's Table 6: α ≥ 1 does "
                    "worse than plain KD), and a row where the label's calibrated probability would be negative stops "
                    "training with an error", alpha)


def check_params(p: TrainStudentParams) -> None:
    from loca_pipe.pipeline.losses import METHODS

    if p.method not in METHODS:
        raise ConfigError(f"unknown method {p.method!r}; {did_you_mean(p.method, METHODS)}valid methods: "
                          f"{sorted(METHODS)}")
    if p.augment not in AUGMENTS:
        raise ConfigError(f"unknown augment {p.augment!r}; valid values: {list(AUGMENTS)}")
    if not (p.tau > 0 and math.isfinite(p.tau)):
        raise ConfigError(f"tau must be a positive number; got {p.tau}")
    if takes_alpha(p.method):
        check_alpha_range(p.alpha, "--alpha/--alphas")
    if METHODS[p.method].blocks and not p.teacher_checkpoint:
        raise ConfigError(f"method {p.method!r} is Block-KD: its stepping-stone hybrids run the teacher's blocks; set "
                          f"train_student.teacher_checkpoint (--teacher-checkpoint PATH, the checkpoint the store's "
                          f"teacher was cached from)")
    if p.online and not p.teacher_checkpoint:
        raise ConfigError("online mode runs the live teacher: set train_student.teacher_checkpoint "
                          "(--teacher-checkpoint PATH, a file from `loca-pipe train-teacher`)")
    if p.max_samples is not None and (p.max_samples < 1 or p.targets):
        raise ConfigError(f"max_samples must be ≥ 1 and works with a logit store (not targets); got {p.max_samples}"
                          f"{' with targets ' + repr(p.targets) if p.targets else ''}")
    if p.memory_limit_gb < 0:
        raise ConfigError(f"memory_limit_gb must be ≥ 0; got {p.memory_limit_gb}")


def _sidecar_percent(d: dict[str, Any]) -> float | None:
    """A teacher's test top-1 in % from a train-teacher record (``test_top1``, which train-teacher writes in
    percent like every other evaluation; never guessed from the value)."""
    v = d.get("test_top1")
    return float(v) if isinstance(v, (int, float)) else None


def _teacher_accuracy(meta: dict[str, Any], checkpoint: str | None) -> float | None:
    """The teacher's test top-1 in % as recorded by train-teacher, when it can be found."""
    from loca_pipe.pipeline.models import read_sidecar

    prov = meta.get("provenance") or {}
    run_info = prov.get("run") or {}
    for d in (prov, run_info.get("sidecar") or {}):
        v = _sidecar_percent(d)
        if v is not None:
            return v
    for ck in (checkpoint, run_info.get("checkpoint"), prov.get("checkpoint")):
        if ck:
            try:
                return _sidecar_percent(read_sidecar(ck))
            except Exception:  # noqa: BLE001 - the accuracy is informational only
                continue
    return None


def check_run_folders(runs: list[TrainStudentParams]) -> None:
    """Refuse a sweep whose runs would share a folder, and folders that already hold a run (unless resume
    or overwrite) — before any training starts."""
    seen: dict[Path, TrainStudentParams] = {}
    for r in runs:
        d = run_dir(r)
        if d in seen:
            raise ConfigError(f"two runs of this sweep would both write {str(d)!r} (method {r.method}, α {r.alpha:g}, "
                              f"seed {r.seed}); remove the duplicate from --methods/--alphas/--seeds")
        seen[d] = r
        check_outputs({"--store": r.store, "--targets": r.targets, "--root": r.root, "--recipe": r.recipe,
                       "--teacher-checkpoint": r.teacher_checkpoint}, {"--out-dir": (d, FOLDER)})
        held = [f for f in ("metrics.json", "checkpoint.pt") if (d / f).exists()]
        if held and not (r.resume or r.overwrite):
            raise ConfigError(f"run folder {str(d)!r} already holds a run ({', '.join(held)}); pass --resume to "
                              f"continue it, --overwrite to replace it, or another --out-dir")


class _Shared:
    """What the runs of one process share: data sets, image tensors, teacher signals, teacher mistakes."""

    def __init__(self) -> None:
        self.items: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Any) -> Any:
        if key not in self.items:
            self.items[key] = make()
        return self.items[key]


def run_many(runs: list[TrainStudentParams]) -> list[Report]:
    """Train the runs of a sweep in turn in this process (data and teacher signal loaded once)."""
    runs = [with_recipe(r) for r in runs]
    for r in runs:
        check_params(r)
    check_run_folders(runs)
    shared = _Shared()
    return [run(r, shared) for r in runs]


def _check_student_outputs(model: Any, student: str, C: int, in_channels: int, image_size: int, dataset: str) -> None:
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, in_channels, image_size, image_size))
    model.train(was)
    k = int(out.shape[-1]) if out.ndim == 2 else None
    if k != C:
        got = f"{k} classes" if k is not None else f"an output of shape {tuple(out.shape)}"
        raise ConfigError(f"student {student!r} outputs {got} but data set {dataset!r} has {C} classes; build "
                          f"the student with num_classes={C} (a module:callable student receives num_classes)")


def _follow(p: TrainStudentParams, shared: _Shared, model: Any, images: Any, source_teacher: str | None,
            method: str) -> dict[str, Any]:
    """Follow rates of the trained student on its teacher's (CE: every teacher's) mis-instructed rows."""
    import torch

    from loca_pipe.pipeline.follow import follow_rates, teacher_mistakes
    from loca_pipe.pipeline.store import LogitStore

    if not p.store or p.online or not Path(p.store).exists():
        return {}
    names = LogitStore.open(p.store).teachers if method == "ce" else [source_teacher or p.teacher]
    was = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), 4096):
            preds.append(model(images.get(torch.arange(i, min(len(images), i + 4096)))).argmax(1).cpu())
    model.train(was)
    pred = torch.cat(preds).numpy()
    out = {}
    for name in names:
        t = shared.get(("mistakes", p.store, name), lambda: teacher_mistakes(p.store, name))
        out[t.teacher] = follow_rates(pred, t)
    return out


def _first_samples(p: TrainStudentParams, source: Any, spec: Any, meta: dict[str, Any], method: str) -> Any:
    """The source restricted to the first ``p.max_samples`` training samples (the teacher's full logits of
    those samples in memory; a store without full logits, or with cached views, is refused)."""
    from loca_pipe.pipeline.soft_labels import PlainSource, TensorSource

    n = int(p.max_samples)
    if isinstance(source, PlainSource):
        return PlainSource(n)
    if getattr(source, "has_views", False):
        raise ConfigError("max_samples needs a store without cached views; unset it or use a store cached with views: 0")
    from loca_pipe.stages.select_recipe import _teacher_logits

    return TensorSource(_teacher_logits(p.store, meta.get("teacher"), spec)[:n])


def _blockkd(p: TrainStudentParams, model: Any, teacher_model: Any, meta: dict[str, Any], spec: Any, C: int
             ) -> tuple[Any, str]:
    """The Block-KD wrapper of ``model``: the teacher from ``p.teacher_checkpoint`` (the live teacher in online
    mode), refused when its weights are not the ones the store's teacher was cached from."""
    from loca_pipe.pipeline.blockkd import build_blockkd
    from loca_pipe.pipeline.caching import weights_sha256
    from loca_pipe.pipeline.models import build_model, load_checkpoint, read_sidecar

    side = read_sidecar(p.teacher_checkpoint)
    teacher = teacher_model
    if teacher is None:
        teacher = build_model(side["arch"], int(side.get("num_classes", C)), int(spec.in_channels), int(spec.image_size))
        load_checkpoint(teacher, p.teacher_checkpoint)
    from loca_pipe.pipeline.models import file_sha256

    ck_sha = file_sha256(p.teacher_checkpoint)
    prov = meta.get("provenance") or {}
    want, have = prov.get("weights_sha256"), weights_sha256(teacher)
    if not p.online:
        if want is None:
            raise ConfigError(f"the store's teacher {meta.get('teacher')!r} records no weights hash, so it cannot be "
                              f"matched to checkpoint {p.teacher_checkpoint!r}; re-cache it with `loca-pipe cache-logits "
                              f"--checkpoint {p.teacher_checkpoint}` (Block-KD's targets and hybrids must be one teacher)")
        if want != have:
            raise ConfigError(f"the store's teacher {meta.get('teacher')!r} was cached from other weights (sha256 "
                              f"{str(want)[:12]}…) than checkpoint {p.teacher_checkpoint!r} (sha256 {have[:12]}…): "
                              f"Block-KD's KL targets and its hybrids must come from one teacher; pass the checkpoint "
                              f"that teacher was cached from, or pick the matching --teacher")
    teacher.to(next(model.parameters()).device)
    return build_blockkd(model, p.student, teacher, side["arch"], int(spec.in_channels), int(spec.image_size)), ck_sha


def run(p: TrainStudentParams, shared: _Shared | None = None) -> Report:
    """Train one student; the report's values are its final metrics (also written to ``<run dir>/metrics.json``).

    ``shared`` is :func:`run_many`'s cache of what the runs of one sweep load once (data, teacher signal)."""
    import torch

    from loca_pipe.pipeline import data as data_mod
    from loca_pipe.pipeline.augment import make_augmenter
    from loca_pipe.pipeline.losses import METHODS
    from loca_pipe.pipeline.models import build_model, load_checkpoint, read_sidecar, resolve_device
    from loca_pipe.pipeline.soft_labels import PlainSource, load_soft_labels, load_targets, run_order
    from loca_pipe.pipeline.training import (ImageSet, METRICS_JSON, atomic_write_text, preset_config,
                                             seed_everything, train_student)

    shared = shared or _Shared()
    p = with_recipe(p)
    check_params(p)
    if shared is not None and not shared.items:
        check_run_folders([p])
    out = run_dir(p)
    if p.overwrite and not p.resume and out.exists():
        shutil.rmtree(out)
    device = resolve_device(p.device)
    from loca_pipe.pipeline.distributed import init_from_env

    init_from_env(device.type)  # under torchrun: DDP over the ranks (pipeline.training), else one process
    threads = p.threads if p.threads is not None else (1 if p.preset == "short-cpu" and device.type == "cpu" else None)
    if threads:
        from loca_pipe.pipeline.threads import pin_threads

        pin_threads(int(threads))
    cfg = preset_config(p.preset, p.student, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, milestones=p.milestones, seed=p.seed,
                        amp=p.amp)
    spec = shared.get(("spec", p.dataset, p.split, p.root), lambda: data_mod.open_dataset(p.dataset, p.split, p.root))
    eval_spec = shared.get(("spec", p.dataset, p.eval_split, p.root),
                           lambda: data_mod.open_dataset(p.dataset, p.eval_split, p.root))
    C = int(spec.num_classes)
    method = p.method
    teacher_model = None
    meta: dict[str, Any] = {}
    mem = int(p.memory_limit_gb * (1 << 30))
    order = run_order(len(spec), C, mem)  # one data order for every method of this seed and memory limit
    if p.online:
        side = read_sidecar(p.teacher_checkpoint)
        teacher_model = build_model(side["arch"], int(side.get("num_classes", C)), spec.in_channels, spec.image_size)
        sha = load_checkpoint(teacher_model, p.teacher_checkpoint)
        if int(side.get("num_classes", C)) != C:
            raise ConfigError(f"teacher checkpoint {p.teacher_checkpoint!r} has {side.get('num_classes')} classes but "
                              f"data set {p.dataset!r} has {C}; use a teacher trained on this data set")
        source: Any = PlainSource(len(spec), order=order)
        meta = {"teacher": side["arch"], "provenance": {**side, "sha256": sha}}
    elif method == "ce":
        source = PlainSource(len(spec), order=order)
    elif p.targets:
        source = load_targets(p.targets, spec, method=method, alpha=p.alpha, tau=p.tau, student_classes=C,
                              teacher=p.teacher, memory_limit_bytes=mem, view_policy=p.view_policy, order=order)
        method = source.method  # targets already hold (calibrated) probabilities: plain KD on them
        meta = source.meta
    else:
        if not p.store:
            raise ConfigError(f"method {method!r} needs a teacher: set train_student.store (a logit store), "
                              f"train_student.targets, or online: true with a teacher_checkpoint")
        source = shared.get(("soft", p.store, p.teacher, C, p.tau, p.form, mem, p.view_policy),
                            lambda: load_soft_labels(p.store, spec, teacher=p.teacher, student_classes=C, tau=p.tau,
                                                     form=p.form, memory_limit_bytes=mem, view_policy=p.view_policy,
                                                     order=order))
        meta = source.meta
    if p.max_samples is not None and p.max_samples < len(source):
        source = _first_samples(p, source, spec, meta, method)
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
    notes: list[str] = []
    if method == "kd_star" and p.store and not p.online and Path(p.store).exists():
        from loca_pipe.pipeline.follow import teacher_mistakes

        t = shared.get(("mistakes", p.store, meta.get("teacher")), lambda: teacher_mistakes(p.store, meta.get("teacher")))
        if not t.mis.any():
            notes.append(f"KD* is plain KD here: teacher {t.teacher!r} has no mis-instructed training rows")
            log.warning(notes[-1])
    seed_everything(p.seed)
    model = build_model(p.student, C, int(spec.in_channels), int(spec.image_size))
    _check_student_outputs(model, p.student, C, int(spec.in_channels), int(spec.image_size), p.dataset)
    takes_a = bool(METHODS[p.method].loca)
    identity = {"method": p.method, "loss_method": method, "alpha": p.alpha if takes_a else None,
                "tau": p.tau, "beta": p.beta, "gamma": p.gamma, "seed": p.seed, "student": p.student,
                "dataset": p.dataset, "split": p.split, "eval_split": p.eval_split, "fingerprint": spec.fingerprint,
                "train_size": len(source), **({"max_samples": p.max_samples} if p.max_samples else {}),
                "store": None if method == "ce" and not p.targets else (p.targets or p.store),
                "teacher": meta.get("teacher"), "online": p.online, "augment": p.augment, "preset": p.preset,
                "form": getattr(source, "kind", None), "view_policy": p.view_policy,
                "recipe": read_recipe(p.recipe) if p.recipe else None,
                "train": dataclasses.asdict(cfg)}
    if p.method in ("dkd", "loca_dkd"):
        identity.update(dkd_alpha=p.dkd_alpha, dkd_beta=p.dkd_beta, warmup_epochs=p.warmup_epochs)
    if p.method in ("ls", "loca_ls"):
        identity.update(ls_tau=loss_config(p).ls_tau)
    blockkd = None
    if METHODS[p.method].blocks:
        blockkd, ck_sha = _blockkd(p, model, teacher_model, meta, spec, C)
        lc = loss_config(p)
        identity.update(cross=lc.cross, cross_distance=lc.cross_distance, teacher_checkpoint_sha256=ck_sha)
    images = shared.get(("images", p.dataset, p.split, p.root, str(device)), lambda: ImageSet(spec.dataset, device))
    eval_images = shared.get(("images", p.dataset, p.eval_split, p.root, str(device)),
                             lambda: ImageSet(eval_spec.dataset, device))
    labels = torch.as_tensor(spec.labels, dtype=torch.int64)
    eval_labels = torch.as_tensor(eval_spec.labels, dtype=torch.int64)
    name = run_name(p.method, p.alpha, p.seed, p.online)
    log.info("training %s (%s, student %s, %d samples, %s) → %s", name, method, p.student, len(source), device, out)
    fresh = not out.exists()
    try:
        res = train_student(model, images=images, labels=labels, source=source, method=method,
                            loss_cfg=loss_config(p), cfg=cfg, eval_images=eval_images, eval_labels=eval_labels,
                            out_dir=out, teacher_model=teacher_model, replay=replay, augmenter=augmenter,
                            resume=p.resume, blockkd=blockkd, identity={**identity, "run": out.name,
                                                       "teacher_test_top1": _teacher_accuracy(meta, p.teacher_checkpoint)},
                            progress=p.progress,
                            progress_desc=f"{name} ({meta['teacher']})" if meta.get("teacher") else name)
    except BaseException:
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before its first checkpoint leaves no empty folder behind
        raise
    metrics = dict(res.metrics)
    from loca_pipe.pipeline.distributed import world

    if p.follow and world()[0] == 0:
        follow = _follow(p, shared, model, images, meta.get("teacher"), method)
        if follow:
            metrics["follow"] = follow
    if notes:
        metrics["notes"] = notes
    if (metrics.get("follow") or notes) and world()[0] == 0:
        atomic_write_text(out / METRICS_JSON, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    text = json.dumps({k: metrics.get(k) for k in ("run", "method", "alpha", "seed", "test_top1", "test_top5",
                                                   "train_seconds")})
    return Report(SECTION, metrics, {"run": str(out)}, text)
