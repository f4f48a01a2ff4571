"""Stages `analyze` / `calibrate` and their CLI commands on small stores built with the store API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from loca_pipe.pipeline.errors import ConfigError, StoreConflictError
from loca_pipe.pipeline.store import LogitStore, StoreInfo, summarize_logits
from loca_pipe.stages import analyze as analyze_stage
from loca_pipe.stages import calibrate as calibrate_stage
from loca_pipe.stages.config import load_section

C = 10


def make_store(path, teachers=(("weak", 1.0), ("mid", 2.5), ("strong", 5.0)), R=320, chunk=64, seed=0, k=3):
    """Three teachers of different strength (label bump) over one sample order; returns (path, labels, logits)."""
    rng = np.random.default_rng(seed)
    info = StoreInfo("classification", R, 1, R, C, chunk, {"name": "synthetic", "fingerprint": f"fp{seed}",
                                                          "split": "train"})
    st = LogitStore.create_or_open(str(path), info)
    labels = rng.integers(0, C, R)
    for c in range(info.num_chunks):
        sl = info.chunk_slice(c)
        st.write_rows(c, np.arange(sl.start, sl.stop), labels[sl], np.zeros(sl.stop - sl.start))
    logits = {}
    for name, bump in teachers:
        z = rng.normal(0, 1, (R, C)).astype(np.float32)
        z[np.arange(R), labels] += bump
        w = st.begin_teacher(name, {"arch": "synthetic"}, top_k=k, temperatures=[1.0, 4.0], logits_dtype="float32")
        for c in w.pending_chunks():
            sl = info.chunk_slice(c)
            s = summarize_logits(torch.from_numpy(z[sl]), torch.from_numpy(labels[sl]), k, [1.0, 4.0])
            w.write_chunk(c, {**{kk: v.numpy() for kk, v in s.items()}, "logits": z[sl]})
        assert w.finalize()
        logits[name] = z
    return str(path), labels, logits


@pytest.fixture(scope="module")
def store3(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "s.zarr")


def test_stage_writes_every_output(store3, tmp_path):
    path, labels, logits = store3
    out = tmp_path / "res"
    p = load_section(analyze_stage.AnalyzeParams, "analyze",
                     {"analyze": {"store": path, "out": str(out), "alpha": [0.9, 0.95], "tau": 4}})
    rep = analyze_stage.run(p)
    mis = {n: z.argmax(1) != labels for n, z in logits.items()}
    metrics = json.loads((out / "metrics.json").read_text())
    for n in logits:
        assert metrics[n]["mis_instructed"] == int(mis[n].sum())
        assert metrics[n]["mis_instruction_ratio"] == pytest.approx(mis[n].mean())
        assert rep["teachers"][n]["mis_instructed"] == int(mis[n].sum())
    assert mis["weak"].sum() > mis["mid"].sum() > mis["strong"].sum()
    teachers = pd.read_csv(out / "teachers.csv")
    assert teachers["teacher"].tolist() == ["mid", "strong", "weak"]
    assert teachers["mis_instructed"].tolist() == [int(mis[n].sum()) for n in ("mid", "strong", "weak")]
    per_class = pd.read_csv(out / "per_class.csv")
    weak = per_class[per_class.teacher == "weak"]
    assert weak["mis_instructed"].tolist() == np.bincount(labels[mis["weak"]], minlength=C).tolist()
    samples = pd.read_parquet(out / "samples" / "weak")
    assert len(samples) == len(labels) and int(samples["mis_instructed"].sum()) == int(mis["weak"].sum())
    for f in ["summary.md", "analysis.json", "confusions.csv", "per_view.csv", "histograms.csv", ".loca-source.json"]:
        assert (out / f).stat().st_size > 0, f
    for f in ["mis_instruction.png", "per_class_weak.png", "confidence_strong.png"]:
        assert (out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert all(f"| {n} |" in md for n in logits)
    assert json.loads((out / "analysis.json").read_text())["teachers"]["weak"]["top_confusions"]


def test_no_scale_ignores_alpha(store3, tmp_path):
    """`--no-scale` (the DVC stage's form) reads no α at all: even an invalid one is not looked at."""
    path, labels, logits = store3
    out = tmp_path / "res"
    p = load_section(analyze_stage.AnalyzeParams, "analyze",
                     {"analyze": {"store": path, "out": str(out), "alpha": [-1.0], "tau": 4, "scale": False,
                                  "figures": False, "samples": False}})
    analyze_stage.run(p)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weak"]["mis_instructed"] == int((logits["weak"].argmax(1) != labels).sum())
    assert not metrics["weak"].get("mean_scale_mis")
    with pytest.raises(ConfigError, match="alpha"):
        analyze_stage.run(load_section(analyze_stage.AnalyzeParams, "analyze", {"analyze": {
            "store": path, "out": str(tmp_path / "r2"), "alpha": [-1.0], "tau": 4}}))


def test_output_folder_of_another_store_is_refused(store3, tmp_path):
    path, *_ = store3
    other, *_ = make_store(tmp_path / "other.zarr", teachers=(("t", 3.0),), seed=7)
    out = tmp_path / "res"
    analyze_stage.run(analyze_stage.AnalyzeParams(store=path, out=str(out), figures=False))
    analyze_stage.run(analyze_stage.AnalyzeParams(store=path, out=str(out), figures=False, samples=False))  # same: ok
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["mid", "strong", "weak"]
    with pytest.raises(StoreConflictError, match="holds analysis results of store .* \\(fingerprint 'fp0'\\), not of"):
        analyze_stage.run(analyze_stage.AnalyzeParams(store=other, out=str(out), figures=False))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreConflictError, match="something else \\(no marker\\)"):
        analyze_stage.run(analyze_stage.AnalyzeParams(store=other, out=str(tmp_path / "junk"), figures=False))
    analyze_stage.run(analyze_stage.AnalyzeParams(store=other, out=str(out), figures=False, overwrite=True))
    assert json.loads((out / ".loca-source.json").read_text())["fingerprint"] == "fp7"
    assert json.loads((out / "metrics.json").read_text()).keys() == {"t"}
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["t"]  # the old store's rows are gone
    analyze_stage.run(analyze_stage.AnalyzeParams(store=other, out=str(tmp_path / "junk"), figures=False,
                                                      samples=False, overwrite=True))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"  # overwrite removes only our outputs


