"""Token-level mis-instruction statistics of a cached causal-LM teacher.

A response token is *mis-instructed* when the reference next token is not the teacher's strict winner
(p_y ≤ max_{i≠y} p_i, ties counted; LoCa paper §3 at the token level) — the one rule of the project,
:func:`loca_pipe.pipeline.calibration.mis_instruction_mask`, applied as in the image analysis
(:func:`loca_pipe.pipeline.analysis.sparse_mis_and_prediction`), so the mis-instruction ratio is the share of
tokens LoCa calibrates. ``prediction`` is the best token other than the label on those rows (the tied token
on a tie) and the top-1 token elsewhere. Reported overall, by position inside the response, and by the frequency
of the reference token (rank buckets of its count among all stored labels: the 10 most frequent tokens,
ranks 11–100, 101–1000, the rest). p_label = exp(z_y/τ − lse_τ) and p_max = exp(z_top1/τ − lse_τ) are exact
from the store; LoCa's scale s (and the share of rows it changes) comes from
:func:`loca_pipe.pipeline.calibration.loca_sparse` on the sparse form.

The store is loaded whole (tokens × k is small: 1M tokens × k=20 ≈ 150 MB); an out-of-core version would
stream :meth:`LMTeacherCache.rows` chunk by chunk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loca_pipe.pipeline.analysis import sparse_mis_and_prediction
from loca_pipe.pipeline.calibration import loca_sparse, sparse_from_topk
from loca_pipe.pipeline.lm.cache import LMTeacherCache

FREQ_BUCKETS = ((1, 10), (11, 100), (101, 1000), (1001, None))
POSITION_CAP = 32  # positions ≥ this are pooled into one "32+" bucket


def freq_bucket_names() -> list[str]:
    return [f"rank {a}-{b}" if b else f"rank {a}+" for a, b in FREQ_BUCKETS]


def token_table(c: LMTeacherCache, tau: float, alpha: float) -> dict[str, np.ndarray]:
    """Per response token: sequence, position, label, prediction, mis-instruction, p_label, p_max, LoCa scale."""
    t = c.tau_index(tau)
    lse = torch.as_tensor(c.lse[:, t])
    zk = torch.as_tensor(c.topk_logits)
    zy = torch.as_tensor(c.label_logit)
    y = torch.as_tensor(c.label)
    sd = sparse_from_topk(zk, torch.as_tensor(c.topk_ids.astype(np.int64)), lse, zy, y, tau)
    _, res = loca_sparse(sd, y, alpha)
    mis, pred = sparse_mis_and_prediction(sd, y)
    ranks = frequency_ranks(c.label)
    bucket = np.zeros(len(c.label), np.int8)
    for b, (lo, _hi) in enumerate(FREQ_BUCKETS):
        bucket[ranks >= lo] = b
    return {
        "sequence": c.sample_id.astype(np.int64), "position": c.position.astype(np.int32),
        "label": c.label.astype(np.int64), "prediction": pred.numpy().astype(np.int64),
        "mis_instructed": mis.numpy(),
        "p_label": torch.exp(zy / tau - lse).numpy().astype(np.float32),
        "p_max": torch.exp(zk[:, 0] / tau - lse).numpy().astype(np.float32),
        "label_rank": ranks.astype(np.int32), "freq_bucket": bucket,
        "loca_scale": res.scale.numpy().astype(np.float32), "loca_calibrated": res.calibrated.numpy(),
    }


def frequency_ranks(labels: np.ndarray) -> np.ndarray:
    """1-based rank of each label's token by its count among ``labels`` (1 = most frequent; ties by id)."""
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))
    rank_of = np.empty(len(ids), np.int64)
    rank_of[order] = np.arange(1, len(ids) + 1)
    return rank_of[np.searchsorted(ids, labels)]


def _group(keys: np.ndarray, mis: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for k, name in enumerate(names):
        m = keys == k
        n = int(m.sum())
        out.append({"bucket": name, "tokens": n, "mis_instructed": int(mis[m].sum()),
                    "mis_ratio": float(mis[m].mean()) if n else None})  # None, not NaN: valid JSON
    return out


def summarize(tab: dict[str, np.ndarray]) -> dict[str, Any]:
    """Overall, by-position and by-frequency mis-instruction ratios (plain dicts, JSON-ready)."""
    mis = tab["mis_instructed"]
    pos = np.minimum(tab["position"], POSITION_CAP)
    pos_names = [str(i) for i in range(POSITION_CAP)] + [f"{POSITION_CAP}+"]
    by_pos = [r for r in _group(pos, mis, pos_names) if r["tokens"]]
    by_freq = _group(tab["freq_bucket"], mis, freq_bucket_names())
    return {
        "tokens": int(len(mis)), "sequences": int(len(np.unique(tab["sequence"]))),
        "mis_instructed": int(mis.sum()), "mis_ratio": float(mis.mean()),
        "mean_p_label": float(tab["p_label"].mean()), "mean_p_max": float(tab["p_max"].mean()),
        "mean_p_label_mis": float(tab["p_label"][mis].mean()) if mis.any() else None,
        "loca_calibrated_share": float(tab["loca_calibrated"].mean()),
        "mean_loca_scale_mis": float(tab["loca_scale"][mis].mean()) if mis.any() else None,
        "by_position": by_pos, "by_frequency": by_freq,
    }


def write_outputs(tab: dict[str, np.ndarray], summary: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, str]:
    """tokens.parquet, by_position.parquet, by_frequency.parquet, metrics.json and mis_instruction.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(tab), out / "tokens.parquet")
    pq.write_table(pa.Table.from_pylist(summary["by_position"]), out / "by_position.parquet")
    pq.write_table(pa.Table.from_pylist(summary["by_frequency"]), out / "by_frequency.parquet")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "mis_instruction.png", title)
    return {k: str(out / f) for k, f in (("tokens", "tokens.parquet"), ("metrics", "metrics.json"),
                                          ("plot", "mis_instruction.png"))}


def plot(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bp = summary["by_position"]
    a.bar(range(len(bp)), [r["mis_ratio"] for r in bp], color="tab:red")
    a.set_xticks(range(len(bp)))
    a.set_xticklabels([r["bucket"] for r in bp], fontsize=6, rotation=90)
    a.axhline(summary["mis_ratio"], color="k", lw=0.8, ls="--", label=f"overall {summary['mis_ratio']:.1%}")
    a.set_xlabel("position in response")
    a.set_ylabel("mis-instruction ratio")
    a.legend(fontsize=8)
    bf = [r for r in summary["by_frequency"] if r["tokens"]]
    b.bar(range(len(bf)), [r["mis_ratio"] for r in bf], color="tab:purple")
    b.set_xticks(range(len(bf)))
    b.set_xticklabels([f"{r['bucket']}\n({r['tokens']} tok)" for r in bf], fontsize=7)
    b.set_xlabel("reference token frequency")
    fig.suptitle(title or "token-level mis-instruction of the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
