"""FROZEN REFERENCE: pipeline/analysis.py as it was before the one-pass rewrite (commit 02aa20d), kept verbatim
apart from this docstring, so tests can check the fast path gives today's results (zarr reads, bmm entropy,
one chunk at a time). Not used by the package; do not "improve" it.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from loca_pipe.pipeline.calibration import (LocaWarning, SparseDist, check_alpha, loca_sparse, mis_instruction_mask,
                                            sparse_from_topk)
from loca_pipe.pipeline.errors import ConfigError, DataError, IncompleteStoreError, StoreError
from loca_pipe.pipeline.caching import summarize_logits
from loca_pipe.pipeline.store import LogitStore, TeacherView

log = logging.getLogger(__name__)

GROUPS = ("mis", "correct")
# quantity → histogram range (entropy's upper end, log C, is filled in per teacher)
HIST_RANGES: dict[str, tuple[float, float]] = {"p_label": (0.0, 1.0), "p_max": (0.0, 1.0), "margin": (-1.0, 1.0)}


def alpha_key(alpha: float) -> str:
    """The text form of α used in column and array names: ``0.95`` → ``"0.95"`` (shortest round-trip)."""
    return repr(float(alpha)) if not float(alpha).is_integer() else f"{float(alpha):.1f}"


def check_alpha_tau(alphas: Sequence[float], tau: float, allow_empty: bool = False) -> tuple[tuple[float, ...], float]:
    """Validate α list and τ (α ≤ 0 or τ ≤ 0 is an error; α ≥ 1 is allowed with a loud warning, DESIGN §2).

    ``allow_empty``: no α at all is valid (statistics without LoCa scales)."""
    if not alphas and not allow_empty:
        raise ConfigError("alpha: give at least one LoCa α in (0, 1), e.g. 0.95")
    alphas = tuple(check_alpha(a) for a in alphas)  # α ≤ 0 → ConfigError, α ≥ 1 → LocaWarning
    if len(set(alphas)) != len(alphas):
        raise ConfigError(f"alpha values must be distinct; got {list(alphas)}")
    if not (float(tau) > 0 and math.isfinite(float(tau))):
        raise ConfigError(f"tau must be a positive temperature (paper: 4 on CIFAR-100, 1 on ImageNet); got {tau}")
    return alphas, float(tau)


def resolve_teachers(store: LogitStore, names: Sequence[str] | None) -> list[str]:
    """The teachers to work on (all when ``names`` is empty), each checked present and complete."""
    if store.info.num_rows == 0:
        raise DataError(f"store {store.path!r} has 0 rows; nothing to analyse — cache a non-empty data set first")
    have = store.teachers
    if not have:
        raise DataError(f"store {store.path!r} holds no teachers yet; run `loca-pipe cache-logits` first")
    names = list(names or have)
    unknown = [n for n in names if n not in have]
    if unknown:
        raise StoreError(f"teacher(s) {unknown} not in store {store.path!r}; it holds: {', '.join(have)}")
    rows_pending = int((store.group["rows_done"][:] == 0).sum())
    if rows_pending:
        raise IncompleteStoreError(f"store {store.path!r} is half-written: {rows_pending} row chunks have no "
                                   f"sample ids/labels yet; re-run the same `loca-pipe cache-logits` command to finish it")
    for n in names:
        store.teacher(n)  # raises IncompleteStoreError for a half-written teacher
    return names


# ----------------------------------------------------------------------------------------------------
# Per-row statistics of one block (pure tensor code; no I/O)


def sparse_mis_and_prediction(sd: SparseDist, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one mis-instruction rule on a sparse teacher, and the prediction that goes with it.

    ``mis`` is :func:`loca_pipe.pipeline.calibration.mis_instruction_mask` (label not the strict winner, ties
    counted) applied to the kept probabilities of ``sd`` (top-k ∪ {label}), the same p that
    :func:`~loca_pipe.pipeline.calibration.loca_sparse` calibrates, so the rows counted here are exactly the
    rows LoCa changes, with or without α values. ``prediction`` is the best class other than the label on
    mis-instructed rows (on a tie that is the tied class, not the label) and the top-1 class elsewhere, so
    ``prediction != label`` exactly where ``mis`` holds and the confusion table has no self-confusions.
    """
    ids, p, _ = sd
    y = labels.long()
    K1 = p.shape[1]
    is_lab_top = ids[:, :-1] == y[:, None]
    in_top = is_lab_top.any(1)
    pos = torch.where(in_top, is_lab_top.to(torch.uint8).argmax(1), torch.full_like(y, K1 - 1))
    mis = mis_instruction_mask(p, pos)
    top = ids[:, 0]
    if K1 >= 3:  # K ≥ 2 kept classes: the runner-up is known
        pred = torch.where(mis & (top == y), ids[:, 1], top)
    else:
        pred = top
    return mis, pred


