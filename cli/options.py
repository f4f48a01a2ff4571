"""Option parsing shared by the command modules."""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable, Optional

# Devices every --device option takes (pipeline/models.py::resolve_device also takes cuda:N).
DEVICES = ("auto", "cpu", "cuda")


def _dataset_help() -> str:
    from loca_pipe.pipeline.data import DATASETS

    return f"Data set NAME ({', '.join(d for d in DATASETS if ':' not in d)}) or module:callable."


DATASET_HELP = _dataset_help()  # from pipeline/data.py's DATASETS, never listed by hand


def choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A typer choice enum built from a library constant (never copied by hand): member ``crop_flip`` has
    value ``"crop-flip"``; ``--help`` lists the values."""
    return enum.Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


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
