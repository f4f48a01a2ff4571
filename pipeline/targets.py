"""Precomputed KD and LoCa targets: a Zarr v3 store the students read instead of calibrating themselves.

Layout (docs/analysis.md is the reader's reference)::

    TARGETS/                          attrs["loca_pipe"]: format "loca-pipe/targets", format_version, tau,
                                      alphas, alpha_keys, num_rows, num_classes, chunk_rows, source{...},
                                      teachers, complete, violations
      sample_id  (R,)    int64        copied from the logit store, same row order
      label      (R,)    int64
      view       (R,)    int16
      aug_params (R, P)  float32      only when the store caches augmented views
      teachers/<name>/                attrs["loca_pipe"]: form, tau, alphas, arrays, provenance, complete,
                                      violations{check: count}, calibrated_rows
        # form "dense" (teacher with full logits, C ≤ dense_max_classes)
        kd              (R, C)   float32   p = softmax(z/τ)
        loca_<a>        (R, C)   float32   LoCa(p, y, α=a)            one per α, e.g. loca_0.95
        # form "sparse" (top-k-only teacher, or form=sparse)
        ids             (R, K+1) int16|int32   top-k ids then the label id (SparseDist.ids)
        kd_probs        (R, K+1) float32   exact p at those ids (label column 0 when the label is in the top-k)
        kd_tail         (R,)     float32   1 − Σ kd_probs (mass of every class not kept)
        loca_<a>_probs  (R, K+1) float32   LoCa applied to the sparse form (SparseDist.probs)
        loca_<a>_tail   (R,)     float32   its tail (= s · kd_tail)
        # both forms
        mis_instructed  (R,)     uint8     1 where LoCa changed the row (label not the strict winner)
        violations      (n_chunks, n_checks) int64   invariant violations found in each chunk
        sigma_sum       (n_chunks,) float64  Σ σ = 1/(1 − p_y + p_k) over each chunk's calibrated rows (metrics)
        done            (n_chunks,) uint8  completion record, one flag per row chunk

``<a>`` is :func:`~loca_pipe.pipeline.analysis.alpha_key` (shortest round-trip text: 0.95 → ``0.95``).
Every chunk is validated against LoCa's invariants (docs/maths.md §1) right after it is computed, before it is
written; the counts are stored, and a store with any violation is never marked complete.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from loca_pipe.pipeline.analysis import (_one_torch_thread, _TorchThreads, alpha_key, check_alpha_tau, chunk_groups,
                                         cluster_threads, local_workers, resolve_teachers)
from loca_pipe.pipeline.caching import summarize_logits
from loca_pipe.pipeline.calibration import LocaWarning, loca_from_logits, loca_sparse, sparse_from_topk
from loca_pipe.pipeline.errors import ConfigError, IncompleteStoreError, NumericsError, StoreConflictError, StoreError
from loca_pipe.pipeline import layout
from loca_pipe.pipeline.io import versions
from loca_pipe.pipeline.store import (ATTR, CheckedArray, LogitStore, array_codecs, dims, now, open_zarr_group,
                                      read_checked, root_sizes)

log = logging.getLogger(__name__)

FORMAT = "loca-pipe/targets"
FORMAT_VERSION = 1
CHECKS = ("sum", "range", "argmax", "margin", "ratio", "unchanged", "mask")
from loca_pipe.pipeline.names import TARGET_FORMS as FORMS  # defined in the torch-free leaf, for the CLI
# tolerances for fp32 targets (sums over up to a few thousand classes)
SUM_TOL, MARGIN_TOL, ELEM_TOL = 1e-4, 1e-5, 1e-6


def dense_name(alpha: float | None) -> str:
    """Array name of a dense target: ``kd`` for α None, else ``loca_<alpha_key>``."""
    return "kd" if alpha is None else f"loca_{alpha_key(alpha)}"


def sparse_names(alpha: float | None) -> tuple[str, str, str]:
    """Array names (ids, probs, tail) of a sparse target for α (None → plain KD)."""
    base = "kd" if alpha is None else f"loca_{alpha_key(alpha)}"
    return "ids", f"{base}_probs", f"{base}_tail"


# ----------------------------------------------------------------------------------------------------
# Invariant checks (independent of how calibration computed the numbers)


def _counts(**kw: torch.Tensor) -> dict[str, int]:
    return {k: int(v.sum()) for k, v in kw.items()}


@torch.no_grad()
def check_dense(kd: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, calibrated: torch.Tensor,
                alpha: float) -> dict[str, int]:
    """Rows of a dense chunk violating each LoCa invariant (all counts must be 0).

    kd (B, C) = p, new (B, C) = p′, calibrated (B,) = the rows calibration says it changed. Checks: Σp′ = 1;
    0 ≤ p′ ≤ 1; on rows where the label is not the strict winner of p (``mask`` compares that with
    ``calibrated``): label is the strict argmax of p′ (α < 1), p′_y − max_{i≠y} p′_i = 1 − α, p′_i = c·p_i for
    i ≠ y with one c per row (ratios kept); on the other rows p′ = p.
    """
    y = labels.long().view(-1, 1)
    p_y, q_y = kd.gather(1, y).view(-1), new.gather(1, y).view(-1)
    p_k = kd.scatter(1, y, -1.0).amax(1)
    q_k = new.scatter(1, y, -1.0).amax(1)
    mis = p_y <= p_k
    c = (1.0 - q_y) / (1.0 - p_y).clamp_min(1e-30)  # the common factor on non-label classes
    off = (new - c.view(-1, 1) * kd).scatter(1, y, 0.0).abs().amax(1)
    return _counts(
        sum=(new.sum(1) - 1.0).abs() > SUM_TOL,
        range=(new < 0).any(1) | (new > 1).any(1),
        argmax=mis & (q_y <= q_k) if alpha < 1 else torch.zeros_like(mis),
        margin=mis & ((q_y - q_k) - (1.0 - alpha)).abs().gt(MARGIN_TOL),
        ratio=mis & (off > ELEM_TOL),
        unchanged=~mis & (new - kd).abs().amax(1).gt(ELEM_TOL),
        mask=mis != calibrated.view(-1),
    )


@torch.no_grad()
def check_sparse(kd: Any, new: Any, labels: torch.Tensor, calibrated: torch.Tensor, alpha: float) -> dict[str, int]:
    """The same invariants on the sparse form (kept entries plus the tail bucket, which counts as non-label)."""
    y = labels.long().view(-1, 1)
    is_lab = kd.ids == y
    p_y = (kd.probs * is_lab).sum(1)
    q_y = (new.probs * is_lab).sum(1)
    p_k = kd.probs.masked_fill(is_lab, -1.0).amax(1)
    q_k = new.probs.masked_fill(is_lab, -1.0).amax(1)
    mis = p_y <= p_k
    c = (1.0 - q_y) / (1.0 - p_y).clamp_min(1e-30)
    off = torch.maximum((new.probs - c.view(-1, 1) * kd.probs).masked_fill(is_lab, 0.0).abs().amax(1),
                        (new.tail - c * kd.tail).abs())
    same = torch.maximum((new.probs - kd.probs).abs().amax(1), (new.tail - kd.tail).abs())
    return _counts(
        sum=(new.probs.sum(1) + new.tail - 1.0).abs() > SUM_TOL,
        range=(new.probs < 0).any(1) | (new.probs > 1).any(1) | (new.tail < 0),
        argmax=mis & (q_y <= q_k) if alpha < 1 else torch.zeros_like(mis),
        margin=mis & ((q_y - q_k) - (1.0 - alpha)).abs().gt(MARGIN_TOL),
        ratio=mis & (off > ELEM_TOL),
        unchanged=~mis & same.gt(ELEM_TOL),
        mask=mis != calibrated.view(-1),
    )


# ----------------------------------------------------------------------------------------------------
# Writing


def source_identity(store: LogitStore, teachers: Sequence[str]) -> dict[str, Any]:
    """What makes a logit store (and its teachers' contents) this one: data fingerprint, layout, teacher runs."""
    info = store.info
    ds = info.dataset if isinstance(info.dataset, dict) else {}
    tchs = {}
    for n in teachers:
        a = store.teacher_attrs(n)
        tchs[n] = {k: v for k, v in a.items() if k not in ("versions",)}
    return {"path": str(store.path), "task": info.task, "num_rows": info.num_rows, "num_samples": info.num_samples,
            "num_views": info.num_views, "num_classes": info.num_classes, "chunk_rows": info.chunk_rows,
            "fingerprint": ds.get("fingerprint"), "split": ds.get("split"), "view_seed": ds.get("view_seed"),
            "dataset": ds, "teachers": tchs}


def _identity_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for k in ("tau", "alphas", "forms"):
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: targets have {old.get(k)!r}, this run asks for {new.get(k)!r}")
    so, sn = old.get("source", {}), new["source"]
    for k in ("fingerprint", "split", "view_seed", "num_rows", "num_classes", "num_views", "chunk_rows", "task"):
        if so.get(k) != sn.get(k):
            diffs.append(f"source {k}: targets have {so.get(k)!r}, the store has {sn.get(k)!r}")
    if sorted(so.get("teachers", {})) != sorted(sn["teachers"]):
        diffs.append(f"teachers: targets have {sorted(so.get('teachers', {}))}, this run asks for {sorted(sn['teachers'])}")
    else:
        for t in sn["teachers"]:
            if so["teachers"][t].get("created") != sn["teachers"][t].get("created"):
                diffs.append(f"teacher {t!r} was re-cached since these targets were written")
    return diffs


def choose_form(tv, form: str, dense_max_classes: int) -> str:
    if form not in FORMS:
        raise ConfigError(f"form must be one of {list(FORMS)}; got {form!r}")
    C = tv.store.info.num_classes
    if form == "dense":
        if not tv.has_full_logits:
            raise StoreError(f"teacher {tv.name!r} keeps only top-{tv.top_k} logits: dense targets need full logits; "
                             f"use form=sparse (or auto), or re-cache with full logits")
        return "dense"
    if form == "sparse":
        return "sparse"
    return "dense" if tv.has_full_logits and C <= dense_max_classes else "sparse"


def _create_teacher(root: zarr.Group, name: str, form: str, tv, alphas: Sequence[float], tau: float) -> None:
    info = tv.store.info
    R, ch, C, n = info.num_rows, info.chunk_rows, info.num_classes, info.num_chunks
    g = root.require_group("teachers").create_group(name, overwrite=True)
    bases = [dense_name(None)] + [dense_name(a) for a in alphas]
    sizes = layout.Sizes(dims={"row": R, "class": C, "k": tv.top_k + 1, "chunk": n, "check": len(CHECKS)},
                         chunks={"row": ch}, num_classes=C)
    for spec in layout.target_arrays(form, bases):  # the table's targets arrays (pipeline/layout.py)
        layout.create(g, spec, sizes)
    if form == "dense":
        names = bases
    else:
        names = ["ids"] + [x for a in [None, *alphas] for x in sparse_names(a)[1:]]
    g.attrs[ATTR] = {"form": form, "tau": tau, "alphas": list(alphas), "alpha_keys": [alpha_key(a) for a in alphas],
                     "arrays": names + ["mis_instructed"], "checks": list(CHECKS), "top_k": tv.top_k,
                     "provenance": {k: v for k, v in tv.attrs.items()}, "complete": False}


# Set when the driver is interrupted (Ctrl-C): local tasks stop after the chunk they are writing, so every
# chunk marked done stays whole and the same command resumes from there.
_STOP = threading.Event()


def targets_task(src: str, out: str, teacher: str, chunks: Sequence[int], tau: float,
                 alphas: Sequence[float], on_chunk: Any = None) -> int:
    """One dask task: compute, validate and write ``chunks`` of one teacher's targets; returns chunks written.

    ``on_chunk(rows)`` (local threads only) is called after each chunk written, for the progress bar.
    """
    _one_torch_thread()
    store = LogitStore.open(src)
    tv = store.teacher(teacher)
    info = store.info
    g = open_zarr_group(out, mode="r+")["teachers"][teacher]
    form = g.attrs[ATTR]["form"]
    t = tv.tau_index(tau) if form == "sparse" else -1
    written = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LocaWarning)  # warned once by the driver
        for c in chunks:
            if _STOP.is_set():
                break
            if g["done"][c]:
                continue  # resume: this chunk is already whole
            sl = info.chunk_slice(c)
            y = torch.from_numpy(tv["label"][sl])
            counts = np.zeros(len(CHECKS), np.int64)
            if form == "dense":
                z = torch.from_numpy(tv["logits"][sl])
                kd = torch.softmax(z.float() / tau, dim=1)
                g["kd"][sl] = kd.numpy()
                for a in alphas:
                    res = loca_from_logits(z, y, a, tau)
                    v = check_dense(kd, res.probs, y, res.calibrated, a)
                    counts += np.array([v[k] for k in CHECKS])
                    g[dense_name(a)][sl] = res.probs.numpy()
            else:
                if t >= 0:
                    tl, lse = tv["topk_logits"][sl], tv["lse"][sl, t]
                    ti = tv["topk_ids"][sl].astype(np.int64)
                    zl = tv["label_logit"][sl]
                else:  # full logits, τ not declared: exact summary from the logits at this τ
                    s = summarize_logits(torch.from_numpy(tv["logits"][sl]).float(), y, tv.top_k, [tau])
                    tl, ti, lse, zl = s["topk_logits"].numpy(), s["topk_ids"].numpy(), s["lse"][:, 0].numpy(), s["label_logit"].numpy()
                sd = sparse_from_topk(torch.from_numpy(tl), torch.from_numpy(ti), torch.from_numpy(lse),
                                      torch.from_numpy(zl), y, tau)
                g["ids"][sl] = sd.ids.numpy().astype(g["ids"].dtype)
                g["kd_probs"][sl] = sd.probs.float().numpy()
                g["kd_tail"][sl] = sd.tail.float().numpy()
                for a in alphas:
                    new, res = loca_sparse(sd, y, a)
                    v = check_sparse(sd, new, y, res.calibrated, a)
                    counts += np.array([v[k] for k in CHECKS])
                    _, pn, tn = sparse_names(a)
                    g[pn][sl] = new.probs.float().numpy()
                    g[tn][sl] = new.tail.float().numpy()
            g["mis_instructed"][sl] = res.calibrated.numpy().astype(np.uint8)
            g["violations"][c] = counts
            if "sigma_sum" in g:
                g["sigma_sum"][c] = float((res.scale[res.calibrated].double() / alphas[-1]).sum())
            g["done"][c] = 1
            written += 1
            if on_chunk is not None:
                on_chunk(sl.stop - sl.start)
    return written


