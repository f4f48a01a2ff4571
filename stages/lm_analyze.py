"""Stage `lm-analyze`: token-level mis-instruction statistics of the cached teacher → analysis/
(tokens.parquet, by_position.parquet, by_frequency.parquet, metrics.json, mis_instruction.png)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.lm import analysis, cache
from loca_pipe.stages.lm_common import DEFAULT_PARAMS, LMBase, load

SECTION = "lm_analyze"


@dataclass(frozen=True)
class Params:
    name: str = "teacher"
    tau: float = 1.0
    alpha: float = 0.9


def run(base: LMBase, p: Params) -> dict[str, Any]:
    c = cache.open_lm_cache(str(base.store), p.name)
    tab = analysis.token_table(c, p.tau, p.alpha)
    summary = analysis.summarize(tab)
    summary.update(tau=p.tau, alpha=p.alpha, teacher=p.name)
    analysis.write_outputs(tab, summary, base.analysis_dir,
                           f"teacher {p.name!r}: {summary['mis_ratio']:.1%} of {summary['tokens']} response tokens "
                           f"mis-instructed (τ={p.tau})")
    return summary


def main(params: str | Path = DEFAULT_PARAMS, overrides: dict | None = None) -> dict[str, Any]:
    base, p = load(Params, SECTION, params, overrides)
    return run(base, p)
