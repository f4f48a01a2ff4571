"""Stage `lm-report`: every students/*/metrics.json → report/results.json + report/table.md, printed.

Rows are runs grouped by their settings but the seed (``metrics.json``'s ``settings``): mean ± std (n) of
Rouge-L, token accuracy and perplexity. Each method is compared with its base (``students.METHODS[m].base``:
kd vs sft, loca vs kd, kd_sampled vs kd, seqkd vs sft, kd_star vs kd) on the seeds both have, through the
image report's paired statistics (``pipeline/stats.py``): mean difference, 95 % t-interval, paired t-test p,
exact sign-flip p and a sentence. Then the token-level mechanism (on the teacher's mis-instructed *training*
response tokens: the share where the student's top token is the teacher's wrong one, and where it is the
reference; SFT is the reference row), and a few test prompts with the reference and each method's generation.
The teacher's row comes from ``teacher/metrics.json``, or from the metrics.json of the folder the store's
teacher was cached from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import DataError, LocaError
from loca_pipe.pipeline.io import atomic_write_text, write_json
from loca_pipe.stages import Report
from loca_pipe.pipeline.report.text import delta_cell as _delta_cell
from loca_pipe.stages.lm.common import LMBase, read_json

SECTION = "lm_report"
COLUMNS = (("rouge_l", "Rouge-L", 2), ("token_accuracy", "token acc", 4), ("perplexity", "ppl", 2))
PAIRED = (("rouge_l", "Rouge-L", 2), ("token_accuracy", "token accuracy", 4))
SHOWN_PROMPTS = 3


@dataclass(frozen=True)
class Params:
    title: str = "Language-model students (held-out)"
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _groups(runs: list[dict]) -> list[dict]:
    """Runs with the same settings but the seed, in registry order; a method with several settings gets the
    run folder's name (minus the seed) as its label."""
    from loca_pipe.pipeline.lm.students import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    groups: dict[str, dict] = {}
    for r in runs:
        st = {k: v for k, v in (r.get("settings") or {"method": r["method"]}).items() if k != "seed"}
        key = json.dumps(st, sort_keys=True, default=str)
        g = groups.setdefault(key, {"method": r["method"], "settings": st, "runs": {}})
        g["runs"][r["seed"]] = r
    out = sorted(groups.values(), key=lambda g: (order.get(g["method"], 99), json.dumps(g["settings"], default=str)))
    n_of = {}
    for g in out:
        n_of[g["method"]] = n_of.get(g["method"], 0) + 1
    for g in out:
        first = next(iter(g["runs"].values()))
        g["label"] = g["method"] if n_of[g["method"]] == 1 else str(first.get("run", g["method"])).rsplit("-s", 1)[0]
    return out


def _paired_rows(groups: list[dict]) -> list[dict]:
    from loca_pipe.pipeline import stats
    from loca_pipe.pipeline.lm.students import METHODS

    rows = []
    for g in groups:
        base = METHODS[g["method"]].base if g["method"] in METHODS else None
        cands = [b for b in groups if b["method"] == base]
        if not cands:
            continue
        ref = max(cands, key=lambda b: len(set(b["runs"]) & set(g["runs"])))
        seeds = sorted(set(g["runs"]) & set(ref["runs"]))
        row = {"row": g["label"], "base": ref["label"], "seeds": seeds}
        for key, name, _ in PAIRED:
            pr = stats.paired([float(g["runs"][s][key]) for s in seeds], [float(ref["runs"][s][key]) for s in seeds])
            row[key] = pr.as_dict()
            row[key + "_sentence"] = pr.words(f"{name} of {g['label']} − {ref['label']}")
            row[key + "_obj"] = pr
        rows.append(row)
    return rows


def _teacher(base: LMBase) -> tuple[dict | None, str]:
    """The teacher's metrics and where they came from (teacher/ or the folder the store's teacher was cached from)."""
    f = base.teacher_dir / "metrics.json"
    if f.exists():
        return read_json(f), str(base.teacher_dir)
    path = ""
    if base.store.exists():
        try:
            from loca_pipe.pipeline.lm.streaming import TokenTeacher

            path = str(TokenTeacher(str(base.store)).attrs.get("teacher_path", ""))
        except LocaError:  # an unreadable store is reported by the stages that read it, not here
            path = ""
    if path and (Path(path) / "metrics.json").exists():
        return read_json(Path(path) / "metrics.json"), path
    return None, path