def _run_targets(args: list[tuple], client: Any, bar: Any, rows: list[int]) -> list[int]:
    """``targets_task(*a)`` for every ``a``: on ``client`` (distributed; the bar moves per finished task) or on
    local threads (the bar moves per chunk). An interrupt stops local tasks after their current chunk."""
    if client is not None:
        import dask
        from distributed import as_completed

        futures = client.compute([dask.delayed(targets_task, pure=False)(*a) for a in args])
        where = {f.key: i for i, f in enumerate(futures)}
        out = [0] * len(args)
        for f in as_completed(futures):
            i = where[f.key]
            out[i] = f.result()
            bar.update(rows[i])
        return out
    from concurrent.futures import ThreadPoolExecutor

    _STOP.clear()
    pool = ThreadPoolExecutor(max_workers=local_workers(), thread_name_prefix="calibrate")
    try:
        with _TorchThreads(1):
            futures = [pool.submit(targets_task, *a, on_chunk=bar.update) for a in args]
            return [f.result() for f in futures]
    except BaseException:
        _STOP.set()  # running tasks finish the chunk they are on; queued ones do not start
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class TargetsReport:
    """What :func:`write_targets` did."""

    path: str
    tau: float
    alphas: tuple[float, ...]
    teachers: dict[str, dict[str, Any]]  # name → form, arrays, shapes, violations, calibrated_rows, chunks_written
    violations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "tau": self.tau, "alphas": list(self.alphas), "violations": self.violations,
                "seconds": self.seconds, "teachers": self.teachers}


