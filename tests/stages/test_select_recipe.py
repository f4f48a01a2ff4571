"""select-recipe: chooses on held-out training rows only, never the test split; the choice reaches students."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.data import open_dataset
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.models import build_model
from loca_pipe.pipeline.store import LogitStore, StoreInfo
from loca_pipe.stages import select_recipe as sr
from tests.helpers import write_teacher

HERE = Path(__file__).resolve().parent
DS = "toy_train_only_module:dataset"  # its test split raises when opened
LOCA_PIPE = str(Path(sys.executable).parent / "loca-pipe")


@pytest.fixture(autouse=True)
def _toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _store(tmp_path: Path) -> str:
    spec = open_dataset(DS, "train")
    torch.manual_seed(0)
    t = build_model("mlp_small", 10, 1, 8)
    with torch.no_grad():
        z = t(spec.dataset.x) * 3
    n = len(spec)
    info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=10, chunk_rows=64,
                     dataset={"name": DS, "split": "train", "fingerprint": spec.fingerprint})
    path = str(tmp_path / "s.zarr")
    st = LogitStore.create_or_open(path, info)
    w = st.begin_teacher("t1", {"teacher": "mlp_small"}, top_k=3, temperatures=(1.0,))
    write_teacher(st, w, z, spec.labels, 3, (1.0,))
    return path


def test_split_is_fixed_seeded_and_disjoint():
    fit, val = sr.split_indices(100, 20, 3)
    fit2, val2 = sr.split_indices(100, 20, 3)
    assert torch.equal(val, val2) and torch.equal(fit, fit2)
    assert len(val) == 20 and len(fit) == 80 and not set(fit.tolist()) & set(val.tolist())
    assert not torch.equal(val, sr.split_indices(100, 20, 4)[1])
    with pytest.raises(ConfigError, match="val_size must be between 1 and 99"):
        sr.split_indices(100, 100, 0)


def test_two_workers_choose_the_same_recipe_with_the_same_scores(tmp_path):
    """workers = 2 trains the grid's students in two spawned processes: every score, and so the choice, equals
    one process's (each student is a pure function of its recipe, seed and teacher)."""
    store = _store(tmp_path)
    grid = ({"tau": 4.0, "beta": 0.9, "gamma": 0.1}, {"tau": 1.0, "beta": 0.5, "gamma": 0.5, "epochs": 1})
    common = dict(store=store, dataset=DS, val_size=60, seeds=(0, 1), grid=grid, epochs=2, batch_size=32, lr=0.1)
    one = sr.run(sr.SelectRecipeParams(workers=1, out=str(tmp_path / "one.json"), **common))
    two = sr.run(sr.SelectRecipeParams(workers=2, out=str(tmp_path / "two.json"), **common))
    assert one["grid"] == two["grid"] and one["chosen"] == two["chosen"]
    # the second recipe's own epochs gives it its own CE students: the CE scores differ between the rows
    assert one["grid"][0]["ce_val_top1"] != one["grid"][1]["ce_val_top1"]
    with pytest.raises(ConfigError, match="select_recipe.workers must be ≥ 1; got 0"):
        sr.run(sr.SelectRecipeParams(workers=0, out=str(tmp_path / "zero.json"), **common))


def test_recipe_stage_never_reads_the_test_split(tmp_path, monkeypatch):
    import loca_pipe.pipeline.data as data

    opened = []
    real = data.open_dataset

    def spy(name, split="train", *a, **k):
        opened.append(split)
        return real(name, split, *a, **k)

    monkeypatch.setattr(data, "open_dataset", spy)
    grid = ({"tau": 4.0, "beta": 0.9, "gamma": 0.1}, {"tau": 1.0, "beta": 0.5, "gamma": 0.5})
    doc = sr.run(sr.SelectRecipeParams(store=_store(tmp_path), dataset=DS, val_size=60, seeds=(0, 1), grid=grid,
                                       epochs=2, batch_size=32, lr=0.1, out=str(tmp_path / "recipe.json")))
    assert set(opened) == {"train"}  # the data set's test split raises if it is ever opened
    assert doc["validation"] == {**doc["validation"], "split": "train", "size": 60, "fit_size": 180}
    gains = [r["gain"] for r in doc["grid"]]
    assert doc["chosen"] == grid[int(np.argmax(gains))]
    for r in doc["grid"]:  # the gain is the mean paired KD − CE on the held-out rows
        kd, ce = r["kd_val_top1"]["t1"], r["ce_val_top1"]
        assert r["gain"] == pytest.approx(np.mean(np.array(kd) - np.array(ce)))
    assert json.loads((tmp_path / "recipe.json").read_text())["chosen"] == doc["chosen"]


