"""Which runs the report may compare: every ``metrics.json`` under a runs folder (:func:`collect`), left out
when not comparable with the rest (:func:`check_comparable`), and the (pair, row) each run belongs to.

Comparability: within a pair every run must agree on the student, data (fingerprint, split, training-set
size), evaluation split and optimisation settings except the seed; distilled runs also on the recipe
(τ, β, γ). The teacher is the pair's name; the same teacher read from a logit store or from targets built
from it counts as one (the report cannot tell a retrained teacher of the same name — retrain into a new
runs folder). The most common value of each field is the reference; a run that differs is left out
of every statistic and listed with the reason (``strict``: refused instead). A second run of the same
(pair, method, α, seed) — e.g. a stale folder from an earlier sweep — is left out the same way.

Data order: a run's ``data_order`` (a hex digest of the order its batches visited the training rows, written by
train-student) decides whether two runs of one seed may be paired — see :mod:`loca_pipe.pipeline.report.table`.
:func:`data_order_note` says, once, when runs written before train-student recorded it are paired on trust.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.student_spec import takes_alpha

log = logging.getLogger(__name__)

COMMON_KEYS = ("student", "dataset", "fingerprint", "split", "train_size", "eval_split", "preset", "augment")
DISTILL_KEYS = ("tau", "beta", "gamma", "recipe")


def labels() -> dict[str, str]:
    """Method name → its label in the tables (the losses registry's)."""
    from loca_pipe.pipeline.losses import METHODS  # deferred: torch, and only when a report is made

    return {n: m.label for n, m in METHODS.items()}


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


def pair_of(m: dict[str, Any]) -> str:
    return f"{m.get('teacher') or 'teacher'} → {m.get('student', '?')}"


def row_key(m: dict[str, Any]) -> tuple[str, str, float | None]:
    """(row label, method, α) of one run: α-taking rows carry their α, online runs are their own row."""
    method = m.get("method", "?")
    alpha = m.get("alpha") if takes_alpha(method) else None
    label = labels().get(method, method)
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
        for pair in sorted({pair_of(m) for m in group if m.get("method") != "ce"}):
            dist = [m for m in group if m.get("method") != "ce" and pair_of(m) == pair and id(m) not in bad]
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
        key = (pair_of(m) if m.get("method") != "ce" else m.get("student"), row_key(m)[0], m.get("seed"))
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


def data_order_note(runs: list[dict[str, Any]]) -> str | None:
    """One sentence when some runs carry no ``data_order`` (written before train-student recorded it): they are
    paired as before, on the assumption that one seed gave every method one data order."""
    unknown = [m for m in runs if not m.get("data_order")]
    if not unknown:
        return None
    return (f"{len(unknown)} of {len(runs)} runs record no data order (written before train-student recorded it): "
            f"they are paired on the assumption that one seed gave every method the same data order, which the "
            f"report cannot check")