def write_targets(store_path: str, out: str, alphas: Sequence[float], tau: float, *,
                  teachers: Sequence[str] | None = None, form: str = "auto", dense_max_classes: int = 4096,
                  overwrite: bool = False, client=None, tasks_per_thread: int = 4,
                  progress: bool = False) -> TargetsReport:
    """Write (or resume) the targets store ``out`` for ``teachers`` of the logit store at ``store_path``.

    A targets store made from another source, τ, α list or form raises StoreConflictError unless ``overwrite``.
    ``progress`` shows a bar over the rows still to write (throughput, ETA; one line per update off a terminal).
    Raises NumericsError (after writing, without marking the store complete) if any chunk violates an invariant.
    """
    import time

    t0 = time.perf_counter()
    store = LogitStore.open(str(store_path))
    names = resolve_teachers(store, teachers)
    alphas, tau = check_alpha_tau(alphas, tau)
    forms = {}
    for n in names:
        tv = store.teacher(n)
        forms[n] = choose_form(tv, form, dense_max_classes)
        if forms[n] == "sparse" and not tv.has_full_logits:
            tv.tau_index(tau)  # τ not declared on a top-k-only teacher → StoreError with the fix
    info = store.info
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tau": tau, "alphas": list(alphas),
            "alpha_keys": [alpha_key(a) for a in alphas], "forms": forms, "num_rows": info.num_rows,
            "num_classes": info.num_classes, "chunk_rows": info.chunk_rows,
            "source": source_identity(store, names), "teachers": names}
    root = _open_or_create(str(out), meta, overwrite)
    if not dict(root.attrs)[ATTR].get("rows_copied"):
        _copy_rows(store, root)
        a = dict(root.attrs[ATTR])
        a["rows_copied"] = True
        root.attrs[ATTR] = a
    for n in names:
        have = "teachers" in root and n in root["teachers"] and dict(root["teachers"][n].attrs).get(ATTR)
        if not have:
            _create_teacher(root, n, forms[n], store.teacher(n), alphas, tau)
    groups = chunk_groups(info.num_chunks, tasks_per_thread * cluster_threads(client))
    args = [(str(store_path), str(out), n, g, tau, alphas) for n in names for g in groups]
    from loca_pipe.pipeline.progress import progress_bar

    done = {n: root["teachers"][n]["done"][:] for n in names}
    rows = [sum(info.chunk_slice(c).stop - info.chunk_slice(c).start for c in g if not done[n][c])
            for (_, _, n, g, _, _) in args]
    with progress_bar(total=sum(rows), desc="calibrate", unit="row", enabled=progress) as bar:
        written = _run_targets(args, client, bar, rows)
    report: dict[str, dict[str, Any]] = {}
    total = 0
    for i, n in enumerate(names):
        g = root["teachers"][n]
        pending = int((g["done"][:] == 0).sum())
        if pending:
            raise IncompleteStoreError(f"targets for {n!r} in {str(out)!r}: {pending} chunks not written; run the same "
                                       f"command again to resume")
        viol = read_checked(g["violations"]).sum(0)
        counts = {k: int(v) for k, v in zip(CHECKS, viol)}
        total += int(viol.sum())
        a = dict(g.attrs[ATTR])
        mis = int(read_checked(g["mis_instructed"]).astype(np.int64).sum())
        if "sigma_sum" in g:
            sigma = float(read_checked(g["sigma_sum"]).sum()) / mis if mis else None
        else:  # a store begun by an older loca-pipe: recompute from the kd targets
            sigma = _mean_sigma_mis(g, CheckedArray(root["label"]), forms[n], info.chunk_rows)
        a.update(violations=counts, calibrated_rows=mis, complete=not viol.any(), finished=now())
        g.attrs[ATTR] = a
        report[n] = {"form": forms[n], "arrays": {k: list(g[k].shape) for k in a["arrays"]},
                     "dtypes": {k: str(g[k].dtype) for k in a["arrays"]}, "violations": counts,
                     "calibrated_rows": mis, "calibrated_ratio": mis / max(1, info.num_rows),
                     "mean_sigma_mis": sigma,
                     "mean_scale_mis": {alpha_key(al): None if sigma is None else al * sigma for al in alphas},
                     "chunks_written": int(sum(w for (_, _, tn, *_), w in zip(args, written) if tn == n))}
    ra = dict(root.attrs[ATTR])
    ra.update(complete=total == 0, violations=total, finished=now(), versions=versions())
    root.attrs[ATTR] = ra
    rep = TargetsReport(str(out), tau, alphas, report, total, time.perf_counter() - t0)
    if total:
        bad = {n: {k: v for k, v in r["violations"].items() if v} for n, r in report.items()}
        raise NumericsError(f"LoCa targets in {str(out)!r} violate the invariants ({bad}); the store is left "
                            f"incomplete so no student reads it — report this with the store's provenance")
    return rep


