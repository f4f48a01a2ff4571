"""The report's figures (matplotlib, Agg backend, PNG): accuracy vs α per pair, the paired gain over KD vs the
teacher's mis-instruction ratio, and the follow rates per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loca_pipe.pipeline.report.runs import labels as method_labels
from loca_pipe.pipeline.report.text import pair_names


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha(rows: list[dict[str, Any]], path: Path, metric: str, title: str) -> bool:
    """Figure-5-style: LoCa accuracy vs α (mean ± std), KD as a horizontal line (± std band), CE dashed.
    Returns False (no file) when no pair has LoCa runs."""
    labels = method_labels()
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
    name = pair_names(list(dict.fromkeys(r["pair"] for r in rows)))
    for r in rows:
        pr, f = r.get("paired"), r.get("follow")
        if pr is None or pr.mean is None or r.get("base") != "KD" or not f:
            continue
        pts.setdefault(r["row"], []).append((f["mis_ratio"], pr.mean, pr.low, pr.high, name[r["pair"]]))
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
        ax.set_title(f"{pair}: {f['mis_rows']} mis-instructed rows ({f['mis_ratio']:.1f} %)", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("student predicts (% of those rows)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Does the student follow the teacher's mistakes? (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
