"""docs/language-models.md's "your own models" walk-through, run as written: a JSONL and two Hugging Face folders
(tiny LLaMA teacher and student with one tokenizer) to a report, no params file; then the bad inputs a user
meets there, through the installed ``loca-pipe`` (one ``error:`` line, exit 1, nothing written lost)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "language-models.md").read_text()
BIN = Path(sys.executable).parent


def _walkthrough() -> list[str]:
    block = DOC.split("<!-- own-models-walkthrough -->", 1)[1]
    return [ln for ln in re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1).splitlines() if ln.strip()]


def _user_files(folder: Path) -> None:
    """What the walk-through assumes the user has: my.jsonl, my-teacher/ and my-student/."""
    from loca_pipe.pipeline.lm import models, text, tokenizer

    raw = text.default_text(60_000)
    pairs = text.continuation_pairs(raw)[:48]
    with open(folder / "my.jsonl", "w") as f:
        for ex in pairs:
            f.write(json.dumps({"instruction": ex.instruction, "context": ex.context, "response": ex.response}) + "\n")
    tokenizer.train_tokenizer(text.sentences(raw), 300, folder / "tok")
    tok = tokenizer.load_tokenizer(folder / "tok")
    for name, d, seed in (("my-teacher", 32, 0), ("my-student", 16, 1)):
        models.save_lm(models.build_lm("llama", len(tok), d, 1, 2, 64, tok, seed=seed), tok, folder / name)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_own_models_walkthrough_and_bad_inputs(tmp_path):
    _user_files(tmp_path)
    assert not (tmp_path / "params.yaml").exists()
    r = _cli(["loca-pipe", "lm-cache", "--teacher", "my-teacher"], tmp_path)  # before lm-tokenizer
    assert r.returncode == 1 and "lm-tokenizer --from-model" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    for line in _walkthrough():
        r = _cli(shlex.split(line), tmp_path)
        assert r.returncode == 0, f"doc line failed: {line}\n{(r.stdout + r.stderr)[-3000:]}"
    w = tmp_path / "lm-work"
    table = (w / "report" / "table.md").read_text()
    assert "| sft | 1 |" in table and "| loca | 1 |" in table and "| *teacher* |" in table
    assert "| loca − sft |" not in table and "## Test prompts" in table
    m = json.loads((w / "students" / "loca-s0" / "metrics.json").read_text())
    prov = m["provenance"]
    assert prov["init_from"] == "my-student" and prov["alpha"] == 0.9 and prov["tau"] == 1.0
    assert prov["steps"] == 4 and prov["grad_accum"] == 2 and prov["processes"] == 1
    assert prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert (w / "students" / "sft-s0" / "model" / "config.json").exists()
    assert not (w / "students" / "loca-s0" / "checkpoints").exists()
    before = (w / "students" / "loca-s0" / "metrics.json").read_bytes()
    bad = [
        (["--alpha", "0.95"], "holds a run with other settings (alpha 0.9 → 0.95); pass --run-name NAME"),
        (["--alpha", "0.9", "--batch-size", "8", "--grad-accum", "3"], "batch_size 8 is not divisible by grad_accum 3"),
    ]
    for extra, msg in bad:
        r = _cli(["loca-pipe", "lm-train-student", "--method", "loca", "--init-from", "my-student", "--steps", "4",
                  "--batch-size", "8", "--grad-accum", "2"] + extra, tmp_path)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("error: ") and msg in last and "Traceback" not in r.stderr, \
            (extra, r.stderr[-2000:])
    assert (w / "students" / "loca-s0" / "metrics.json").read_bytes() == before  # nothing written is lost