def _mean_sigma_mis(g: zarr.Group, labels: CheckedArray, form: str, block: int) -> float | None:
    """Mean σ = 1/(1 − p_y + p_k) over the calibrated rows, from the stored plain-KD targets.

    s = α·σ and σ does not depend on α, so the mean LoCa scale of every α is α times this (metrics only).
    """
    total, count = 0.0, 0
    R = labels.shape[0]
    g = {k: CheckedArray(g[k]) for k in ("mis_instructed", "kd", "ids", "kd_probs") if k in g}  # checked reads
    for start in range(0, R, block):
        sl = slice(start, min(R, start + block))
        mis = g["mis_instructed"][sl].astype(bool)
        if not mis.any():
            continue
        y = labels[sl][mis]
        rows = np.arange(len(y))
        if form == "dense":
            p = g["kd"][sl][mis].astype(np.float64)
            p_y = p[rows, y]
        else:
            ids = g["ids"][sl][mis].astype(np.int64)
            p = g["kd_probs"][sl][mis].astype(np.float64)
            is_y = ids == y[:, None]
            p_y = np.where(is_y, p, 0.0).sum(1)  # the label's mass sits in one column (the other is 0)
            p = np.where(is_y, -1.0, p)
        if form == "dense":
            p[rows, y] = -1.0
        p_k = p.max(1)
        total += float((1.0 / (1.0 - p_y + p_k)).sum())
        count += len(y)
    return total / count if count else None  # no calibrated row: nothing to average