def test_bad_params_are_refused_before_the_output_folder_is_touched(store3, tmp_path):
    path, *_ = store3
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['alfa'\\]"):
        load_section(analyze_stage.AnalyzeParams, "analyze", {"analyze": {"alfa": 0.9}})
    with pytest.raises(ConfigError, match="alpha must be"):
        analyze_stage.run(analyze_stage.AnalyzeParams(store=path, out=str(tmp_path / "r"), alpha=(0.0,)))
    assert not (tmp_path / "r").exists()


def test_calibrate_stage_metrics(store3, tmp_path):
    path, labels, logits = store3
    p = calibrate_stage.CalibrateParams(store=path, out=str(tmp_path / "t.zarr"), metrics=str(tmp_path / "m.json"),
                                        alpha=(0.95,), teachers=("weak",))
    rep = calibrate_stage.run(p)
    m = json.loads((tmp_path / "m.json").read_text())
    mis_rows = logits["weak"].argmax(1) != labels
    mis = int(mis_rows.sum())
    # independent reference for the mean LoCa scale s = α / (1 − p_y + p_k) over calibrated rows
    z = logits["weak"][mis_rows].astype(np.float64) / 4.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = labels[mis_rows]
    p_y = p[np.arange(mis), y]
    p[np.arange(mis), y] = -1
    s_ref = float(np.mean(0.95 / (1 - p_y + p.max(1))))
    s_got = m["teachers"]["weak"].pop("mean_scale_mis")
    assert s_got.keys() == {"0.95"} and s_got["0.95"] == pytest.approx(s_ref, rel=1e-5)
    assert m == {"violations": 0, "teachers": {"weak": {"form": "dense", "calibrated_rows": mis,
                                                         "calibrated_ratio": mis / len(labels), "violations": 0}}}
    assert rep["teachers"]["weak"]["arrays"] == {"kd": [len(labels), C], "loca_0.95": [len(labels), C],
                                                 "mis_instructed": [len(labels)]}


def test_cli_analyze_and_calibrate(store3, tmp_path, monkeypatch, capsys):
    from loca_pipe.cli.main import app, main

    path, labels, logits = store3
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", path, "--out", str(tmp_path / "res"), "--teachers", "weak,strong",
                            "--alpha", "0.9,0.95", "--tau", "1", "--no-figures", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["teachers"]) == {"weak", "strong"}
    assert rep["teachers"]["weak"]["mis_instructed"] == int((logits["weak"].argmax(1) != labels).sum())
    r = runner.invoke(app, ["analyze", path, "--out", str(tmp_path / "res"), "-t", "weak", "--no-figures"])
    assert r.exit_code == 0 and "| weak |" in r.stdout and "top confusions" in r.stdout
    r = runner.invoke(app, ["calibrate", path, "--out", str(tmp_path / "t.zarr"), "--metrics", str(tmp_path / "m.json"),
                            "-t", "strong", "--form", "sparse", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["teachers"]["strong"]["arrays"]["loca_0.95_probs"] == [len(labels), 4]
    # user errors: one line, exit 1, the store's teachers listed
    monkeypatch.setattr(sys, "argv", ["loca-pipe", "analyze", path, "--out", str(tmp_path / "r2"), "-t", "nope"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error: teacher(s) ['nope'] not in store" in err and "it holds: mid, strong, weak" in err
    monkeypatch.setattr(sys, "argv", ["loca-pipe", "calibrate", path, "--out", str(tmp_path / "t2.zarr"), "--tau", "-1"])
    with pytest.raises(SystemExit):
        main()
    assert "error: tau must be a positive temperature" in capsys.readouterr().err


def test_analyze_shows_progress_with_throughput_and_eta_off_a_terminal(store3, tmp_path):
    """Through the installed console script, stderr piped (not a terminal): one bar line per update, with
    rows/s and the elapsed<remaining time; the JSON on stdout stays clean."""
    import shutil
    import subprocess

    path, labels, _ = store3
    exe = shutil.which("loca-pipe", path=str(Path(sys.executable).parent))
    r = subprocess.run([exe, "analyze", path, "--out", str(tmp_path / "res"), "--no-figures", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["teachers"]["weak"]["rows"] == len(labels)
    bars = [ln for ln in r.stderr.splitlines() if ln.startswith("analyze")]
    assert bars and "\r" not in r.stderr
    assert "100%" in bars[-1] and "row/s" in bars[-1] and "<" in bars[-1], bars
    assert f"{3 * len(labels)}/{3 * len(labels)}" in bars[-1]  # all three teachers' rows
