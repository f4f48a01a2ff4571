"""The comparison report: student runs → paired comparisons over seeds, the mechanism, and figures.

``run(params)`` reads every ``metrics.json`` under ``runs_dir`` (any depth) written by ``train-student``
and writes into ``out_dir``::

    report.md          the comparison table (mean ± std (n) per method and teacher → student pair,
                       teachers ordered by accuracy), each compared row's paired difference against its
                       base method with a 95 % interval and p-values, a sentence per difference saying
                       whether it is above run-to-run noise, the mis-instruction table, the follow-rate
                       table, excluded runs with the reason, and where the figures are
    report.csv         long form: pair, row, method, alpha, mean, std, n, base, delta, low, high, p_t, p_perm
    full.json          everything above as JSON
    alpha.png          accuracy vs α per pair (LoCa mean ± std; KD and CE as lines)
    delta_vs_mis.png   paired Δ (LoCa − KD, KD* − KD) with 95 % interval vs the teacher's training
                       mis-instruction ratio
    follow.png         on each teacher's mis-instructed training rows: share of students predicting the
                       teacher's wrong class and the label, per method (CE = reference)
``metrics`` (a small JSON for ``dvc metrics`` / ``dvc exp show``): per teacher its accuracy and
mis-instruction ratio, per method ``{top1, delta, p}`` (Δ and p against the base method).

Pairing: a method's base comes from the registry (``losses.METHODS[m].base``: KD and DKD vs CE, LoCa and
KD* vs KD, DKD+LoCa vs DKD). Only seeds present on both sides are paired (same seed ⇒ same initial
weights and data order). Statistics: :mod:`loca_pipe.pipeline.stats` (paired t-test and its t-interval as
the primary numbers, the exact sign-flip p beside them).

Comparability: within a pair every run must agree on the student, data (fingerprint, split, training-set
size), evaluation split and optimisation settings except the seed; distilled runs also on the recipe
(τ, β, γ). The teacher is the pair's name; the same teacher read from a logit store or from targets built
from it counts as one (the report cannot tell a retrained teacher of the same name — retrain into a new
runs folder). The most common value of each field is the reference; a run that differs is left out
of every statistic and listed with the reason (``strict``: refused instead). A second run of the same
(pair, method, α, seed) — e.g. a stale folder from an earlier sweep — is left out the same way.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.stages import Report

log = logging.getLogger(__name__)
SECTION = "report"

# What a table may show: final-epoch accuracies. metrics.json also holds best_test_top1 (the best epoch *on the test
# set*: selecting an epoch by its test score is early stopping on test), so the report never offers it.
METRICS = ("test_top1", "test_top5")
COMMON_KEYS = ("student", "dataset", "fingerprint", "split", "train_size", "eval_split", "preset", "augment")
DISTILL_KEYS = ("tau", "beta", "gamma", "recipe")



def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 seed"``, ``"3 seeds"`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _labels() -> dict[str, str]:
    from loca_pipe.pipeline.losses import METHODS

    return {n: m.label for n, m in METHODS.items()}


@dataclass(frozen=True)
class ReportParams:
    """The ``report`` section of params.yaml."""

    runs_dir: str = "data/students"
    out_dir: str = "data/report"
    metrics: str | None = None             # small JSON for dvc metrics (default: <out_dir>/report.json)
    metric: str = "test_top1"              # test_top1 | test_top5 (never best_test_top1: test-set selection)
    teacher_top1: float | None = None      # override the teacher accuracy found in the runs
    title: str = "Student accuracy (%)"
    strict: bool = False                   # refuse (instead of leaving out) runs that are not comparable


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run's metrics.json under ``runs_dir`` (any depth), sorted by path."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs folder {str(root)!r} does not exist; train students first "
                          f"(`loca-pipe train-student`) or point report.runs_dir at their folder")
    runs = []
    for f in sorted(root.glob("**/metrics.json")):
        try:
            m = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{str(f)!r} is not valid JSON ({exc}); delete the run folder or re-run it") from exc
        if not isinstance(m, dict) or "method" not in m:
            continue  # not a train-student run (e.g. a teacher's metrics)
        m.setdefault("run", f.parent.name)
        m["_path"] = str(f.parent)
        m["_mtime"] = f.stat().st_mtime
        runs.append(m)
    if not runs:
        raise ConfigError(f"no runs in {str(root)!r} (no */metrics.json); train students first")
    return runs


def _pair(m: dict[str, Any]) -> str:
    return f"{m.get('teacher') or 'teacher'} → {m.get('student', '?')}"


def _takes_alpha(method: str) -> bool:
    from loca_pipe.pipeline.losses import METHODS

    return bool(METHODS[method].loca) if method in METHODS else method.startswith("loca")


def row_key(m: dict[str, Any]) -> tuple[str, str, float | None]:
    """(row label, method, α) of one run: α-taking rows carry their α, online runs are their own row."""
    method = m.get("method", "?")
    alpha = m.get("alpha") if _takes_alpha(method) else None
    label = _labels().get(method, method)
    if alpha is not None:
        label = f"{label}-{alpha:g}"
    if m.get("online"):
        label += " (online)"
    return label, method, alpha


def _train_cfg(m: dict[str, Any]) -> str:
    t = dict(m.get("train") or {})
    t.pop("seed", None)
    return json.dumps(t, sort_keys=True)


def _fmt(v: Any) -> str:
    if isinstance(v, str) and v.startswith("{"):
        t = json.loads(v)
        return ", ".join(f"{k} {t[k]}" for k in ("epochs", "batch_size", "lr", "milestones") if k in t) or v
    return repr(v)


def check_comparable(runs: list[dict[str, Any]], strict: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(kept runs, reasons for every run left out); ``strict`` raises instead of leaving out."""
    excluded: list[str] = []
    bad: set[int] = set()
    students = {m.get("student") for m in runs}
    for student in sorted(students, key=str):
        group = [m for m in runs if m.get("student") == student]
        fields = [(k, lambda m, k=k: m.get(k)) for k in COMMON_KEYS] + [("training settings", _train_cfg)]
        for name, get in fields:
            vals = Counter(json.dumps(get(m), sort_keys=True, default=str) for m in group)
            ref, _ = vals.most_common(1)[0]
            for m in group:
                v = json.dumps(get(m), sort_keys=True, default=str)
                if v != ref and id(m) not in bad:
                    bad.add(id(m))
                    excluded.append(f"{m['_path']}: {name} {_fmt(json.loads(v))} differs from the other runs' "
                                    f"{_fmt(json.loads(ref))}")
        for pair in sorted({_pair(m) for m in group if m.get("method") != "ce"}):
            dist = [m for m in group if m.get("method") != "ce" and _pair(m) == pair and id(m) not in bad]
            for k in DISTILL_KEYS:
                vals = Counter(json.dumps(m.get(k), sort_keys=True, default=str) for m in dist)
                if not vals:
                    continue
                ref, _ = vals.most_common(1)[0]
                for m in dist:
                    v = json.dumps(m.get(k), sort_keys=True, default=str)
                    if v != ref and id(m) not in bad:
                        bad.add(id(m))
                        excluded.append(f"{m['_path']}: {k} {v} differs from the other {pair} runs' {ref}")
    # the same (pair, row, seed) twice: keep the newest, leave out the others as stale
    newest: dict[tuple, dict[str, Any]] = {}
    for m in sorted((m for m in runs if id(m) not in bad), key=lambda m: m["_mtime"]):
        key = (_pair(m) if m.get("method") != "ce" else m.get("student"), row_key(m)[0], m.get("seed"))
        if key in newest:
            old = newest[key]
            bad.add(id(old))
            excluded.append(f"{old['_path']}: a second run of {row_key(m)[0]} seed {m.get('seed')} exists "
                            f"({m['_path']}, newer); left out as stale")
        newest[key] = m
    if excluded and strict:
        raise ConfigError("runs are not comparable: " + "; ".join(excluded) + " (remove them or set report.strict "
                                                                              "false to leave them out)")
    for e in excluded:
        log.warning("left out: %s", e)
    return [m for m in runs if id(m) not in bad], excluded


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def table(runs: list[dict[str, Any]], metric: str = "test_top1", teacher_top1: float | None = None) -> list[dict[str, Any]]:
    """Long-form rows: one per (pair, row label) with mean, std, n, per-seed values and the paired
    comparison against the base method."""
    from loca_pipe.pipeline import stats
    from loca_pipe.pipeline.losses import METHODS

    if metric == "best_test_top1":
        raise ConfigError("report metric 'best_test_top1' picks each run's best epoch on the test set (early stopping "
                          f"on test), so no table shows it; use one of {list(METRICS)}")
    if metric not in METRICS:
        raise ConfigError(f"unknown report metric {metric!r}; valid: {list(METRICS)}")
    order = {n: i for i, n in enumerate(METHODS)}
    teacher_acc: dict[str, float] = {}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    ce: dict[str, dict[str, Any]] = {}
    for m in runs:
        label, method, alpha = row_key(m)
        if method == "ce":
            g = ce.setdefault(m.get("student"), {"row": label, "method": "ce", "alpha": None, "online": False,
                                                  "seeds": {}, "runs": {}, "follow": {}})
        else:
            pair = _pair(m)
            if m.get("teacher_test_top1") is not None:
                teacher_acc.setdefault(pair, float(m["teacher_test_top1"]))
            g = groups.setdefault((pair, label), {"pair": pair, "row": label, "method": method, "alpha": alpha,
                                                  "online": bool(m.get("online")), "seeds": {}, "runs": {},
                                                  "follow": {}})
        if m.get(metric) is not None:
            g["seeds"][m.get("seed")] = float(m[metric])
            g["runs"][m.get("seed")] = m.get("run")
        for t, f in (m.get("follow") or {}).items():
            g["follow"].setdefault(t, []).append(f)
    pairs = sorted({p for p, _ in groups}, key=lambda p: (teacher_acc.get(p, math.inf), p))
    if not pairs:  # CE runs only: one column per student
        pairs = [f"(no teacher) → {s}" for s in ce]
    out: list[dict[str, Any]] = []
    for pair in pairs:
        student = pair.split(" → ", 1)[1]
        teacher = pair.split(" → ", 1)[0]
        acc = teacher_top1 if teacher_top1 is not None else teacher_acc.get(pair)
        if acc is not None:
            out.append({"pair": pair, "row": "Teacher", "method": "teacher", "alpha": None, "mean": acc, "std": 0.0,
                        "n": 1, "seeds": {}, "runs": "", "base": None, "paired": None, "follow": None})
        rows = [dict(g, pair=pair) for (p, _), g in groups.items() if p == pair]
        if student in ce:
            rows.append(dict(ce[student], pair=pair))
        rows.sort(key=lambda g: (order.get(g["method"], 99), g["online"], g["alpha"] or 0.0))
        by_method = {(g["method"], g["online"]): g for g in rows if g["alpha"] is None}
        for g in rows:
            if not g["seeds"]:
                continue
            vals = list(g["seeds"].values())
            mean, sd = _mean_std(vals)
            base = METHODS[g["method"]].base if g["method"] in METHODS else None
            ref = by_method.get((base, False)) if base else None
            pr = None
            if ref is not None:
                common = sorted(set(g["seeds"]) & set(ref["seeds"]), key=str)
                pr = stats.paired([g["seeds"][s] for s in common], [ref["seeds"][s] for s in common])
            fl = g["follow"].get(teacher) or []
            follow = None
            if fl and fl[0].get("follow_teacher") is not None:
                ft = [f["follow_teacher"] for f in fl]
                fb = [f["follow_label"] for f in fl]
                follow = {"follow_teacher": _mean_std(ft), "follow_label": _mean_std(fb), "n": len(fl),
                          "mis_ratio": fl[0]["mis_ratio"], "mis_rows": fl[0]["mis_rows"], "rows": fl[0]["rows"]}
            elif fl:
                follow = {"note": fl[0].get("note"), "mis_ratio": fl[0]["mis_ratio"], "mis_rows": 0,
                          "rows": fl[0]["rows"]}
            out.append({"pair": pair, "row": g["row"], "method": g["method"], "alpha": g["alpha"], "mean": mean,
                        "std": sd, "n": len(vals), "seeds": dict(g["seeds"]),
                        "runs": " ".join(str(g["runs"][s]) for s in g["runs"]),
                        "base": None if ref is None else ref["row"], "paired": pr, "follow": follow})
    return out


