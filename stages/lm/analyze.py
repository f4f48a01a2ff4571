"""Stage `lm-analyze`: token-level mis-instruction statistics of the cached teacher → analysis/
(tokens.parquet, by_position.parquet, by_frequency.parquet, metrics.json, mis_instruction.png)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.lm import analysis, streaming
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, report as lm_report

SECTION = "lm_analyze"


@dataclass(frozen=True)
class Params:
    name: str = "teacher"
    tau: float = 1.0
    alpha: float = 0.9
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def run(p: Params) -> Report:
    base = p.base
    t = streaming.TokenTeacher(str(base.store), p.name)  # streamed block by block: memory does not grow with tokens
    s = analysis.analyze_streamed(
        t, p.tau, p.alpha, base.analysis_dir, progress=True, extra={"tau": p.tau, "alpha": p.alpha, "teacher": p.name},
        title=lambda s: f"teacher {p.name!r}: {s['mis_ratio']:.1%} of {s['tokens']} response tokens mis-instructed "
                        f"(τ={p.tau})")
    return lm_report(SECTION, s, {"analysis": base.analysis_dir},
                     shown={k: v for k, v in s.items() if k not in ("by_position", "by_frequency")})
