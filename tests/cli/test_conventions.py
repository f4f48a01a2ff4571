"""One rule for the store argument, strict params sections, the pipeline's default output folders, messages
that name the right fix, dimension_names on every array (xarray opens the store), calibrate's progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from loca_pipe.cli.main import app
from loca_pipe.pipeline.errors import ConfigError, StoreError


def test_store_argument_and_option_are_the_same(toy_store):
    runner = CliRunner()
    a = runner.invoke(app, ["info", str(toy_store), "--json"], catch_exceptions=False)
    b = runner.invoke(app, ["info", "--store", str(toy_store), "--json"], catch_exceptions=False)
    c = runner.invoke(app, ["info", str(toy_store), "--store", str(toy_store), "--json"], catch_exceptions=False)
    assert a.exit_code == b.exit_code == c.exit_code == 0
    assert json.loads(a.stdout) == json.loads(b.stdout) == json.loads(c.stdout)


def test_two_different_stores_are_refused():
    from loca_pipe.cli.options import store_option

    assert store_option("a", None) == store_option(None, "a") == store_option("a", "a") == "a"
    assert store_option(None, None) is None
    with pytest.raises(ConfigError, match=r"two stores given: 'a' as the argument and 'b' as --store"):
        store_option("a", "b")


def test_every_store_command_takes_store_option():
    from loca_pipe.cli.main import app as the_app
    import typer

    group = typer.main.get_command(the_app)
    for name in ("info", "verify", "analyze", "calibrate", "cache-logits", "train-student"):
        opts = {o for p in group.commands[name].params for o in getattr(p, "opts", [])}
        assert "--store" in opts, name


@pytest.mark.parametrize("section, close", [("analyse", "analyze"), ("train-student", "train_student"),
                                             ("calibration", "calibrate"), ("lm_cahce", "lm_cache")])
def test_misspelled_section_is_refused_with_the_closest(tmp_path, section, close):
    from loca_pipe.stages.config import read_params

    p = tmp_path / "params.yaml"
    p.write_text(f"{section}:\n  alpha: [0.9]\n")
    with pytest.raises(ConfigError, match=rf"unknown section '{section}'; did you mean '{close}'\?"):
        read_params(p)


def test_a_section_that_dvc_yaml_declares_is_known(tmp_path):
    from loca_pipe.stages.config import read_params

    (tmp_path / "params.yaml").write_text("choose_recipe:\n  x: 1\nanalyze:\n  tau: 4\n")
    with pytest.raises(ConfigError, match="unknown section 'choose_recipe'"):
        read_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  choose:\n    cmd: x\n    params: [choose_recipe.x, analyze]\n")
    assert read_params(tmp_path / "params.yaml")["choose_recipe"] == {"x": 1}


@pytest.mark.parametrize("path", ["params.yaml", "lm/params.yaml", "presets/cifar100.yaml", "presets/imagenet.yaml"])
def test_the_shipped_params_files_pass(path):
    from loca_pipe.stages.config import read_params

    read_params(Path(__file__).resolve().parents[2] / path)


def test_defaults_are_the_pipelines_outputs():
    """Without --out / --params a command writes where `dvc repro` does (params.yaml)."""
    import yaml

    from loca_pipe.stages.analyze import AnalyzeParams
    from loca_pipe.stages.calibrate import CalibrateParams

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert AnalyzeParams().out == params["analyze"]["out"] == "data/analysis"
    assert CalibrateParams().metrics == params["calibrate"]["metrics"]


def test_a_folder_that_is_not_a_store_names_the_stores_below_it(tmp_path, toy_store):
    import shutil

    from loca_pipe.pipeline.store import LogitStore

    shutil.copytree(toy_store, tmp_path / "logits" / "a.zarr")
    with pytest.raises(StoreError) as err:
        LogitStore.open(str(tmp_path))
    msg = str(err.value)
    assert "is not a loca-pipe logit store: a folder without zarr.json" in msg
    assert f"logit stores below it: '{tmp_path / 'logits' / 'a.zarr'}'" in msg
    assert "create one" not in msg  # creating a store at a folder of other things is not the fix
    with pytest.raises(StoreError, match=r"no logit store at .* \(nothing is there\)"):
        LogitStore.open(str(tmp_path / "nope.zarr"))


def test_targets_store_given_as_a_logit_store_says_so(tmp_path, toy_store):
    from loca_pipe.pipeline.store import LogitStore
    from loca_pipe.pipeline.targets import write_targets

    write_targets(str(toy_store), str(tmp_path / "t.zarr"), [0.9], 4.0)
    with pytest.raises(StoreError, match=r"is a targets store \(written by `loca-pipe calibrate`\), not a logit store; "
                                         r"pass the logit store it was made from"):
        LogitStore.open(str(tmp_path / "t.zarr"))


def test_every_array_has_dimension_names(toy_store, tmp_path):
    from loca_pipe.pipeline.targets import write_targets

    write_targets(str(toy_store), str(tmp_path / "t.zarr"), [0.9], 4.0)
    for root in (toy_store, tmp_path / "t.zarr"):
        g = zarr.open_group(str(root), mode="r")
        arrays = list(g.arrays()) + [(f"{t}/{k}", a) for t, tg in g["teachers"].groups() for k, a in tg.arrays()]
        assert arrays
        for name, a in arrays:
            dims = a.metadata.dimension_names
            assert dims is not None and len(dims) == a.ndim and all(dims), name
            meta = json.loads((root / a.path / "zarr.json").read_text())  # what other readers see on disk
            assert meta["dimension_names"] == list(dims), name


def test_xarray_opens_the_store_and_each_teacher(toy_store):
    xr = pytest.importorskip("xarray")
    from loca_pipe.pipeline.store import LogitStore

    rows = xr.open_zarr(str(toy_store), consolidated=False)
    t = xr.open_zarr(str(toy_store), group="teachers/teacher", consolidated=False)
    view = LogitStore.open(str(toy_store)).teacher("teacher")
    assert dict(t.sizes) == {"row": 40, "class": 5, "k": 3, "temperature": 2, "chunk": 5}
    np.testing.assert_array_equal(t["logits"].values, view["logits"][:])
    np.testing.assert_array_equal(rows["label"].values, view["label"][:])


def test_calibrate_progress_is_one_line_per_update_off_a_terminal(tmp_path, toy_store, monkeypatch):
    import sys

    from loca_pipe.pipeline import progress
    from loca_pipe.pipeline.targets import write_targets

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # every update printed
    write_targets(str(toy_store), str(tmp_path / "t.zarr"), [0.9], 4.0, progress=True)
    text = buf.getvalue()
    lines = [x for x in text.splitlines() if x.startswith("calibrate")]
    assert "\r" not in text and len(lines) >= 2, text
    assert lines[-1].startswith("calibrate: 100%") and "40.0/40.0" in lines[-1] and "row/s" in lines[-1], lines
    assert "<" in lines[0] or "?" in lines[0]  # the ETA field of tqdm ("[elapsed<remaining, …]")
    buf.truncate(0)
    write_targets(str(toy_store), str(tmp_path / "t.zarr"), [0.9], 4.0, progress=False)
    assert "calibrate" not in buf.getvalue()


@pytest.mark.parametrize("err, reason", [(PermissionError(13, "Permission denied", "/r/o/metrics.json"),
                                          "permission denied (EACCES)"),
                                         (OSError(28, "No space left on device", "/full/x"), "the disk is full (ENOSPC)")])
def test_a_write_error_past_the_checks_is_one_line(tmp_path, toy_store, monkeypatch, capsys, err, reason):
    from loca_pipe.cli.main import main
    from loca_pipe.stages import analyze as stage

    def fail(p):
        raise err

    monkeypatch.setattr(stage, "run", fail)
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(toy_store), "--out", str(tmp_path / "a")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: cannot write {err.filename!r}: {reason}; work already finished is kept — free space "
                     f"or fix the permissions (or choose another output), then run the same command again"]


def test_an_unexpected_error_is_not_hidden(toy_store, tmp_path, monkeypatch):
    from loca_pipe.cli.main import main
    from loca_pipe.stages import analyze as stage

    monkeypatch.setattr(stage, "run", lambda p: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        main(["analyze", str(toy_store), "--out", str(tmp_path / "a")])


# -- issue #20: words that match behaviour --------------------------------------------------------------------


@pytest.mark.parametrize("argv, line", [
    (["train-student", "--store", "s.zarr", "--overwrite", "--seed", "1"],
     "interrupted; resume with: loca-pipe train-student --store s.zarr --seed 1 --resume"),
    (["train-student", "--resume", "--store", "a b.zarr"],
     "interrupted; resume with: loca-pipe train-student --resume --store 'a b.zarr'"),
    (["-v", "cache-logits", "--store", "s.zarr", "--overwrite"],
     "interrupted; resume with: loca-pipe -v cache-logits --store s.zarr --overwrite"),
    (["calibrate", "s.zarr"], "interrupted; resume with: loca-pipe calibrate s.zarr"),
    (["train-teacher", "--arch", "cnn"], "interrupted; this command does not resume — `loca-pipe train-teacher --arch "
                                         "cnn` starts it again (outputs already finished are kept)"),
])
def test_the_interrupt_message_names_the_command_that_resumes(argv, line):
    from loca_pipe.cli.main import interrupted_line

    assert interrupted_line(argv) == line


def test_ctrl_c_in_train_student_says_resume_with_resume(monkeypatch, capsys, tmp_path):
    """The message is what the CLI prints on an interrupt (exit 130), and its command is not refused."""
    from loca_pipe.cli.main import main
    from loca_pipe.stages import train_student as stage

    def interrupt(runs):  # a real SIGINT, as Ctrl-C sends: main()'s handler turns it into the interrupt
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(stage, "run_many", interrupt)
    argv = ["train-student", "--store", str(tmp_path / "s.zarr"), "--out-dir", str(tmp_path / "runs"), "--overwrite"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"interrupted; resume with: loca-pipe train-student --store {tmp_path / 's.zarr'} --out-dir "
                    f"{tmp_path / 'runs'} --resume")
    # the resuming command passes the run-folder check that refuses a plain re-run
    from loca_pipe.stages.train_student import TrainStudentParams, check_run_folders

    run = tmp_path / "runs" / "kd-s0"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pass --resume"):
        check_run_folders([TrainStudentParams(out_dir=str(tmp_path / "runs"), method="kd")])
    check_run_folders([TrainStudentParams(out_dir=str(tmp_path / "runs"), method="kd", resume=True)])


def test_alpha_out_of_range_is_refused_before_any_folder(tmp_path, toy_store, capsys):
    from loca_pipe.cli.main import main

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        main(["train-student", "--store", str(toy_store), "--dataset", "toy_cache_module:dataset", "--methods",
              "kd,loca", "--alphas", "0.9,2.5", "--out-dir", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: LoCa α must be in (0, 2)") and "got 2.5 in --alpha/--alphas" in err[0]
    assert not out.exists()  # refused before any run folder (kd's included) was made


def test_alpha_at_least_one_is_warned_before_training(caplog):
    from loca_pipe.pipeline.student_spec import _WARNED, check_alpha_range

    _WARNED.discard(1.5)
    with caplog.at_level("WARNING"):
        check_alpha_range(1.5, "--alpha")
        check_alpha_range(0.9, "--alpha")
    assert [r.getMessage()[:45] for r in caplog.records] == ["LoCa α=1.5 ≥ 1: prediction correctness is no "]
    for bad in (0.0, -1.0, 2.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"must be in \(0, 2\)"):
            check_alpha_range(bad, "--alpha")


def test_alpha_two_or_more_makes_every_mis_instructed_label_negative():
    """The reason α ≥ 2 is refused: with α ≥ 2, p′_y ≤ 0 on every mis-instructed row (independent reference)."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.floats(0.001, 1.0), min_size=2, max_size=6), st.floats(2.0, 4.0))
    def check(weights, alpha):
        p = np.array(weights) / sum(weights)
        y = int(np.argmin(p))
        if p[y] >= p.max():  # not mis-instructed
            return
        p_k = max(v for i, v in enumerate(p) if i != y)
        s = alpha / (1 - p[y] + p_k)  # LoCa's scale (docs/maths.md)
        assert 1 - s * (1 - p[y]) <= 1e-12  # p′_y = 1 − s(1 − p_y)

    check()


