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

:func:`analyze_streamed` (what ``lm-analyze`` runs) reads the store block by block (two passes: the label
counts for the frequency ranks, then everything else) and writes ``tokens.parquet`` as it goes, so memory does
not grow with the number of tokens; its numbers equal the in-memory :func:`token_table` + :func:`summarize`
(kept for small caches and as the reference the tests compare with). Outputs are written to temporary files
and moved into place at the end, so a corrupted chunk met mid-stream (named by the store's checked read)
leaves the previous outputs as they were.
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


def analyze_streamed(teacher, tau: float, alpha: float, out_dir: str | Path, title: Any = "",
                     block_rows: int = 1 << 16, progress: bool = False, extra: dict | None = None) -> dict[str, Any]:
    """Token statistics of a :class:`~loca_pipe.pipeline.lm.streaming.TokenTeacher`, streamed block by block.

    Writes tokens.parquet (one row per response token, same columns as :func:`token_table`), by_position.parquet,
    by_frequency.parquet, metrics.json and mis_instruction.png; returns the summary (same keys as
    :func:`summarize`) updated with ``extra``. ``title``: the figure's title, or a function of the summary.
    Memory: one block of rows plus O(vocabulary + sequences) counters.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loca_pipe.pipeline.progress import progress_bar

    t = teacher.tau_index(tau)
    V = teacher.num_classes
    counts = np.zeros(V, np.int64)
    for _, d in teacher.blocks(("label",), block_rows):  # pass 1: label counts → frequency ranks
        counts += np.bincount(d["label"].astype(np.int64), minlength=V)[:V]
    ids = np.flatnonzero(counts)
    order = np.lexsort((ids, -counts[ids]))
    rank_of = np.zeros(V, np.int64)
    rank_of[ids[order]] = np.arange(1, len(ids) + 1)
    n_pos = POSITION_CAP + 1
    nb = len(FREQ_BUCKETS)
    acc = {"tokens": 0, "mis": 0, "calibrated": 0, "p_label": 0.0, "p_max": 0.0, "p_label_mis": 0.0, "scale_mis": 0.0}
    pos_tok, pos_mis = np.zeros(n_pos, np.int64), np.zeros(n_pos, np.int64)
    fb_tok, fb_mis = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
    seen = np.zeros(teacher.num_sequences, bool)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_tokens = out / "tokens.parquet.tmp"
    writer = None
    keys = ("sample_id", "position", "label", "topk_logits", "topk_ids", "lse", "label_logit")
    flagged = "import_flags" in getattr(teacher, "keys", ())  # an imported cache (lm-import): some p_label unknown
    keys += ("import_flags",) if flagged else ()
    acc.update(unknown=0, undetermined=0, loca_inexact=0, known=0)
    try:
        with progress_bar(total=teacher.num_rows, desc="lm-analyze", unit="tok", enabled=progress) as bar:
            for sl, d in teacher.blocks(keys, block_rows):  # pass 2: everything else
                y = torch.as_tensor(d["label"].astype(np.int64))
                zk = torch.as_tensor(d["topk_logits"])
                zy = torch.as_tensor(d["label_logit"])
                lse = torch.as_tensor(np.ascontiguousarray(d["lse"][:, t]))
                sd = sparse_from_topk(zk, torch.as_tensor(d["topk_ids"].astype(np.int64)), lse, zy, y, tau)
                _, res = loca_sparse(sd, y, alpha)
                mis_t, pred = sparse_mis_and_prediction(sd, y)
                mis = mis_t.numpy()
                ranks = rank_of[d["label"].astype(np.int64)]
                bucket = np.zeros(len(ranks), np.int8)
                for b, (lo, _hi) in enumerate(FREQ_BUCKETS):
                    bucket[ranks >= lo] = b
                p_label = torch.exp(zy / tau - lse).numpy().astype(np.float32)
                p_max = torch.exp(zk[:, 0] / tau - lse).numpy().astype(np.float32)
                scale = res.scale.numpy().astype(np.float32)
                tab = {"sequence": d["sample_id"].astype(np.int64), "position": d["position"].astype(np.int32),
                       "label": d["label"].astype(np.int64), "prediction": pred.numpy().astype(np.int64),
                       "mis_instructed": mis, "p_label": p_label, "p_max": p_max, "label_rank": ranks.astype(np.int32),
                       "freq_bucket": bucket, "loca_scale": scale, "loca_calibrated": res.calibrated.numpy()}
                known = np.ones(len(mis), bool)
                if flagged:  # label outside the stored top-k: p_label unknown (≤ the tail, which label_logit holds)
                    from loca_pipe.pipeline.lm.import_distillkit import LABEL_UNKNOWN

                    known = (d["import_flags"] & LABEL_UNKNOWN) == 0
                    p_label = np.where(known, p_label, np.float32(np.nan))
                    # with p_label at its bound the row is mis-instructed iff tail ≤ p_top1: then it is certain;
                    # a row not mis-instructed at the bound may be either way
                    tab.update(p_label=p_label, label_known=known, mis_determined=known | mis)
                    acc["unknown"] += int((~known).sum())
                    acc["undetermined"] += int((~known & ~mis).sum())
                    acc["loca_inexact"] += int((~known & tab["loca_calibrated"]).sum())
                acc["known"] += int(known.sum())
                table = pa.table(tab)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp_tokens), table.schema)
                writer.write_table(table)
                acc["tokens"] += len(mis)
                acc["mis"] += int(mis.sum())
                acc["calibrated"] += int(tab["loca_calibrated"].sum())
                acc["p_label"] += float(p_label[known].astype(np.float64).sum())
                acc["p_max"] += float(p_max.astype(np.float64).sum())
                acc["p_label_mis"] += float(p_label[mis & known].astype(np.float64).sum())
                acc["mis_known"] = acc.get("mis_known", 0) + int((mis & known).sum())
                acc["scale_mis"] += float(scale[mis].astype(np.float64).sum())
                pos = np.minimum(tab["position"], POSITION_CAP)
                pos_tok += np.bincount(pos, minlength=n_pos)
                pos_mis += np.bincount(pos[mis], minlength=n_pos)
                fb_tok += np.bincount(bucket, minlength=nb)
                fb_mis += np.bincount(bucket[mis], minlength=nb)
                seen[tab["sequence"]] = True
                bar.update(sl.stop - sl.start)
    finally:
        if writer is not None:
            writer.close()

    def group(tok, mis, names):
        return [{"bucket": nm, "tokens": int(n), "mis_instructed": int(m), "mis_ratio": float(m / n) if n else None}
                for nm, n, m in zip(names, tok, mis)]

    n, m = acc["tokens"], acc["mis"]
    pos_names = [str(i) for i in range(POSITION_CAP)] + [f"{POSITION_CAP}+"]
    summary = {
        "tokens": n, "sequences": int(seen.sum()), "mis_instructed": m, "mis_ratio": m / n if n else float("nan"),
        "mean_p_label": acc["p_label"] / acc["known"] if acc["known"] else None, "mean_p_max": acc["p_max"] / n,
        "mean_p_label_mis": acc["p_label_mis"] / acc["mis_known"] if acc.get("mis_known") else None,
        "loca_calibrated_share": acc["calibrated"] / n,
        "mean_loca_scale_mis": acc["scale_mis"] / m if m else None,
        "by_position": [r for r in group(pos_tok, pos_mis, pos_names) if r["tokens"]],
        "by_frequency": group(fb_tok, fb_mis, freq_bucket_names()),
    }
    if flagged:  # docs/language-models.md "Importing a DistillKit cache": what is a bound, not a value
        summary.update(label_unknown=acc["unknown"], mis_undetermined=acc["undetermined"],
                       mis_ratio_max=(m + acc["undetermined"]) / n if n else float("nan"),
                       loca_inexact=acc["loca_inexact"],
                       exactness="imported cache: p_label is unknown on label_unknown tokens (NaN in tokens.parquet, "
                                 "left out of mean_p_label); mis_ratio counts only certain mis-instructions and "
                                 "mis_ratio_max adds the undetermined ones; LoCa on loca_inexact rows used the upper "
                                 "bound of p_label")
    summary.update(extra or {})
    write_outputs(None, summary, out, title(summary) if callable(title) else title, tokens_written=tmp_tokens)
    return summary


def write_outputs(tab: dict[str, np.ndarray] | None, summary: dict[str, Any], out_dir: str | Path, title: str = "",
                  tokens_written: Path | None = None) -> dict[str, str]:
    """tokens.parquet, by_position.parquet, by_frequency.parquet, metrics.json and mis_instruction.png.

    Each file is written beside its final name and moved into place (``tokens_written``: a tokens table
    already streamed to a temporary file), so a failure leaves the previous outputs whole."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []

    def stage(name: str, write) -> None:
        tmp = out / f"{name}.tmp"
        write(tmp)
        staged.append((tmp, out / name))

    if tokens_written is not None:
        staged.append((Path(tokens_written), out / "tokens.parquet"))
    else:
        stage("tokens.parquet", lambda f: pq.write_table(pa.table(tab), f))
    stage("by_position.parquet", lambda f: pq.write_table(pa.Table.from_pylist(summary["by_position"]), f))
    stage("by_frequency.parquet", lambda f: pq.write_table(pa.Table.from_pylist(summary["by_frequency"]), f))
    stage("metrics.json", lambda f: f.write_text(json.dumps(summary, indent=2)))
    stage("mis_instruction.png", lambda f: plot(summary, f, title))
    for tmp, final in staged:
        os.replace(tmp, final)
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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
