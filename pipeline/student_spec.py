"""What one student run is: its settings (:class:`StudentRun`), its folder name, its recipe, its loss settings,
and the checks made before any training (bad values, clashing or occupied run folders).

The run name comes from :func:`run_name` only: ``<method>-s<seed>`` (``ce-s0``, ``kd-s1``), with the α for
LoCa methods (``loca-a0.9-s2``, ``loca_dkd-a0.95-s0``) and an ``-online`` suffix for live-teacher runs.
Names cannot collide silently: a sweep whose runs share a folder is refused before training, and a folder
that already holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set.

``recipe`` (the output of ``loca-pipe select-recipe``) sets τ, β, γ (and epochs or lr when it chose them).
Running the runs is :mod:`loca_pipe.pipeline.experiment`; the ``train_student`` params section
(``stages/train_student.py``) is a :class:`StudentRun` plus the sweep lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError, did_you_mean
from loca_pipe.pipeline.guard import FOLDER, check_outputs
from loca_pipe.pipeline.names import AUGMENTATIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentRun:
    """One student run's settings (every key optional; the ``train_student`` params section adds the sweep lists)."""

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


def takes_alpha(method: str) -> bool:
    from loca_pipe.pipeline.losses import METHODS

    return bool(METHODS[method].loca) if method in METHODS else method.startswith("loca")


def run_name(method: str, alpha: float, seed: int, online: bool = False) -> str:
    """The one place a run's folder name is derived (see the module docstring)."""
    a = f"-a{alpha:g}" if takes_alpha(method) else ""
    return f"{method}{a}-s{seed}{'-online' if online else ''}"


RECIPE_KEYS = ("tau", "beta", "gamma", "epochs", "lr", "cross", "cross_distance")  # select-recipe's grid keys


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


def with_recipe(p: StudentRun) -> StudentRun:
    """``p`` with the recipe file's choice applied (the file wins over tau/beta/gamma given elsewhere)."""
    if not p.recipe:
        return p
    return dataclasses.replace(p, **read_recipe(p.recipe))



def run_dir(p: StudentRun) -> Path:
    return Path(p.out_dir) / run_name(p.method, p.alpha, p.seed, p.online)


def loss_config(p: StudentRun) -> Any:
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


def check_params(p: StudentRun) -> None:
    from loca_pipe.pipeline.losses import METHODS

    if p.method not in METHODS:
        raise ConfigError(f"unknown method {p.method!r}; {did_you_mean(p.method, METHODS)}valid methods: "
                          f"{sorted(METHODS)}")
    if p.augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment {p.augment!r}; valid values: {list(AUGMENTATIONS)}")
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


def teacher_accuracy(meta: dict[str, Any], checkpoint: str | None) -> float | None:
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


def check_run_folders(runs: list[StudentRun]) -> None:
    """Refuse a sweep whose runs would share a folder, and folders that already hold a run (unless resume
    or overwrite) — before any training starts."""
    seen: dict[Path, StudentRun] = {}
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
