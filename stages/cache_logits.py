"""Stage one: run a teacher once over a labelled image set and cache its logits in the logit store.

``run(CacheParams(...))`` adds one teacher to the store (creating the store on first use). Work goes
chunk by chunk, only over chunks not yet done, so running the same command after a crash resumes; every
batch of a chunk starts at the chunk's first row, so a resumed run computes exactly the same batches as an
uninterrupted one and the arrays come out bit-identical. The engine (read-ahead, summaries, background
writer, sharding, completion) is ``pipeline/caching.py``; this stage turns its params into a teacher, a
data set and an :class:`~loca_pipe.pipeline.caching.ImageJob`, and returns the engine's report.

Views: ``views = 0`` caches the un-augmented image once per sample (one row per sample, ``view = 0``).
``views = V > 0`` caches V *augmented* views per sample (``crop-flip``, parameters from
``Augmenter.sample_params(sample_ids, v)`` for v in 0..V-1, stored in ``aug_params``); none of them is the
clean image — a student that trains on augmented images never sees the clean one, and a clean-image
teacher is a separate store (``views: 0``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from loca_pipe.pipeline import caching
from loca_pipe.pipeline.caching import CacheReport, CacheSettings, ImageJob, weights_sha256
from loca_pipe.stages import Report
from loca_pipe.pipeline.errors import ConfigError, DataError, ModelError, StoreError
from loca_pipe.pipeline.guard import LOGITS, check_outputs
from loca_pipe.pipeline.store import LogitStore, StoreInfo, default_chunk_rows

log = logging.getLogger(__name__)
SECTION = "cache"

AUGMENT_KIND = "crop-flip"


@dataclass(frozen=True)
class CacheParams:
    """Section ``cache`` of params.yaml (one teacher; see :func:`load_params` for several)."""

    teacher: str | None = None  # model NAME or module:callable; default: the checkpoint sidecar's "arch"
    checkpoint: str | None = None  # state-dict file; its sidecar <ckpt>.json gives arch / num_classes
    name: str | None = None  # teacher name in the store; default: checkpoint stem, else the arch
    dataset: str = "fashion-mnist"
    root: str | None = None
    split: str = "train"
    store: str = "data/logits/fashion-mnist-train.zarr"
    top_k: int = 5
    temperatures: tuple[float, ...] = (1.0, 4.0)
    logits_dtype: Literal["float32", "float16", "none"] = "float32"
    compress_logits: bool = False
    views: int = 0  # 0: the clean image once; V > 0: V replayable augmented (crop-flip) views per sample
    view_seed: int = 0
    batch_size: int = 256  # rows per forward pass (samples × views)
    num_workers: int | None = None  # DataLoader workers; None: min(4, CPUs) (in-memory data sets need none)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # fp16 autocast, on CUDA only
    chunk_rows: int | None = None  # default: store.default_chunk_rows(C)
    max_samples: int | None = None  # first N samples only (tiny runs, tests)
    overwrite: bool = False  # replace a conflicting store / teacher; identical work is kept and resumed
    recache: bool = False  # also re-cache a complete identical teacher (what --overwrite on the command line does)
    shard: int | None = None  # this process caches chunks c with c % num_shards == shard (default: $RANK)
    num_shards: int | None = None  # processes sharing the work (default: $WORLD_SIZE, else 1)
    progress: bool = True


def load_params(params: dict[str, Any] | str | Path = "params.yaml", teacher_key: str | None = None,
                overrides: dict[str, Any] | None = None) -> list[CacheParams]:
    """Params of section ``cache``, one CacheParams per teacher.

    The section may hold ``teachers: {KEY: {per-teacher values}}``; each entry overrides the section's
    common values (its ``name`` defaults to KEY). With ``teachers_dir: DIR`` an entry without ``teacher`` or
    ``checkpoint`` reads train-teacher's ``DIR/KEY.pt`` (:func:`train_teacher.checkpoint_path`). ``teacher_key`` picks one entry. ``overrides`` (CLI
    options, None = unset) apply last, to every teacher.
    """
    from loca_pipe.stages.config import build, read_params

    if not isinstance(params, dict):
        params = read_params(params)
    section = dict(params.get(SECTION) or {})
    teachers = section.pop("teachers", None)
    teachers_dir = section.pop("teachers_dir", None)
    if teachers_dir is not None and not isinstance(teachers_dir, str):
        raise ConfigError(f"cache.teachers_dir must be a folder path; got {teachers_dir!r}")
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not teachers:
        if teacher_key is not None and over.get("name") is None:
            over["name"] = teacher_key
        return [build(CacheParams, {**section, **over}, SECTION)]
    if not isinstance(teachers, dict):
        raise ConfigError(f"cache.teachers must map a teacher key to its values; got {type(teachers).__name__}")
    keys = list(teachers)
    if teacher_key is not None:
        if teacher_key not in teachers:
            raise ConfigError(f"cache.teachers has no entry {teacher_key!r}; it has {keys}")
        keys = [teacher_key]
    out = []
    for key in keys:
        entry = dict(teachers[key] or {})
        entry.setdefault("name", key)
        if teachers_dir is not None and entry.get("teacher") is None and entry.get("checkpoint") is None:
            from loca_pipe.stages.train_teacher import checkpoint_path

            entry["checkpoint"] = str(checkpoint_path(teachers_dir, key))
        out.append(build(CacheParams, {**section, **entry, **over}, f"cache.teachers.{key}"))
    return out


# ----------------------------------------------------------------------------------------------------
# Resolution of the teacher and the data




def _validate(p: CacheParams) -> None:
    if p.teacher is None and p.checkpoint is None:
        raise ConfigError("give --teacher NAME|module:callable and/or --checkpoint PATH (whose <ckpt>.json "
                          "sidecar names the architecture)")
    if p.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1; got {p.top_k}")
    if not p.temperatures or any(not (t > 0 and math.isfinite(t)) for t in p.temperatures):
        raise ConfigError(f"--temperatures must be positive numbers; got {list(p.temperatures)}")
    for key, lo in (("views", 0), ("batch_size", 1), ("num_workers", 0), ("chunk_rows", 1), ("max_samples", 1)):
        v = getattr(p, key)
        if v is not None and v < lo:
            raise ConfigError(f"{key} must be at least {lo}; got {v}")
    caching.resolve_shard(p.shard, p.num_shards)


def _existing_chunk_rows(path: str) -> int | None:
    """chunk_rows of the store already at ``path`` (a later teacher adopts it), else None."""
    try:
        return LogitStore.open(path).info.chunk_rows
    except (StoreError, OSError, KeyError):
        return None


def run(params: CacheParams) -> Report:
    """Cache one teacher's logits for one data set split into ``params.store`` (resumable); what it did."""
    from loca_pipe.pipeline import augment as _augment
    from loca_pipe.pipeline import data as _data
    from loca_pipe.pipeline import models as _models

    p = params
    _validate(p)
    check_outputs({"--checkpoint": p.checkpoint, "--root": p.root}, {"--store": (p.store, LOGITS)})
    sidecar = _models.read_sidecar(p.checkpoint, missing_ok=True) if p.checkpoint else {}
    if p.checkpoint and not Path(p.checkpoint).is_file():
        raise ModelError(f"checkpoint {p.checkpoint!r} not found; train one with `loca-pipe train-teacher` or "
                         f"fix --checkpoint")
    arch = p.teacher or sidecar.get("arch")
    if not arch:
        raise ConfigError(f"no --teacher given and the checkpoint {p.checkpoint!r} has no sidecar naming its "
                          f"\"arch\"; pass --teacher NAME|module:callable")
    name = p.name or (Path(p.checkpoint).stem if p.checkpoint else arch.split(":")[-1])

    # -- data ---------------------------------------------------------------------------------------
    spec = _data.open_dataset(p.dataset, split=p.split, root=p.root)
    N = len(spec.dataset) if p.max_samples is None else min(p.max_samples, len(spec.dataset))
    if N == 0:
        raise DataError(f"data set {p.dataset!r} split {p.split!r} is empty; nothing to cache")
    C = int(spec.num_classes)
    labels = np.asarray(spec.labels[:N], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= C))
    if bad.size:
        raise DataError(f"labels must lie in [0, {C}) for the {C}-class data set {p.dataset!r}; sample ids "
                        f"{bad[:20].tolist()}{' …' if bad.size > 20 else ''} have labels "
                        f"{np.unique(labels[bad])[:10].tolist()}; fix the data set or its num_classes")
    if sidecar.get("num_classes") is not None and int(sidecar["num_classes"]) != C:
        raise ModelError(f"checkpoint {p.checkpoint!r} is for {sidecar['num_classes']} classes but data set "
                         f"{p.dataset!r} has {C}; pick the matching checkpoint or data set")
    if not p.top_k <= C:
        raise ConfigError(f"--top-k must be in [1, {C}] (the data set has {C} classes); got {p.top_k}")

    # -- teacher ------------------------------------------------------------------------------------
    with torch.random.fork_rng(devices=[]):  # a checkpoint-less teacher is reproducible; the caller's RNG untouched
        torch.manual_seed(0)
        model = _models.build_model(arch, num_classes=C, in_channels=int(spec.in_channels),
                                    image_size=int(spec.image_size))
    ckpt_sha = _models.load_checkpoint(model, p.checkpoint) if p.checkpoint else None
    if ckpt_sha and sidecar.get("sha256") and sidecar["sha256"] != ckpt_sha:
        raise ModelError(f"the sidecar of checkpoint {p.checkpoint!r} describes another file (sha256 "
                         f"{str(sidecar['sha256'])[:12]}…, the checkpoint has {ckpt_sha[:12]}…); the checkpoint was "
                         f"replaced without its .json — retrain or restore the matching pair")
    if not p.checkpoint and ":" not in arch:  # a module:callable may bring its own weights
        log.warning("no --checkpoint: teacher %r runs with the weights its constructor gives it", arch)
    device = _models.resolve_device(p.device)
    amp = bool(p.amp and device.type == "cuda")
    model = model.to(device).eval()

    # -- store and engine ---------------------------------------------------------------------------
    V = max(1, p.views)
    augmenter = _augment.make_augmenter(AUGMENT_KIND, p.view_seed, int(spec.image_size)) if p.views else None
    ch = p.chunk_rows or _existing_chunk_rows(p.store) or default_chunk_rows(C)  # fp32-sized whatever the dtype,
    ch = max(V, ch - ch % V)  # so teachers of any dtype share a store; a chunk holds whole samples
    info = StoreInfo(
        task="classification", num_samples=N, num_views=V, num_rows=N * V, num_classes=C, chunk_rows=ch,
        dataset={"name": p.dataset, "split": p.split, "fingerprint": spec.fingerprint,
                 "transform": getattr(spec, "transform", None), "image_size": int(spec.image_size),
                 "in_channels": int(spec.in_channels), "size": len(spec.dataset),
                 "augment": AUGMENT_KIND if p.views else None, "view_seed": p.view_seed if p.views else None,
                 "root": str(p.root) if p.root else None,
                 "classes": list(getattr(spec, "class_names", ()) or []) or None},
        aug_param_names=tuple(augmenter.param_names) if augmenter is not None else ())
    provenance = {
        "teacher": arch, "checkpoint_sha256": ckpt_sha, "weights_sha256": weights_sha256(model),
        "num_classes": C, "amp": amp, "dataset_fingerprint": spec.fingerprint,
        "run": {"checkpoint": str(p.checkpoint) if p.checkpoint else None, "device": str(device),
                "batch_size": p.batch_size, "sidecar": sidecar},
    }
    settings = CacheSettings(
        store=p.store, name=name, top_k=p.top_k, temperatures=tuple(p.temperatures),
        logits_dtype=None if p.logits_dtype == "none" else p.logits_dtype, compress_logits=p.compress_logits,
        overwrite=p.overwrite, recache=p.recache, shard=p.shard, num_shards=p.num_shards, amp=amp,
        device_type=device.type, progress=p.progress, unit="sample")
    job = ImageJob(spec.dataset, labels, model, device, info, p.batch_size, augmenter, p.num_workers, amp, p.dataset)
    return _report(caching.cache(settings, info, provenance, job))


def _report(r: CacheReport) -> Report:
    """The stage report of one image caching run: the engine's numbers and the line `cache-logits` prints."""
    if not r.rows:
        state = "complete" if r.complete else "waiting for other shards"
        text = (f"teacher {r.name!r} in {r.store}: nothing left to cache ({state}); pass --overwrite to "
                f"re-cache it")
    else:
        text = (f"teacher {r.name!r}: {r.rows} rows cached in {r.seconds_loop:.1f} s "
                f"({r.rows / max(r.seconds_loop, 1e-9):.0f} rows/s){' (resumed)' if r.resumed else ''} -> {r.store}")
    return Report(SECTION, r.to_dict(), {"store": r.store}, text)
