"""`loca-pipe train-student` (stage three) and `loca-pipe report` (the comparison table and α plot)."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Optional

import typer

from loca_pipe.cli.options import Device  # noqa: F401 - train.Device, as before options were shared
from loca_pipe.cli.options import (Amp, Dataset, DeviceOption, MethodHelp, Momentum, Progress, Root, StoreFromCache,
                                   WeightDecay, choices, comma_list, overrides, params_file)
from loca_pipe.pipeline.names import AUGMENTATIONS, REPORT_METRICS, VIEW_POLICIES
from loca_pipe.pipeline.names import SOFT_LABEL_FORMS as FORMS


class Preset(str, enum.Enum):
    short_cpu = "short-cpu"
    paper_cifar = "paper-cifar"


Form = choices("Form", FORMS)  # pipeline/names.py (soft-label forms)


ViewPolicy = choices("ViewPolicy", VIEW_POLICIES)  # pipeline/names.py


Augment = choices("Augment", AUGMENTATIONS)  # pipeline/names.py


Metric = choices("Metric", REPORT_METRICS)  # pipeline/names.py (the report's metrics)

TrainStudentParamsFile = params_file("train_student")
ReportParamsFile = params_file("report")
SelectRecipeParamsFile = params_file("select_recipe")


def _list(text: Optional[str], kind: type, option: str) -> Optional[list[Any]]:
    example = {float: "'0.9,0.95'", int: "'0,1,2'"}.get(kind, "'ce,kd,loca'")
    return comma_list(text, option, kind, example)


def train_student(
    store: StoreFromCache = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher name in the store (default: its only teacher).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Targets store from `loca-pipe calibrate` (instead of logits).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Loss, from the losses registry: {methods}.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoCa α (0 < α < 1; paper: 0.9–0.99).")] = None,
    tau: Annotated[Optional[float], typer.Option(help="KD temperature τ.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="KD loss weight β.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="CE loss weight γ.")] = None,
    dkd_alpha: Annotated[Optional[float], typer.Option(help="DKD target-class weight.")] = None,
    dkd_beta: Annotated[Optional[float], typer.Option(help="DKD non-target weight.")] = None,
    ls_tau: Annotated[Optional[float], typer.Option(help="Base temperature of logit standardisation (ls, loca_ls; default 2).")] = None,
    cross: Annotated[Optional[float], typer.Option(help="Block-KD cross-term weight (the paper's γ; blockkd* methods).")] = None,
    cross_distance: Annotated[Optional[str], typer.Option(help="Block-KD cross-term distance: kl or mse.")] = None,
    form: Annotated[Optional[Form], typer.Option(help="Teacher signal: full logits, top-k (sparse, exact at stored τ), or auto.")] = None,
    view_policy: Annotated[Optional[ViewPolicy], typer.Option(help="Cached views: cycle (epoch e → view e mod V) or random per sample.")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student model NAME (model zoo) or module:callable.")] = None,
    dataset: Dataset = None,
    root: Root = None,
    split: Annotated[Optional[str], typer.Option(help="Training split.")] = None,
    eval_split: Annotated[Optional[str], typer.Option(help="Held-out split for top-1/top-5.")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Plain augmentation when the store has no cached views (mismatches un-augmented teacher logits).")] = None,
    preset: Annotated[Optional[Preset], typer.Option(help="Optimisation recipe; the options below override it.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Initial learning rate (SGD).")] = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    milestones: Annotated[Optional[str], typer.Option(help="Comma-separated epochs where lr is multiplied by 0.1.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (model init and data order).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Sweep: comma-separated seeds (one process, runs in turn).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Sweep: comma-separated methods.")] = None,
    group: Annotated[Optional[str], typer.Option(help="Sweep: the methods of group NAME of --teacher in the params' train_student.groups.")] = None,
    alphas: Annotated[Optional[str], typer.Option(help="Sweep: comma-separated α for the LoCa methods.")] = None,
    device: DeviceOption = None,
    amp: Amp = None,
    out_dir: Annotated[Optional[str], typer.Option(help="Folder of run folders (<out>/<method>[-a<α>]-s<seed>).")] = None,
    online: Annotated[Optional[bool], typer.Option("--online/--offline", help="Run the live teacher instead of the store (A/B).")] = None,
    teacher_checkpoint: Annotated[Optional[str], typer.Option(help="Teacher checkpoint for --online, and for the Block-KD methods' hybrids (the one the store's teacher was cached from).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue from the run's last checkpoint.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace a run folder that already holds a run (otherwise refused).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Recipe file from `loca-pipe select-recipe` (sets τ, β, γ).")] = None,
    memory_limit_gb: Annotated[Optional[float], typer.Option(help="Teacher signal above this is streamed chunk by chunk.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Train on the first N training samples only (a full-logit store).")] = None,
    progress: Progress = None,
    params: TrainStudentParamsFile = None,
) -> None:
    """Train a student from cached teacher logits (or targets, or a live teacher); writes metrics, log, checkpoint."""
    given = overrides(locals(), skip=("params", "seeds", "methods", "group", "alphas"))  # option name = params key
    from loca_pipe.stages import train_student as stage
    from loca_pipe.stages.config import load_section

    given["milestones"] = _list(milestones, int, "--milestones")
    p = load_section(stage.TrainStudentParams, stage.SECTION, str(params) if params else {}, given)
    from loca_pipe.stages.config import check_writable

    check_writable(p.out_dir, "student runs", "--out-dir")  # before any training
    method_list = _list(methods, str, "--methods")
    if group is not None:
        if method_list:
            raise typer.BadParameter("give --methods or --group, not both", param_hint="--group")
        method_list = stage.group_methods(p, group)
    runs = stage.expand(p, methods=method_list, alphas=_list(alphas, float, "--alphas"), seeds=_list(seeds, int, "--seeds"))
    from loca_pipe.pipeline.distributed import world

    for m in stage.run_many(runs):
        if world()[0] != 0:
            continue  # under torchrun only rank 0 reports (it also writes the run folder)
        typer.echo(str(m))


def report(
    runs_dir: Annotated[Optional[str], typer.Option(help="Folder holding the run folders (*/metrics.json).")] = None,
    out_dir: Annotated[Optional[str], typer.Option(help="Where report.md/.csv/.json and alpha.png go.")] = None,
    metric: Annotated[Optional[Metric], typer.Option(help="Which accuracy to compare.")] = None,
    teacher_top1: Annotated[Optional[float], typer.Option(help="Teacher accuracy to show (default: from the runs).")] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="Refuse runs that are not comparable (default: leave them out, with the reason).")] = None,
    params: ReportParamsFile = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print where the report went, not the report (dvc.yaml: `make repro` prints it once, at the end).")] = False,
) -> None:
    """Paired comparisons over seeds (95 % intervals, p-values), mis-instruction and follow-rate tables, figures."""
    given = overrides(locals(), skip=("params", "quiet"))  # option name = params key
    from loca_pipe.stages import report as stage
    from loca_pipe.stages.config import load_section

    p = load_section(stage.ReportParams, stage.SECTION, str(params) if params else {}, given)
    from loca_pipe.stages.config import check_writable

    from loca_pipe.pipeline.guard import FOLDER, check_outputs

    check_outputs({"--runs-dir": p.runs_dir}, {"--out-dir": (p.out_dir, FOLDER)})
    check_writable(p.out_dir, "the report", "--out-dir")
    rep = stage.run(p)
    typer.echo(f"report: {rep.outputs['markdown']}" if quiet else str(rep))


def select_recipe(
    store: StoreFromCache = None,
    teachers: Annotated[Optional[str], typer.Option(help="Comma-separated teachers of the store (default: all).")] = None,
    val_size: Annotated[Optional[int], typer.Option(help="Training rows held out for validation (never the test split).")] = None,
    val_seed: Annotated[Optional[int], typer.Option(help="Seed of the held-out rows.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds per grid point.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Where the recipe file goes (train-student --recipe reads it).")] = None,
    progress: Progress = None,
    params: SelectRecipeParamsFile = None,
) -> None:
    """Choose the KD recipe (τ, β, γ) by KD-vs-CE top-1 on held-out training rows; writes the recipe file."""
    given = overrides(locals())  # option name = params key
    from loca_pipe.stages import select_recipe as stage
    from loca_pipe.stages.config import load_section

    given.update(teachers=_list(teachers, str, "--teachers"), seeds=_list(seeds, int, "--seeds"))
    p = load_section(stage.SelectRecipeParams, stage.SECTION, str(params) if params else {}, given)
    typer.echo(str(stage.run(p)))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("select-recipe")(select_recipe)
    app.command("train-student", cls=MethodHelp)(train_student)
    app.command("report")(report)
