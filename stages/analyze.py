"""Stage ``analyze``: mis-instruction statistics of every teacher in a logit store (section ``analyze``).

Outputs in ``out`` (docs/analysis.md)::

    .loca-source.json        which store these results belong to (refuses another store unless overwrite)
    metrics.json             per-teacher scalar metrics (dvc metrics)
    analysis.json            everything, including confusions, worst classes, per-view numbers (--json)
    summary.md               Markdown table
    teachers.csv             teacher, rows, mis_instructed, mis_instruction_ratio, top1, top5 (dvc plots: Figure 2)
    per_class.csv            teacher, class, rows, mis_instructed, ratio (dvc plots)
    confusions.csv           teacher, label, prediction, count, share_of_label
    per_view.csv             teacher, view, rows, mis_instructed, ratio, top1, top5
    histograms.csv           teacher, quantity, group, bin, lo, hi, count
    samples/<teacher>/part-*.parquet   one row per store row (pandas/duckdb/polars read the folder)
    figures/mis_instruction.png, figures/per_class_<teacher>.png, figures/confidence_<teacher>.png
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.analysis import AnalysisOptions, TeacherReport, analyze, connect
from loca_pipe.pipeline.errors import StoreConflictError
from loca_pipe.pipeline.guard import FOLDER, check_outputs
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.stages import Report

SECTION = "analyze"
MARKER = ".loca-source.json"
OUTPUTS = (MARKER, "metrics.json", "analysis.json", "summary.md", "teachers.csv", "per_class.csv", "confusions.csv",
           "per_view.csv", "histograms.csv", "samples", "figures")


@dataclass(frozen=True)
class AnalyzeParams:
    """Section ``analyze`` of params.yaml."""

    store: str = "data/logits/fashion-mnist-train.zarr"
    teachers: tuple[str, ...] = ()  # empty: every teacher in the store
    alpha: tuple[float, ...] = (0.95,)  # LoCa α for the scale statistics (paper: 0.9–0.999, best 0.95 on CIFAR-100)
    tau: float = 4.0  # temperature of p = softmax(z/τ) (paper: 4 on CIFAR-100, 1 on ImageNet)
    out: str = "data/analysis"  # where the pipeline (params.yaml) writes it
    scheduler: str | None = None  # dask.distributed scheduler address; empty: local threads
    overwrite: bool = False  # replace results of another store in `out`
    bins: int = 50  # histogram bins
    top_confusions: int = 20  # (label → prediction) pairs kept per teacher
    entropy: Literal["auto", "topk"] = "auto"  # auto: exact from full logits when stored; topk: never read them
    samples: bool = True  # write the per-sample Parquet table
    figures: bool = True  # write the PNG figures
    scale: bool = True  # LoCa scale statistics for each α; off: α is ignored (a DVC stage then need not track it)


def source_marker(store: LogitStore) -> dict[str, Any]:
    """The identity of a store as recorded in an output folder: data fingerprint and layout (not the path)."""
    info = store.info
    ds = info.dataset if isinstance(info.dataset, dict) else {}
    return {"store": str(store.path), "task": info.task, "num_rows": info.num_rows, "num_classes": info.num_classes,
            "num_views": info.num_views, "fingerprint": ds.get("fingerprint"), "split": ds.get("split"),
            "view_seed": ds.get("view_seed")}


def claim_output(out: Path, store: LogitStore, overwrite: bool, what: str = "analysis results") -> None:
    """Refuse an output folder that holds results of another store (unless ``overwrite``), then mark it ours."""
    mine = source_marker(store)
    marker = out / MARKER
    if out.exists() and any(out.iterdir()):
        old = json.loads(marker.read_text()) if marker.exists() else None
        same = old is not None and all(old.get(k) == v for k, v in mine.items() if k != "store")
        if not same and not overwrite:
            who = f"store {old.get('store')!r} (fingerprint {old.get('fingerprint')!r})" if old else "something else (no marker)"
            raise StoreConflictError(
                f"output folder {str(out)!r} holds {what} of {who}, not of {store.path!r}; choose another --out or "
                f"pass --overwrite to replace them")
        if not same:  # overwrite: remove what this stage writes, never anything else in the folder
            for name in OUTPUTS:
                f = out / name
                if f.is_dir():
                    shutil.rmtree(f)
                elif f.exists():
                    f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(mine, indent=1))


def _clean(x: Any) -> Any:
    """JSON without NaN (dvc and strict parsers reject it): NaN → null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _clean(x.item())
    return x


