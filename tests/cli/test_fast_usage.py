"""A usage error answers without loading torch or zarr: checked from the interpreter's own record of what it
imported (PYTHONPROFILEIMPORTTIME lists every module as it is imported), running the installed `loca-pipe` as a
user does — not by a timer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "zarr", "torchvision", "transformers", "dask", "numpy")  # numpy: since --codec comes from names.py


def _imported(args: list[str]) -> tuple[int, set[str], str]:
    exe = shutil.which("loca-pipe") or str(Path(sys.executable).parent / "loca-pipe")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)
    mods = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return out.returncode, mods, out.stderr


@pytest.mark.parametrize("args, code", [
    (["--bogus"], 2),                 # unknown option
    (["bogus-command"], 2),           # unknown command
    (["--help"], 0),
    (["train-student", "--bogus"], 2),  # unknown option of a command
    (["cache-logits", "--logits-dtype", "float8"], 2),  # a value outside a choice list
])
def test_usage_errors_never_import_torch_or_zarr(args, code):
    rc, mods, err = _imported(args)
    assert rc == code, err[-2000:]
    assert "loca_pipe.cli.main" in mods  # the record is real: the CLI was imported under it
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy[:10]


def test_the_record_would_show_torch():
    # the same check on a command that does load the library: the method list of train-student --help comes from
    # the losses registry (torch), filled in only when that help is shown
    rc, mods, err = _imported(["train-student", "--help"])
    assert rc == 0, err[-2000:]
    assert "torch" in mods
