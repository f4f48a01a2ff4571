"""The report's table: one row per (teacher → student pair, method row) with mean ± std over seeds and the paired
comparison against the row's base method.

Pairing: a method's base comes from the registry (``losses.METHODS[m].base``: KD and DKD vs CE, LoCa and
KD* vs KD, DKD+LoCa vs DKD). Only seeds present on both sides are paired (same seed ⇒ same initial
weights and data order). Two runs of one seed whose ``data_order`` differs (each records the digest of the order
its batches visited the training rows) are not paired: that seed is dropped from the row's paired difference and
the reason is listed (``strict``: refused instead); the run still counts in its row's mean ± std. A run without
``data_order`` (written before train-student recorded it) is paired as before (the report notes it once).
Statistics: :mod:`loca_pipe.pipeline.stats` (paired t-test and its t-interval as the primary numbers, the exact
sign-flip p beside them).
"""

from __future__ import annotations

import math
from typing import Any

from loca_pipe.pipeline import stats
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.names import REPORT_METRICS as METRICS
from loca_pipe.pipeline.report.runs import pair_of, row_key


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def table(runs: list[dict[str, Any]], metric: str = "test_top1", teacher_top1: float | None = None,
          strict: bool = False) -> list[dict[str, Any]]:
    """Long-form rows: one per (pair, row label) with mean, std, n, per-seed values and the paired
    comparison against the base method; ``unpaired`` lists the seeds left out of that comparison because the
    two runs' data orders differ, with the reason (``strict``: refused instead)."""
    from loca_pipe.pipeline.losses import METHODS  # deferred: torch, and only when a report is made

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
                                                  "seeds": {}, "runs": {}, "orders": {}, "follow": {}})
        else:
            pair = pair_of(m)
            if m.get("teacher_test_top1") is not None:
                teacher_acc.setdefault(pair, float(m["teacher_test_top1"]))
            g = groups.setdefault((pair, label), {"pair": pair, "row": label, "method": method, "alpha": alpha,
                                                  "online": bool(m.get("online")), "seeds": {}, "runs": {},
                                                  "orders": {}, "follow": {}})
        if m.get(metric) is not None:
            g["seeds"][m.get("seed")] = float(m[metric])
            g["runs"][m.get("seed")] = m.get("run")
            g["orders"][m.get("seed")] = m.get("data_order")
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
            pr, unpaired = None, []
            if ref is not None:
                common = sorted(set(g["seeds"]) & set(ref["seeds"]), key=str)
                unpaired = [order_clash(pair, g, ref, s) for s in common if _clash(g, ref, s)]
                common = [s for s in common if not _clash(g, ref, s)]
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
                        "base": None if ref is None else ref["row"], "paired": pr, "follow": follow,
                        "unpaired": unpaired})
    clashes = [u for r in out for u in r.get("unpaired") or []]
    if clashes and strict:
        raise ConfigError("runs of one seed with different data orders cannot be paired: " + "; ".join(clashes) +
                          " (re-run them with one train-student version, or set report.strict false to leave those "
                          "seeds out of the paired differences)")
    return out


def _clash(g: dict[str, Any], ref: dict[str, Any], seed: Any) -> bool:
    """Both runs of ``seed`` record a data order and the two differ (a run without one is paired on trust)."""
    a, b = g["orders"].get(seed), ref["orders"].get(seed)
    return bool(a) and bool(b) and a != b


def order_clash(pair: str, g: dict[str, Any], ref: dict[str, Any], seed: Any) -> str:
    """Why seed ``seed`` of row ``g`` is not paired with its base row ``ref``."""
    a, b = str(g["orders"][seed]), str(ref["orders"][seed])
    return (f"{pair}: {g['row']} − {ref['row']} seed {seed} not paired: run {g['runs'].get(seed)} saw the training "
            f"rows in data order {a[:12]}, run {ref['runs'].get(seed)} in {b[:12]}, so their difference is not paired "
            f"in data order (both runs still count in their rows' means)")