@torch.no_grad()
def row_stats(labels: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
              label_logit: torch.Tensor, tau: float, alphas: Sequence[float],
              logits: torch.Tensor | None = None, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Per-row statistics at temperature τ from a teacher's summary (and optionally its full logits).

    labels (B,), topk_logits (B, K) descending, topk_ids (B, K), lse (B,) = logsumexp(z/τ), label_logit (B,),
    logits (B, C) any float dtype or None; ``num_classes`` C (default: logits' width, else unknown). Returns numpy arrays (B,) keyed by the Parquet column names.
    """
    y = labels.long()
    ids = topk_ids.long()
    tl, lse, zl = topk_logits.float(), lse.float(), label_logit.float()
    B, K = tl.shape
    sd = sparse_from_topk(tl, ids, lse, zl, y, tau)
    scales = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LocaWarning)  # α ≥ 1 was warned about once, up front
        for a in alphas:
            _, res = loca_sparse(sd, y, float(a))
            scales[f"loca_scale_{alpha_key(a)}"] = res.scale.float().numpy()
    mis, pred = sparse_mis_and_prediction(sd, y)
    p_label = torch.exp(zl / tau - lse)
    p_max = torch.exp(tl[:, 0] / tau - lse)
    top_is_label = ids[:, 0] == y
    if K >= 2:  # best class other than the label: top-1 unless that is the label, then top-2
        other = torch.where(top_is_label, tl[:, 1], tl[:, 0])
        margin = p_label - torch.exp(other / tau - lse)
    else:
        margin = torch.where(top_is_label, torch.full_like(p_label, float("nan")), p_label - p_max)
    C = num_classes if num_classes is not None else (logits.shape[1] if logits is not None else None)
    if K >= 5 or (C is not None and K >= C):  # the top-k ids answer "label among the top 5" exactly
        in_top5 = (ids[:, :5] == y[:, None]).any(1).numpy()
    elif logits is not None:
        rank = (logits > logits.gather(1, y[:, None])).sum(1)  # classes strictly above the label
        in_top5 = (rank < 5).numpy()
    else:
        in_top5 = None
    if logits is not None:
        # one pass, shifted by the stored lse: t = z/τ − lse, e = exp(t), S = Σe (≈ 1), H = log S − Σ e·t / S
        t = logits.to(torch.float32, copy=True)
        if tau != 1.0:
            t.mul_(1.0 / tau)
        t.sub_(lse[:, None])
        e = torch.exp(t)
        S = e.sum(1)
        D = torch.bmm(e.unsqueeze(1), t.unsqueeze(2)).view(-1)
        entropy = torch.log(S) - D / S
    else:  # coarse distribution: kept entries (top-k and the label) plus one tail bucket
        p = sd.probs.float().clamp_min(0)
        tail = sd.tail.float().clamp_min(0)
        entropy = -(torch.special.xlogy(p, p).sum(1) + torch.special.xlogy(tail, tail))
    out = {"prediction": pred.numpy(), "mis_instructed": mis.numpy(), "p_label": p_label.numpy(),
           "p_max": p_max.numpy(), "margin": margin.numpy(), "entropy": entropy.float().numpy()}
    if in_top5 is not None:
        out["in_top5"] = in_top5
    out.update(scales)
    return out


# ----------------------------------------------------------------------------------------------------
# Aggregates


@dataclass
class Partial:
    """Mergeable aggregates of a set of rows (small: O(C + bins + distinct confusions))."""

    num_classes: int
    num_views: int
    bins: int
    rows: int = 0
    class_rows: np.ndarray = field(default=None)  # (C,)
    class_mis: np.ndarray = field(default=None)  # (C,)
    view_rows: np.ndarray = field(default=None)  # (V,)
    view_mis: np.ndarray = field(default=None)  # (V,)
    view_top5: np.ndarray = field(default=None)  # (V,)
    top5_known: bool = True
    pair_keys: np.ndarray = field(default=None)  # label·C + prediction of mis-instructed rows
    pair_counts: np.ndarray = field(default=None)
    hist: dict[str, np.ndarray] = field(default_factory=dict)  # "quantity/group" → (bins,) counts
    sums: dict[str, float] = field(default_factory=dict)  # "quantity/group" → sum (NaN-free rows)
    counts: dict[str, int] = field(default_factory=dict)  # "quantity/group" → rows in the sum
    nan_margin: int = 0

    def __post_init__(self) -> None:
        C, V = self.num_classes, self.num_views
        for name, n in (("class_rows", C), ("class_mis", C), ("view_rows", V), ("view_mis", V), ("view_top5", V)):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n, np.int64))
        if self.pair_keys is None:
            self.pair_keys, self.pair_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add(self, stats: dict[str, np.ndarray], labels: np.ndarray, views: np.ndarray,
            ranges: dict[str, tuple[float, float]]) -> None:
        C, V = self.num_classes, self.num_views
        mis = stats["mis_instructed"]
        self.rows += len(labels)
        self.class_rows += np.bincount(labels, minlength=C)[:C]
        self.class_mis += np.bincount(labels[mis], minlength=C)[:C]
        v = views.astype(np.int64)
        self.view_rows += np.bincount(v, minlength=V)[:V]
        self.view_mis += np.bincount(v[mis], minlength=V)[:V]
        if "in_top5" in stats:
            self.view_top5 += np.bincount(v[stats["in_top5"]], minlength=V)[:V]
        else:
            self.top5_known = False
        keys, counts = np.unique(labels[mis].astype(np.int64) * C + stats["prediction"][mis], return_counts=True)
        self._add_pairs(keys, counts)
        for q, (lo, hi) in ranges.items():
            x = stats[q]
            for g, sel in (("mis", mis), ("correct", ~mis)):
                if q.startswith("loca_scale") and g == "correct":
                    continue  # s is 1 by definition on correct rows
                xs = x[sel]
                ok = np.isfinite(xs)
                if q == "margin":
                    self.nan_margin += int((~ok).sum())
                xs = xs[ok]
                h, _ = np.histogram(np.clip(xs, lo, hi), bins=self.bins, range=(lo, hi))
                k = f"{q}/{g}"
                self.hist[k] = self.hist.get(k, 0) + h
                self.sums[k] = self.sums.get(k, 0.0) + float(xs.astype(np.float64).sum())
                self.counts[k] = self.counts.get(k, 0) + int(xs.size)

    def _add_pairs(self, keys: np.ndarray, counts: np.ndarray) -> None:
        k = np.concatenate([self.pair_keys, keys])
        c = np.concatenate([self.pair_counts, counts])
        if k.size:
            uk, inv = np.unique(k, return_inverse=True)
            self.pair_keys, self.pair_counts = uk, np.bincount(inv, weights=c, minlength=uk.size).astype(np.int64)

    def merge(self, other: "Partial") -> "Partial":
        self.rows += other.rows
        for name in ("class_rows", "class_mis", "view_rows", "view_mis", "view_top5"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.top5_known = self.top5_known and other.top5_known
        self._add_pairs(other.pair_keys, other.pair_counts)
        for k, h in other.hist.items():
            self.hist[k] = self.hist.get(k, 0) + h
        for k, s in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + s
            self.counts[k] = self.counts.get(k, 0) + other.counts[k]
        self.nan_margin += other.nan_margin
        return self


# ----------------------------------------------------------------------------------------------------
# One task: a contiguous range of chunks of one teacher


@dataclass(frozen=True)
class AnalysisOptions:
    """What to compute: temperature, LoCa α list, histogram bins, entropy source."""

    tau: float
    alphas: tuple[float, ...]
    bins: int = 50
    top_confusions: int = 20
    entropy: str = "auto"  # auto: exact from full logits when stored, else top-k+tail; "topk": never read logits


def hist_ranges(opts: AnalysisOptions, num_classes: int) -> dict[str, tuple[float, float]]:
    r = dict(HIST_RANGES)
    r["entropy"] = (0.0, max(math.log(num_classes), 1e-6))
    for a in opts.alphas:
        r[f"loca_scale_{alpha_key(a)}"] = (0.0, max(1.0, float(a)))
    return r


# Rows of the small per-row arrays (labels, top-k, lse, …) read in one zarr call: each call has a fixed cost,
# so reading them chunk by chunk would cost more than the compute on stores with many chunks.
SMALL_BLOCK_ROWS = 1 << 16
# Full logits are read this many bytes per zarr call (whole chunks, at least one) and computed on chunk by
# chunk: fewer calls amortise zarr's per-call cost (thread hand-offs, large under CPU contention).
LOGITS_BLOCK_BYTES = 4 << 20


def _blocks(chunks: Sequence[int], chunk_rows: int) -> list[list[int]]:
    """Runs of consecutive chunks holding at most SMALL_BLOCK_ROWS rows (at least one chunk)."""
    per = max(1, SMALL_BLOCK_ROWS // max(1, chunk_rows))
    out: list[list[int]] = []
    for c in chunks:
        if out and c == out[-1][-1] + 1 and len(out[-1]) < per:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def _iter_blocks(tv: TeacherView, chunks: Sequence[int], opts: AnalysisOptions):
    """Yield (row slice, per-row statistics, row metadata) for each chunk.

    Memory: one read block of logits (≤ LOGITS_BLOCK_BYTES, or one chunk) plus one chunk's fp32 temporaries.
    """
    info = tv.store.info
    stored = _tau_stored(tv, opts.tau)
    use_logits = tv.has_full_logits and opts.entropy != "topk"
    t = tv.tau_index(opts.tau) if stored else -1
    if tv.has_full_logits:
        row_bytes = info.num_classes * tv["logits"].dtype.itemsize
        per_read = max(1, LOGITS_BLOCK_BYTES // max(1, row_bytes * info.chunk_rows))
    for blk in _blocks(chunks, info.chunk_rows):
        bsl = slice(info.chunk_slice(blk[0]).start, info.chunk_slice(blk[-1]).stop)
        small = {k: tv[k][bsl] for k in ("label", "view", "sample_id")}
        if stored:
            small.update(topk_logits=tv["topk_logits"][bsl], topk_ids=tv["topk_ids"][bsl].astype(np.int64),
                         lse=tv["lse"][bsl, t], label_logit=tv["label_logit"][bsl])
        zblk, zsl = None, slice(0, 0)
        for i, c in enumerate(blk):
            sl = info.chunk_slice(c)
            loc = slice(sl.start - bsl.start, sl.stop - bsl.start)
            part = {k: v[loc] for k, v in small.items()}
            y = torch.from_numpy(part["label"])
            z = None
            if use_logits or not stored:
                if sl.start >= zsl.stop:  # next run of chunks: one zarr call for up to LOGITS_BLOCK_BYTES
                    run = blk[i:i + per_read]
                    zsl = slice(sl.start, info.chunk_slice(run[-1]).stop)
                    zblk = tv["logits"][zsl]
                z = torch.from_numpy(zblk[sl.start - zsl.start:sl.stop - zsl.start])  # a view: compute per chunk
            if stored:
                tl, ti = torch.from_numpy(part["topk_logits"]), torch.from_numpy(part["topk_ids"])
                lse, zl = torch.from_numpy(part["lse"]), torch.from_numpy(part["label_logit"])
            else:  # τ not declared at cache time, but full logits are stored: recompute the summary exactly
                s = summarize_logits(z.float(), y, top_k=min(info.num_classes, max(5, tv.top_k)),
                                     temperatures=[opts.tau])
                tl, ti, lse, zl = s["topk_logits"], s["topk_ids"], s["lse"][:, 0], s["label_logit"]
            stats = row_stats(y, tl, ti, lse, zl, opts.tau, opts.alphas, logits=z if use_logits else None,
                              num_classes=info.num_classes)
            yield sl, stats, {k: part[k] for k in ("label", "view", "sample_id")}


def _tau_stored(tv: TeacherView, tau: float) -> bool:
    return any(math.isclose(t, tau, rel_tol=1e-6) for t in tv.temperatures)


def _table(sl: slice, meta: dict[str, np.ndarray], stats: dict[str, np.ndarray], teacher: str):
    import pyarrow as pa

    cols: dict[str, Any] = {"teacher": pa.repeat(pa.scalar(teacher, pa.string()), sl.stop - sl.start),
                            "row": np.arange(sl.start, sl.stop, dtype=np.int64),
                            "sample_id": meta["sample_id"].astype(np.int64), "view": meta["view"].astype(np.int16),
                            "label": meta["label"].astype(np.int64), "prediction": stats["prediction"].astype(np.int64)}
    for k in ("p_label", "p_max", "margin", "entropy"):
        cols[k] = stats[k].astype(np.float32)
    cols["mis_instructed"] = stats["mis_instructed"].astype(bool)
    if "in_top5" in stats:
        cols["in_top5"] = stats["in_top5"].astype(bool)
    for k in stats:
        if k.startswith("loca_scale_"):
            cols[k] = stats[k].astype(np.float32)
    return pa.table(cols)


def analyze_task(store_path: str, teacher: str, chunks: Sequence[int], opts: AnalysisOptions,
                 part_path: str | None = None) -> Partial:
    """One dask task: stream ``chunks`` of ``teacher``, write their rows to ``part_path`` (Parquet), return aggregates."""
    import pyarrow.parquet as pq

    _one_torch_thread()
    store = LogitStore.open(store_path)
    tv = store.teacher(teacher)
    info = store.info
    part = Partial(info.num_classes, info.num_views, opts.bins)
    ranges = hist_ranges(opts, info.num_classes)
    writer = None
    tmp = f"{part_path}.tmp" if part_path else None
    try:
        for sl, stats, meta in _iter_blocks(tv, chunks, opts):
            part.add(stats, meta["label"], meta["view"], ranges)
            if tmp:
                table = _table(sl, meta, stats, teacher)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if tmp and writer is not None:
        os.replace(tmp, part_path)  # a part file exists only once whole
    return part


def _one_torch_thread() -> None:
    # A task is one unit of parallelism (a dask thread or a distributed worker thread); torch's own
    # intra-op threads on top of it only add hand-offs, which are very costly on a busy machine.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def chunk_groups(num_chunks: int, num_tasks: int) -> list[list[int]]:
    """Split chunk indices 0..n-1 into ``num_tasks`` contiguous, near-equal groups."""
    num_tasks = max(1, min(num_tasks, num_chunks))
    edges = np.linspace(0, num_chunks, num_tasks + 1).round().astype(int)
    return [list(range(edges[i], edges[i + 1])) for i in range(num_tasks) if edges[i + 1] > edges[i]]


class _TorchThreads:
    """Single-threaded torch ops inside dask's thread pool: parallelism comes from the pool, not from both."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def run_tasks(fn, arg_lists: list[tuple], client=None, num_workers: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` for each args tuple with dask: on ``client`` (distributed) or local threads."""
    import dask

    delayed = [dask.delayed(fn, pure=False)(*args) for args in arg_lists]
    if client is not None:
        return client.gather(client.compute(delayed))
    with _TorchThreads(1):
        return list(dask.compute(*delayed, scheduler="threads", num_workers=num_workers or local_workers()))


def local_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def cluster_threads(client) -> int:
    return max(1, sum(client.nthreads().values())) if client is not None else local_workers()


def connect(address: str | None):
    """A dask.distributed client for ``address`` (None → None: local threads)."""
    if not address:
        return None
    try:
        from distributed import Client

        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the dask scheduler at {address!r} ({exc}); start one with "
                          f"`dask scheduler` + `dask worker ADDRESS`, or leave scheduler empty to run locally") from exc


# ----------------------------------------------------------------------------------------------------
# Reports


@dataclass
class TeacherReport:
    """Everything the analysis knows about one teacher (tables are pandas DataFrames)."""

    name: str
    metrics: dict[str, Any]
    per_class: Any  # DataFrame: class, name, rows, mis_instructed, ratio
    confusions: Any  # DataFrame: label, prediction, count, share_of_label
    per_view: Any  # DataFrame: view, rows, mis_instructed, ratio, top1, top5
    histograms: Any  # DataFrame: quantity, group, bin, lo, hi, count


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def build_report(name: str, part: Partial, opts: AnalysisOptions, tv: TeacherView) -> TeacherReport:
    import pandas as pd

    info = tv.store.info
    C = info.num_classes
    class_names = list(info.dataset.get("classes") or []) if isinstance(info.dataset, dict) else []
    per_class = pd.DataFrame({"class": np.arange(C), "rows": part.class_rows, "mis_instructed": part.class_mis})
    per_class["ratio"] = np.where(part.class_rows > 0, part.class_mis / np.maximum(part.class_rows, 1), np.nan)
    if len(class_names) == C:
        per_class.insert(1, "name", [str(n) for n in class_names])
    order = np.argsort(-part.pair_counts, kind="stable")[: opts.top_confusions]
    lab, pred = part.pair_keys[order] // C, part.pair_keys[order] % C
    confusions = pd.DataFrame({"label": lab, "prediction": pred, "count": part.pair_counts[order]})
    confusions["share_of_label"] = confusions["count"] / np.maximum(part.class_rows[lab], 1)
    per_view = pd.DataFrame({"view": np.arange(info.num_views), "rows": part.view_rows, "mis_instructed": part.view_mis})
    per_view["ratio"] = part.view_mis / np.maximum(part.view_rows, 1)
    per_view["top1"] = 1.0 - per_view["ratio"]
    per_view["top5"] = part.view_top5 / np.maximum(part.view_rows, 1) if part.top5_known else np.nan
    ranges = hist_ranges(opts, C)
    hrows = []
    for key, h in sorted(part.hist.items()):
        q, g = key.split("/")
        lo, hi = ranges[q]
        edges = np.linspace(lo, hi, opts.bins + 1)
        for b, cnt in enumerate(np.asarray(h)):
            hrows.append((q, g, b, float(edges[b]), float(edges[b + 1]), int(cnt)))
    histograms = pd.DataFrame(hrows, columns=["quantity", "group", "bin", "lo", "hi", "count"])
    mis = int(part.class_mis.sum())
    means = {}
    for key in sorted(part.sums):
        q, g = key.split("/")
        means.setdefault(q, {})[g] = _ratio(part.sums[key], part.counts[key])
    loca = {}
    for a in opts.alphas:
        k = f"loca_scale_{alpha_key(a)}"
        loca[alpha_key(a)] = {"mean_scale_mis": means.get(k, {}).get("mis", float("nan")),
                              "calibrated_rows": part.counts.get(f"{k}/mis", 0)}
    worst = per_class[per_class["rows"] > 0].sort_values(["ratio", "rows"], ascending=[False, False]).head(5)
    entropy_kind = "exact" if (tv.has_full_logits and opts.entropy != "topk") else "topk_tail_lower_bound"
    metrics = {
        "rows": part.rows, "samples": info.num_samples, "views": info.num_views, "classes": C,
        "tau": opts.tau, "alphas": [float(a) for a in opts.alphas],
        "mis_instructed": mis, "mis_instruction_ratio": _ratio(mis, part.rows),
        "top1": 1.0 - _ratio(mis, part.rows),
        "top5": _ratio(part.view_top5.sum(), part.rows) if part.top5_known else None,
        "entropy_kind": entropy_kind, "margin_unknown_rows": part.nan_margin,
        "mean": means, "loca": loca,
        "worst_classes": [{"class": int(r["class"]), "rows": int(r["rows"]), "mis_instructed": int(r["mis_instructed"]),
                           "ratio": float(r["ratio"])} for _, r in worst.iterrows()],
        "top_confusions": [{"label": int(r.label), "prediction": int(r.prediction), "count": int(r.count)}
                           for r in confusions.itertuples()],
        "teacher": {k: v for k, v in tv.attrs.items() if k not in ("versions",)},
    }
    if info.num_views > 1:
        metrics["per_view"] = [{"view": int(r.view), "rows": int(r.rows), "mis_instructed": int(r.mis_instructed),
                                "ratio": float(r.ratio)} for r in per_view.itertuples()]
    return TeacherReport(name, metrics, per_class, confusions, per_view, histograms)


def analyze(store_path: str, teachers: Sequence[str] | None, opts: AnalysisOptions, *,
            samples_dir: str | Path | None = None, client=None, tasks_per_thread: int = 4) -> list[TeacherReport]:
    """Analyse teachers of the store at ``store_path``; per-sample rows go to ``samples_dir/<teacher>/part-*.parquet``.

    Memory is a few chunks per worker thread; all teachers' tasks share one dask computation.
    """
    store = LogitStore.open(str(store_path))
    names = resolve_teachers(store, teachers)
    alphas, tau = check_alpha_tau(opts.alphas, opts.tau, allow_empty=True)  # empty: no LoCa scale statistics
    if opts.bins < 1 or opts.top_confusions < 0:
        raise ConfigError(f"bins must be ≥ 1 and top_confusions ≥ 0; got bins={opts.bins}, top_confusions={opts.top_confusions}")
    if opts.entropy not in ("auto", "topk"):
        raise ConfigError(f"entropy must be 'auto' or 'topk'; got {opts.entropy!r}")
    for n in names:
        tv = store.teacher(n)
        if not _tau_stored(tv, tau) and not tv.has_full_logits:
            tv.tau_index(tau)  # raises: τ not declared and only top-k stored
    groups = chunk_groups(store.info.num_chunks, tasks_per_thread * cluster_threads(client))
    args, owners = [], []
    for n in names:
        part_dir = None
        if samples_dir is not None:
            part_dir = Path(samples_dir) / n
            part_dir.mkdir(parents=True, exist_ok=True)
            for old in part_dir.glob("part-*.parquet"):
                old.unlink()
        for i, g in enumerate(groups):
            part = str(part_dir / f"part-{i:05d}.parquet") if part_dir is not None else None
            args.append((str(store_path), n, g, opts, part))
            owners.append(n)
    results = run_tasks(analyze_task, args, client=client)
    reports = []
    for n in names:
        merged = Partial(store.info.num_classes, store.info.num_views, opts.bins)
        for owner, p in zip(owners, results):
            if owner == n:
                merged.merge(p)
        reports.append(build_report(n, merged, opts, store.teacher(n)))
    return reports
