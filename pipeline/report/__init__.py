"""The comparison report: student runs → paired comparisons over seeds, the mechanism, and figures.

:func:`write_report` reads every ``metrics.json`` under ``runs_dir`` (any depth) written by ``train-student``
and writes into ``out_dir``::

    report.md          the comparison table (mean ± std (n) per method and teacher → student pair,
                       teachers ordered by accuracy), each compared row's paired difference against its
                       base method with a 95 % interval and p-values, a sentence per difference saying
                       whether it is above run-to-run noise, the mis-instruction table, the follow-rate
                       table (one row per teacher), excluded runs with the reason, the seeds not paired
                       because their runs' data orders differ, notes (runs that record no data order), and
                       where the figures are
    report.csv         long form: pair, row, method, alpha, mean, std, n, base, delta, low, high, p_t, p_perm
    full.json          everything above as JSON
    alpha.png          accuracy vs α per pair (LoCa mean ± std; KD and CE as lines)
    delta_vs_mis.png   paired Δ (LoCa − KD, KD* − KD) with 95 % interval vs the teacher's training
                       mis-instruction ratio
    follow.png         on each teacher's mis-instructed training rows: share of students predicting the
                       teacher's wrong class and the label, per method (CE = reference)
``metrics`` (a small JSON for ``dvc metrics`` / ``dvc exp show``): per teacher its accuracy and
mis-instruction ratio, per method ``{top1, delta, p}`` (Δ and p against the base method).

Modules: :mod:`~loca_pipe.pipeline.report.runs` (collect the runs, leave out the incomparable ones),
:mod:`~loca_pipe.pipeline.report.table` (means and paired differences), :mod:`~loca_pipe.pipeline.report.text`
(Markdown, CSV, JSON, metrics) and :mod:`~loca_pipe.pipeline.report.figures`. The ``report`` stage
(``stages/report.py``) is its params and one call to :func:`write_report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.report.figures import plot_alpha, plot_delta_vs_mis, plot_follow
from loca_pipe.pipeline.report.runs import (COMMON_KEYS, DISTILL_KEYS, check_comparable, collect, data_order_note,
                                            pair_of, row_key)
from loca_pipe.pipeline.report.table import METRICS, table
from loca_pipe.pipeline.report.text import delta_cell, plural, to_csv, to_json, to_markdown, to_metrics, unpaired

__all__ = ["COMMON_KEYS", "DISTILL_KEYS", "METRICS", "check_comparable", "collect", "data_order_note", "delta_cell",
           "pair_of", "plot_alpha", "plot_delta_vs_mis", "plot_follow", "plural", "row_key", "table", "to_csv",
           "to_json", "to_markdown", "to_metrics", "unpaired", "write_report"]

log = logging.getLogger(__name__)


def write_report(runs_dir: str | Path, out_dir: str | Path, *, metric: str = "test_top1",
                 teacher_top1: float | None = None, title: str = "Student accuracy (%)", strict: bool = False,
                 metrics: str | Path | None = None) -> tuple[dict[str, Any], dict[str, str], str]:
    """Write the report files and figures into ``out_dir`` (the metrics file to ``metrics``, default
    ``<out_dir>/report.json``): (full.json's content, what → path of every file written, the Markdown)."""
    runs, excluded = check_comparable(collect(runs_dir), strict)
    rows = table(runs, metric, teacher_top1, strict)
    for u in unpaired(rows):
        log.warning("not paired: %s", u)
    notes = [n for n in (data_order_note(runs),) if n]
    for n in notes:
        log.warning("%s", n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, ok in (("alpha.png", plot_alpha(rows, out / "alpha.png", metric, title)),
                     ("delta_vs_mis.png", plot_delta_vs_mis(rows, out / "delta_vs_mis.png", metric)),
                     ("follow.png", plot_follow(rows, out / "follow.png"))):
        if ok:
            figures.append(str(out / name))
        else:
            log.info("%s not written (no rows to draw)", name)
    md = to_markdown(rows, title, metric, excluded, figures, notes)
    (out / "report.md").write_text(md)
    (out / "report.csv").write_text(to_csv(rows))
    full = to_json(rows, excluded, notes)
    (out / "full.json").write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    mpath = Path(metrics) if metrics else out / "report.json"
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(to_metrics(rows), indent=2, ensure_ascii=False) + "\n")
    outputs = {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "json": str(out / "full.json"),
               "metrics": str(mpath), **{f"figure:{Path(f).name}": f for f in figures}}
    return full, outputs, md
