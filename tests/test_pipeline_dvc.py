"""The default DVC pipeline end to end, on a tiny params override (real Fashion-MNIST pixels, 768 images).

Runs the README's main-job command (`make repro`, with set-up already done) in a copy of the project,
then checks: the recipe stage, students from every teacher and the report ran; `make repro` ends with the
report; the figures and `dvc metrics show` exist and the LM sub-repo stays out of `dvc status` / metrics; a
second `dvc repro` does nothing; `dvc exp run -S analyze.alpha=...` re-runs only calibration, the LoCa
students and the report, and `dvc exp show --json` has the report's metrics for both rows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
DVC = str(VENV / "bin" / "dvc")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FMNIST.exists(), reason="make setup installs dataset-fashion-mnist")]


def _tiny_params(params: dict) -> dict:
    p = params
    p["base"]["dataset"] = "tiny_fmnist:build"
    for t in p["train_teacher"]["teachers"].values():
        t["epochs"] = 1
    p["analyze"]["alpha"] = [0.9]
    p["select_recipe"].update(val_size=128, epochs=1, batch_size=64, grid=p["select_recipe"]["grid"][:2])
    p["train_student"].update(seeds=[0, 1], epochs=2, milestones=[1], batch_size=64,
                              groups={"weak": {"base": "kd,kd_star,dkd", "loca": "loca,loca_dkd"},
                                      "strong": {"base": "kd", "loca": "loca"}})
    p["cnn_students"]["args"] = "--epochs 1 --max-samples 256"
    return p


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("pipeline") / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    shutil.copy2(ROOT / "tests" / "fixtures" / "tiny_fmnist.py", dst / "tiny_fmnist.py")
    params = _tiny_params(yaml.safe_load((dst / "params.yaml").read_text()))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # PATH deliberately without the venv: `make repro` must put it there for the stages dvc runs.
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != VENV / "bin")
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(dst),
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        _run(cmd, dst, env)
    return dst, env


def test_make_repro_runs_the_whole_pipeline(project):
    dst, env = project
    stamp = VENV / ".installed"
    # The README's main-job command; set-up is already done for this venv, so mark its targets as old.
    out = _run(["make", f"VENV={VENV}", "-o", str(stamp), "-o", str(FMNIST), "repro"], dst, env)
    assert {"prepare_data", "train_teacher@strong", "cache_logits", "analyze", "calibrate", "select_recipe",
            "train_student_ce", "train_student_base@weak", "train_student_base@strong",
            "train_student_loca@weak-0.9", "train_student_loca@strong-0.9", "train_student_cnn_base",
            "train_student_cnn_loca@0.9", "report"} <= _ran(out)
    assert (dst / "data/report/report.md").read_text().rstrip() in out  # make repro prints the report
    title = (dst / "data/report/report.md").read_text().splitlines()[0]
    assert out.count(title) == 1, "make repro prints the report once (the report stage runs with --quiet)"
    assert "report: data/report/report.md" in out
    table = (dst / "data/report/report.md").read_text()
    for text in ("| KD |", "| KD* |", "| LoCa-0.9 |", "| DKD+LoCa-0.9 |", "| LoCa-0.9 − KD |", "Mis-instruction",
                 "| Swap − KD |", "| Block-KD − KD |", "| Block-KD+LoCa-0.9 − Block-KD |", "strong → cnn_small",
                 "The mechanism", "delta_vs_mis.png"):
        assert text in table, table
    for fig in ("data/analysis/figures/mis_instruction.png", "data/report/delta_vs_mis.png",
                "data/report/follow.png"):
        assert (dst / fig).stat().st_size > 1000, fig
    recipe = json.loads((dst / "data/recipe.json").read_text())
    assert recipe["validation"]["split"] == "train" and recipe["chosen"] in [r["recipe"] for r in recipe["grid"]]
    metrics = _run([DVC, "metrics", "show"], dst, env)
    assert "metrics/report.json" in metrics and "cache_report" not in metrics
    status = _run([DVC, "status"], dst, env)
    assert "lm/" not in status and "Data and pipelines are up to date" in status
    # the offline plots page (#14: `dvc plots show` loads vega from a CDN): every chart rendered to SVG here,
    # every image inlined, no script and no URL to fetch
    html_out = dst.parent / "plots-offline.html"  # outside the project: its git tree stays as dvc left it
    out = _run([str(VENV / "bin" / "loca-pipe"), "plots", "--out", str(html_out)], dst, env)
    page = html_out.read_text()
    n_vega = sum(1 for v in yaml.safe_load((dst / "dvc.yaml").read_text())["plots"] if isinstance(v, dict))
    assert page.count("<svg") == n_vega and n_vega >= 3 and "<script" not in page and 'src="http' not in page
    assert page.count("data:image/png;base64,") >= 3 and f"{n_vega + page.count('data:image/png')} plots" in out

    again = _run(["make", f"VENV={VENV}", "-o", str(VENV / ".installed"), "-o", str(FMNIST), "repro"], dst, env)
    assert _ran(again) == set(), f"a second dvc repro re-ran {_ran(again)}"

    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "pipeline ran"], dst, env)
    env = {**env, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}  # as after `. .venv/bin/activate`
    exp = _run([DVC, "exp", "run", "-S", "analyze.alpha=[0.8]"], dst, env)
    ran = _ran(exp)
    assert {"calibrate", "report", "train_student_loca@weak-0.8", "train_student_loca@strong-0.8"} <= ran
    untouched = {"prepare_data", "cache_logits", "analyze", "select_recipe", "train_student_ce"} \
        | {s for s in ran if s.startswith(("train_teacher", "train_student_base"))}
    assert not (ran & untouched), f"a new α re-ran stages that do not depend on it: {sorted(ran & untouched)}"
    proc = subprocess.run([DVC, "exp", "show", "--json"], cwd=dst, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    show = json.loads(proc.stdout)
    rows = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "metrics" in data:
                rows.append(data)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(show)
    with_report = [r for r in rows if (r.get("metrics") or {}).get("metrics/report.json", {}).get("data")]
    assert len(with_report) >= 2, f"report metrics in {len(with_report)} of {len(rows)} rows"
    keys = [set(r["metrics"]["metrics/report.json"]["data"]["weak"]) for r in with_report]
    assert any("loca-a0.8" in k for k in keys) and any("loca-a0.9" in k for k in keys)
    # the README's terminal view of the experiments (the line itself, run as written)
    line = next(ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.strip().startswith("dvc exp show --drop"))
    readable = _run([DVC] + shlex.split(line)[1:] + ["--no-pager"], dst, {**env, "COLUMNS": "200"})
    assert max(len(ln) for ln in readable.splitlines()) < 200, readable
    assert "analyze.alpha" in readable and "weak.loca-a0.8.delta" in readable, readable