def test_students_read_the_choice(tmp_path):
    from loca_pipe.stages.train_student import TrainStudentParams, with_recipe

    f = tmp_path / "r.json"
    f.write_text(json.dumps({"chosen": {"tau": 1.0, "beta": 0.5, "gamma": 0.5}}))
    p = with_recipe(TrainStudentParams(recipe=str(f), tau=4.0, beta=0.9, gamma=0.1))
    assert (p.tau, p.beta, p.gamma) == (1.0, 0.5, 0.5)
    f.write_text(json.dumps({"chosen": {"temperature": 2}}))
    with pytest.raises(ConfigError, match="has no 'chosen' recipe with keys among"):
        with_recipe(TrainStudentParams(recipe=str(f)))


def test_bad_grid_through_the_console_script(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("select_recipe:\n  grid:\n    - {temperature: 4}\n")
    proc = subprocess.run([LOCA_PIPE, "select-recipe", "--params", str(p)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: select_recipe.grid[0] must be a mapping with keys among ['tau', 'beta', 'gamma'" in proc.stderr


def test_a_declared_single_recipe_is_taken_without_training(tmp_path, monkeypatch):
    import loca_pipe.pipeline.data as data

    monkeypatch.setattr(data, "open_dataset", lambda *a, **k: pytest.fail("a declared recipe needs no data"))
    doc = sr.run(sr.SelectRecipeParams(grid=({"tau": 4.0, "beta": 0.9, "gamma": 0.1},), out=str(tmp_path / "r.json")))
    assert doc["chosen"] == {"tau": 4.0, "beta": 0.9, "gamma": 0.1} and "declared" in doc["criterion"]


def test_kd_star_on_a_teacher_without_mistakes_says_it_is_kd(tmp_path):
    """A perfect teacher: KD* trains exactly like KD, and the run says so in metrics.json."""
    from loca_pipe.stages.train_student import TrainStudentParams, run

    spec = open_dataset("toy_student_module:dataset", "train")
    n = len(spec)
    info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=10, chunk_rows=64,
                     dataset={"name": "toy", "split": "train", "fingerprint": spec.fingerprint})
    st = LogitStore.create_or_open(str(tmp_path / "p.zarr"), info)
    w = st.begin_teacher("perfect", {"teacher": "oracle"}, top_k=3, temperatures=(1.0,))
    z = 5.0 * torch.nn.functional.one_hot(torch.as_tensor(spec.labels), 10).float()
    write_teacher(st, w, z, spec.labels, 3, (1.0,))
    common = dict(store=str(tmp_path / "p.zarr"), dataset="toy_student_module:dataset", epochs=1, batch_size=32,
                  lr=0.1, device="cpu", progress=False, tau=1.0)
    star = run(TrainStudentParams(method="kd_star", out_dir=str(tmp_path / "a"), **common))
    kd = run(TrainStudentParams(method="kd", out_dir=str(tmp_path / "b"), **common))
    assert star["notes"] == ["KD* is plain KD here: teacher 'perfect' has no mis-instructed training rows"]
    assert star["train_loss"] == kd["train_loss"] and star["test_top1"] == kd["test_top1"]
    assert star["follow"]["perfect"]["mis_rows"] == 0 and "nothing to follow" in star["follow"]["perfect"]["note"]
    assert json.loads((tmp_path / "a" / "kd_star-s0" / "metrics.json").read_text())["notes"] == star["notes"]


def test_calibrate_makes_targets_at_the_recipes_tau(tmp_path):
    """The default pipeline's targets are at the τ its students use (the recipe's), not at analyze.tau."""
    from loca_pipe.pipeline.targets import TargetsStore
    from loca_pipe.stages.calibrate import CalibrateParams, run

    store = _store(tmp_path)  # declares τ = 1 only
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"chosen": {"tau": 1.0, "beta": 0.5, "gamma": 0.5}}))
    out = str(tmp_path / "t.zarr")
    run(CalibrateParams(store=store, out=out, metrics="", tau=4.0, recipe=str(f), progress=False))
    assert TargetsStore(out).tau == 1.0
    assert run(CalibrateParams(store=store, out=str(tmp_path / "t4.zarr"), metrics="", tau=1.0,
                               progress=False)).values["tau"] == 1.0  # no recipe: calibrate.tau, as before


