"""Stage `lm-report`: every students/*/metrics.json → report/results.json + report/table.md (mean ± std over
seeds per method), with the teacher's and the cache's numbers; prints the table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import DataError
from loca_pipe.pipeline.io import atomic_write_text, write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, read_json

SECTION = "lm_report"
ORDER = ("sft", "seqkd", "kd", "loca", "kd_sampled")
COLUMNS = (("rouge_l", "Rouge-L", 2), ("token_accuracy", "token acc", 4), ("perplexity", "ppl", 2))


@dataclass(frozen=True)
class Params:
    title: str = "Language-model students (held-out)"
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def run(p: Params) -> Report:
    base = p.base
    runs = [read_json(f) for f in sorted(base.students_dir.glob("*/metrics.json"))]
    if not runs:
        raise DataError(f"no student metrics under {base.students_dir}; run `loca-pipe lm-train-student` first")
    methods = sorted({r["method"] for r in runs}, key=lambda m: ORDER.index(m) if m in ORDER else 99)
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row: dict[str, Any] = {"method": m, "seeds": sorted(r["seed"] for r in rs)}
        for key, _, _ in COLUMNS:
            row[key], row[key + "_std"] = _mean_std([float(r[key]) for r in rs])
        rows.append(row)
    extra = {}
    for name, path in (("teacher", base.teacher_dir / "metrics.json"), ("analysis", base.analysis_dir / "metrics.json"),
                       ("cache", base.cache_report)):
        if path.exists():
            extra[name] = read_json(path)
    lines = [f"# {p.title}", "", "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[k]:.{d}f} ± {r[k + '_std']:.{d}f}" for k, _, d in COLUMNS]
        lines.append(f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    if "teacher" in extra:
        t = extra["teacher"]
        lines.append(f"| *teacher* | – | {t['rouge_l']:.2f} | {t['token_accuracy']:.4f} | {t['perplexity']:.2f} |")
    if "analysis" in extra:
        a = extra["analysis"]
        lines += ["", f"Teacher mis-instruction on training response tokens: {a['mis_ratio']:.1%} of {a['tokens']} "
                      f"(τ={a.get('tau')})."]
    if "cache" in extra:
        c = extra["cache"]
        lines += [f"Cache: {c['rows']} response tokens, {c['bytes_per_token']:.1f} bytes/token on disk, "
                  f"{c['truncated_sequences']} truncated sequences."]
    table = "\n".join(lines) + "\n"
    result = {"rows": rows, "runs": runs, **extra}
    write_json(base.report_dir / "results.json", result, sort_keys=False)
    atomic_write_text(base.report_dir / "table.md", table)
    return Report(SECTION, result, {"results": str(base.report_dir / "results.json"),
                                    "table": str(base.report_dir / "table.md")}, table)
