"""The paper presets are valid params files for the same dvc.yaml: every section loads into its stage's
dataclass (unknown keys and wrong types would be refused) and carries the paper's settings."""

from pathlib import Path

import pytest

from loca_pipe.stages import (analyze, cache_logits, calibrate, prepare_data, report, select_recipe, train_student,
                              train_teacher)
from loca_pipe.stages.config import load_section, read_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "presets/cifar100.yaml", "presets/imagenet.yaml"])
def test_every_section_loads(path):
    p = read_params(ROOT / path)
    load_section(prepare_data.PrepareDataParams, "prepare_data", p)
    for key in p["train_teacher"]["teachers"]:
        train_teacher.load_params(p, name=key)
    assert cache_logits.load_params(p)
    load_section(analyze.AnalyzeParams, "analyze", p)
    load_section(calibrate.CalibrateParams, "calibrate", p)
    load_section(train_student.TrainStudentParams, "train_student", p)
    load_section(report.ReportParams, "report", p)
    sr = load_section(select_recipe.SelectRecipeParams, "select_recipe", p)
    select_recipe.check_grid(sr.grid)
    # the keys dvc.yaml interpolates exist
    for key in ("prepared", "teachers_dir", "store", "targets", "recipe", "students_dir"):
        assert p["base"][key]
    assert p["report"]["metrics"] and not p["report"]["metrics"].startswith("data/")
    groups = p["train_student"]["groups"]
    assert groups and set(groups) <= set(p["cache"]["teachers"])
    for g in groups.values():
        assert set(g) == {"base", "loca"}


@pytest.mark.parametrize("path, teacher, student, tau, beta, gamma", [
    ("presets/cifar100.yaml", "resnet32x4", "resnet8x4", 4.0, 0.9, 0.1),
    ("presets/imagenet.yaml", "resnet34", "resnet18", 1.0, 0.5, 0.5),
])
def test_paper_settings(path, teacher, student, tau, beta, gamma):
    p = read_params(ROOT / path)
    s = load_section(train_student.TrainStudentParams, "train_student", p)
    assert (s.teacher, s.student, s.tau, s.beta, s.gamma) == (teacher, student, tau, beta, gamma)
    assert load_section(select_recipe.SelectRecipeParams, "select_recipe", p).grid == (
        {"tau": tau, "beta": beta, "gamma": gamma},)  # the paper's recipe, declared
    # the targets are made at the students' τ: calibrate reads the same recipe file (its τ is the grid's above)
    assert load_section(calibrate.CalibrateParams, "calibrate", p).recipe == s.recipe


@pytest.mark.parametrize("path", ["params.yaml", "presets/cifar100.yaml", "presets/imagenet.yaml"])
def test_block_kd_pair_is_declared_and_connectable(path):
    """dvc.yaml's train_student_cnn_* stages read cnn_students: a cached teacher, methods of the registry with
    Block-KD among them, and a (student, teacher) pair whose declared blocks connect."""
    from loca_pipe.pipeline.blockkd import build_blockkd
    from loca_pipe.pipeline.losses import METHODS
    from loca_pipe.pipeline.models import build_model

    p = read_params(ROOT / path)
    c = p["cnn_students"]
    assert set(c) == {"teacher", "student", "base", "loca", "args"} and isinstance(c["args"], str)
    assert c["teacher"] in p["cache"]["teachers"] and c["teacher"] in p["train_teacher"]["teachers"]
    base, loca = c["base"].split(","), c["loca"].split(",")
    assert all(m in METHODS for m in base + loca) and "blockkd" in base and "blockkd_loca" in loca
    assert not any(METHODS[m].loca for m in base) and all(METHODS[m].loca for m in loca)
    if c["student"] == p["train_student"]["student"]:  # same pair as the groups: no method twice in the report
        listed = {m for g in p["train_student"]["groups"].get(c["teacher"], {}).values() for m in g.split(",")}
        assert not listed & set(base + loca)
    arch = p["train_teacher"]["teachers"][c["teacher"]]["arch"]
    size = 28 if path == "params.yaml" else 32
    ch = 1 if path == "params.yaml" else 3
    bk = build_blockkd(build_model(c["student"], 10, ch, size), c["student"], build_model(arch, 10, ch, size), arch,
                       ch, size)
    assert bk.n >= 2


def test_cifar100_preset_has_the_block_kd_pair():
    c = read_params(ROOT / "presets/cifar100.yaml")["cnn_students"]
    assert (c["teacher"], c["student"]) == ("resnet32x4", "resnet8x4")


def test_the_blockkd_cross_selection_preset_matches_the_default_pipeline():
    """presets/select-blockkd-cross.yaml re-runs docs/students.md's choice of the cross weight: it must load, read
    the default pipeline's own store and strong teacher, and hold the grid the docs' table shows."""
    default = read_params(ROOT / "params.yaml")
    p = load_section(select_recipe.SelectRecipeParams, "select_recipe", ROOT / "presets/select-blockkd-cross.yaml")
    grid = select_recipe.check_grid(p.grid)
    assert p.method == "blockkd" and p.teachers == ("strong",) and p.student == default["cnn_students"]["student"]
    assert p.store == default["base"]["store"] and p.dataset == default["base"]["dataset"]
    assert p.teacher_checkpoints == {"strong": f"{default['base']['teachers_dir']}/strong.pt"}
    assert [(g["cross"], g.get("cross_distance", "kl")) for g in grid] == [(0.0, "kl"), (0.5, "kl"), (1.0, "kl"),
                                                                           (0.5, "mse")]
    assert p.val_size == 5000 and p.epochs == 1 and p.seeds == (0,)
    assert p.out != default["base"]["recipe"]  # never overwrites the pipeline's KD recipe
