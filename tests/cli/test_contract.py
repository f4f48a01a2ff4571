"""Issue #15's stage/CLI defects: one stage contract, no dead ``main()``, CLI choices from the library's
constants, output paths written once."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import typing
from pathlib import Path

import pytest
import yaml

import loca_pipe.stages as stages_pkg
import loca_pipe.stages.lm as lm_pkg

ROOT = Path(__file__).resolve().parents[2]
NOT_STAGES = {"config", "common"}  # helpers shared by the stages, not stages


def _stage_modules() -> list[str]:
    names = [f"loca_pipe.stages.{m.name}" for m in pkgutil.iter_modules(stages_pkg.__path__) if not m.ispkg]
    names += [f"loca_pipe.stages.lm.{m.name}" for m in pkgutil.iter_modules(lm_pkg.__path__)]
    return sorted(n for n in names if n.rsplit(".", 1)[1] not in NOT_STAGES)


STAGES = _stage_modules()


def test_the_stage_list_covers_both_pipelines():
    lm = {n.rsplit(".", 1)[1] for n in STAGES if ".lm." in n}
    assert lm == {"prepare", "tokenizer", "train_teacher", "cache", "plan", "analyze", "train_student", "report", "export"}
    assert "loca_pipe.stages.cache_logits" in STAGES and "loca_pipe.stages.train_student" in STAGES
    assert not list((ROOT / "stages").glob("lm_*.py")), "the LM stages live in stages/lm/"


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_is_run_of_one_frozen_params_object(name):
    mod = importlib.import_module(name)
    sig = inspect.signature(mod.run)
    params = list(sig.parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty]
    assert len(required) == 1, f"{name}.run takes {[p.name for p in required]}; the contract is run(params)"
    cls = typing.get_type_hints(mod.run)[params[0].name]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{name}.run's params: {cls}"
    assert cls.__module__ == name, f"{name}'s params class is defined in {cls.__module__}"


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_returns_a_report_and_names_its_section(name):
    from loca_pipe.stages import Report

    mod = importlib.import_module(name)
    assert typing.get_type_hints(mod.run)["return"] is Report, f"{name}.run must return a stages.Report"
    assert isinstance(mod.SECTION, str) and mod.SECTION, f"{name}.SECTION: the params section it reads"
    extra = [n for n in ("execute", "_run_stage") if hasattr(mod, n)]
    assert not extra, f"{name} has a second entry point {extra}; the contract is run(params)"


def test_a_report_is_its_values_its_outputs_and_its_text():
    from loca_pipe.stages import Report

    r = Report("x", {"a": 1, "b": [2.5]}, {"out": "d/o.json"}, "a=1")
    assert r["a"] == 1 and dict(r) == {"a": 1, "b": [2.5]} and "a" in r and len(r) == 2
    assert str(r) == "a=1" and json.loads(r.to_json()) == {"a": 1, "b": [2.5]}
    assert json.loads(str(Report("x", {"n": 3}))) == {"n": 3}  # no text: the values as JSON
    with pytest.raises(TypeError):
        r["a"] = 2  # read-only
    with pytest.raises(TypeError):
        r.values["a"] = 2  # the values too: a stage's report cannot be changed after the fact
    import pickle

    q = pickle.loads(pickle.dumps(r))
    assert (q.stage, dict(q), dict(q.outputs), str(q)) == ("x", dict(r), {"out": "d/o.json"}, "a=1")
    import numpy as np

    assert json.loads(Report("x", {"i": np.int64(2), "b": np.bool_(False)}).to_json()) == {"i": 2, "b": False}


def test_every_cli_command_prints_the_report_of_its_stage():
    """The commands are thin: no command formats a stage's values itself (one place says what is printed)."""
    import re

    seen = 0
    for f in sorted((ROOT / "cli").glob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"(?:(\w+) = |for (\w+) in )stage\.run(?:_many)?\(", text):
            var = m.group(1) or m.group(2)
            body = text[m.end():].split("\ndef ")[0]
            seen += 1
            assert not re.search(rf"\b{var}(\[|\.get\(|\.items\(|\.values\b)", body), f"{f.name}: formats {var} itself"
    assert seen >= 3  # analyze, calibrate, train-student (the rest print str(stage.run(p)) directly)


def _dvc_stages(folder: Path):
    from dvc.repo import Repo

    repo = Repo(str(folder))
    try:
        return [(s.addressing.split(":")[-1], s.cmd, sorted(str(o.def_path) for o in s.outs),
                 sorted(str(d.def_path) for d in s.deps)) for s in repo.index.stages]
    finally:
        repo.close()


def test_lm_dvc_yaml_tracks_exactly_what_the_lm_stages_write():
    """lm/dvc.yaml's outs are the paths LMBase (lm_base.outputs) and train_student.out_dir derive, resolved by DVC
    itself; a renamed output in either place fails here."""
    import shlex

    from loca_pipe.stages.config import read_params
    from loca_pipe.stages.lm import common, train_student

    params = read_params(ROOT / "lm" / "params.yaml")
    base = common.load(train_student.Params, train_student.SECTION, params).base
    assert base.workdir == ".", "DVC runs the LM stages from lm/: the outputs are relative to it"
    rel = lambda p: str(Path(p))  # noqa: E731
    want = {"prepare": [rel(base.data_dir)], "tokenizer": [rel(base.tokenizer_dir)],
            "teacher": [rel(base.teacher_dir)], "cache": sorted([rel(base.store), rel(base.cache_report)]),
            "analyze": [rel(base.analysis_dir)], "report": [rel(base.report_dir)]}
    every_output = {rel(getattr(base, a)) for a in ("data_dir", "tokenizer_dir", "teacher_dir", "store",
                                                    "cache_report", "analysis_dir", "students_dir", "report_dir")}
    stages = _dvc_stages(ROOT / "lm")
    students = 0
    for name, cmd, outs, deps in stages:
        if name.startswith("student@"):
            args = shlex.split(cmd)
            over = {"method": args[args.index("--method") + 1], "seed": int(args[args.index("--seed") + 1])}
            p = common.load(train_student.Params, train_student.SECTION, params, over)
            assert outs == [rel(train_student.out_dir(p))], (name, outs)
            students += 1
        else:
            assert outs == want.pop(name.split("@")[0]), (name, outs)
        inside = lambda d: any(d == o or d.startswith(o + "/") for o in every_output)  # noqa: E731
        assert all(inside(d) for d in deps if d != "params.yaml"), f"{name} depends on {deps}, not on stage outputs"
    assert not want and students == 30, (want, students)  # 6 methods × 5 seeds


