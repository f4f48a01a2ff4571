"""Issue #20: nothing a user types destroys data. A table of destructive outputs for every command that writes
(the output pointed at each of its inputs, at another store, at a checkpoint, at a device file, at a FIFO):
exit 1, exactly one `error:` line, and every byte under the fixtures (the inputs, the other stores, the
checkpoint) unchanged afterwards.

Every row runs the CLI's entry point (``loca_pipe.cli.main.main``, what the console script calls) in this
process; the first row of every command also runs through the installed `loca-pipe` in a subprocess, as a
user runs it (a process start loads torch, ~4 s on 2 cores, so not all ~90 rows: that would be ~6 min)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from .conftest import run_cli, toy_params


def tree_hash(root: Path) -> str:
    """sha256 over every regular file's relative path and bytes, every folder and every special file's kind."""
    h = hashlib.sha256()
    for top, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files) + [f"{d}/" for d in dirs]:
            p = Path(top) / name.rstrip("/")
            h.update(str(p.relative_to(root)).encode() + b"\0")
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                h.update(p.read_bytes())
            else:
                h.update(str(stat.S_IFMT(mode)).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Built once: a logit store, another store, a targets store, a teacher checkpoint with its sidecar, a runs
    folder, a prepared-data source, a DVC repo, a FIFO, an LM workdir with a token store stand-in."""
    from loca_pipe.stages.cache_logits import run
    from loca_pipe.pipeline.targets import write_targets

    w = tmp_path_factory.mktemp("world")
    run(toy_params(w / "s.zarr"))
    shutil.copytree(w / "s.zarr", w / "other.zarr")
    write_targets(str(w / "s.zarr"), str(w / "t.zarr"), [0.9], 4.0)
    (w / "teacher.pt").write_bytes(b"state dict bytes")
    (w / "teacher.pt.json").write_text('{"arch": "mlp_small", "num_classes": 3}')
    (w / "runs" / "kd-s0").mkdir(parents=True)
    (w / "runs" / "kd-s0" / "metrics.json").write_text("{}")
    (w / "src").mkdir()
    (w / "src" / "train-images-idx3-ubyte.gz").write_bytes(b"gz")
    (w / "repo").mkdir()
    (w / "repo" / "dvc.yaml").write_text("stages: {}\n")
    os.mkfifo(w / "fifo")
    lm = w / "lm"
    shutil.copytree(w / "s.zarr", lm / "store.zarr")  # the guard reads the marker only: a logit store stands in
    for d in ("data", "tokenizer", "teacher", "students/kd-s0"):
        (lm / d).mkdir(parents=True)
        (lm / d / "f.json").write_text("{}")
    return w


