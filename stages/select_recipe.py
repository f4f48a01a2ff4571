"""Stage `select-recipe`: choose the KD recipe (τ, β, γ; optionally epochs, lr) on a validation split.

The premise of every comparison is a KD recipe that makes distillation work on this data set, chosen
without looking at the test set. A fixed, seeded ``val_size`` rows of the **training** split are held out
(the test split is never opened by this stage); on the remaining rows a CE student and, for every recipe of
the declared ``grid`` and every teacher, a KD student are trained with the same seeds, and each is scored
by top-1 on the held-out rows. The recipe with the largest mean paired gain KD − CE over teachers and
seeds wins (ties: the first in grid order). The output file (``out``) holds the choice under ``chosen``,
which ``train-student --recipe FILE`` applies, plus every score, so the choice can be audited::

    {"chosen": {"tau": 1.0, "beta": 0.5, "gamma": 0.5},
     "criterion": "...", "validation": {"split": "train", "size": 5000, "seed": 0, "indices_sha256": "..."},
     "ce": {"val_top1": [...]}, "grid": [{"recipe": {...}, "gain": 0.8, "kd_val_top1": {teacher: [...]}}, ...]}

LoCa's α is not chosen here: the pipeline pre-registers one value (params.yaml ``analyze.alpha``).

``method: blockkd`` chooses Block-KD's weights the same way: every grid point (keys may add ``cross`` and
``cross_distance`` to the recipe's) trains a Block-KD student whose stepping-stone hybrids run the teacher
of ``teacher_checkpoints[teacher]`` (refused unless those are the weights the store's teacher was cached
from), scored against the same CE students. ``presets/select-blockkd-cross.yaml`` is the run that chose the
default ``cross = 0`` (docs/students.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.experiment import teacher_full_logits
from loca_pipe.pipeline.guard import FILE, check_outputs
from loca_pipe.pipeline.io import write_json
from loca_pipe.pipeline.student_spec import RECIPE_KEYS
from loca_pipe.pipeline.threads import pin_threads
from loca_pipe.stages import Report

log = logging.getLogger(__name__)
SECTION = "select_recipe"

LOSS_KEYS = ("tau", "beta", "gamma", "cross", "cross_distance")
SELECT_METHODS = ("kd", "blockkd")
# the paper's two settings (CIFAR-100 and ImageNet) and two between them
DEFAULT_GRID = ({"tau": 4.0, "beta": 0.9, "gamma": 0.1}, {"tau": 1.0, "beta": 0.5, "gamma": 0.5},
                {"tau": 2.0, "beta": 0.5, "gamma": 0.5}, {"tau": 4.0, "beta": 0.5, "gamma": 0.5})


@dataclass(frozen=True)
class SelectRecipeParams:
    """The ``select_recipe`` section of params.yaml."""

    store: str = "data/logits/fashion-mnist-train.zarr"
    teachers: tuple[str, ...] | None = None   # None: every teacher of the store
    student: str = "mlp_small"
    dataset: str = "fashion-mnist"
    root: str | None = None
    preset: str = "short-cpu"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    val_size: int = 5000
    val_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    grid: tuple[dict[str, float], ...] = field(default=DEFAULT_GRID)
    out: str = "data/recipe.json"
    threads: int = 1
    progress: bool = False
    method: str = "kd"                                # kd | blockkd (the students scored against CE)
    workers: int = 1                                  # processes training the grid's students at once (same results)
    teacher_checkpoints: dict[str, str] | None = None  # blockkd: teacher name → checkpoint for the hybrids


def split_indices(n: int, val_size: int, seed: int) -> tuple[Any, Any]:
    """(fit, val): sorted data-set indices of the training split; val = the first ``val_size`` of a seeded
    permutation. A pure function of (n, val_size, seed)."""
    import torch

    if not 0 < val_size < n:
        raise ConfigError(f"select_recipe.val_size must be between 1 and {n - 1} (the training split has {n} "
                          f"rows); got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def check_grid(grid: Any) -> list[dict[str, float]]:
    if not grid:
        raise ConfigError("select_recipe.grid is empty; declare at least one recipe, e.g. {tau: 1, beta: 0.5, gamma: 0.5}")
    out = []
    for i, g in enumerate(grid):
        if not isinstance(g, dict) or not g or not set(g) <= set(RECIPE_KEYS):
            raise ConfigError(f"select_recipe.grid[{i}] must be a mapping with keys among {list(RECIPE_KEYS)}; got {g!r}")
        out.append({k: (int(v) if k == "epochs" else str(v) if k == "cross_distance" else float(v))
                    for k, v in g.items()})
    return out


def check_method(p: SelectRecipeParams, teachers: list[str]) -> None:
    """The scored method and, for Block-KD, one checkpoint per teacher (before any training)."""
    if p.method not in SELECT_METHODS:
        raise ConfigError(f"select_recipe.method must be one of {list(SELECT_METHODS)}; got {p.method!r}")
    if p.method == "blockkd":
        missing = [t for t in teachers if not (p.teacher_checkpoints or {}).get(t)]
        if missing:
            raise ConfigError(f"select_recipe.method blockkd runs the teacher's blocks in its hybrids: set "
                              f"select_recipe.teacher_checkpoints for {missing} (teacher name: checkpoint the store's "
                              f"teacher was cached from)")


@dataclass
class _Context:
    """What every scored student of one process reads: the fit / held-out rows, the teachers' logits on the fit
    rows, and (Block-KD) the teachers for the hybrids."""

    fit_img: Any
    val_img: Any
    fit_y: Any
    val_y: Any
    logits: dict[str, Any]
    num_classes: int
    in_channels: int
    image_size: int
    hybrid_teachers: dict[str, Any]


_CONTEXT: _Context | None = None  # one per process: set by _load (in the parent, or in each worker)


def _load(p: SelectRecipeParams, teachers: list[str]) -> _Context:
    import torch

    from loca_pipe.pipeline import data as data_mod
    from loca_pipe.pipeline.store import LogitStore
    from loca_pipe.pipeline.training import ImageSet, preload

    global _CONTEXT
    pin_threads(int(p.threads))  # the one thread helper, pipeline/threads.py
    spec = data_mod.open_dataset(p.dataset, "train", p.root)  # the only split this stage reads
    fit, val = split_indices(len(spec), int(p.val_size), int(p.val_seed))
    x = preload(spec.dataset)
    y = torch.as_tensor(spec.labels, dtype=torch.int64)
    dev = torch.device("cpu")
    C = int(spec.num_classes)
    hybrid_teachers = {}
    if p.method == "blockkd":
        from loca_pipe.pipeline.blockkd import matched_teacher

        st = LogitStore.open(p.store)
        for t in teachers:
            tv = st.teacher(t)
            hybrid_teachers[t] = matched_teacher(str(p.teacher_checkpoints[t]), {"teacher": tv.name, "provenance": tv.attrs},
                                                 C, int(spec.in_channels), int(spec.image_size))
    _CONTEXT = _Context(ImageSet(None, dev, tensor=x[fit]), ImageSet(None, dev, tensor=x[val]), y[fit], y[val],
                        {t: teacher_full_logits(p.store, t, spec)[fit] for t in teachers}, C, int(spec.in_channels),
                        int(spec.image_size), hybrid_teachers)
    return _CONTEXT


def _score(p: SelectRecipeParams, method: str, recipe: dict[str, Any], seed: int, teacher: str | None) -> float:
    """Top-1 on the held-out training rows of one student (CE when ``teacher`` is None): a pure function of its
    arguments and the process's context, so it does not matter which process trains it."""
    from loca_pipe.pipeline.losses import LossConfig
    from loca_pipe.pipeline.models import build_model
    from loca_pipe.pipeline.soft_labels import PlainSource, TensorSource
    from loca_pipe.pipeline.training import preset_config, seed_everything, train_student

    ctx = _CONTEXT
    assert ctx is not None, "select-recipe: _load runs before _score in every process"
    source = PlainSource(len(ctx.fit_y)) if teacher is None else TensorSource(ctx.logits[teacher])
    cfg = preset_config(p.preset, p.student, epochs=recipe.get("epochs", p.epochs), batch_size=p.batch_size,
                        lr=recipe.get("lr", p.lr), seed=seed)
    lc = LossConfig(**{k: recipe[k] for k in LOSS_KEYS if k in recipe})
    seed_everything(seed)
    model = build_model(p.student, ctx.num_classes, ctx.in_channels, ctx.image_size)
    blockkd = None
    if method == "blockkd":
        from loca_pipe.pipeline.blockkd import build_blockkd

        t_model, t_arch = ctx.hybrid_teachers[teacher]
        blockkd = build_blockkd(model, p.student, t_model, t_arch, ctx.in_channels, ctx.image_size)
    res = train_student(model, images=ctx.fit_img, labels=ctx.fit_y, source=source, method=method, loss_cfg=lc,
                        cfg=cfg, eval_images=ctx.val_img, eval_labels=ctx.val_y, progress=p.progress, blockkd=blockkd,
                        progress_desc=f"select-recipe {method} " + " ".join(
                            f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}" for k, v in recipe.items()))
    return float(res.metrics["test_top1"])  # the held-out rows of the training split


def _score_all(p: SelectRecipeParams, teachers: list[str], jobs: list[tuple]) -> list[float]:
    """Every job's score, in the order given: in this process, or (``workers`` > 1) in that many spawned
    processes, each loading the data once; results equal one process's (tested)."""
    workers = min(int(p.workers), len(jobs))
    if workers <= 1:
        _load(p, teachers)
        return [_score(p, *j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_load,
                             initargs=(p, teachers)) as pool:
        futures = [pool.submit(_score, p, *j) for j in jobs]
        return [f.result() for f in futures]


def run(p: SelectRecipeParams) -> Report:
    """Train the grid on the fit rows, score it on the held-out training rows, write ``out``; its content is the
    report."""
    from loca_pipe.pipeline import data as data_mod
    from loca_pipe.pipeline import stats
    from loca_pipe.pipeline.store import LogitStore

    check_outputs({"--store": p.store, "--root": p.root}, {"--out": (p.out, FILE)})  # before any work
    grid = check_grid(p.grid)
    if len(grid) == 1:  # a declared recipe (e.g. the paper's for its own data set): nothing to choose
        doc = {"chosen": grid[0], "criterion": "the only recipe of the grid, declared, not chosen on data",
               "validation": None, "grid": [{"recipe": grid[0]}],
               "alpha": "not chosen here: LoCa's α is pre-registered in params.yaml (analyze.alpha)"}
        return _write(Path(p.out), doc)
    if int(p.workers) < 1:
        raise ConfigError(f"select_recipe.workers must be ≥ 1; got {p.workers}")
    teachers = list(p.teachers or LogitStore.open(p.store).teachers)
    check_method(p, teachers)
    n = len(data_mod.open_dataset(p.dataset, "train", p.root))
    fit, val = split_indices(n, int(p.val_size), int(p.val_seed))
    # every student of the grid, each once: CE per distinct (epochs, lr), then the scored method per recipe
    jobs: dict[tuple, tuple] = {}
    for recipe in grid:
        key = (recipe.get("epochs"), recipe.get("lr"))
        for s in p.seeds:
            jobs.setdefault(("ce", key, s), ("ce", recipe, s, None))
            for t in teachers:
                jobs[(p.method, json.dumps(recipe, sort_keys=True), s, t)] = (p.method, recipe, s, t)
    score = dict(zip(jobs, _score_all(p, teachers, list(jobs.values()))))
    rows = []
    for recipe in grid:
        key = (recipe.get("epochs"), recipe.get("lr"))
        ce = [score[("ce", key, s)] for s in p.seeds]
        kd = {t: [score[(p.method, json.dumps(recipe, sort_keys=True), s, t)] for s in p.seeds] for t in teachers}
        gains = [k - c for t in teachers for k, c in zip(kd[t], ce)]
        per_teacher = {t: stats.paired(kd[t], ce).as_dict() for t in teachers}
        rows.append({"recipe": recipe, "gain": sum(gains) / len(gains), "kd_val_top1": kd, "ce_val_top1": ce,
                     "paired_vs_ce": per_teacher})
        log.info("recipe %s: mean KD − CE on validation %+.2f", recipe, rows[-1]["gain"])
    best = max(range(len(rows)), key=lambda i: (rows[i]["gain"], -i))
    doc = {"chosen": rows[best]["recipe"], "method": p.method,
           "criterion": f"largest mean paired gain ({p.method} − CE) in top-1 on the held-out training rows, over teachers "
                        "and seeds; ties: first in grid order",
           "validation": {"split": "train", "size": int(val.numel()), "fit_size": int(fit.numel()),
                          "seed": int(p.val_seed),
                          "indices_sha256": hashlib.sha256(val.numpy().tobytes()).hexdigest()},
           "teachers": teachers, "student": p.student, "seeds": list(p.seeds), "grid": rows,
           "alpha": "not chosen here: LoCa's α is pre-registered in params.yaml (analyze.alpha)"}
    return _write(Path(p.out), doc)


def _write(out: Path, doc: dict[str, Any]) -> Report:
    write_json(out, doc, sort_keys=False)
    text = json.dumps({"chosen": doc["chosen"],  # a declared single recipe has no gain: null
                       "gains": [round(r["gain"], 3) if "gain" in r else None for r in doc["grid"]]})
    return Report(SECTION, doc, {"recipe": str(out)}, text)
