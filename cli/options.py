"""Option parsing shared by the command modules, and the options several commands share, declared once.

The shared options are typer ``Annotated`` aliases (``Root``, ``Amp``, ``Progress``, …): a command writes
``root: Root = None`` and gets the same flag and help as every other command that takes it. An option's name is
its params key, so :func:`overrides` turns a command's arguments into its params overrides without writing each
option a second time. Torch-free, like every module the CLI imports at start (tests/cli/test_fast_usage.py).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional

import typer
from typer.core import TyperCommand

from loca_pipe.pipeline.names import DATASETS

# Devices every --device option takes (pipeline/models.py::resolve_device also takes cuda:N).
DEVICES = ("auto", "cpu", "cuda")


DATASET_HELP = f"Data set NAME ({', '.join(d for d in DATASETS if ':' not in d)}) or module:callable."  # never by hand


def choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A typer choice enum built from a library constant (never copied by hand): member ``crop_flip`` has
    value ``"crop-flip"``; ``--help`` lists the values."""
    return enum.Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Device = choices("Device", DEVICES)

# ---- options shared by several commands (one declaration each)
Dataset = Annotated[Optional[str], typer.Option(help=DATASET_HELP)]
Root = Annotated[Optional[str], typer.Option(help="Data set root folder.")]
DeviceOption = Annotated[Optional[Device], typer.Option(help="Where it runs (auto: CUDA where there is one).")]
Amp = Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="fp16 autocast (CUDA only).")]
Progress = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Show a progress bar (samples/s, ETA).")]
Momentum = Annotated[Optional[float], typer.Option(help="SGD momentum.")]
WeightDecay = Annotated[Optional[float], typer.Option(help="Weight decay.")]
StoreFromCache = Annotated[Optional[str], typer.Option(help="Logit store from `loca-pipe cache-logits`.")]


def params_file(section: str) -> Any:
    """The ``--params`` option of a command that reads params section ``section``."""
    return Annotated[Optional[Path], typer.Option(help=f"Params file whose section '{section}' gives the defaults "
                                                       f"(options override it).")]


def overrides(given: dict[str, Any], skip: Iterable[str] = ("params",)) -> dict[str, Any]:
    """A command's arguments (``locals()`` first thing in its body) as params overrides — each option's name is its
    params key; a choice becomes its value; None (not given) stays None, which the params loader skips."""
    drop = set(skip)
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in given.items() if k not in drop}


class MethodHelp(TyperCommand):
    """A command whose ``{methods}`` in an option's help is filled from the losses registry only when its help is
    shown: the registry imports torch, and building the text at import would load torch for every typo."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from loca_pipe.pipeline.losses import method_help  # deferred on purpose: torch, only for --help

        for p in self.params:
            if isinstance(getattr(p, "help", None), str) and "{methods}" in p.help:
                p.help = p.help.replace("{methods}", method_help())
        super().format_help(ctx, formatter)


def comma_list(text: Optional[str], option: str, kind: Callable[[str], Any] = str,
               example: str = "'0.9,0.95'") -> Optional[list[Any]]:
    """``"0.9, 0.95"`` → ``[0.9, 0.95]`` (None stays None: the option was not given)."""
    if text is None:
        return None
    try:
        return [kind(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        from loca_pipe.pipeline.errors import ConfigError  # here, not at import: usage errors stay fast

        raise ConfigError(f"{option} takes comma-separated values such as {example}; got {text!r}") from exc


STORE_RULE = ("every command names the logit store with --store PATH; info, verify, analyze and calibrate "
              "also take it as their first argument")


def store_option(positional: Optional[str], option: Optional[str]) -> Optional[str]:
    """The store of a command that takes it both ways (``loca-pipe analyze STORE`` = ``--store STORE``)."""
    if positional is not None and option is not None and positional != option:
        from loca_pipe.pipeline.errors import ConfigError

        raise ConfigError(f"two stores given: {positional!r} as the argument and {option!r} as --store; give one "
                          f"({STORE_RULE})")
    return option if option is not None else positional
