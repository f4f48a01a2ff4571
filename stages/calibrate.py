"""Stage ``calibrate``: precomputed KD and LoCa targets for the students (section ``calibrate``).

Writes the targets store ``out`` (layout: :mod:`loca_pipe.pipeline.targets`, docs/analysis.md) and
``metrics`` (a JSON file for dvc metrics: per teacher, the form, the calibrated share and the invariant
violations — which must all be 0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.analysis import connect
from loca_pipe.pipeline.guard import FILE, TARGETS, check_outputs
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.targets import write_targets
from loca_pipe.stages import Report
from loca_pipe.stages.config import check_writable
from loca_pipe.pipeline.student_spec import read_recipe

SECTION = "calibrate"


@dataclass(frozen=True)
class CalibrateParams:
    """Section ``calibrate`` of params.yaml."""

    store: str = "data/logits/fashion-mnist-train.zarr"
    teachers: tuple[str, ...] = ()  # empty: every teacher in the store
    alpha: tuple[float, ...] = (0.95,)  # one loca_<α> target per value (paper: 0.9–0.999)
    tau: float = 4.0  # temperature of the targets p = softmax(z/τ); students must use the same τ
    # select-recipe's output file: its τ wins over ``tau`` (as in train_student), so the pipeline's targets are made
    # at the τ its students train with (params.yaml sets it; unset, ``tau`` is used)
    recipe: str | None = None
    out: str = "data/targets/fashion-mnist-train.zarr"
    metrics: str = "data/calibrate.json"  # where the pipeline (params.yaml) writes it
    form: Literal["auto", "dense", "sparse"] = "auto"  # auto: dense for full-logit teachers with C ≤ dense_max_classes
    dense_max_classes: int = 4096
    scheduler: str | None = None  # dask.distributed scheduler address; empty: local threads
    overwrite: bool = False  # replace targets made from another store / other settings
    progress: bool = True  # a bar over the rows (throughput, ETA; one line per update off a terminal)


def run(params: CalibrateParams) -> Report:
    """Write (or resume) the targets; the report's values are what ``--json`` prints."""
    check_outputs({"STORE": params.store}, {"--out": (params.out, TARGETS), "--metrics": (params.metrics, FILE)})
    check_writable(params.out, "the targets store", "--out")  # before any work
    if params.metrics:
        check_writable(params.metrics, "the calibrate metrics", "--metrics", kind="file")
    params = with_recipe_tau(params)
    client = connect(params.scheduler)
    try:
        rep = write_targets(params.store, params.out, params.alpha, params.tau, teachers=params.teachers,
                            form=params.form, dense_max_classes=params.dense_max_classes,
                            overwrite=params.overwrite, client=client, progress=params.progress)
    finally:
        if client is not None:
            client.close()
    full = {"store": params.store, "params": asdict(params), **rep.to_dict()}
    if params.metrics:
        m = Path(params.metrics)
        m.parent.mkdir(parents=True, exist_ok=True)
        lean = {"violations": rep.violations,
                "teachers": {n: {"form": t["form"], "calibrated_rows": t["calibrated_rows"],
                                 "calibrated_ratio": t["calibrated_ratio"],
                                 "mean_scale_mis": t["mean_scale_mis"],
                                 "violations": sum(t["violations"].values())} for n, t in rep.teachers.items()}}
        m.write_text(json.dumps(lean, indent=1))
    outputs = {"targets": params.out, **({"metrics": params.metrics} if params.metrics else {})}
    return Report(SECTION, full, outputs, _text(full))


def with_recipe_tau(params: CalibrateParams) -> CalibrateParams:
    """``params`` with τ from the recipe file when one is set (and chooses τ)."""
    if not params.recipe:
        return params
    try:
        chosen = read_recipe(params.recipe)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("train_student.recipe", "calibrate.recipe")) from None
    return replace(params, tau=float(chosen["tau"])) if "tau" in chosen else params


def _text(rep: dict[str, Any]) -> str:
    """What `loca-pipe calibrate` prints."""
    from loca_pipe.stages.analyze import pct

    lines = [f"targets {rep['path']}  τ={rep['tau']:g}  α={rep['alphas']}  ({rep['seconds']:.1f} s)"]
    for n, t in rep["teachers"].items():
        arrays = ", ".join(f"{k} {tuple(v)}" for k, v in t["arrays"].items())
        lines.append(f"  {n}: {t['form']}; calibrated rows {t['calibrated_rows']:,} ({pct(t['calibrated_ratio'])}); "
                     f"invariant violations {sum(t['violations'].values())}; chunks written {t['chunks_written']}")
        lines.append(f"    arrays: {arrays}")
    return "\n".join(lines)
