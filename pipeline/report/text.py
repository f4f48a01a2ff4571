"""The report's text outputs from the table's rows: Markdown (report.md), long-form CSV (report.csv), JSON
(full.json) and the small metrics file for ``dvc metrics`` / ``dvc exp show`` (report.json)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 seed"``, ``"3 seeds"`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def teacher_of(pair: str) -> str:
    """The teacher of a ``"teacher → student"`` pair."""
    return pair.split(" → ", 1)[0]


def pair_names(pairs: list[str]) -> dict[str, str]:
    """What the report calls each pair in prose and figures: its teacher, or the whole pair where that teacher
    taught several students (the default's strong → mlp_small and strong → cnn_small), so no two pairs share
    a name."""
    per_teacher = Counter(teacher_of(p) for p in pairs)
    return {p: teacher_of(p) if per_teacher[teacher_of(p)] == 1 else p for p in pairs}


def _cell(r: dict[str, Any]) -> str:
    if r["row"] == "Teacher":
        return f"{r['mean']:.2f}"
    return f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n']})"


def delta_cell(pr: Any, digits: int = 2) -> str:
    """A paired difference as a table cell (the LM report's too): mean [interval] p, perm p, * if it excludes 0."""
    if pr is None or pr.mean is None:
        return ""
    d = digits
    if pr.low is None:
        return f"{pr.mean:+.{d}f} (1 seed, no interval)"
    star = " *" if pr.distinguishable else ""
    perm = f", perm p {pr.p_perm:.3g}" if pr.p_perm is not None else ""
    return f"{pr.mean:+.{d}f} [{pr.low:+.{d}f}, {pr.high:+.{d}f}] p {pr.p_t:.3g}{perm}{star}"


def unpaired(rows: list[dict[str, Any]]) -> list[str]:
    """Every seed the table left out of a paired difference, with the reason (the data orders differ)."""
    return [u for r in rows for u in r.get("unpaired") or []]


def to_markdown(rows: list[dict[str, Any]], title: str, metric: str, excluded: list[str] | None = None,
                figures: list[str] | None = None, notes: list[str] | None = None) -> str:
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
            vals = [delta_cell(cell.get((p, lab), {}).get("paired")) for p in pairs]
            lines.append(f"| {lab} − {base} | " + " | ".join(vals) + " |")
        lines += ["", "In words:", ""]
        name = pair_names(pairs)
        for p in pairs:
            for lab in compared:
                r = cell.get((p, lab))
                if r is not None and r.get("paired") is not None:
                    what = f"{lab} − {r['base']}"
                    lines.append(f"- {name[p]}: {r['paired'].words(what)}.")
        if n_seeds and n_seeds <= 5:
            lines += ["", f"With {plural(n_seeds, 'seed')} the exact sign-flip test cannot go below {2 / 2 ** n_seeds:.4g}; "
                          f"the paired t-test (normal per-seed differences assumed) is the primary test."]
    mis = [(p, r["follow"]) for p in pairs for r in rows if r["pair"] == p and r.get("follow")]
    if mis:
        lines += ["", "### Mis-instruction (teacher top-1 not the label, ties counted) on the training set", "",
                  "| teacher | teacher test top-1 | mis-instructed training rows | ratio |", "|---|---|---|---|"]
        shown: set[str] = set()  # one row per teacher, however many students it taught (its first pair's)
        for p in pairs:
            f = next((f for q, f in mis if q == p), None)
            t = cell.get((p, "Teacher"))
            if f is not None and teacher_of(p) not in shown:
                shown.add(teacher_of(p))
                acc = "" if t is None else f"{t['mean']:.2f}"
                lines.append(f"| {teacher_of(p)} | {acc} | {f['mis_rows']} of {f['rows']} | {f['mis_ratio']:.2f} % |")
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
    clashes = unpaired(rows)
    if clashes:
        lines += ["", f"### Not paired ({plural(len(clashes), 'seed')} whose two runs saw the training rows in "
                      f"different data orders)", ""]
        lines += [f"- {u}" for u in clashes]
    if notes:
        lines += ["", "### Notes", ""]
        lines += [f"- {n}" for n in notes]
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


def to_json(rows: list[dict[str, Any]], excluded: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    js: dict[str, Any] = {"pairs": {}, "excluded": excluded}
    if unpaired(rows):
        js["unpaired"] = unpaired(rows)
    if notes:
        js["notes"] = list(notes)
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
    out: dict[str, Any] = {}
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    common = Counter(p.split(" → ", 1)[-1] for p in pairs).most_common(1)
    per_teacher = Counter(teacher_of(p) for p in pairs)

    def key(pair: str) -> str:
        alone = per_teacher[teacher_of(pair)] == 1 or pair.split(" → ", 1)[-1] == common[0][0]
        return teacher_of(pair) if alone else pair.replace(" → ", "-")

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