@pytest.mark.parametrize("make, close", [
    (lambda: __import__("loca_pipe.pipeline.data", fromlist=["x"]).open_dataset("fashion-mnsit", "train"),
     "did you mean 'fashion-mnist'?"),
    (lambda: __import__("loca_pipe.stages.train_student", fromlist=["x"]).check_params(
        __import__("loca_pipe.stages.train_student", fromlist=["x"]).TrainStudentParams(method="lcoa")),
     "did you mean 'loca'?"),
    (lambda: __import__("loca_pipe.stages.config", fromlist=["x"]).load_section(
        __import__("loca_pipe.stages.analyze", fromlist=["x"]).AnalyzeParams, "analyze", {"analyze": {"tua": 4}}),
     "did you mean 'tau'?"),
])
def test_one_did_you_mean_for_data_sets_methods_and_params_keys(make, close):
    from loca_pipe.pipeline.errors import LocaError

    with pytest.raises(LocaError, match=close.replace("?", r"\?")):
        make()


def test_did_you_mean_helper():
    from loca_pipe.pipeline.errors import did_you_mean

    assert did_you_mean("lcoa", ["kd", "loca", "dkd"]) == "did you mean 'loca'? "
    assert did_you_mean("xyz", ["kd", "loca"]) == ""


def test_a_missing_tau_names_both_fixes(tmp_path):
    from loca_pipe.pipeline.store import require_tau

    with pytest.raises(StoreError, match=r"pass --tau as one of \[1\.0\], or re-cache with --temperatures including 4"):
        require_tau([1.0], 4.0)


