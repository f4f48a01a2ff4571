"""The report: paired statistics from metrics files, incomparable runs, one seed, follow rates, figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.stages import report as rs
from loca_pipe.stages.train_student import run_name

TRAIN = {"epochs": 5, "batch_size": 128, "lr": 0.05, "seed": 0}
LOCA_PIPE = str(Path(sys.executable).parent / "loca-pipe")


def write_run(root: Path, method: str, seed: int, acc: float, *, teacher: str | None = "weak", alpha=None,
              follow=None, **over) -> Path:
    d = root / (teacher or "ce") / run_name(method, alpha or 0.9, seed)
    d.mkdir(parents=True, exist_ok=True)
    m = {"method": method, "alpha": alpha, "seed": seed, "student": "mlp_small", "teacher": teacher,
         "teacher_test_top1": None if teacher is None else {"weak": 80.0, "strong": 90.0}[teacher],
         "test_top1": acc, "online": False, "dataset": "d", "fingerprint": "fp", "split": "train",
         "train_size": 100, "eval_split": "test", "preset": "short-cpu", "augment": "none",
         "tau": 1.0, "beta": 0.5, "gamma": 0.5, "store": "s.zarr", "recipe": {"tau": 1.0}, "form": "logits",
         "train": {**TRAIN, "seed": seed}}
    if follow is not None:
        m["follow"] = follow
    for k, v in over.items():
        if k == "epochs":
            m["train"] = {**m["train"], "epochs": v}
        else:
            m[k] = v
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def _follow(teacher: str, ft: float, fl: float) -> dict:
    return {teacher: {"teacher": teacher, "rows": 100, "mis_rows": 20, "mis_ratio": 20.0, "follow_teacher": ft,
                      "follow_label": fl}}


KD = [84.0, 85.0, 86.0, 85.5, 84.5]
LOCA = [85.0, 86.5, 86.5, 86.0, 85.5]  # d = 1, 1.5, 0.5, 0.5, 1.0
CE = [83.0, 83.5, 84.0, 84.5, 83.0]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for s in range(5):
        write_run(root, "ce", s, CE[s], teacher=None, follow=_follow("weak", 30.0, 60.0))
        write_run(root, "kd", s, KD[s], follow=_follow("weak", 50.0 + s, 40.0))
        write_run(root, "loca", s, LOCA[s], alpha=0.95, follow=_follow("weak", 45.0, 45.0 + s))
    return root


def test_paired_rows_against_hand_computation(runs, tmp_path):
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    full = json.loads((tmp_path / "rep" / "full.json").read_text())["pairs"]["weak → mlp_small"]
    d = [a - b for a, b in zip(LOCA, KD)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    lo = full["LoCa-0.95"]["paired"]
    assert full["LoCa-0.95"]["vs"] == "KD" and full["KD"]["vs"] == "Student (CE)"
    assert lo["mean"] == pytest.approx(mean, abs=1e-6)
    assert (lo["low"], lo["high"]) == (pytest.approx(mean - half, abs=1e-5), pytest.approx(mean + half, abs=1e-5))
    assert lo["p_perm"] == pytest.approx(2 / 32)  # every d > 0: only all-plus / all-minus reach |Σ|
    assert "| Teacher | 80.00 |" in md
    assert f"| LoCa-0.95 − KD | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" in md
    assert "weak: LoCa-0.95 − KD is above zero beyond run-to-run noise" in md
    assert "cannot go below 0.0625" in md
    # mechanism table and mis-instruction table
    assert "| weak | 80.00 | 20 of 100 | 20.00 % |" in md
    assert "| Student (CE) | wrong 30.0 ± 0.0 / label 60.0 ± 0.0 |" in md
    assert "| KD | wrong 52.0 ± 1.6 / label 40.0 ± 0.0 |" in md
    small = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert small["weak"]["loca-a0.95"] == {"top1": round(sum(LOCA) / 5, 2), "delta": round(mean, 2),
                                           "p": pytest.approx(lo["p_t"], abs=1e-4)}
    assert small["weak"]["teacher"] == 80.0 and small["weak"]["mis_ratio"] == 20.0
    for f in ("alpha.png", "delta_vs_mis.png", "follow.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 5000, f


def test_incomparable_runs_are_left_out_with_the_reason(runs, tmp_path):
    write_run(runs / "old", "kd", 7, 70.0, epochs=20)
    write_run(runs / "other", "kd", 8, 70.0, train_size=55)
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    assert "Left out (2 runs" in md
    assert "training settings epochs 20, batch_size 128, lr 0.05 differs from the other runs' epochs 5" in md
    assert "train_size 55 differs from the other runs' 100" in md
    assert "| KD | 85.00 ± 0.79 (5) |" in md  # the left-out runs are in no statistic
    with pytest.raises(ConfigError, match="runs are not comparable: .*epochs 20"):
        rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep2"), strict=True))


def test_stale_duplicate_and_other_recipe_left_out(runs, tmp_path):
    old = write_run(runs / "stale", "kd", 0, 10.0)
    os.utime(old / "metrics.json", (1, 1))
    write_run(runs / "r2", "loca", 9, 70.0, alpha=0.95, recipe={"tau": 4.0})
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    assert "a second run of KD seed 0 exists" in md and "left out as stale" in md
    assert 'recipe {"tau": 4.0} differs from the other weak → mlp_small runs\' {"tau": 1.0}' in md


def test_one_seed_is_said_in_words(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "kd", 0, 85.0)
    write_run(root, "loca", 0, 86.0, alpha=0.95)
    md = str(rs.run(rs.ReportParams(runs_dir=str(root), out_dir=str(tmp_path / "rep"))))
    assert "+1.00 (1 seed, no interval)" in md
    assert "only 1 paired seed: no interval or p-value (needs at least 2 seeds)" in md
    assert "nan" not in md.lower()


def test_report_cli_refuses_incomparable_runs_in_strict_mode(runs, tmp_path):
    write_run(runs / "old", "kd", 7, 70.0, epochs=20)
    p = tmp_path / "p.yaml"
    p.write_text(f"report:\n  runs_dir: {runs}\n  out_dir: {tmp_path / 'rep'}\n  strict: true\n")
    proc = subprocess.run([LOCA_PIPE, "report", "--params", str(p)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: runs are not comparable" in proc.stderr and "Traceback" not in proc.stderr


def test_swap_and_block_kd_rows_of_a_second_student_pair(runs, tmp_path):
    """The default's CNN pair: a second student of the same teacher gets its own column and metrics key;
    swap and Block-KD pair against KD, Block-KD+LoCa against Block-KD."""
    accs = {"kd": KD, "swap": LOCA, "blockkd": [a + 0.5 for a in KD], "blockkd_loca": [a + 1.0 for a in KD]}
    for s in range(5):  # mlp_small is the most common student (two teachers), as in the default
        write_run(runs, "kd", s, KD[s], teacher="strong")
    for m, vals in accs.items():
        for s in range(5):
            d = write_run(runs / "cnn", m, s, vals[s], alpha=0.95 if m == "blockkd_loca" else None,
                          student="cnn_small")
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    full = json.loads((tmp_path / "rep" / "full.json").read_text())["pairs"]
    cnn = full["weak → cnn_small"]
    assert cnn["Swap"]["vs"] == "KD" and cnn["Block-KD"]["vs"] == "KD"
    assert cnn["Block-KD+LoCa-0.95"]["vs"] == "Block-KD"
    assert cnn["Block-KD+LoCa-0.95"]["paired"]["mean"] == pytest.approx(0.5)
    assert cnn["Swap"]["paired"]["mean"] == pytest.approx(sum(LOCA) / 5 - sum(KD) / 5)
    assert "| Block-KD − KD |" in md and "| Swap − KD |" in md
    # in words, a teacher with two students is named with the student: which pair a sentence is about
    words = md.split("In words:", 1)[1].split("With ", 1)[0]
    assert "- weak → cnn_small: Block-KD − KD is above zero" in words
    assert "- weak → mlp_small: LoCa-0.95 − KD is above zero" in words
    assert "- weak:" not in words
    small = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert small["weak"]["loca-a0.95"]["top1"] == round(sum(LOCA) / 5, 2)  # the mlp_small pair keeps its key
    assert small["weak-cnn_small"]["blockkd"]["delta"] == pytest.approx(0.5)
    assert d.exists()


def test_the_report_never_shows_the_best_test_epoch(runs, tmp_path):
    """best_test_top1 is each run's best epoch on the test set (early stopping on test): no table may show it."""
    assert "best_test_top1" not in rs.METRICS
    with pytest.raises(ConfigError, match="best epoch on the test set"):
        rs.table(rs.collect(runs), "best_test_top1")
    p = tmp_path / "p.yaml"
    p.write_text(f"report:\n  runs_dir: {runs}\n  out_dir: {tmp_path / 'rep'}\n  metric: best_test_top1\n")
    proc = subprocess.run([LOCA_PIPE, "report", "--params", str(p)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: report metric 'best_test_top1' picks each run's best epoch on the test set" in proc.stderr
    assert not (tmp_path / "rep").exists()
    cli = subprocess.run([LOCA_PIPE, "report", "--runs-dir", str(runs), "--metric", "best_test_top1"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "best_test_top1" in cli.stderr  # not among the choices --metric offers


def _order(seed: int, tag: str = "") -> str:
    return f"{seed:02d}{tag}".encode().hex().ljust(16, "0")  # a hand-written data_order (hex), one per seed


def test_runs_of_one_seed_with_different_data_orders_are_not_paired(tmp_path):
    """Same seed, different data order: that seed leaves the paired difference (stated), not the means."""
    root = tmp_path / "runs"
    for s in range(4):
        write_run(root, "ce", s, CE[s], teacher=None, data_order=_order(s, "x" if s == 1 else ""))
        write_run(root, "kd", s, KD[s], data_order=_order(s))
        write_run(root, "loca", s, LOCA[s], alpha=0.95, data_order=_order(s, "y" if s == 3 else ""))
    md = str(rs.run(rs.ReportParams(runs_dir=str(root), out_dir=str(tmp_path / "rep"))))
    full = json.loads((tmp_path / "rep" / "full.json").read_text())
    pair = full["pairs"]["weak → mlp_small"]
    lo_d = [LOCA[s] - KD[s] for s in (0, 1, 2)]  # seed 3: LoCa and KD saw different orders
    kd_d = [KD[s] - CE[s] for s in (0, 2, 3)]    # seed 1: KD and CE saw different orders
    assert pair["LoCa-0.95"]["paired"]["n"] == 3 and pair["LoCa-0.95"]["paired"]["mean"] == pytest.approx(sum(lo_d) / 3)
    assert pair["KD"]["paired"]["n"] == 3 and pair["KD"]["paired"]["mean"] == pytest.approx(sum(kd_d) / 3)
    assert pair["LoCa-0.95"]["n"] == 4 and pair["LoCa-0.95"]["mean"] == pytest.approx(sum(LOCA[:4]) / 4)  # still counted
    assert len(full["unpaired"]) == 2 and "notes" not in full
    assert "### Not paired (2 seeds whose two runs saw the training rows in different data orders)" in md
    assert "LoCa-0.95 − KD seed 3 not paired: run loca-a0.95-s3 saw the training rows in data order" in md
    assert "KD − Student (CE) seed 1 not paired: run kd-s1" in md
    assert "record no data order" not in md
    with pytest.raises(ConfigError, match="runs of one seed with different data orders cannot be paired: .*seed 3"):
        rs.run(rs.ReportParams(runs_dir=str(root), out_dir=str(tmp_path / "rep2"), strict=True))


def test_runs_without_a_data_order_are_paired_as_before_and_noted_once(runs, tmp_path):
    write_run(runs / "new", "kd", 9, 85.0, data_order=_order(9))  # one new run beside 15 old ones
    write_run(runs / "new", "loca", 9, 86.0, alpha=0.95)
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    full = json.loads((tmp_path / "rep" / "full.json").read_text())
    assert full["pairs"]["weak → mlp_small"]["LoCa-0.95"]["paired"]["n"] == 6  # seed 9: one side unknown, paired
    assert full["notes"] == ["16 of 17 runs record no data order (written before train-student recorded it): they "
                             "are paired on the assumption that one seed gave every method the same data order, "
                             "which the report cannot check"]
    assert md.count("record no data order") == 1 and "Not paired" not in md and "unpaired" not in full


def test_figures_name_each_pair_of_a_teacher_with_two_students(runs, tmp_path, monkeypatch):
    """The follow figure's panels and the Δ-vs-mis-instruction figure's points name the pair, not only the
    teacher, where one teacher taught two students (both would otherwise read "weak")."""
    from matplotlib.axes import Axes
    texts: list[str] = []
    title, annotate = Axes.set_title, Axes.annotate
    monkeypatch.setattr(Axes, "set_title", lambda self, t, *a, **k: (texts.append(t), title(self, t, *a, **k))[1])
    monkeypatch.setattr(Axes, "annotate", lambda self, t, *a, **k: (texts.append(t), annotate(self, t, *a, **k))[1])
    for s in range(5):
        write_run(runs / "cnn", "kd", s, KD[s], student="cnn_small", follow=_follow("weak", 52.0, 40.0))
        write_run(runs / "cnn", "loca", s, LOCA[s], alpha=0.95, student="cnn_small",
                  follow=_follow("weak", 47.0, 45.0))
    rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep")))
    assert "weak → mlp_small: 20 mis-instructed rows (20.0 %)" in texts
    assert "weak → cnn_small: 20 mis-instructed rows (20.0 %)" in texts
    assert {"weak → mlp_small", "weak → cnn_small"} <= set(texts)  # the LoCa − KD points, one per pair
    assert "weak" not in texts


def test_the_mis_instruction_table_lists_each_teacher_once(runs, tmp_path):
    """Issue #22: a teacher with two students (the default's strong → mlp_small and strong → cnn_small) is one
    row of the mis-instruction table, not one per pair."""
    for s in range(2):
        write_run(runs / "s-mlp", "kd", s, KD[s], teacher="strong", follow=_follow("strong", 40.0, 50.0))
        write_run(runs / "s-cnn", "kd", s, KD[s], teacher="strong", student="cnn_small",
                  follow=_follow("strong", 41.0, 51.0))
    md = str(rs.run(rs.ReportParams(runs_dir=str(runs), out_dir=str(tmp_path / "rep"))))
    mis = md.split("### Mis-instruction", 1)[1].split("###", 1)[0]
    rows = [line for line in mis.splitlines() if line.startswith("| ") and not line.startswith("| teacher")]
    assert rows == ["| weak | 80.00 | 20 of 100 | 20.00 % |", "| strong | 90.00 | 20 of 100 | 20.00 % |"]
    assert "strong → mlp_small" in md and "strong → cnn_small" in md  # both pairs keep their columns


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, "aa", "bb"]), st.sampled_from([None, "aa", "bb"])), min_size=1,
                max_size=6))
