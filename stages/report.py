"""The comparison report stage: student runs → paired comparisons over seeds, the mechanism, and figures.

``run(params)`` is one call to :func:`loca_pipe.pipeline.report.write_report`, which reads every ``metrics.json``
under ``runs_dir`` (any depth) written by ``train-student`` and writes report.md, report.csv, full.json, the
figures (alpha.png, delta_vs_mis.png, follow.png) and the small dvc metrics file — see that module for what each
holds, how runs are paired and when a run is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from loca_pipe.pipeline.names import REPORT_METRICS as METRICS
from loca_pipe.pipeline.report import collect, plural, table, write_report  # noqa: F401 - collect, plural, table: this stage's names before the move
from loca_pipe.stages import Report

SECTION = "report"


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


def run(p: ReportParams) -> Report:
    """Write the report files and figures; the report's values are full.json, its text the Markdown."""
    full, outputs, md = write_report(p.runs_dir, p.out_dir, metric=p.metric, teacher_top1=p.teacher_top1,
                                     title=p.title, strict=p.strict, metrics=p.metrics)
    return Report(SECTION, full, outputs, md)