def _open_or_create(out: str, meta: dict[str, Any], overwrite: bool) -> zarr.Group:
    try:
        g = open_zarr_group(out, mode="r+")
        old = dict(g.attrs).get(ATTR)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        g, old = None, None
    if g is not None and not overwrite:
        if not old or old.get("format") != FORMAT:
            if list(g.keys()) or dict(g.attrs):
                raise StoreConflictError(f"{out!r} holds something that is not a loca-pipe targets store; choose "
                                         f"another output path or pass --overwrite to replace it")
        else:
            diffs = _identity_diffs(old, meta)
            if diffs:
                raise StoreConflictError(f"{out!r} holds targets for another store or settings ({'; '.join(diffs)}); "
                                         f"choose another output path, or pass --overwrite to replace them")
            return g  # same identity: resume
    if Path(out).exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    g = open_zarr_group(out, mode="w")
    g.attrs[ATTR] = {**meta, "created": now(), "complete": False, "rows_copied": False}
    return g


def _copy_rows(store: LogitStore, root: zarr.Group) -> None:
    info = store.info
    # the source's shared row arrays (the table's write_rows arrays it holds), copied as they are stored
    names = [a.name for a in layout.arrays(layout.ROOT, root_sizes(info), writer=layout.ROWS)]
    for k in names:
        src = store.group[k]
        dst = root.create_array(k, shape=src.shape, chunks=src.chunks, dtype=src.dtype, fill_value=src.fill_value,
                                overwrite=True, **array_codecs(src.dtype), **dims(k))
        for c in range(info.num_chunks):
            sl = info.chunk_slice(c)
            dst[sl] = read_checked(src, sl)


