"""Stage three: train students from a logit store (or a targets store, or a live teacher).

``run(params)`` trains one (method, α, seed) run, :func:`run_many` a sweep in one process; both are one call into
:mod:`loca_pipe.pipeline.experiment` (which writes ``<out_dir>/<run name>/metrics.json``, ``log.csv`` and
``checkpoint.pt``, and measures the follow rates). What a run is — its settings, its name (:func:`run_name`:
``kd-s1``, ``loca-a0.9-s2``), its recipe and the checks made before training — is
:mod:`loca_pipe.pipeline.student_spec`. This stage adds what only the params section has: the sweep lists
(``methods`` × ``seeds``, LoCa methods × ``alphas``) and the named method groups of the DVC matrix.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from loca_pipe.pipeline import experiment
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.experiment import Shared
from loca_pipe.pipeline.names import AUGMENTATIONS
# check_params, check_run_folders, loss_config, run_name, with_recipe: importable from this stage as before the move
from loca_pipe.pipeline.student_spec import (StudentRun, check_params, check_run_folders, loss_config,  # noqa: F401
                                             run_name, takes_alpha, with_recipe)
from loca_pipe.stages import Report

SECTION = "train_student"

AUGMENTS = AUGMENTATIONS  # pipeline/names.py, the one list


@dataclass(frozen=True)
class TrainStudentParams(StudentRun):
    """The ``train_student`` section of params.yaml (every key optional): one run's settings
    (:class:`~loca_pipe.pipeline.student_spec.StudentRun`) and the sweep lists."""

    # sweep (one process, runs in turn): every method × seed, LoCa methods × every α; None = the single values
    methods: tuple[str, ...] | None = None
    alphas: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    # named method groups per teacher, for the DVC matrix: {teacher: {group: "kd,kd_star"}} (`--group NAME`)
    groups: dict[str, dict[str, str]] | None = None
    workers: int = 1                      # processes training a sweep's runs at once (same results, sooner)


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


def _report(metrics: dict[str, Any], out: Any) -> Report:
    text = json.dumps({k: metrics.get(k) for k in ("run", "method", "alpha", "seed", "test_top1", "test_top5",
                                                   "train_seconds")})
    return Report(SECTION, metrics, {"run": str(out)}, text)


def run_many(runs: list[TrainStudentParams]) -> list[Report]:
    """Train the runs of a sweep in turn in this process (data and teacher signal loaded once)."""
    return [_report(*r) for r in experiment.run_many(runs, workers=runs[0].workers if runs else 1)]


def run(p: TrainStudentParams, shared: Shared | None = None) -> Report:
    """Train one student; the report's values are its final metrics (also written to ``<run dir>/metrics.json``)."""
    return _report(*experiment.run_one(p, shared))