def pct(v: Any) -> str:
    """A ratio as a percentage with two decimals ("n/a" when missing)."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.2f}%"


def _num(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def summary_table(reports: list[TeacherReport]) -> str:
    """Markdown table: one line per teacher."""
    alphas = reports[0].metrics["alphas"] if reports else []
    head = ["teacher", "rows", "mis-instructed", "ratio", "top-1", "top-5", "mean p_label (mis)",
            "mean p_max (mis)"] + [f"mean s (α={a:g})" for a in alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        m = r.metrics
        row = [r.name, f"{m['rows']:,}", f"{m['mis_instructed']:,}", pct(m["mis_instruction_ratio"]), pct(m["top1"]),
               pct(m["top5"]), _num(m["mean"].get("p_label", {}).get("mis")), _num(m["mean"].get("p_max", {}).get("mis"))]
        row += [_num(m["loca"][k]["mean_scale_mis"]) for k in m["loca"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run(params: AnalyzeParams) -> Report:
    """Run the analysis and write every output; the report's values are analysis.json (what ``--json`` prints)."""
    import pandas as pd

    from loca_pipe.pipeline import plots

    t0 = time.perf_counter()
    check_outputs({"STORE": params.store}, {"--out": (params.out, FOLDER)})  # before the store is even opened
    store = LogitStore.open(params.store)
    out = Path(params.out)
    alphas = tuple(params.alpha) if params.scale else ()
    opts = AnalysisOptions(tau=params.tau, alphas=alphas, bins=params.bins,
                           top_confusions=params.top_confusions, entropy=params.entropy)
    # validate everything (teachers, α, τ) before touching the output folder
    from loca_pipe.pipeline.analysis import check_alpha_tau, resolve_teachers

    names = resolve_teachers(store, params.teachers)
    check_alpha_tau(opts.alphas, opts.tau, allow_empty=not params.scale)
    claim_output(out, store, params.overwrite)
    client = connect(params.scheduler)
    try:
        reports = analyze(params.store, names, opts, samples_dir=out / "samples" if params.samples else None,
                          client=client, progress=True)
    finally:
        if client is not None:
            client.close()
    tables = {"per_class": [], "confusions": [], "per_view": [], "histograms": []}
    for r in reports:
        for k in tables:
            df = getattr(r, k).copy()
            df.insert(0, "teacher", r.name)
            tables[k].append(df)
    for k, dfs in tables.items():
        pd.concat(dfs, ignore_index=True).to_csv(out / f"{k}.csv", index=False)
    pd.DataFrame([{"teacher": r.name, "rows": r.metrics["rows"], "mis_instructed": r.metrics["mis_instructed"],
                   "mis_instruction_ratio": r.metrics["mis_instruction_ratio"], "top1": r.metrics["top1"],
                   "top5": r.metrics["top5"]} for r in reports]).to_csv(out / "teachers.csv", index=False)
    lean = {r.name: {k: r.metrics[k] for k in ("rows", "mis_instructed", "mis_instruction_ratio", "top1", "top5")}
            | {"mean_scale_mis": {a: v["mean_scale_mis"] for a, v in r.metrics["loca"].items()}} for r in reports}
    (out / "metrics.json").write_text(json.dumps(_clean(lean), indent=1))
    if params.figures:
        figs = out / "figures"
        plots.mis_instruction_bars(reports, figs / "mis_instruction.png")
        for r in reports:
            plots.per_class_bars(r, figs / f"per_class_{r.name}.png")
            plots.confidence_histograms(r, figs / f"confidence_{r.name}.png")
    md = summary_table(reports)
    (out / "summary.md").write_text(f"# Teacher mis-instruction on {params.store} (τ={params.tau:g})\n\n" + md)
    full = {"store": params.store, "out": str(out), "params": asdict(params), "seconds": time.perf_counter() - t0,
            "teachers": {r.name: r.metrics for r in reports}, "summary_markdown": md}
    full = _clean(full)
    (out / "analysis.json").write_text(json.dumps(full, indent=1))
    return Report(SECTION, full, {"out": str(out)}, _text(params, full))


def _text(p: AnalyzeParams, rep: dict[str, Any]) -> str:
    """What `loca-pipe analyze` prints."""
    alphas = f"  α={list(p.alpha)}" if p.scale else ""
    lines = [f"store {p.store}  τ={p.tau:g}{alphas}  ({rep['seconds']:.1f} s)\n", rep["summary_markdown"]]
    for name, m in rep["teachers"].items():
        conf = ", ".join(f"{c['label']}→{c['prediction']} ({c['count']})" for c in m["top_confusions"][:5])
        worst = ", ".join(f"{c['class']} ({pct(c['ratio'])})" for c in m["worst_classes"][:3])
        lines.append(f"{name}: top confusions {conf or '-'}; worst classes {worst or '-'}; entropy {m['entropy_kind']}")
    lines.append(f"\nresults in {p.out}/ (metrics.json, summary.md, *.csv, samples/, figures/)")
    return "\n".join(lines)