def test_a_seed_is_paired_exactly_when_no_two_known_data_orders_differ(orders):
    """Property: the LoCa − KD difference uses seed s iff its two runs' orders agree or one is unknown; the means
    keep every run; each left-out seed is stated once."""
    base = {"student": "mlp_small", "teacher": "weak", "online": False, "train": TRAIN}
    runs = []
    for s, (a, b) in enumerate(orders):
        runs.append({**base, "method": "kd", "alpha": None, "seed": s, "test_top1": 80.0 + s, "run": f"kd-s{s}",
                     **({"data_order": a} if a else {})})
        runs.append({**base, "method": "loca", "alpha": 0.9, "seed": s, "test_top1": 81.0 + 2 * s,
                     "run": f"loca-a0.9-s{s}", **({"data_order": b} if b else {})})
    rows = {r["row"]: r for r in rs.table(runs)}
    kept = [s for s, (a, b) in enumerate(orders) if not (a and b and a != b)]
    lo = rows["LoCa-0.9"]
    assert lo["n"] == len(orders) and lo["paired"].n == len(kept)
    if kept:
        assert lo["paired"].mean == pytest.approx(sum(1.0 + s for s in kept) / len(kept))
    assert [u.split(" seed ")[1].split(" ")[0] for u in lo["unpaired"]] == [str(s) for s in range(len(orders))
                                                                          if s not in kept]