def _short(pair: str) -> str:
    return pair.split(" → ", 1)[0]


def _cell(r: dict[str, Any]) -> str:
    if r["row"] == "Teacher":
        return f"{r['mean']:.2f}"
    return f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n']})"


def _delta_cell(pr: Any, digits: int = 2) -> str:
    """A paired difference as a table cell (the LM report's too): mean [interval] p, perm p, * if it excludes 0."""
    if pr is None or pr.mean is None:
        return ""
    d = digits
    if pr.low is None:
        return f"{pr.mean:+.{d}f} (1 seed, no interval)"
    star = " *" if pr.distinguishable else ""
    perm = f", perm p {pr.p_perm:.3g}" if pr.p_perm is not None else ""
    return f"{pr.mean:+.{d}f} [{pr.low:+.{d}f}, {pr.high:+.{d}f}] p {pr.p_t:.3g}{perm}{star}"


def to_markdown(rows: list[dict[str, Any]], title: str, metric: str, excluded: list[str] | None = None,
                figures: list[str] | None = None) -> str:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    labels = list(dict.fromkeys(r["row"] for r in rows))
    cell = {(r["pair"], r["row"]): r for r in rows}
    n_seeds = max((r["n"] for r in rows if r["row"] != "Teacher"), default=0)
    lines = [f"### {title} — {metric}, mean ± std over seeds (n)", "",
             "| | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for lab in labels:
        vals = [_cell(cell[(p, lab)]) if (p, lab) in cell else "" for p in pairs]
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
    compared = [lab for lab in labels if any(cell.get((p, lab), {}).get("paired") is not None for p in pairs)]
    if compared:
        lines += ["", f"### Paired differences (same seeds), mean [95 % t-interval], paired t-test p, exact "
                      f"sign-flip p; * = interval excludes 0", "",
                  "| | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
        for lab in compared:
            base = next(cell[(p, lab)]["base"] for p in pairs if cell.get((p, lab), {}).get("paired") is not None)
            vals = [_delta_cell(cell.get((p, lab), {}).get("paired")) for p in pairs]
            lines.append(f"| {lab} − {base} | " + " | ".join(vals) + " |")
        lines += ["", "In words:", ""]
        for p in pairs:
            for lab in compared:
                r = cell.get((p, lab))
                if r is not None and r.get("paired") is not None:
                    what = f"{lab} − {r['base']}"
                    lines.append(f"- {_short(p)}: {r['paired'].words(what)}.")
        if n_seeds and n_seeds <= 5:
            lines += ["", f"With {plural(n_seeds, 'seed')} the exact sign-flip test cannot go below {2 / 2 ** n_seeds:.4g}; "
                          f"the paired t-test (normal per-seed differences assumed) is the primary test."]
    mis = [(p, r["follow"]) for p in pairs for r in rows if r["pair"] == p and r.get("follow")]
    if mis:
        lines += ["", "### Mis-instruction (teacher top-1 not the label, ties counted) on the training set", "",
                  "| teacher | teacher test top-1 | mis-instructed training rows | ratio |", "|---|---|---|---|"]
        for p in pairs:
            f = next((f for q, f in mis if q == p), None)
            t = cell.get((p, "Teacher"))
            if f is not None:
                acc = "" if t is None else f"{t['mean']:.2f}"
                lines.append(f"| {_short(p)} | {acc} | {f['mis_rows']} of {f['rows']} | {f['mis_ratio']:.2f} % |")
        lines += ["", "### The mechanism: on the teacher's mis-instructed training rows, the share (%) of the "
                      "student's predictions that are the teacher's wrong class / the label (mean ± std over seeds; "
                      "the CE student never saw the teacher)", "",
                  "| | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
        for lab in labels:
            if lab == "Teacher":
                continue
            vals = []
            for p in pairs:
                f = (cell.get((p, lab)) or {}).get("follow")
                if not f:
                    vals.append("")
                elif "follow_teacher" not in f:
                    vals.append(f.get("note") or "")
                else:
                    (ft, st), (fb, sb) = f["follow_teacher"], f["follow_label"]
                    vals.append(f"wrong {ft:.1f} ± {st:.1f} / label {fb:.1f} ± {sb:.1f}")
            if any(vals):
                lines.append(f"| {lab} | " + " | ".join(vals) + " |")
    if excluded:
        lines += ["", f"### Left out ({plural(len(excluded), 'run')} not comparable with the rest)", ""]
        lines += [f"- {e}" for e in excluded]
    if figures:
        lines += ["", "Figures: " + ", ".join(figures)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["pair", "row", "method", "alpha", "mean", "std", "n", "base", "delta", "low", "high", "p_t", "p_perm",
            "follow_teacher", "follow_label", "runs"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        pr = r.get("paired")
        f = r.get("follow") or {}
        num = (lambda v: "" if v is None else f"{v:.6g}")
        w.writerow({"pair": r["pair"], "row": r["row"], "method": r["method"],
                    "alpha": "" if r["alpha"] is None else r["alpha"], "mean": f"{r['mean']:.4f}",
                    "std": f"{r['std']:.4f}", "n": r["n"], "base": r.get("base") or "",
                    "delta": num(pr.mean if pr else None), "low": num(pr.low if pr else None),
                    "high": num(pr.high if pr else None), "p_t": num(pr.p_t if pr else None),
                    "p_perm": num(pr.p_perm if pr else None),
                    "follow_teacher": num(f["follow_teacher"][0]) if "follow_teacher" in f else "",
                    "follow_label": num(f["follow_label"][0]) if "follow_label" in f else "", "runs": r["runs"]})
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]], excluded: list[str]) -> dict[str, Any]:
    js: dict[str, Any] = {"pairs": {}, "excluded": excluded}
    for r in rows:
        pr = r.get("paired")
        js["pairs"].setdefault(r["pair"], {})[r["row"]] = {
            "mean": round(r["mean"], 4), "std": round(r["std"], 4), "n": r["n"],
            "seeds": {str(k): v for k, v in (r.get("seeds") or {}).items()},
            **({"vs": r["base"], "paired": pr.as_dict()} if pr is not None else {}),
            **({"follow": r["follow"]} if r.get("follow") else {})}
    return js


def _key(r: dict[str, Any]) -> str:
    k = r["method"] + (f"-a{r['alpha']:g}" if r.get("alpha") is not None else "")
    return k + ("-online" if "(online)" in r["row"] else "")


def to_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The small dvc metrics file: per teacher its top-1 and training mis-instruction ratio (%), and per
    method (run-name style keys: kd, kd_star, loca-a0.95) the mean top-1 and, where it has a base method,
    the paired Δ and its t-test p. A teacher with students of several architectures (the default's strong
    teacher: mlp_small and cnn_small) keys the most common student's pair by the teacher's name and each
    other pair by "teacher-student" (ASCII, like its run folder), so no pair's rows overwrite another's."""
    from collections import Counter

    out: dict[str, Any] = {}
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    common = Counter(p.split(" → ", 1)[-1] for p in pairs).most_common(1)
    per_teacher = Counter(_short(p) for p in pairs)

    def key(pair: str) -> str:
        alone = per_teacher[_short(pair)] == 1 or pair.split(" → ", 1)[-1] == common[0][0]
        return _short(pair) if alone else pair.replace(" → ", "-")

    for r in rows:
        t = out.setdefault(key(r["pair"]), {})
        if r["row"] == "Teacher":
            t["teacher"] = round(r["mean"], 2)
            continue
        if r.get("follow") and "mis_ratio" not in t:
            t["mis_ratio"] = round(r["follow"]["mis_ratio"], 2)
        e: dict[str, Any] = {"top1": round(r["mean"], 2)}
        pr = r.get("paired")
        if pr is not None and pr.mean is not None:
            e["delta"] = round(pr.mean, 2)
            if pr.p_t is not None:
                e["p"] = round(pr.p_t, 4)
        t[_key(r)] = e
    return out


# ------------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha(rows: list[dict[str, Any]], path: Path, metric: str, title: str) -> bool:
    """Figure-5-style: LoCa accuracy vs α (mean ± std), KD as a horizontal line (± std band), CE dashed.
    Returns False (no file) when no pair has LoCa runs."""
    labels = _labels()
    pairs = [p for p in dict.fromkeys(r["pair"] for r in rows)
             if any(r["pair"] == p and r["method"] == "loca" and not r["row"].endswith("(online)") for r in rows)]
    if not pairs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.2), squeeze=False)
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
                ax.axhline(ref["mean"], color=color, linestyle=style, label=labels[method])
                if ref["std"] > 0:
                    ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"], color=color, alpha=0.12)
        ax.set_xlabel("LoCa α")
        ax.set_ylabel(f"student {metric} (%)")
        ax.set_title(pair, fontsize=9)
        if xs:
            ax.set_xticks(xs)
            if len(xs) == 1:
                ax.set_xlim(xs[0] - 0.05, xs[0] + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: sensitivity to α (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_delta_vs_mis(rows: list[dict[str, Any]], path: Path, metric: str) -> bool:
    """Paired Δ vs base (KD) with 95 % interval, against each teacher's training mis-instruction ratio."""
    pts: dict[str, list[tuple[float, float, float | None, float | None, str]]] = {}
    for r in rows:
        pr, f = r.get("paired"), r.get("follow")
        if pr is None or pr.mean is None or r.get("base") != "KD" or not f:
            continue
        pts.setdefault(r["row"], []).append((f["mis_ratio"], pr.mean, pr.low, pr.high, _short(r["pair"])))
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    colors = iter(["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"])
    for k, (lab, ps) in enumerate(sorted(pts.items())):
        ps.sort()
        c = next(colors, "black")
        off = (k - (len(pts) - 1) / 2) * 0.25
        xs = [p[0] + off for p in ps]
        ys = [p[1] for p in ps]
        err = [[p[1] - p[2] if p[2] is not None else 0 for p in ps], [p[3] - p[1] if p[3] is not None else 0 for p in ps]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=c, linestyle="-", label=f"{lab} − KD")
        for x, y, p in zip(xs, ys, ps):
            ax.annotate(p[4], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7, color=c)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("teacher's mis-instructed training rows (%)")
    ax.set_ylabel(f"paired Δ {metric} vs KD (points)")
    ax.set_title("Gain over KD vs teacher mis-instruction (mean, 95 % t-interval over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_follow(rows: list[dict[str, Any]], path: Path) -> bool:
    """Per teacher, grouped bars per method: share predicting the teacher's wrong class / the label."""
    pairs = [p for p in dict.fromkeys(r["pair"] for r in rows)
             if any(r["pair"] == p and (r.get("follow") or {}).get("follow_teacher") for r in rows)]
    if not pairs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(5.5, 3.8 * len(pairs)), 3.8), squeeze=False, sharey=True)
    for ax, pair in zip(axes[0], pairs):
        rs = [r for r in rows if r["pair"] == pair and (r.get("follow") or {}).get("follow_teacher")]
        xs = range(len(rs))
        ft = [r["follow"]["follow_teacher"] for r in rs]
        fb = [r["follow"]["follow_label"] for r in rs]
        ax.bar([x - 0.2 for x in xs], [m for m, _ in ft], 0.4, yerr=[s for _, s in ft], capsize=2, color="tab:red",
               label="teacher's wrong class")
        ax.bar([x + 0.2 for x in xs], [m for m, _ in fb], 0.4, yerr=[s for _, s in fb], capsize=2, color="tab:blue",
               label="the label")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["row"] for r in rs], rotation=35, ha="right", fontsize=8)
        f = rs[0]["follow"]
        ax.set_title(f"{_short(pair)} teacher: {f['mis_rows']} mis-instructed rows ({f['mis_ratio']:.1f} %)", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("student predicts (% of those rows)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Does the student follow the teacher's mistakes? (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(p: ReportParams) -> Report:
    """Write the report files and figures; the report's values are full.json, its text the Markdown."""
    runs, excluded = check_comparable(collect(p.runs_dir), p.strict)
    rows = table(runs, p.metric, p.teacher_top1)
    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, ok in (("alpha.png", plot_alpha(rows, out / "alpha.png", p.metric, p.title)),
                     ("delta_vs_mis.png", plot_delta_vs_mis(rows, out / "delta_vs_mis.png", p.metric)),
                     ("follow.png", plot_follow(rows, out / "follow.png"))):
        if ok:
            figures.append(str(out / name))
        else:
            log.info("%s not written (no rows to draw)", name)
    md = to_markdown(rows, p.title, p.metric, excluded, figures)
    (out / "report.md").write_text(md)
    (out / "report.csv").write_text(to_csv(rows))
    full = to_json(rows, excluded)
    (out / "full.json").write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    mpath = Path(p.metrics) if p.metrics else out / "report.json"
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(to_metrics(rows), indent=2, ensure_ascii=False) + "\n")
    outputs = {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "json": str(out / "full.json"),
               "metrics": str(mpath), **{f"figure:{Path(f).name}": f for f in figures}}
    return Report(SECTION, full, outputs, md)