@pytest.mark.parametrize("name", STAGES)
def test_no_stage_has_a_main(name):
    assert not hasattr(importlib.import_module(name), "main"), f"{name}.main: nothing calls it"


def test_lm_params_carry_their_base_and_refuse_a_base_key(tmp_path):
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.stages.lm import common, train_student

    p = common.load(train_student.Params, train_student.SECTION,
                    {"lm_base": {"workdir": str(tmp_path)}, "lm_train_student": {"method": "kd", "seed": 2}})
    assert p.base.workdir == str(tmp_path) and train_student.out_dir(p) == tmp_path / "students" / "kd-s2"
    with pytest.raises(ConfigError, match="lm_train_student: unknown key 'base'"):
        common.load(train_student.Params, train_student.SECTION, {"lm_train_student": {"base": {}}})


def _values(e) -> tuple[str, ...]:
    return tuple(m.value for m in e)


def test_cli_choices_are_the_library_constants():
    from loca_pipe.cli import analyze, cache, lm, options, teacher, train
    from loca_pipe.pipeline import augment, soft_labels, store, targets
    from loca_pipe.pipeline.lm import cache as lm_cache, students

    assert _values(cache.Device) == _values(train.Device) == options.DEVICES == ("auto", "cpu", "cuda")
    assert _values(teacher.Augment) == _values(train.Augment) == augment.AUGMENTATIONS
    assert _values(analyze.Form) == targets.FORMS and _values(train.Form) == soft_labels.FORMS
    assert _values(cache.LogitsDtype) == (*store.LOGIT_DTYPES, "none")
    assert _values(lm.IdDtype) == lm_cache.ID_DTYPES and _values(lm.Method) == tuple(students.METHODS)
    from loca_pipe.stages import train_student

    assert train_student.AUGMENTS is augment.AUGMENTATIONS
    from loca_pipe.pipeline.lm import text
    from loca_pipe.stages import report

    assert _values(lm.Template) == text.TEMPLATES and _values(lm.BadLine) == text.BAD_LINE_POLICIES
    assert _values(train.ViewPolicy) == soft_labels.VIEW_POLICIES and _values(train.Metric) == report.METRICS


def test_cli_enums_written_in_the_cli_match_the_params_they_set():
    """The few choices still spelled in cli/ (their library side is a params Literal or a dict of presets,
    in modules the CLI does not import) equal that library side."""
    from loca_pipe.cli import analyze, teacher, train
    from loca_pipe.pipeline.training import PRESETS
    from loca_pipe.stages import analyze as analyze_stage, train_teacher

    def literal(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert _values(teacher.Optimizer) == literal(train_teacher.TrainTeacherParams, "optimizer")
    assert _values(teacher.Schedule) == literal(train_teacher.TrainTeacherParams, "schedule")
    assert _values(analyze.Entropy) == literal(analyze_stage.AnalyzeParams, "entropy")
    assert set(_values(train.Preset)) == set(PRESETS)


def test_every_device_choice_resolves():
    import torch

    from loca_pipe.cli.options import DEVICES
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.pipeline.models import resolve_device

    for d in DEVICES:
        if d == "cuda" and not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="CUDA is not available"):
                resolve_device(d)
        else:
            assert isinstance(resolve_device(d), torch.device)


def _leaves(x, where=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{where}.{k}" if where else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{where}[{i}]")
    else:
        yield where, x


@pytest.mark.parametrize("params_file", ["params.yaml", "lm/params.yaml"])
def test_params_paths_are_written_once(params_file):
    raw = yaml.safe_load((ROOT / params_file).read_text())
    seen: dict[str, str] = {}
    for where, v in _leaves(raw):
        if isinstance(v, str) and "/" in v and not v.startswith("="):
            assert v not in seen, f"{params_file}: {v!r} spelled at {seen[v]} and {where}; refer with =section.key"
            seen[v] = where
    base = raw.get("base", {})
    dirs = [v for k, v in base.items() if isinstance(v, str) and k.endswith("_dir")]
    for where, v in _leaves(raw):
        if isinstance(v, str) and not where.startswith("base."):
            assert not any(v.startswith(d + "/") for d in dirs), f"{params_file}: {where} = {v!r} re-spells a base dir"


def test_cache_reads_each_teacher_where_train_teacher_writes_it():
    from loca_pipe.stages import cache_logits, train_teacher
    from loca_pipe.stages.config import read_params

    params = read_params(ROOT / "params.yaml")
    written = {k: str(train_teacher.load_params(params, k).checkpoint) for k in params["train_teacher"]["teachers"]}
    read = {p.name: p.checkpoint for p in cache_logits.load_params(params)}
    assert read == written


def test_dataset_help_lists_the_library_data_sets():
    from loca_pipe.cli.options import DATASET_HELP
    from loca_pipe.pipeline.data import DATASETS

    assert all(d in DATASET_HELP for d in DATASETS)
