"""Stage three: train-student runs (CLI sweep, online = offline, bad inputs) and the comparison report."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from loca_pipe.cli.main import app
from loca_pipe.pipeline.data import open_dataset
from loca_pipe.pipeline.errors import ConfigError, DataError, IncompleteStoreError, StoreError
from loca_pipe.pipeline.models import build_model
from loca_pipe.pipeline.store import LogitStore, StoreInfo
from loca_pipe.stages import report as report_stage
from loca_pipe.stages.train_student import TrainStudentParams, expand, run, run_name
from tests.helpers import write_teacher

HERE = Path(__file__).resolve().parent
DS = "toy_student_module:dataset"
C = 10


@pytest.fixture(autouse=True)
def _toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def make_teacher(tmp_path: Path) -> tuple[str, torch.nn.Module]:
    """A briefly trained mlp_small teacher saved as a checkpoint + sidecar, like train-teacher does."""
    spec = open_dataset(DS, "train")
    torch.manual_seed(0)
    t = build_model("mlp_small", C, 1, 8)
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    x, y = spec.dataset.x, torch.as_tensor(spec.labels)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(t(x), y).backward()
        opt.step()
    t.eval()
    ck = tmp_path / "teacher.pt"
    torch.save(t.state_dict(), ck)
    Path(f"{ck}.json").write_text(json.dumps({"arch": "mlp_small", "num_classes": C, "dataset": DS,
                                              "fingerprint": spec.fingerprint, "test_top1": 77.5}))
    return str(ck), t


def make_store(tmp_path: Path, teacher: torch.nn.Module, *, fingerprint: str | None = None, complete: bool = True,
               name: str = "s.zarr") -> str:
    spec = open_dataset(DS, "train")
    n = len(spec)
    info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=C, chunk_rows=64,
                     dataset={"name": DS, "split": "train", "fingerprint": fingerprint or spec.fingerprint})
    path = str(tmp_path / name)
    store = LogitStore.create_or_open(path, info)
    w = store.begin_teacher("mlp_small", {"teacher": "mlp_small", "run": {"checkpoint": None,
                                                                          "sidecar": {"test_top1": 77.5}}},
                            top_k=3, temperatures=(4.0,))
    with torch.no_grad():
        z = teacher(spec.dataset.x)
    write_teacher(store, w, z, spec.labels, 3, (4.0,), chunks=range(info.num_chunks - (0 if complete else 1)))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("students")
    import sys

    sys.path.insert(0, str(HERE))
    ck, teacher = make_teacher(tmp)
    store = make_store(tmp, teacher)
    return tmp, ck, teacher, store


def params(tmp: Path, store: str, **kw) -> TrainStudentParams:
    base = dict(store=store, dataset=DS, student="mlp_small", epochs=2, batch_size=32, lr=0.1, device="cpu",
                out_dir=str(tmp / "runs"), progress=False)
    base.update(kw)
    return TrainStudentParams(**base)


def test_run_names_and_sweep_expansion():
    assert run_name("ce", 0.9, 0) == "ce-s0"
    assert run_name("kd", 0.9, 2, online=True) == "kd-s2-online"
    assert run_name("loca", 0.95, 1) == "loca-a0.95-s1"
    runs = expand(TrainStudentParams(methods=("ce", "kd", "loca"), alphas=(0.9, 0.95), seeds=(0, 1, 2)))
    names = [run_name(r.method, r.alpha, r.seed) for r in runs]
    assert len(names) == len(set(names)) == 12
    assert "loca-a0.95-s2" in names and "kd-s1" in names


@pytest.mark.slow
def test_cli_sweep_then_report(env, tmp_path):
    tmp, ck, teacher, store = env
    out, rep = tmp_path / "runs", tmp_path / "report"
    res = CliRunner().invoke(app, ["train-student", "--store", store, "--dataset", DS, "--student", "mlp_small",
                                   "--methods", "ce,kd,loca", "--alphas", "0.9,0.95", "--seeds", "0,1", "--epochs", "2",
                                   "--batch-size", "32", "--lr", "0.1", "--device", "cpu", "--out-dir", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    runs = sorted(p.name for p in out.iterdir())
    assert runs == ["ce-s0", "ce-s1", "kd-s0", "kd-s1", "loca-a0.9-s0", "loca-a0.9-s1", "loca-a0.95-s0",
                    "loca-a0.95-s1"]
    for r in runs:
        m = json.loads((out / r / "metrics.json").read_text())
        assert 0 <= m["test_top1"] <= 100 and m["epochs"] == 2 and m["run"] == r
        assert (out / r / "log.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
        assert (out / r / "checkpoint.pt").is_file()
    res = CliRunner().invoke(app, ["report", "--runs-dir", str(out), "--out-dir", str(rep)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    md = (rep / "report.md").read_text()
    for row in ("| Teacher | 77.50", "| Student (CE) |", "| KD |", "| LoCa-0.9 |", "| LoCa-0.95 |",
                "| LoCa-0.95 − KD |", "| KD − Student (CE) |"):
        assert row in md, md
    # mean ± std and the paired Δ against an independent computation from the metrics files
    acc = {r: json.loads((out / r / "metrics.json").read_text())["test_top1"] for r in runs}
    kd = [acc["kd-s0"], acc["kd-s1"]]
    lo = [acc["loca-a0.95-s0"], acc["loca-a0.95-s1"]]
    js = json.loads((rep / "full.json").read_text())["pairs"]
    assert list(js) == ["mlp_small → mlp_small"]
    js = js["mlp_small → mlp_small"]
    assert js["KD"]["mean"] == pytest.approx(np.mean(kd), abs=1e-4)
    assert js["KD"]["std"] == pytest.approx(np.std(kd, ddof=1), abs=1e-4)
    assert js["LoCa-0.95"]["paired"]["mean"] == pytest.approx(np.mean(lo) - np.mean(kd), abs=1e-4)
    assert (rep / "alpha.png").stat().st_size > 1000
    assert "LoCa-0.9," in (rep / "report.csv").read_text().replace('"', "")
    # the follow rates reached metrics.json: CE against the store's teacher, KD against its own
    ce = json.loads((out / "ce-s0" / "metrics.json").read_text())["follow"]["mlp_small"]
    assert ce["mis_rows"] > 0 and 0 <= ce["follow_teacher"] <= 100 and 0 <= ce["follow_label"] <= 100


def test_online_teacher_gives_the_same_run_as_the_store(env, tmp_path):
    tmp, ck, teacher, store = env
    off = run(params(tmp_path, store, method="loca", alpha=0.9, seed=3))
    on = run(params(tmp_path, None, method="loca", alpha=0.9, seed=3, online=True, teacher_checkpoint=ck))
    assert on["run"] == "loca-a0.9-s3-online"
    assert on["test_top1"] == pytest.approx(off["test_top1"], abs=1e-9)
    assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-5)
    a = torch.load(tmp_path / "runs" / "loca-a0.9-s3" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "runs" / "loca-a0.9-s3-online" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_params_section_and_resume_of_a_finished_run(env, tmp_path):
    tmp, ck, teacher, store = env
    pfile = tmp_path / "params.yaml"
    pfile.write_text(f"train_student:\n  store: {store}\n  dataset: '{DS}'\n  student: mlp_small\n  epochs: 1\n"
                     f"  batch_size: 64\n  device: cpu\n  out_dir: {tmp_path / 'r'}\n  progress: false\n  method: kd\n")
    res = CliRunner().invoke(app, ["train-student", "--params", str(pfile), "--seed", "5"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    first = json.loads((tmp_path / "r" / "kd-s5" / "metrics.json").read_text())
    res = CliRunner().invoke(app, ["train-student", "--params", str(pfile), "--seed", "5", "--resume"])
    assert res.exit_code == 0
    again = json.loads((tmp_path / "r" / "kd-s5" / "metrics.json").read_text())
    assert again["test_top1"] == first["test_top1"]
    res = CliRunner().invoke(app, ["train-student", "--params", str(pfile), "--seed", "5", "--resume", "--tau", "2"])
    assert isinstance(res.exception, ConfigError) and "belongs to another run" in str(res.exception)
    pfile.write_text(pfile.read_text() + "  alfa: 0.9\n")
    res = CliRunner().invoke(app, ["train-student", "--params", str(pfile)])
    assert isinstance(res.exception, ConfigError) and "unknown key(s) ['alfa']" in str(res.exception)


@pytest.mark.parametrize("case, error, pattern", [
    ("method", ConfigError, r"unknown method 'lcoa'; did you mean 'loca'\? valid methods: \[.*'ce', 'dkd', .*'kd', 'kd_star', 'loca'"),
    ("fingerprint", DataError, r"fingerprint 'not-this-data'.*re-cache the teacher on this data"),
    ("classes", StoreError, r"has 10 classes but the student outputs 3"),
    ("incomplete", IncompleteStoreError, r"cannot train from this store.*incomplete \(1 of 4 chunks"),
    ("online", ConfigError, r"online mode runs the live teacher: set train_student.teacher_checkpoint"),
    ("no-store", ConfigError, r"method 'kd' needs a teacher"),
    ("preset", ConfigError, r"unknown preset 'quick'; valid presets"),
])
def test_bad_input_is_refused_with_the_reason(env, tmp_path, case, error, pattern, monkeypatch):
    tmp, ck, teacher, store = env
    p = params(tmp_path, store)
    if case == "method":
        p = replace(p, method="lcoa")
    elif case == "fingerprint":
        p = replace(p, store=make_store(tmp_path, teacher, fingerprint="not-this-data"))
    elif case == "classes":
        import loca_pipe.pipeline.data as data

        real = data.open_dataset

        def three_classes(*a, **k):
            spec = real(*a, **k)
            spec.num_classes = 3
            return spec

        monkeypatch.setattr(data, "open_dataset", three_classes)
    elif case == "incomplete":
        p = replace(p, store=make_store(tmp_path, teacher, complete=False, name="half.zarr"))
    elif case == "online":
        p = replace(p, online=True)
    elif case == "no-store":
        p = replace(p, store=None)
    elif case == "preset":
        p = replace(p, preset="quick")
    with pytest.raises(error, match=pattern):
        run(p)


@pytest.mark.slow
def test_targets_store_trains_like_calibrating_on_the_fly_and_refuses_other_alpha_tau(env, tmp_path):
    from loca_pipe.pipeline.targets import write_targets

    tmp, ck, teacher, store = env
    targets = str(tmp_path / "targets.zarr")
    write_targets(store, targets, alphas=(0.9,), tau=4.0)
    a = run(params(tmp_path, store, method="loca", alpha=0.9, seed=1, out_dir=str(tmp_path / "a")))
    b = run(params(tmp_path, None, targets=targets, method="loca", alpha=0.9, seed=1, out_dir=str(tmp_path / "b")))
    assert b["loss_method"] == "kd" and b["form"] == "probs"
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=1.0)  # fp32 targets vs on-the-fly: tiny drift only
    with pytest.raises(StoreError, match=r"holds LoCa targets for α in \[0.9\], not α=0.95.*--alpha 0.95"):
        run(params(tmp_path, None, targets=targets, method="loca", alpha=0.95))
    with pytest.raises(StoreError, match=r"was built at τ=4, this run asks τ=2.*train_student.tau to 4"):
        run(params(tmp_path, None, targets=targets, method="kd", tau=2.0))
    with pytest.raises(ConfigError, match=r"method 'ls' cannot train from precomputed targets"):
        run(params(tmp_path, None, targets=targets, method="ls"))


def test_ls_tau_reaches_the_loss_config():
    from loca_pipe.stages.train_student import TrainStudentParams, loss_config

    assert loss_config(TrainStudentParams(method="ls", ls_tau=3.0)).ls_tau == 3.0
    assert loss_config(TrainStudentParams(method="ls")).ls_tau == 2.0  # the library's default


def test_teacher_accuracy_is_read_in_percent_as_train_teacher_writes_it():
    """train-teacher records test_top1 in percent (like every evaluation); the student side must not rescale it."""
    from loca_pipe.pipeline.student_spec import _sidecar_percent

    assert _sidecar_percent({"test_top1": 90.46}) == 90.46
    assert _sidecar_percent({"test_top1": 0.5}) == 0.5   # a 0.5 % teacher, not 50 %
    assert _sidecar_percent({}) is None


@pytest.mark.slow
def test_two_worker_processes_give_one_processes_results(env, tmp_path):
    """workers = 2 trains a sweep's runs in two spawned processes: every run's metrics (accuracy, loss, follow
    rates, data order) equal those of the same sweep in one process, and the reports come back in run order."""
    from loca_pipe.stages.train_student import run_many

    tmp, ck, teacher, store = env
    base = TrainStudentParams(store=store, dataset=DS, student="mlp_small", epochs=1, batch_size=32, lr=0.1,
                              device="cpu", progress=False)
    runs = expand(base, methods=["ce", "kd", "loca"], alphas=[0.9], seeds=[0, 1])
    one = run_many([replace(r, out_dir=str(tmp_path / "one")) for r in runs])
    two = run_many([replace(r, out_dir=str(tmp_path / "two"), workers=2) for r in runs])
    assert [r.values["run"] for r in two] == [r.values["run"] for r in one] == [run_name(r.method, r.alpha, r.seed)
                                                                                 for r in runs]
    keys = ("test_top1", "test_top5", "train_loss", "follow", "data_order", "seed", "method")
    for a, b in zip(one, two):
        assert all(a.values.get(k) is not None for k in keys), a.values
        assert {k: a.values.get(k) for k in keys} == {k: b.values.get(k) for k in keys}
    with pytest.raises(ConfigError, match="train_student.workers must be ≥ 1"):
        run_many([replace(runs[0], out_dir=str(tmp_path / "three"), workers=0)])


def test_follow_rates_predict_only_the_mistakes_and_equal_the_whole_split_reference(env):
    """The run's follow rates predict only the teacher's mis-instructed rows; they equal follow_rates on the
    student's prediction for every row of the split (the reference), for one teacher and for CE's every teacher."""
    from loca_pipe.pipeline.experiment import Shared, _follow
    from loca_pipe.pipeline.follow import follow_rates, teacher_mistakes
    from loca_pipe.pipeline.student_spec import StudentRun
    from loca_pipe.pipeline.training import ImageSet

    tmp, ck, teacher, store = env
    spec = open_dataset(DS, "train")
    images = ImageSet(spec.dataset, torch.device("cpu"))
    torch.manual_seed(5)
    student = build_model("mlp_small", C, 1, 8).eval()
    seen = []
    forward = student.forward
    student.forward = lambda x: (seen.append(len(x)), forward(x))[1]
    with torch.no_grad():
        whole = student(images.get(torch.arange(len(spec)))).argmax(1).numpy()
    t = teacher_mistakes(store, None)
    assert 0 < t.mis.sum() < len(spec)  # some rows are mistakes, some are not: the restriction matters
    want = follow_rates(whole, t)
    seen.clear()
    p = StudentRun(store=store, dataset=DS, teacher=t.teacher)
    for method in ("kd", "ce"):
        got = _follow(p, Shared(), student, images, t.teacher, method)
        assert got == {t.teacher: want}
    assert sum(seen) == 2 * int(t.mis.sum())  # only the mis-instructed rows were predicted (twice: kd, ce)