# command template, then {OUT} destinations; S = the input store, W = the world folder
S = "{W}/s.zarr"
IMAGE = {
    "calibrate": (["calibrate", S, "--out", "{OUT}", "--overwrite", "--no-progress", "--metrics", "{W}/m.json"],
                  ["{W}/s.zarr", "{W}/s.zarr/teachers", "{W}", "{W}/other.zarr", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "calibrate --metrics": (["calibrate", S, "--out", "{W}/new.zarr", "--metrics", "{OUT}"],
                            ["{W}/s.zarr/zarr.json", "{W}/teacher.pt", "{W}/teacher.pt.json", "/dev/full", "{W}/fifo"]),
    "analyze": (["analyze", S, "--out", "{OUT}", "--overwrite", "--no-figures", "--no-samples"],
                ["{W}/s.zarr", "{W}/s.zarr/teachers", "{W}", "{W}/t.zarr", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "select-recipe": (["select-recipe", "--store", S, "--out", "{OUT}"],
                      ["{W}/s.zarr", "{W}/s.zarr/zarr.json", "{W}/teacher.pt", "{W}/teacher.pt.json", "/dev/full", "{W}/fifo"]),
    "train-teacher": (["train-teacher", "--arch", "mlp_small", "--dataset", "toy_cache_module:dataset", "--epochs", "1",
                       "--out", "{OUT}"],
                      ["{W}/s.zarr", "{W}/s.zarr/zarr.json", "{W}/t.zarr", "/dev/full", "{W}/fifo"]),
    "cache-logits": (["cache-logits", "--teacher", "toy_cache_module:teacher", "--checkpoint", "{W}/teacher.pt",
                      "--dataset", "toy_cache_module:dataset", "--store", "{OUT}", "--overwrite", "--device", "cpu"],
                     ["{W}/teacher.pt", "{W}/teacher.pt.json", "{W}/t.zarr", "{W}/runs", "/dev/null", "{W}/fifo"]),
    "train-student": (["train-student", "--store", S, "--dataset", "toy_cache_module:dataset", "--method", "kd",
                       "--out-dir", "{OUT}", "--overwrite"],
                      ["{W}/s.zarr", "{W}/other.zarr", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "report": (["report", "--runs-dir", "{W}/runs", "--out-dir", "{OUT}"],
               ["{W}/runs", "{W}/runs/kd-s0", "{W}", "{W}/s.zarr", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "prepare-data": (["prepare-data", "--source", "{W}/src", "--root", "{OUT}"],
                     ["{W}/src", "{W}", "{W}/s.zarr", "/dev/null", "{W}/fifo"]),
    "plots": (["plots", "--repo", "{W}/repo", "--out", "{OUT}"],
              ["{W}/repo/dvc.yaml", "{W}/s.zarr/zarr.json", "{W}/teacher.pt", "/dev/full", "{W}/fifo"]),
}
# LM commands: the output key of lm_base.outputs (relative to workdir {W}/lm, or absolute) pointed at each target
LM = {
    "lm-cache": ("store", ["teacher", "data", "tokenizer", "{W}/t.zarr", "{W}/fifo"]),
    "lm-cache --cache-report": ("cache_report", ["store.zarr/zarr.json", "{W}/teacher.pt", "/dev/full", "{W}/fifo"]),
    "lm-analyze": ("analysis", ["store.zarr", "store.zarr/teachers", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "lm-train-student": ("students", ["store.zarr", "data", "tokenizer", "{W}/s.zarr", "/dev/null", "{W}/fifo"]),
    "lm-report": ("report", ["students", "students/kd-s0", "{W}/s.zarr", "{W}/teacher.pt", "/dev/null", "{W}/fifo"]),
    "lm-tokenizer": ("tokenizer", ["data", "{W}/s.zarr", "/dev/null", "{W}/fifo"]),
    "lm-train-teacher": ("teacher", ["data", "tokenizer", "{W}/t.zarr", "/dev/null", "{W}/fifo"]),
}

def _cases(first_only: bool) -> list:
    rows = [pytest.param(cmd, None, out, id=f"{name}->{out.replace('{W}/', '')}")
            for name, (cmd, outs) in IMAGE.items() for out in (outs[:1] if first_only else outs)]
    return rows + [pytest.param([name.split()[0]], key, out, id=f"{name}->{out.replace('{W}/', '')}")
                   for name, (key, outs) in LM.items() for out in (outs[:1] if first_only else outs)]


class Result:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def run_in_process(args: list[str], capsys) -> Result:
    """The console script's entry point in this process: its exit code and what it printed on stderr."""
    from loca_pipe.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return Result(int(exc.value.code or 0), capsys.readouterr().err)


def _refused(proc, world: Path, before: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert tree_hash(world) == before, "an input changed"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert stat.S_ISFIFO(os.lstat(world / "fifo").st_mode)
    return lines[0]


def _args(world: Path, tmp_path: Path, cmd: list[str], key: str | None, out: str) -> tuple[list[str], str]:
    """The command line of one row, and the text its error line must name."""
    target = out.format(W=world)
    if key is None:
        return [a.format(W=world, OUT=target) for a in cmd], os.path.realpath(target)
    params = tmp_path / "params.yaml"  # an LM command: the output is a path of lm_base.outputs
    params.write_text(f"lm_base:\n  workdir: {world / 'lm'}\n  outputs:\n    {key}: {target}\n")
    return [*cmd, "--params", str(params)], f"lm_base.outputs.{key}"


def _check(world: Path, run, cmd: list[str], key: str | None, out: str, tmp_path: Path) -> None:
    before = tree_hash(world)
    args, named = _args(world, tmp_path, cmd, key, out)
    line = _refused(run(args), world, before)
    if "--out-dir" not in cmd:  # train-student names the run folder below it
        assert named in line, line
    assert not (world / "m.json").exists() and not (world / "new.zarr").exists()


@pytest.mark.parametrize("cmd, key, out", _cases(first_only=False))
def test_a_destructive_output_is_refused_and_nothing_changes(world, tmp_path, capsys, cmd, key, out):
    _check(world, lambda a: run_in_process(a, capsys), cmd, key, out, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cmd, key, out", _cases(first_only=True))
def test_the_installed_console_script_refuses_too(world, tmp_path, cmd, key, out):
    _check(world, lambda a: run_cli(a, cwd=tmp_path), cmd, key, out, tmp_path)


def test_a_symlink_to_the_input_is_the_input(world, tmp_path, capsys):
    """Paths are resolved: a link to the store is the store."""
    before = tree_hash(world)
    link = tmp_path / "link.zarr"
    link.symlink_to(world / "s.zarr")
    line = _refused(run_in_process(["calibrate", str(world / "s.zarr"), "--out", str(link), "--overwrite"], capsys),
                    world, before)
    assert "is the input STORE" in line and str(world / "s.zarr") in line