def run(p: Params) -> Report:
    base = p.base
    runs = [read_json(f) for f in sorted(base.students_dir.glob("*/metrics.json"))]
    if not runs:
        raise DataError(f"no student metrics under {base.students_dir}; run `loca-pipe lm-train-student` first")
    groups = _groups(runs)
    rows = []
    for g in groups:
        rs = list(g["runs"].values())
        row: dict[str, Any] = {"method": g["method"], "label": g["label"], "seeds": sorted(g["runs"]),
                               "settings": g["settings"]}
        for key, _, _ in COLUMNS:
            row[key], row[key + "_std"] = _mean_std([float(r[key]) for r in rs])
        mech = [r["mechanism"] for r in rs if (r.get("mechanism") or {}).get("follows_teacher") is not None]
        if mech:
            row["mechanism"] = {"follows_teacher": _mean_std([m["follows_teacher"] for m in mech]),
                                "recovers_label": _mean_std([m["recovers_label"] for m in mech]),
                                "mis_tokens": mech[0]["mis_tokens"], "split": mech[0]["split"], "n": len(mech)}
        rows.append(row)
    paired = _paired_rows(groups)
    extra: dict[str, Any] = {}
    teacher, teacher_from = _teacher(base)
    for name, path in (("analysis", base.analysis_dir / "metrics.json"), ("cache", base.cache_report)):
        if path.exists():
            extra[name] = read_json(path)
    lines = [f"# {p.title}", "", "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[k]:.{d}f} ± {r[k + '_std']:.{d}f}" for k, _, d in COLUMNS]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    if teacher is not None:
        lines.append(f"| *teacher* | – | {teacher['rouge_l']:.2f} | {teacher['token_accuracy']:.4f} | "
                     f"{teacher['perplexity']:.2f} |")
    elif teacher_from:
        lines += ["", f"The teacher ({teacher_from}) was not evaluated here; `loca-pipe lm-train-teacher --init-from "
                      f"{teacher_from} --steps 0` evaluates it and adds its row."]
    if paired:
        lines += ["", "## Paired differences (same seeds): mean [95 % t-interval], paired t-test p, exact sign-flip "
                      "(perm) p; * = the interval excludes 0", "",
                  "| method − base | seeds | Δ Rouge-L | Δ token acc |", "|---|---|---|---|"]
        for pr in paired:
            lines.append(f"| {pr['row']} − {pr['base']} | {len(pr['seeds'])} | {_delta_cell(pr['rouge_l_obj'], 2) or '–'} | "
                         f"{_delta_cell(pr['token_accuracy_obj'], 4) or '–'} |")
        lines += [""] + [f"- {pr['rouge_l_sentence']}." for pr in paired]
    mech_rows = [r for r in rows if "mechanism" in r]
    if mech_rows:
        m0 = mech_rows[0]["mechanism"]
        lines += ["", f"## Mechanism: the student's top token on the teacher's {m0['mis_tokens']} mis-instructed "
                      f"{m0['split']}ing response tokens (mean ± std over seeds; sft is the reference)", "",
                  "| method | = teacher's wrong token | = reference token |", "|---|---|---|"]
        for r in mech_rows:
            (ft, fs), (rl, rs_) = r["mechanism"]["follows_teacher"], r["mechanism"]["recovers_label"]
            lines.append(f"| {r['label']} | {ft:.1%} ± {fs:.1%} | {rl:.1%} ± {rs_:.1%} |")
    lines += _samples(base, groups)
    if "analysis" in extra:
        a = extra["analysis"]
        lines += ["", f"Teacher mis-instruction on training response tokens: {a['mis_ratio']:.1%} of {a['tokens']} "
                      f"(τ={a.get('tau')})."]
    if "cache" in extra:
        c = extra["cache"]
        lines += [f"Cache: {c['rows']} response tokens, {c['bytes_per_token']:.1f} bytes/token on disk, "
                  f"{c['truncated_sequences']} truncated sequences."]
    table = "\n".join(lines) + "\n"
    result = {"rows": rows, "paired": [{k: v for k, v in pr.items() if not k.endswith("_obj")} for pr in paired],
              "runs": runs, **({"teacher": teacher} if teacher is not None else {}), **extra}
    write_json(base.report_dir / "results.json", result, sort_keys=False)
    atomic_write_text(base.report_dir / "table.md", table)
    return Report(SECTION, result, {"results": str(base.report_dir / "results.json"),
                                    "table": str(base.report_dir / "table.md")}, table)


def _samples(base: LMBase, groups: list[dict]) -> list[str]:
    """A few test prompts: the reference and each row's generation (its lowest seed), side by side."""
    shown: list[tuple[str, list[dict]]] = []
    for g in groups:
        seed = min(g["runs"])
        f = base.students_dir / str(g["runs"][seed].get("run", f"{g['method']}-s{seed}")) / "samples.json"
        if f.exists():
            shown.append((f"{g['label']} (seed {seed})", read_json(f).get("samples", [])))
    if not shown or not shown[0][1]:
        return []
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["", "## Test prompts: the reference and each method's greedy generation", ""]
    for i, s in enumerate(shown[0][1][:SHOWN_PROMPTS]):
        out += [f"**Prompt {i + 1}:** {cell(s.get('prompt') or '')}", "", "| | response |", "|---|---|",
                 f"| reference | {cell(s['reference'])} |"]
        out += [f"| {lab} | {cell(ss[i]['generation'])} |" for lab, ss in shown if i < len(ss)]
        out.append("")
    return out