# ----------------------------------------------------------------------------------------------------
# Reading (what students use)


class TargetsStore:
    """Read access to a complete targets store; refuses half-written or foreign ones."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self.group = open_zarr_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
            raise StoreError(f"no targets store at {self.path!r}; write one with `loca-pipe calibrate STORE --out {path}`") from exc
        a = dict(self.group.attrs).get(ATTR)
        if not a or a.get("format") != FORMAT:
            raise StoreError(f"{self.path!r} is not a loca-pipe targets store (no {ATTR!r} attributes with format "
                             f"{FORMAT!r}); write one with `loca-pipe calibrate`")
        if a.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path!r} has targets format version {a.get('format_version')}, this loca-pipe reads "
                             f"version {FORMAT_VERSION}; re-run `loca-pipe calibrate`")
        if not a.get("complete"):
            raise IncompleteStoreError(f"targets store {self.path!r} is incomplete (still being written, crashed, or it "
                                       f"failed validation); re-run the same `loca-pipe calibrate` command")
        self.attrs = a
        self.tau: float = float(a["tau"])
        self.alphas: tuple[float, ...] = tuple(a["alphas"])
        self.teachers: list[str] = list(a["teachers"])

    def __getitem__(self, key: str) -> CheckedArray:
        """Array ``key`` of the store group; its reads are CRC32C-checked (a damaged chunk is a named StoreError)."""
        return CheckedArray(self.group[key])

    def teacher(self, name: str | None = None) -> "TargetsView":
        if name is None:
            if len(self.teachers) != 1:
                raise StoreError(f"targets store {self.path!r} holds {self.teachers}; name one")
            name = self.teachers[0]
        if name not in self.teachers:
            raise StoreError(f"teacher {name!r} has no targets in {self.path!r}; it holds: {', '.join(self.teachers)}")
        return TargetsView(self, name, self.group["teachers"][name])


class TargetsView:
    """One teacher's targets: ``dense(alpha)`` or ``sparse(alpha)`` arrays (alpha None → plain KD)."""

    def __init__(self, store: TargetsStore, name: str, group: zarr.Group):
        self.store, self.name, self.group = store, name, group
        self.attrs = dict(group.attrs[ATTR])
        self.form: str = self.attrs["form"]

    def _check_alpha(self, alpha: float | None) -> None:
        if alpha is not None and not any(math.isclose(alpha, a, rel_tol=1e-9) for a in self.store.alphas):
            raise StoreError(f"no LoCa targets for alpha={alpha} in {self.store.path!r}; it has alphas "
                             f"{list(self.store.alphas)} — re-run `loca-pipe calibrate` with --alpha {alpha}")

    def dense(self, alpha: float | None = None) -> CheckedArray:
        """(R, C) float32 targets: ``kd`` (alpha None) or ``loca_<alpha>``."""
        self._check_alpha(alpha)
        if self.form != "dense":
            raise StoreError(f"targets of {self.name!r} are sparse (top-k-only teacher); use .sparse(alpha)")
        return CheckedArray(self.group[dense_name(alpha)])

    def sparse(self, alpha: float | None = None) -> tuple[CheckedArray, CheckedArray, CheckedArray]:
        """(ids (R, K+1), probs (R, K+1), tail (R,)) — a SparseDist per row block."""
        self._check_alpha(alpha)
        if self.form != "sparse":
            raise StoreError(f"targets of {self.name!r} are dense; use .dense(alpha)")
        i, p, t = sparse_names(alpha)
        return CheckedArray(self.group[i]), CheckedArray(self.group[p]), CheckedArray(self.group[t])
