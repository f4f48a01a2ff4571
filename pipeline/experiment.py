"""Running student runs: one process trains the runs of a sweep in turn, loading what they share once.

:func:`run_many` checks every run first (values, run folders), then trains them one after the other;
:class:`Shared` holds what the runs of one process load once — data sets, image tensors, teacher signals and the
teacher's mis-instructed rows. :func:`run_one` trains one run and writes::

    <out_dir>/<run name>/
        metrics.json     final test top-1/top-5, best top-1, identity of the run (dvc metrics)
        log.csv          one row per epoch: lr, train loss/top-1, test loss/top-1/top-5, seconds (dvc plots)
        checkpoint.pt    model, optimizer, scheduler, RNG states, log — rewritten atomically each epoch

The teacher signal is the logit store, a targets store, or the live teacher (``online``); Block-KD methods
also get their stepping-stone hybrids (the teacher checkpoint must be the one the store's teacher was cached
from). After training, ``metrics.json`` gains ``follow``: per teacher, the share of its mis-instructed training
rows where the student predicts the teacher's wrong class / the label (:mod:`loca_pipe.pipeline.follow`; a CE
student is measured against every teacher of the store). The training loop itself is
:func:`loca_pipe.pipeline.training.train_student`; what a run is (its settings, name, checks) is
:mod:`loca_pipe.pipeline.student_spec`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loca_pipe.pipeline import data as data_mod
from loca_pipe.pipeline.augment import make_augmenter
from loca_pipe.pipeline.blockkd import build_blockkd, matched_teacher
from loca_pipe.pipeline.distributed import init_from_env, world
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.follow import follow_rates, teacher_mistakes
from loca_pipe.pipeline.losses import METHODS
from loca_pipe.pipeline.models import build_model, file_sha256, load_checkpoint, read_sidecar, resolve_device
from loca_pipe.pipeline.soft_labels import (PlainSource, TensorSource, check_join, load_soft_labels, load_targets,
                                           run_order)
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.pipeline.threads import pin_threads
from loca_pipe.pipeline.student_spec import (StudentRun, check_params, check_run_folders, loss_config, read_recipe,
                                             run_dir, run_name, teacher_accuracy, with_recipe)
from loca_pipe.pipeline.training import (METRICS_JSON, ImageSet, atomic_write_text, preset_config, seed_everything,
                                         train_student)

log = logging.getLogger(__name__)

MISMATCH_WARNING = (
    "augment={aug!r} with a store of un-augmented teacher logits: the student trains on augmented images while "
    "the teacher's signal describes the clean image it never sees (a known mismatch, DESIGN.md §4). Cache "
    "augmented views (cache-logits views: V) to replay exactly what the teacher saw, or use augment: none")


class Shared:
    """What the runs of one process share: data sets, image tensors, teacher signals, teacher mistakes."""

    def __init__(self) -> None:
        self.items: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Any) -> Any:
        if key not in self.items:
            self.items[key] = make()
        return self.items[key]


def run_many(runs: list[StudentRun], workers: int = 1) -> list[tuple[dict[str, Any], Path]]:
    """Train the runs of a sweep (data and teacher signal loaded once per process); per run, in the order given,
    its final metrics and its folder.

    ``workers`` > 1 trains them in that many processes at once (spawned; runs i, i + w, i + 2w, … in process i,
    each on the threads its run pins): every run is a pure function of its own settings and seed, so the
    results equal one process's (tested), only sooner on a machine with idle cores. Under torchrun the ranks
    are the parallelism: one process each."""
    if workers < 1:
        raise ConfigError(f"train_student.workers must be ≥ 1; got {workers}")
    runs = [with_recipe(r) for r in runs]
    for r in runs:
        check_params(r)
    check_run_folders(runs)
    workers = min(workers, len(runs))
    if workers <= 1 or "WORLD_SIZE" in os.environ:
        return _run_chunk(runs)
    # spawn, not fork: the parent may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        chunks = [pool.submit(_run_chunk, runs[i::workers]) for i in range(workers)]
        done = [c.result() for c in chunks]
    out: list[Any] = [None] * len(runs)
    for i, chunk in enumerate(done):
        out[i::workers] = chunk
    return out


def _run_chunk(runs: list[StudentRun]) -> list[tuple[dict[str, Any], Path]]:
    shared = Shared()
    return [run_one(r, shared) for r in runs]


def _check_student_outputs(model: Any, student: str, C: int, in_channels: int, image_size: int, dataset: str) -> None:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, in_channels, image_size, image_size))
    model.train(was)
    k = int(out.shape[-1]) if out.ndim == 2 else None
    if k != C:
        got = f"{k} classes" if k is not None else f"an output of shape {tuple(out.shape)}"
        raise ConfigError(f"student {student!r} outputs {got} but data set {dataset!r} has {C} classes; build "
                          f"the student with num_classes={C} (a module:callable student receives num_classes)")


def _follow(p: StudentRun, shared: Shared, model: Any, images: Any, source_teacher: str | None,
            method: str) -> dict[str, Any]:
    """Follow rates of the trained student on its teacher's (CE: every teacher's) mis-instructed rows."""
    if not p.store or p.online or not Path(p.store).exists():
        return {}
    names = LogitStore.open(p.store).teachers if method == "ce" else [source_teacher or p.teacher]
    mistakes = [shared.get(("mistakes", p.store, name), lambda name=name: teacher_mistakes(p.store, name))
                for name in names]
    # the rates read the student's prediction on mis-instructed rows only: predict those, not the whole split
    # (the CNN pair's runs spent a third of their time predicting 60,000 rows for ~4,000 that count)
    rows = torch.from_numpy(np.unique(np.concatenate([t.sample_id[t.mis] for t in mistakes] or [np.zeros(0, np.int64)])))
    pred = np.full(len(images), -1, np.int64)  # -1: not predicted (no class); never read by follow_rates
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), 4096):
            idx = rows[i:i + 4096]
            pred[idx.numpy()] = model(images.get(idx)).argmax(1).cpu().numpy()
    model.train(was)
    return {t.teacher: follow_rates(pred, t) for t in mistakes}


def _first_samples(p: StudentRun, source: Any, spec: Any, meta: dict[str, Any], method: str) -> Any:
    """The source restricted to the first ``p.max_samples`` training samples (the teacher's full logits of
    those samples in memory; a store without full logits, or with cached views, is refused)."""
    n = int(p.max_samples)
    if isinstance(source, PlainSource):
        return PlainSource(n)
    if getattr(source, "has_views", False):
        raise ConfigError("max_samples needs a store without cached views; unset it or use a store cached with views: 0")
    return TensorSource(teacher_full_logits(p.store, meta.get("teacher"), spec)[:n])


def _blockkd(p: StudentRun, model: Any, teacher_model: Any, meta: dict[str, Any], spec: Any, C: int
             ) -> tuple[Any, str]:
    """The Block-KD wrapper of ``model``: the teacher from ``p.teacher_checkpoint`` (the live teacher in online
    mode), refused when its weights are not the ones the store's teacher was cached from
    (:func:`~loca_pipe.pipeline.blockkd.matched_teacher`, the one check); and the checkpoint's sha256."""
    teacher, arch = matched_teacher(p.teacher_checkpoint, meta, C, int(spec.in_channels), int(spec.image_size),
                                    teacher=teacher_model, check=not p.online)
    teacher.to(next(model.parameters()).device)
    return build_blockkd(model, p.student, teacher, arch, int(spec.in_channels), int(spec.image_size)), \
        file_sha256(p.teacher_checkpoint)


