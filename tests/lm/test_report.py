"""lm-report's paired evidence on hand-made run folders: each method against its base over the common seeds,
checked against an independent computation (mean, sd, Student-t interval from a table value, t statistic)."""

from __future__ import annotations

import json
import math

import pytest

from loca_pipe.stages.lm import common, report

T_975_DF4 = 2.7764451051977987  # Student t, 97.5 % quantile, 4 degrees of freedom (statistical tables)


def _run(root, method, seed, rouge, acc, extra=None, name=None):
    settings = {"method": method, "seed": seed, "tau": 1.0, **(extra or {})}
    name = name or f"{method}-s{seed}"
    d = root / "students" / name
    d.mkdir(parents=True)
    m = {"method": method, "seed": seed, "run": name, "rouge_l": rouge, "token_accuracy": acc, "perplexity": 10.0,
         "mechanism": {"split": "train", "mis_tokens": 40, "tau": 1.0, "follows_teacher": 0.1 + seed / 100,
                       "recovers_label": 0.2}, "settings": settings}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "samples.json").write_text(json.dumps({"samples": [{"prompt": "p|q", "generation": f"{method} says",
                                                              "reference": "ref"}]}))


def test_paired_differences_against_an_independent_computation(tmp_path):
    sft = [10.0, 11.0, 9.5, 10.5, 10.2]
    kd = [11.0, 11.5, 10.9, 11.6, 10.7]
    loca_other_alpha = [1.0, 2.0, 3.0, 4.0, 5.0]
    for s in range(5):
        _run(tmp_path, "sft", s, sft[s], 0.2)
        _run(tmp_path, "kd", s, kd[s], 0.25 + s / 1000)
        _run(tmp_path, "loca", s, kd[s] + 0.01, 0.25, {"alpha": 0.9})
        _run(tmp_path, "loca", s, loca_other_alpha[s], 0.25, {"alpha": 0.95}, name=f"loca-a95-s{s}")
    _run(tmp_path, "kd_star", 0, 3.0, 0.2)  # one seed: no interval, said in words
    p = common.load(report.Params, report.SECTION, {"lm_base": {"workdir": str(tmp_path)}})
    rep = report.run(p)
    paired = {(r["row"], r["base"]): r for r in rep.values["paired"]}
    d = [a - b for a, b in zip(kd, sft)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    got = paired[("kd", "sft")]["rouge_l"]
    assert got["mean"] == pytest.approx(mean, abs=1e-6)
    assert got["low"] == pytest.approx(mean - T_975_DF4 * sd / math.sqrt(5), abs=1e-5)
    assert got["high"] == pytest.approx(mean + T_975_DF4 * sd / math.sqrt(5), abs=1e-5)
    assert got["p_perm"] == pytest.approx(2 / 32)  # all five differences positive: 2 of 32 sign patterns as extreme
    assert "above zero beyond run-to-run noise" in paired[("kd", "sft")]["rouge_l_sentence"]
    # the two LoCa settings are two rows, each paired with kd; kd_star's single seed has no interval
    assert set(paired) == {("kd", "sft"), ("loca", "kd"), ("loca-a95", "kd"), ("kd_star", "kd")}
    assert paired[("kd_star", "kd")]["rouge_l"]["low"] is None
    assert "only 1 paired seed" in paired[("kd_star", "kd")]["rouge_l_sentence"]
    table = rep.text
    assert "| kd − sft | 5 |" in table and "## Mechanism" in table and "**Prompt 1:** p\\|q" in table
    assert "| kd_star (seed 0) | kd_star says |" in table