def test_a_live_writer_is_named(toy_store, tmp_path):
    import os
    import shutil
    import socket

    from loca_pipe.pipeline.distributed import WriterLease
    from loca_pipe.pipeline.errors import IncompleteStoreError
    from loca_pipe.pipeline.store import LogitStore

    path = tmp_path / "s.zarr"
    shutil.copytree(toy_store, path)
    g = zarr.open_group(str(path / "teachers" / "teacher"), mode="r+")
    g["done"][0] = 0  # the teacher is incomplete, as while a job writes it
    g.attrs["loca_pipe"] = {**dict(g.attrs["loca_pipe"]), "complete": False}
    lease = WriterLease(str(path), "teacher")
    assert lease.acquire()["pid"] == os.getpid()  # this (live) process holds the lease
    with pytest.raises(IncompleteStoreError, match=rf"being written now by a running job \(host {socket.gethostname()}, "
                                                   rf"pid {os.getpid()}, since .*\); wait for it"):
        LogitStore.open(str(path)).teacher("teacher")
    lease.release()
    with pytest.raises(IncompleteStoreError, match="still being written or its run crashed; re-run the same"):
        LogitStore.open(str(path)).teacher("teacher")


def test_plural_forms():
    from loca_pipe.stages.report import plural

    assert plural(1, "seed") == "1 seed" and plural(3, "seed") == "3 seeds" and plural(0, "run") == "0 runs"
