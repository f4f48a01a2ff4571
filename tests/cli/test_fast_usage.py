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
    assert "loca_pipe.cli.fast_usage" in mods  # the record is real: the CLI was imported under it
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy[:10]
    if code == 2 and args[-1] == "--bogus" or args == ["bogus-command"]:  # the two fast answers: not even typer
        assert not {m.split(".")[0] for m in mods} & {"typer", "pydantic", "click"}, sorted(mods)[:20]


def test_the_record_would_show_torch():
    # the same check on a command that does load the library: the method list of train-student --help comes from
    # the losses registry (torch), filled in only when that help is shown
    rc, mods, err = _imported(["train-student", "--help"])
    assert rc == 0, err[-2000:]
    assert "torch" in mods


# -- the fast answers equal typer's --------------------------------------------------------------------------

def _typer_answer(argv: list[str], capsys) -> tuple[int, str]:
    from loca_pipe.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


def _fast_answer(argv: list[str], capsys) -> tuple[int | None, str]:
    from loca_pipe.cli.fast_usage import check
    from loca_pipe.cli.usage_table import TABLE

    code = check(argv, TABLE)
    return code, capsys.readouterr().err


def test_the_table_is_the_typer_app_and_current():
    from loca_pipe.cli.fast_usage import build_table, sources_hash
    from loca_pipe.cli.main import app
    from loca_pipe.cli.usage_table import TABLE

    assert TABLE["hash"] == sources_hash(), "cli/ changed: run `python -m loca_pipe.cli.fast_usage --write`"
    assert TABLE == build_table(app), "run `python -m loca_pipe.cli.fast_usage --write`"


def _cases() -> list[list[str]]:
    from loca_pipe.cli.usage_table import TABLE

    out = [["--bogus"], ["-v", "--bogus"], ["--verbos"], ["bogus-command"], ["trian-student"], ["lm-cach", "--x"],
           ["-v", "analyse"], ["--verbose", "verfy", "s.zarr"]]
    for name, cmd in TABLE["commands"].items():
        out.append([name, "--bogus"])
        for opt, takes in list((cmd["options"] or {}).items())[:3]:
            near = opt[:-1] if len(opt) > 4 else opt + "x"  # a typo of a real option
            out.append([name, near, "1"])
            out.append([name, f"{near}=1"])
            if takes:
                out.append([name, opt, "-1", "--bogus"])   # a value that looks like an option, then a typo
                out.append([name, f"{opt}=--bogus", near])
            elif takes is False and opt != "--help":
                out.append([name, opt, "--bogus"])
    return out


@pytest.mark.parametrize("argv", _cases(), ids=lambda a: " ".join(a))
def test_every_fast_answer_is_typers_own(argv, capsys):
    """Where the fast path answers, its exit code and stderr equal typer's byte for byte; where it does not, it
    printed nothing and typer decides."""
    code, err = _fast_answer(argv, capsys)
    if code is None:
        assert err == ""
        return
    want_code, want_err = _typer_answer(argv, capsys)
    assert (code, err) == (want_code, want_err)


def test_valid_command_lines_are_left_to_typer(capsys):
    """No valid long option of any command, with or without its value, is ever refused by the fast path."""
    from loca_pipe.cli.fast_usage import check
    from loca_pipe.cli.usage_table import TABLE

    for name, cmd in TABLE["commands"].items():
        for opt, takes in (cmd["options"] or {}).items():
            argv = [name, opt, "1"] if takes else [name, opt]
            assert check(argv, TABLE) is None, argv
            assert check(["-v", *argv, "--", "--bogus"], TABLE) is None, argv
    assert capsys.readouterr().err == ""


def test_a_stale_table_is_never_used(monkeypatch, capsys):
    import loca_pipe.cli.fast_usage as fu

    called = []
    monkeypatch.setattr(fu, "sources_hash", lambda: "changed")
    monkeypatch.setattr(fu, "check", lambda *a: called.append(a) or 2)
    monkeypatch.setattr(sys, "argv", ["loca-pipe", "train-student", "--bogus"])
    with pytest.raises(SystemExit) as exc:
        fu.main()
    assert called == [] and exc.value.code == 2  # typer's own answer, through cli.main
    assert "no such option: --bogus" in capsys.readouterr().err
