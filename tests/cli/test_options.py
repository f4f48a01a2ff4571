"""Options declared once: a command's option names are its params keys (so cli/options.overrides passes them on
without a second list), and an option several commands share is one declaration with one flag and one help."""

from __future__ import annotations

import dataclasses
import enum

import pytest
import typer

from loca_pipe.cli import options
from loca_pipe.cli.main import app

COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("command, module, cls, own", [
    ("train-student", "train_student", "TrainStudentParams", {"params", "seeds", "methods", "group", "alphas"}),
    ("report", "report", "ReportParams", {"params", "quiet"}),
    ("select-recipe", "select_recipe", "SelectRecipeParams", {"params"}),
])
def test_every_option_is_a_params_key(command, module, cls, own):
    import importlib

    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(f"loca_pipe.stages.{module}"), cls))}
    names = {p.name for p in COMMANDS[command].params}
    assert own <= names and names - own <= fields, sorted(names - own - fields)


def test_overrides_turn_choices_into_values_and_skip_what_is_not_a_params_key():
    class Colour(str, enum.Enum):
        red = "red-ish"

    got = options.overrides({"params": "p.yaml", "colour": Colour.red, "n": None, "k": 3, "quiet": True},
                            skip=("params", "quiet"))
    assert got == {"colour": "red-ish", "n": None, "k": 3}


@pytest.mark.parametrize("flag, commands", [
    ("--root", ("cache-logits", "train-teacher", "train-student")),
    ("--dataset", ("cache-logits", "train-teacher", "train-student", "prepare-data")),
    ("--progress", ("cache-logits", "train-teacher", "train-student", "select-recipe")),
    ("--amp", ("cache-logits", "train-student")),
    ("--device", ("cache-logits", "train-student")),
    ("--weight-decay", ("train-teacher", "train-student")),
])
def test_a_shared_option_reads_the_same_in_every_command(flag, commands):
    seen = set()
    for c in commands:
        p = next(p for p in COMMANDS[c].params if flag in p.opts)
        seen.add((tuple(p.opts), tuple(p.secondary_opts), p.help))
    assert len(seen) == 1, seen