def test_calibrate_with_a_missing_recipe_through_the_console_script(tmp_path):
    store = _store(tmp_path)
    p = tmp_path / "p.yaml"
    p.write_text(f"calibrate:\n  store: {store}\n  out: {tmp_path / 't.zarr'}\n  metrics: ''\n"
                 f"  recipe: {tmp_path / 'none.json'}\n")
    proc = subprocess.run([LOCA_PIPE, "calibrate", "--params", str(p)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: recipe file ")
    assert "unset calibrate.recipe" in proc.stderr
    assert not (tmp_path / "t.zarr").exists()  # refused before any work


def _cnn_store(tmp_path: Path, seed: int = 0) -> tuple[str, str]:
    """A store cached from a `cnn` teacher (its weights hash recorded) and that teacher's checkpoint."""
    from loca_pipe.pipeline.caching import weights_sha256

    spec = open_dataset(DS, "train")
    torch.manual_seed(seed)
    t = build_model("cnn", 10, 1, 8).eval()
    ck = tmp_path / f"cnn{seed}.pt"
    torch.save(t.state_dict(), ck)
    Path(f"{ck}.json").write_text(json.dumps({"arch": "cnn", "num_classes": 10}))
    with torch.no_grad():
        z = t(spec.dataset.x) * 3
    n = len(spec)
    info = StoreInfo(task="classification", num_samples=n, num_views=1, num_rows=n, num_classes=10, chunk_rows=64,
                     dataset={"name": DS, "split": "train", "fingerprint": spec.fingerprint})
    path = str(tmp_path / f"c{seed}.zarr")
    st = LogitStore.create_or_open(path, info)
    w = st.begin_teacher("t1", {"teacher": "cnn", "weights_sha256": weights_sha256(t)}, top_k=10, temperatures=(1.0,))
    write_teacher(st, w, z, spec.labels, 10, (1.0,))
    return path, str(ck)


def test_blockkd_weights_are_chosen_on_validation_too(tmp_path, monkeypatch):
    """method blockkd: every grid point is a Block-KD student (hybrids through the store's own teacher), scored
    against the same CE students on the held-out training rows; the test split is never opened (it raises)."""
    store, ck = _cnn_store(tmp_path)
    grid = ({"tau": 1.0, "beta": 0.5, "gamma": 0.5, "cross": 0.0},
            {"tau": 1.0, "beta": 0.5, "gamma": 0.5, "cross": 0.5, "cross_distance": "mse"})
    common = dict(store=store, dataset=DS, student="cnn_small", val_size=60, seeds=(0,), grid=grid, epochs=1,
                  batch_size=32, lr=0.05, out=str(tmp_path / "r.json"))
    import loca_pipe.pipeline.training as training

    seen, real = [], training.train_student

    def spy(model, **kw):
        seen.append((kw["method"], kw["loss_cfg"].cross, kw["loss_cfg"].cross_distance, kw["blockkd"] is not None))
        return real(model, **kw)

    monkeypatch.setattr(training, "train_student", spy)
    doc = sr.run(sr.SelectRecipeParams(method="blockkd", teacher_checkpoints={"t1": ck}, **common))
    # one CE student, then one Block-KD student per grid point with that point's cross weight and distance
    assert seen == [("ce", 0.0, "kl", False), ("blockkd", 0.0, "kl", True), ("blockkd", 0.5, "mse", True)]
    assert doc["method"] == "blockkd" and "(blockkd − CE)" in doc["criterion"]
    gains = [r["gain"] for r in doc["grid"]]
    assert doc["chosen"] == grid[int(np.argmax(gains))]
    for r in doc["grid"]:
        assert r["gain"] == pytest.approx(np.mean(np.array(r["kd_val_top1"]["t1"]) - np.array(r["ce_val_top1"])))
    with pytest.raises(ConfigError, match=r"set select_recipe.teacher_checkpoints for \['t1'\]"):
        sr.run(sr.SelectRecipeParams(method="blockkd", **common))
    _, other = _cnn_store(tmp_path, seed=1)  # another teacher's weights: targets and hybrids must be one teacher
    with pytest.raises(ConfigError, match="was cached from other weights"):
        sr.run(sr.SelectRecipeParams(method="blockkd", teacher_checkpoints={"t1": other}, **common))
    with pytest.raises(ConfigError, match=r"select_recipe.method must be one of \['kd', 'blockkd'\]"):
        sr.run(sr.SelectRecipeParams(method="dkd", **common))


def test_a_blockkd_choice_reaches_students(tmp_path):
    """A select-recipe file that chose Block-KD's cross weight is one train-student --recipe applies."""
    from loca_pipe.stages.train_student import TrainStudentParams, with_recipe

    f = tmp_path / "r.json"
    f.write_text(json.dumps({"chosen": {"tau": 1.0, "beta": 0.5, "gamma": 0.5, "cross": 0.5, "cross_distance": "mse"}}))
    p = with_recipe(TrainStudentParams(recipe=str(f), method="blockkd"))
    assert (p.tau, p.beta, p.gamma, p.cross, p.cross_distance) == (1.0, 0.5, 0.5, 0.5, "mse")
