"""`loca-pipe analyze` (mis-instruction statistics) and `loca-pipe calibrate` (precomputed LoCa/KD targets)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loca_pipe.cli.options import choices, comma_list, store_option
from loca_pipe.pipeline.names import TARGET_FORMS as FORMS


class Entropy(str, enum.Enum):
    auto = "auto"
    topk = "topk"


Form = choices("Form", FORMS)  # pipeline/names.py (targets forms)


def _floats(text: Optional[str], opt: str) -> Optional[list[float]]:
    return comma_list(text, opt, float)


def _names(text: Optional[str]) -> Optional[list[str]]:
    return comma_list(text, "--teachers")


def _params(section: str, cls: type, params: Optional[Path], overrides: dict[str, Any]):
    from loca_pipe.stages.config import load_section

    return load_section(cls, section, str(params) if params else {}, overrides)


StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Logit store path (the same as the argument STORE).")]


def analyze(
    store: Annotated[Optional[str], typer.Argument(metavar="STORE", help="Logit store path (or --store; default: analyze.store of --params).")] = None,
    store_opt: StoreOpt = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", "-t", help="Comma-separated teacher names (default: all in the store).")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Comma-separated LoCa α values for the scale statistics, each in (0, 1) (default 0.95).")] = None,
    tau: Annotated[Optional[float], typer.Option(help="Temperature τ of p = softmax(z/τ) (default 4; must be declared at cache time for top-k-only teachers).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (default data/analysis, where the pipeline writes).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (tcp://host:8786); default: local threads.")] = None,
    bins: Annotated[Optional[int], typer.Option(help="Histogram bins.")] = None,
    top_confusions: Annotated[Optional[int], typer.Option(help="(label → prediction) pairs kept per teacher.")] = None,
    entropy: Annotated[Optional[Entropy], typer.Option(help="auto: exact entropy from full logits when stored; topk: top-k+tail bound, never read the full logits.")] = None,
    samples: Annotated[Optional[bool], typer.Option("--samples/--no-samples", help="Write the per-sample Parquet table.")] = None,
    figures: Annotated[Optional[bool], typer.Option("--figures/--no-figures", help="Write the PNG figures.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace results of another store in the output folder.")] = None,
    scale: Annotated[Optional[bool], typer.Option("--scale/--no-scale", help="LoCa scale statistics for each α (--no-scale ignores α; `calibrate` reports them too).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="Params file whose section 'analyze' gives the defaults (options override it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON on stdout.")] = False,
) -> None:
    """Mis-instruction statistics of every teacher in a logit store: ratios, confusions, confidences, figures."""
    from loca_pipe.stages import analyze as stage
    from loca_pipe.stages.config import check_writable

    p = _params("analyze", stage.AnalyzeParams, params, {
        "store": store_option(store, store_opt), "teachers": _names(teachers), "alpha": _floats(alpha, "--alpha"), "tau": tau, "out": out,
        "scheduler": scheduler, "bins": bins, "top_confusions": top_confusions,
        "entropy": entropy.value if entropy else None, "samples": samples, "figures": figures, "overwrite": overwrite,
        "scale": scale})
    check_writable(p.out, "analysis results", "--out")
    rep = stage.run(p)
    typer.echo(rep.to_json() if as_json else str(rep))


def calibrate(
    store: Annotated[Optional[str], typer.Argument(metavar="STORE", help="Logit store path (or --store; default: calibrate.store of --params).")] = None,
    store_opt: StoreOpt = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", "-t", help="Comma-separated teacher names (default: all in the store).")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Comma-separated LoCa α values; one loca_<α> target each (default 0.95).")] = None,
    tau: Annotated[Optional[float], typer.Option(help="Temperature τ of the targets (default 4).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Targets store path (a Zarr v3 folder).")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Metrics JSON path (dvc metrics; default data/calibrate.json).")] = None,
    form: Annotated[Optional[Form], typer.Option(help="auto: dense (R, C) for full-logit teachers, sparse top-k form otherwise.")] = None,
    dense_max_classes: Annotated[Optional[int], typer.Option(help="With form auto, more classes than this → sparse.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address; default: local threads.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace targets made from another store or with other settings.")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar over the rows (rows/s, ETA).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="Params file whose section 'calibrate' gives the defaults.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Write precomputed KD and LoCa targets (validated against LoCa's invariants) for the students."""
    from loca_pipe.stages import calibrate as stage

    p = _params("calibrate", stage.CalibrateParams, params, {
        "store": store_option(store, store_opt), "teachers": _names(teachers), "alpha": _floats(alpha, "--alpha"), "tau": tau, "out": out,
        "metrics": metrics, "form": form.value if form else None, "dense_max_classes": dense_max_classes,
        "scheduler": scheduler, "overwrite": overwrite, "progress": progress})
    rep = stage.run(p)
    typer.echo(rep.to_json() if as_json else str(rep))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("analyze")(analyze)
    app.command("calibrate")(calibrate)