def run_one(p: StudentRun, shared: Shared | None = None) -> tuple[dict[str, Any], Path]:
    """Train one student: its final metrics (also written to ``<run dir>/metrics.json``) and its run folder.

    ``shared`` is :func:`run_many`'s cache of what the runs of one sweep load once (data, teacher signal)."""
    shared = shared or Shared()
    p = with_recipe(p)
    check_params(p)
    if shared is not None and not shared.items:
        check_run_folders([p])
    out = run_dir(p)
    if p.overwrite and not p.resume and out.exists():
        shutil.rmtree(out)
    device = resolve_device(p.device)
    init_from_env(device.type)  # under torchrun: DDP over the ranks (pipeline.training), else one process
    threads = p.threads if p.threads is not None else (1 if p.preset == "short-cpu" and device.type == "cpu" else None)
    if threads:
        pin_threads(int(threads))
    cfg = preset_config(p.preset, p.student, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                        momentum=p.momentum, weight_decay=p.weight_decay, milestones=p.milestones, seed=p.seed,
                        amp=p.amp)
    spec = shared.get(("spec", p.dataset, p.split, p.root), lambda: data_mod.open_dataset(p.dataset, p.split, p.root))
    eval_spec = shared.get(("spec", p.dataset, p.eval_split, p.root),
                           lambda: data_mod.open_dataset(p.dataset, p.eval_split, p.root))
    C = int(spec.num_classes)
    method = p.method
    teacher_model = None
    meta: dict[str, Any] = {}
    mem = int(p.memory_limit_gb * (1 << 30))
    order = run_order(len(spec), C, mem)  # one data order for every method of this seed and memory limit
    if p.online:
        side = read_sidecar(p.teacher_checkpoint)
        teacher_model = build_model(side["arch"], int(side.get("num_classes", C)), spec.in_channels, spec.image_size)
        sha = load_checkpoint(teacher_model, p.teacher_checkpoint)
        if int(side.get("num_classes", C)) != C:
            raise ConfigError(f"teacher checkpoint {p.teacher_checkpoint!r} has {side.get('num_classes')} classes but "
                              f"data set {p.dataset!r} has {C}; use a teacher trained on this data set")
        source: Any = PlainSource(len(spec), order=order)
        meta = {"teacher": side["arch"], "provenance": {**side, "sha256": sha}}
    elif method == "ce":
        source = PlainSource(len(spec), order=order)
    elif p.targets:
        source = load_targets(p.targets, spec, method=method, alpha=p.alpha, tau=p.tau, student_classes=C,
                              teacher=p.teacher, memory_limit_bytes=mem, view_policy=p.view_policy, order=order)
        method = source.method  # targets already hold (calibrated) probabilities: plain KD on them
        meta = source.meta
    else:
        if not p.store:
            raise ConfigError(f"method {method!r} needs a teacher: set train_student.store (a logit store), "
                              f"train_student.targets, or online: true with a teacher_checkpoint")
        source = shared.get(("soft", p.store, p.teacher, C, p.tau, p.form, mem, p.view_policy),
                            lambda: load_soft_labels(p.store, spec, teacher=p.teacher, student_classes=C, tau=p.tau,
                                                     form=p.form, memory_limit_bytes=mem, view_policy=p.view_policy,
                                                     order=order))
        meta = source.meta
    if p.max_samples is not None and p.max_samples < len(source):
        source = _first_samples(p, source, spec, meta, method)
    replay = augmenter = None
    if getattr(source, "has_views", False):
        ds_meta = meta.get("dataset") or {}
        kind = ds_meta.get("augment") or "crop-flip"
        replay = make_augmenter(kind, int(ds_meta.get("view_seed") or 0), int(spec.image_size))
        if p.augment != "none":
            log.info("the store caches augmented views; replaying them and ignoring augment=%r", p.augment)
    elif p.augment != "none":
        augmenter = make_augmenter(p.augment, p.seed, int(spec.image_size))
        if meta and not p.online:
            log.warning(MISMATCH_WARNING.format(aug=p.augment))
    notes: list[str] = []
    if method == "kd_star" and p.store and not p.online and Path(p.store).exists():
        t = shared.get(("mistakes", p.store, meta.get("teacher")), lambda: teacher_mistakes(p.store, meta.get("teacher")))
        if not t.mis.any():
            notes.append(f"KD* is plain KD here: teacher {t.teacher!r} has no mis-instructed training rows")
            log.warning(notes[-1])
    seed_everything(p.seed)
    model = build_model(p.student, C, int(spec.in_channels), int(spec.image_size))
    _check_student_outputs(model, p.student, C, int(spec.in_channels), int(spec.image_size), p.dataset)
    takes_a = bool(METHODS[p.method].loca)
    identity = {"method": p.method, "loss_method": method, "alpha": p.alpha if takes_a else None,
                "tau": p.tau, "beta": p.beta, "gamma": p.gamma, "seed": p.seed, "student": p.student,
                "dataset": p.dataset, "split": p.split, "eval_split": p.eval_split, "fingerprint": spec.fingerprint,
                "train_size": len(source), **({"max_samples": p.max_samples} if p.max_samples else {}),
                "store": None if method == "ce" and not p.targets else (p.targets or p.store),
                "teacher": meta.get("teacher"), "online": p.online, "augment": p.augment, "preset": p.preset,
                "form": getattr(source, "kind", None), "view_policy": p.view_policy,
                "recipe": read_recipe(p.recipe) if p.recipe else None,
                "train": dataclasses.asdict(cfg)}
    if p.method in ("dkd", "loca_dkd"):
        identity.update(dkd_alpha=p.dkd_alpha, dkd_beta=p.dkd_beta, warmup_epochs=p.warmup_epochs)
    if p.method in ("ls", "loca_ls"):
        identity.update(ls_tau=loss_config(p).ls_tau)
    blockkd = None
    if METHODS[p.method].blocks:
        blockkd, ck_sha = _blockkd(p, model, teacher_model, meta, spec, C)
        lc = loss_config(p)
        identity.update(cross=lc.cross, cross_distance=lc.cross_distance, teacher_checkpoint_sha256=ck_sha)
    images = shared.get(("images", p.dataset, p.split, p.root, str(device)), lambda: ImageSet(spec.dataset, device))
    eval_images = shared.get(("images", p.dataset, p.eval_split, p.root, str(device)),
                             lambda: ImageSet(eval_spec.dataset, device))
    labels = torch.as_tensor(spec.labels, dtype=torch.int64)
    eval_labels = torch.as_tensor(eval_spec.labels, dtype=torch.int64)
    name = run_name(p.method, p.alpha, p.seed, p.online)
    log.info("training %s (%s, student %s, %d samples, %s) → %s", name, method, p.student, len(source), device, out)
    fresh = not out.exists()
    try:
        res = train_student(model, images=images, labels=labels, source=source, method=method,
                            loss_cfg=loss_config(p), cfg=cfg, eval_images=eval_images, eval_labels=eval_labels,
                            out_dir=out, teacher_model=teacher_model, replay=replay, augmenter=augmenter,
                            resume=p.resume, blockkd=blockkd, identity={**identity, "run": out.name,
                                                       "teacher_test_top1": teacher_accuracy(meta, p.teacher_checkpoint)},
                            progress=p.progress,
                            progress_desc=f"{name} ({meta['teacher']})" if meta.get("teacher") else name)
    except BaseException:
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before its first checkpoint leaves no empty folder behind
        raise
    metrics = dict(res.metrics)
    if p.follow and world()[0] == 0:
        follow = _follow(p, shared, model, images, meta.get("teacher"), method)
        if follow:
            metrics["follow"] = follow
    if notes:
        metrics["notes"] = notes
    if (metrics.get("follow") or notes) and world()[0] == 0:
        atomic_write_text(out / METRICS_JSON, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics, out


def teacher_full_logits(store: str, name: str, spec: Any) -> Any:
    """(N, C) full logits of ``name`` in data-set order (view 0), after checking the store fits ``spec``."""
    st = LogitStore.open(store)
    tv = st.teacher(name)
    if not tv.has_full_logits:
        raise ConfigError(f"select-recipe trains KD students from full logits; teacher {tv.name!r} in {store!r} keeps "
                          f"only top-{tv.top_k}: re-cache it with --logits-dtype float16 or float32")
    sid, lab, view = tv["sample_id"][:], tv["label"][:], tv["view"][:]
    check_join(store, "store", st.info.dataset.get("fingerprint"), spec, st.info.num_classes, int(spec.num_classes),
               sid, lab)
    rows = np.flatnonzero(view == 0)
    z = np.asarray(tv.read("logits", rows), np.float32)
    out = torch.full((len(spec), z.shape[1]), float("nan"))
    out[torch.from_numpy(np.asarray(sid[rows], np.int64))] = torch.from_numpy(z)
    if bool(torch.isnan(out).any()):
        raise ConfigError(f"teacher {tv.name!r} in {store!r} does not cover every training sample; re-cache it")
    return out
