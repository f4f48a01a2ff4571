"""Figures of the analysis (matplotlib, Agg backend, PNG): the paper's Figure 2 across teachers, per-class
mis-instruction ratios, and confidence histograms of mis-instructed vs correct rows."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from loca_pipe.pipeline.analysis import TeacherReport, alpha_key

MAX_CLASS_BARS = 40  # more classes than this: show the worst ones


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display on servers/CI
    import matplotlib.pyplot as plt

    return plt


def mis_instruction_bars(reports: Sequence[TeacherReport], path: str | Path, title: str = "") -> Path:
    """Figure-2-style bar chart: mis-instruction ratio (%) of every teacher, with counts on the bars."""
    plt = _plt()
    # weakest teacher first: teachers ordered by their top-1 on the rows analysed
    reports = sorted(reports, key=lambda r: (r.metrics.get("top1", 0.0), r.name))
    names = [r.name for r in reports]
    ratios = [100 * r.metrics["mis_instruction_ratio"] for r in reports]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 3.8))
    bars = ax.bar(names, ratios, color="#c0504d")
    for b, r in zip(bars, reports):
        ax.annotate(f"{100 * r.metrics['mis_instruction_ratio']:.1f}%\n({r.metrics['mis_instructed']:,})",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("mis-instruction ratio (%)")
    ax.set_ylim(0, max(ratios + [1.0]) * 1.3)
    ax.set_title(title or "Mis-instruction ratio per teacher, weakest first (label not the strict top-1)",
                 fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.88, bottom=0.22)
    return _save(fig, path)


def per_class_bars(report: TeacherReport, path: str | Path) -> Path:
    """Mis-instruction ratio per class (the worst MAX_CLASS_BARS classes when there are more)."""
    plt = _plt()
    df = report.per_class[report.per_class["rows"] > 0]
    if len(df) > MAX_CLASS_BARS:
        df = df.sort_values("ratio", ascending=False).head(MAX_CLASS_BARS)
        title = f"{report.name}: the {MAX_CLASS_BARS} classes with the highest mis-instruction ratio"
    else:
        title = f"{report.name}: mis-instruction ratio per class"
    labels = df["name"].astype(str).tolist() if "name" in df else df["class"].astype(str).tolist()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(df) + 2), 3.6))
    ax.bar(labels, 100 * df["ratio"].to_numpy(), color="#4f81bd")
    ax.axhline(100 * report.metrics["mis_instruction_ratio"], color="k", ls="--", lw=1, label="overall")
    ax.set_ylabel("mis-instruction ratio (%)")
    ax.set_xlabel("label class")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    long = max((len(x) for x in labels), default=0) > 4
    ax.tick_params(axis="x", rotation=90 if len(df) > 12 else (30 if long else 0), labelsize=7)
    if long and len(df) <= 12:
        plt.setp(ax.get_xticklabels(), ha="right")
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.3)
    return _save(fig, path)


def confidence_histograms(report: TeacherReport, path: str | Path) -> Path:
    """p_label, p_max, margin, entropy (mis-instructed vs correct) and LoCa's s (mis-instructed rows)."""
    plt = _plt()
    h = report.histograms
    qs = ["p_label", "p_max", "margin", "entropy"] + [f"loca_scale_{alpha_key(a)}" for a in report.metrics["alphas"]]
    ncol = 3
    nrow = int(np.ceil(len(qs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 2.8 * nrow), squeeze=False)
    tau = report.metrics["tau"]
    for ax, q in zip(axes.flat, qs):
        for g, color in (("correct", "#4f81bd"), ("mis", "#c0504d")):
            d = h[(h["quantity"] == q) & (h["group"] == g)]
            if d.empty or d["count"].sum() == 0:
                continue
            w = d["count"].to_numpy() / d["count"].sum()
            ax.stairs(w, np.append(d["lo"].to_numpy(), d["hi"].to_numpy()[-1]), label=g, color=color, fill=False)
        name = q.replace("loca_scale_", "LoCa s, α=") if q.startswith("loca_scale_") else q
        ax.set_title(f"{name} (τ={tau:g})", fontsize=9)
        ax.set_ylabel("share of rows", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    fig.suptitle(f"{report.name}: confidence of mis-instructed vs correct rows", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.08, hspace=0.45, wspace=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
