"""The comparison report: student runs → a Table-2-style table and a Figure-5-style α plot.

``run(params)`` reads every ``<runs_dir>/*/metrics.json`` written by ``train-student`` and writes::

    <out_dir>/report.md     rows Teacher, Student (CE), KD, LoCa-α … with Δ vs KD; one column per
                            teacher → student pair; cells "mean ± std (n)" over seeds
    <out_dir>/report.csv    the same in long form (pair, row, method, alpha, mean, std, n, delta, runs)
    <out_dir>/report.json   {pair: {row: {mean, std, n, delta}}} for `dvc metrics`
    <out_dir>/alpha.png     accuracy vs α per pair: LoCa mean ± std, KD (and CE) as horizontal lines

std is the sample standard deviation over seeds (ddof = 1; 0 for a single run). Δ compares a LoCa row
with its base method: LoCa-α vs KD, loca_dkd vs DKD, loca_ls vs LS — mean minus mean.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

METRICS = ("test_top1", "test_top5", "best_test_top1")
LABELS = {"ce": "Student (CE)", "kd": "KD", "dkd": "DKD", "ls": "KD+LS", "loca": "LoCa", "loca_dkd": "DKD+LoCa",
          "loca_ls": "LS+LoCa"}


@dataclass(frozen=True)
class ReportParams:
    """The ``report`` section of params.yaml."""

    runs_dir: str = "data/students"
    out_dir: str = "data/report"
    metric: str = "test_top1"              # test_top1 | test_top5 | best_test_top1
    teacher_top1: float | None = None      # override the teacher accuracy found in the runs
    title: str = "Student accuracy (%)"


def _base_of(method: str) -> str | None:
    if method == "loca":
        return "kd"
    if method.startswith("loca_"):
        return method[len("loca_"):]
    return None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run's metrics.json under ``runs_dir`` (one level deep), sorted by run name."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs folder {str(root)!r} does not exist; train students first "
                          f"(`loca-pipe train-student`) or point report.runs_dir at their folder")
    runs = []
    for f in sorted(root.glob("*/metrics.json")):
        try:
            m = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{str(f)!r} is not valid JSON ({exc}); delete the run folder or re-run it") from exc
        m.setdefault("run", f.parent.name)
        runs.append(m)
    if not runs:
        raise ConfigError(f"no runs in {str(root)!r} (no */metrics.json); train students first")
    return runs


def row_key(m: dict[str, Any]) -> tuple[str, str, float | None]:
    """(row label, method, α) of one run: LoCa rows carry their α, online runs are their own row."""
    method = m.get("method", "?")
    alpha = m.get("alpha") if method.startswith("loca") else None
    label = LABELS.get(method, method)
    if alpha is not None:
        label = f"{label}-{alpha:g}"
    if m.get("online"):
        label += " (online)"
    return label, method, alpha


def table(runs: list[dict[str, Any]], metric: str = "test_top1", teacher_top1: float | None = None) -> list[dict[str, Any]]:
    """Long-form rows: one per (pair, row label) with mean, std, n and Δ vs the base method."""
    if metric not in METRICS:
        raise ConfigError(f"unknown report metric {metric!r}; valid: {list(METRICS)}")
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    teacher_acc: dict[str, float] = {}
    for m in runs:
        pair = f"{m.get('teacher') or 'teacher'} → {m.get('student', '?')}"
        if m.get("teacher_test_top1") is not None:
            teacher_acc.setdefault(pair, float(m["teacher_test_top1"]))
        label, method, alpha = row_key(m)
        g = groups.setdefault((pair, label), {"pair": pair, "row": label, "method": method, "alpha": alpha,
                                              "online": bool(m.get("online")), "values": [], "runs": []})
        if m.get(metric) is not None:
            g["values"].append(float(m[metric]))
            g["runs"].append(m.get("run"))
    # a CE run has no teacher: it is the "Student" row of every pair with the same student, and a column of
    # its own only when no distilled run uses that student
    distilled = {p for (p, _), g in groups.items() if g["method"] != "ce"}
    pairs = sorted(distilled | {p for (p, _), g in groups.items()
                                if g["method"] == "ce" and not any(d.endswith(f"→ {p.split(' → ', 1)[1]}")
                                                                   for d in distilled)})
    out: list[dict[str, Any]] = []
    for pair in pairs:
        student = pair.split(" → ", 1)[1]
        acc = teacher_top1 if teacher_top1 is not None else teacher_acc.get(pair)
        if acc is not None:
            out.append({"pair": pair, "row": "Teacher", "method": "teacher", "alpha": None, "mean": acc, "std": 0.0,
                        "n": 1, "delta": None, "runs": ""})
        rows = [g for (p, _), g in groups.items() if p == pair]
        if not any(g["method"] == "ce" for g in rows):  # CE runs recorded under another pair name
            rows += [g for (p, _), g in groups.items() if g["method"] == "ce" and p.endswith(f"→ {student}")
                     and p != pair]
        order = {"ce": 0, "kd": 1, "loca": 2, "dkd": 3, "loca_dkd": 4, "ls": 5, "loca_ls": 6}
        rows.sort(key=lambda g: (order.get(g["method"], 9), g["online"], g["alpha"] or 0.0))
        stats = {}
        for g in rows:
            if not g["values"]:
                continue
            mean, sd = _mean_std(g["values"])
            stats[(g["method"], g["online"])] = mean
            out.append({"pair": pair, "row": g["row"], "method": g["method"], "alpha": g["alpha"], "mean": mean,
                        "std": sd, "n": len(g["values"]), "delta": None, "runs": " ".join(map(str, g["runs"]))})
        for r in out:
            base = _base_of(r["method"]) if r["pair"] == pair else None
            if base is not None and (base, False) in stats:
                r["delta"] = r["mean"] - stats[(base, False)]
    return out


def to_markdown(rows: list[dict[str, Any]], title: str, metric: str) -> str:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    labels = list(dict.fromkeys(r["row"] for r in rows))
    cell = {(r["pair"], r["row"]): r for r in rows}
    lines = [f"### {title} — {metric}, mean ± std over seeds (n)", "",
             "| | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for lab in labels:
        vals = []
        for p in pairs:
            r = cell.get((p, lab))
            if r is None:
                vals.append("")
            elif r["row"] == "Teacher":
                vals.append(f"{r['mean']:.2f}")
            else:
                vals.append(f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n']})")
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
        if any(cell.get((p, lab), {}).get("delta") is not None for p in pairs):
            ds = []
            for p in pairs:
                d = cell.get((p, lab), {}).get("delta")
                ds.append("" if d is None else f"{d:+.2f}")
            base = LABELS.get(_base_of(next(r["method"] for r in rows if r["row"] == lab)) or "", "base")
            lines.append(f"| Δ vs {base} | " + " | ".join(ds) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["pair", "row", "method", "alpha", "mean", "std", "n", "delta", "runs"])
    w.writeheader()
    for r in rows:
        w.writerow({**r, "mean": f"{r['mean']:.4f}", "std": f"{r['std']:.4f}",
                    "delta": "" if r["delta"] is None else f"{r['delta']:.4f}",
                    "alpha": "" if r["alpha"] is None else r["alpha"]})
    return buf.getvalue()


def plot_alpha(rows: list[dict[str, Any]], path: Path, metric: str, title: str) -> bool:
    """Figure-5-style: LoCa accuracy vs α (mean ± std), KD as a horizontal line (± std band), CE dashed.
    Returns False (no file) when no pair has LoCa runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in dict.fromkeys(r["pair"] for r in rows)
             if any(r["pair"] == p and r["method"] == "loca" and not r["row"].endswith("(online)") for r in rows)]
    if not pairs:
        return False
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        lo = sorted((r for r in rows if r["pair"] == pair and r["method"] == "loca" and "(online)" not in r["row"]),
                    key=lambda r: r["alpha"])
        xs = [r["alpha"] for r in lo]
        ax.errorbar(xs, [r["mean"] for r in lo], yerr=[r["std"] for r in lo], marker="o", capsize=3,
                    color="tab:red", label="LoCa")
        for method, color, style in (("kd", "tab:blue", "-"), ("ce", "tab:gray", "--")):
            ref = next((r for r in rows if r["pair"] == pair and r["method"] == method and "(online)" not in r["row"]),
                       None)
            if ref is not None:
                ax.axhline(ref["mean"], color=color, linestyle=style, label=LABELS[method])
                if ref["std"] > 0:
                    ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"], color=color, alpha=0.12)
        ax.set_xlabel("α")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(pair, fontsize=9)
        if len(xs) > 0:
            ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: sensitivity to α", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(p: ReportParams) -> str:
    """Write report.md/.csv/.json and alpha.png; return the Markdown table."""
    runs = collect(p.runs_dir)
    rows = table(runs, p.metric, p.teacher_top1)
    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, p.title, p.metric)
    (out / "report.md").write_text(md)
    (out / "report.csv").write_text(to_csv(rows))
    js: dict[str, Any] = {}
    for r in rows:
        js.setdefault(r["pair"], {})[r["row"]] = {"mean": round(r["mean"], 4), "std": round(r["std"], 4),
                                                  "n": r["n"], **({"delta": round(r["delta"], 4)}
                                                                  if r["delta"] is not None else {})}
    (out / "report.json").write_text(json.dumps(js, indent=2, ensure_ascii=False) + "\n")
    if not plot_alpha(rows, out / "alpha.png", p.metric, p.title):
        log.warning("no LoCa runs: alpha.png not written")
    return md
