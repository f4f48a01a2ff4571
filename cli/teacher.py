"""`loca-pipe prepare-data` and `loca-pipe train-teacher`: thin wrappers over their stages."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loca_pipe.cli.options import Dataset, Progress, Root, WeightDecay, choices
from loca_pipe.pipeline.names import AUGMENTATIONS


class Optimizer(str, enum.Enum):
    sgd = "sgd"
    adam = "adam"


class Schedule(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"


Augment = choices("Augment", AUGMENTATIONS)  # pipeline/names.py


def prepare_data(
    dataset: Dataset = None,
    root: Annotated[Optional[str], typer.Option(help="Data set root folder (fashion-mnist default: data/fashion-mnist).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Folder holding the Fashion-MNIST .gz files (the Debian package's by default).")] = None,
    record: Annotated[Optional[str], typer.Option(help="Where to write the fingerprint record (default: ROOT/fingerprints.json).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="Params file whose section 'prepare_data' gives the defaults (options override it).")] = None,
) -> None:
    """Copy + gunzip the Debian Fashion-MNIST files where torchvision reads them; record the data fingerprints."""
    from loca_pipe.stages import prepare_data as stage
    from loca_pipe.stages.config import load_section

    p = load_section(stage.PrepareDataParams, stage.SECTION, str(params) if params else {},
                     {"dataset": dataset, "root": root, "source": source, "record": record})
    from loca_pipe.pipeline.guard import FILE, FOLDER, check_outputs

    check_outputs({"--source": p.source}, {"--root": (p.root, FOLDER), "--record": (p.record, FILE)})
    typer.echo(str(stage.run(p)))


def train_teacher(
    name: Annotated[Optional[str], typer.Option(help="Teacher key: picks the entry of train_teacher.teachers in --params and names the default output file.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture: a model name (mlp_small, mlp, cnn_small, cnn, resnet20, resnet8x4, wrn_40_2, resnet18, ...) or module:callable.")] = None,
    dataset: Dataset = None,
    root: Root = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help="Optimizer.")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD (Nesterov) momentum.")] = None,
    weight_decay: WeightDecay = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help="Learning-rate schedule (cosine: per-step decay to 0).")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Training augmentation (crop-flip: pad 4, random crop, flip).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the weights, the data order and the augmentation.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    out_dir: Annotated[Optional[str], typer.Option(help="Folder of the default checkpoint path <out-dir>/<name or arch>.pt.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Checkpoint path (sidecar OUT.json and metrics OUT-with-.metrics.json next to it).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers (in-memory data sets use a faster batch path).")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Use only the first N train and N test samples (quick runs).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: one per core; 1 is faster for tiny models on a busy machine).")] = None,
    progress: Progress = None,
    params: Annotated[Optional[Path], typer.Option(help="Params file whose section 'train_teacher' (and its teachers.<name> entry) gives the defaults; options override it.")] = None,
) -> None:
    """Train a teacher on a data set; write its state dict, a JSON sidecar and a metrics JSON."""
    from loca_pipe.stages import train_teacher as stage

    overrides: dict[str, Any] = {
        "arch": arch, "dataset": dataset, "root": root, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer.value if optimizer else None, "momentum": momentum, "weight_decay": weight_decay,
        "schedule": schedule.value if schedule else None, "augment": augment.value if augment else None,
        "seed": seed, "device": device, "out_dir": out_dir, "out": out, "num_workers": num_workers,
        "max_samples": max_samples, "threads": threads, "progress": progress,
    }
    p = stage.load_params(str(params) if params else {}, name=name, overrides=overrides)
    typer.echo(str(stage.run(p)))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("prepare-data")(prepare_data)
    app.command("train-teacher")(train_teacher)
