"""Stage one: run a teacher once over a labelled image set and cache its logits in the logit store.

``run(CacheParams(...))`` adds one teacher to the store (creating the store on first use). Work goes
chunk by chunk, only over chunks not yet done, so running the same command after a crash resumes; every
batch of a chunk starts at the chunk's first row, so a resumed run computes exactly the same batches as an
uninterrupted one and the arrays come out bit-identical. A background writer thread writes finished
chunks while the teacher computes the next ones.

Views: ``views = 0`` caches the un-augmented image once per sample (one row per sample, ``view = 0``).
``views = V > 0`` caches V *augmented* views per sample (``crop-flip``, parameters from
``Augmenter.sample_params(sample_ids, v)`` for v in 0..V-1, stored in ``aug_params``); none of them is the
clean image — a student that trains on augmented images never sees the clean one, and a clean-image
teacher is a separate store (``views: 0``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from loca_pipe.pipeline.errors import (
    ConfigError,
    DataError,
    ModelError,
    NumericsError,
    StoreConflictError,
    StoreError,
)
from loca_pipe.pipeline.store import (
    LogitStore,
    StoreInfo,
    TeacherWriter,
    SMALL_OP_ELEMENTS,
    default_chunk_rows,
    io_guard,
    one_thread,
    summarize_logits,
)
from loca_pipe.pipeline import distributed as _dist
from loca_pipe.pipeline.distributed import WriterLease

log = logging.getLogger(__name__)

AUGMENT_KIND = "crop-flip"
SHARD_WAIT_SECONDS = 600.0  # how long shards > 0 wait for shard 0 to create the store and the teacher
# Timings of the last run() in this process (rows cached, loop and total seconds): for logs and benchmarks.
last_run: dict[str, Any] = {}
FP16_MAX = float(np.finfo(np.float16).max)


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
    shard: int | None = None  # this process caches chunks c with c % num_shards == shard (default: $RANK)
    num_shards: int | None = None  # processes sharing the work (default: $WORLD_SIZE, else 1)
    progress: bool = True


def load_params(params: dict[str, Any] | str | Path = "params.yaml", teacher_key: str | None = None,
                overrides: dict[str, Any] | None = None) -> list[CacheParams]:
    """Params of section ``cache``, one CacheParams per teacher.

    The section may hold ``teachers: {KEY: {per-teacher values}}``; each entry overrides the section's
    common values (its ``name`` defaults to KEY). ``teacher_key`` picks one entry. ``overrides`` (CLI
    options, None = unset) apply last, to every teacher.
    """
    from loca_pipe.stages.config import build, read_params

    if not isinstance(params, dict):
        params = read_params(params)
    section = dict(params.get("cache") or {})
    teachers = section.pop("teachers", None)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not teachers:
        if teacher_key is not None and over.get("name") is None:
            over["name"] = teacher_key
        return [build(CacheParams, {**section, **over}, "cache")]
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
        out.append(build(CacheParams, {**section, **entry, **over}, f"cache.teachers.{key}"))
    return out


# ----------------------------------------------------------------------------------------------------
# Resolution of the teacher and the data


def read_sidecar(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON sidecar (``<ckpt>.json``, or the checkpoint path with suffix .json), or {}."""
    ckpt = Path(checkpoint)
    for cand in (Path(str(ckpt) + ".json"), ckpt.with_suffix(".json")):
        if cand.is_file() and cand != ckpt:
            try:
                data = json.loads(cand.read_text())
            except json.JSONDecodeError as exc:
                raise ModelError(f"checkpoint sidecar {str(cand)!r} is not valid JSON ({exc}); fix or delete it") from exc
            if not isinstance(data, dict):
                raise ModelError(f"checkpoint sidecar {str(cand)!r} must hold a JSON object")
            return data
    return {}


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes): the teacher's numerical identity."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    _shard(p)


def _shard(p: CacheParams) -> tuple[int, int]:
    """(shard, num_shards): from the params, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    n = p.num_shards if p.num_shards is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    k = p.shard if p.shard is not None else int(os.environ.get("RANK", "0") or 0)
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"shard must be in [0, num_shards) with num_shards >= 1; got shard {k} of {n}")
    return k, n


def _open_for_writing(p: CacheParams, info: StoreInfo, name: str,
                      provenance: dict[str, Any]) -> tuple[LogitStore, TeacherWriter]:
    """Create or reopen the store and the teacher; --overwrite replaces only what conflicts."""
    with io_guard(p.store, "opening the store"):
        try:
            store = LogitStore.create_or_open(p.store, info, overwrite=False)
        except StoreConflictError:
            if not p.overwrite:
                raise
            log.warning("--overwrite: replacing store %s", p.store)
            store = LogitStore.create_or_open(p.store, info, overwrite=True)
    with io_guard(p.store, f"taking the writer lease of teacher {name!r}"):
        lease = WriterLease(p.store, name)
        lease.acquire()  # a second job writing this teacher refuses here (ranks of one job share the lease)
    with io_guard(p.store, f"creating teacher {name!r}"):
        args = (name, provenance, p.top_k, p.temperatures, None if p.logits_dtype == "none" else p.logits_dtype)
        try:  # an identical teacher is kept (and resumed)
            writer = store.begin_teacher(*args, compress_logits=p.compress_logits, overwrite=False)
        except StoreConflictError:
            if not p.overwrite:
                raise
            log.warning("--overwrite: replacing teacher %r in %s", name, p.store)
            writer = store.begin_teacher(*args, compress_logits=p.compress_logits, overwrite=True)
    return store, writer


def _existing_chunk_rows(path: str) -> int | None:
    """chunk_rows of the store already at ``path`` (a later teacher adopts it), else None."""
    try:
        return LogitStore.open(path).info.chunk_rows
    except (StoreError, OSError, KeyError):
        return None


def _teacher_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(f"the teacher must return a logits tensor (batch, classes); it returned {type(out).__name__}")


def _chunk_batches(info: StoreInfo, chunks: list[int], rows_per_batch: int) -> list[tuple[int, list[int]]]:
    """(chunk, sample indices) per forward pass; each chunk's batches start at its first sample."""
    V = info.num_views
    spb = max(1, rows_per_batch // V)  # samples per batch
    out = []
    for c in chunks:
        sl = info.chunk_slice(c)
        s0, s1 = sl.start // V, sl.stop // V  # chunk_rows is a multiple of V
        for b in range(s0, s1, spb):
            out.append((c, list(range(b, min(s1, b + spb)))))
    return out


def _batch_iter(dataset: Any, batches: list[list[int]], num_workers: int | None, pin: bool) -> Any:
    """(images, labels) per batch of sample indices, in order.

    In-memory data sets with a ``get_batch(indices)`` fast path (pipeline.data.TensorImageDataset) are
    indexed whole-batch in a prefetch thread; anything else goes through a DataLoader with workers.
    """
    fast = getattr(dataset, "get_batch", None)
    if not callable(fast):
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin)
    return _prefetch((fast(ids) for ids in batches), depth=2)


def _prefetch(it: Any, depth: int) -> Any:
    """Run iterator ``it`` in a background thread, ``depth`` items ahead (exceptions re-raised in order)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    t = threading.Thread(target=work, name="loca-pipe-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _Writer(threading.Thread):
    """Writes finished chunks (shared rows, then teacher arrays, then the done flag) off the compute thread."""

    def __init__(self, store: LogitStore, writer: TeacherWriter, depth: int = 2):
        super().__init__(name="loca-pipe-store-writer", daemon=True)
        self.store, self.writer = store, writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            c, rows, arrays = item
            try:
                with io_guard(self.store.path, f"writing chunk {c}"):
                    self.store.write_rows(c, **rows)
                    self.writer.write_chunk(c, arrays)
                self.written += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self.error = exc

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Let the queue drain (finished chunks are kept), then stop."""
        self.q.put(None)
        self.join()


# ----------------------------------------------------------------------------------------------------


def run(params: CacheParams) -> None:
    """Cache one teacher's logits for one data set split into ``params.store`` (resumable)."""
    from loca_pipe.pipeline import augment as _augment
    from loca_pipe.pipeline import data as _data
    from loca_pipe.pipeline import models as _models

    p = params
    t_start = time.perf_counter()
    last_run.clear()
    _validate(p)
    sidecar = read_sidecar(p.checkpoint) if p.checkpoint else {}
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

    # -- store --------------------------------------------------------------------------------------
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
    shard, num_shards = _shard(p)
    # under torchrun (MASTER_ADDR set, WORLD_SIZE > 1) the ranks join a process group: rank 0 creates the
    # store and teacher before a barrier, and finalises after one; without a group, shards poll the store.
    group = num_shards > 1 and p.shard is None and _dist.init_from_env(device.type)
    if group and _dist.world() != (shard, num_shards):
        group = False  # explicit --shard/--num-shards that differ from the group's ranks: poll instead
    if shard == 0:
        try:
            store, writer = _open_for_writing(p, info, name, provenance)
        finally:
            if group:
                _dist.barrier()  # the others open what rank 0 made (or fail fast if it failed)
    elif group:
        _dist.barrier()
        store, writer = _open_for_writing(replace(p, overwrite=False), info, name, provenance)
    else:  # shard 0 creates (or replaces) the store and the teacher; the others join what it made
        deadline = time.monotonic() + SHARD_WAIT_SECONDS
        while True:
            try:
                LogitStore.open(p.store)  # never create: StoreError while shard 0 has not made it yet
                if not LogitStore.open(p.store).teacher_attrs(name):
                    raise StoreError(f"teacher {name!r} is still being created")
                store, writer = _open_for_writing(replace(p, overwrite=False), info, name, provenance)
                break
            except StoreError as exc:  # absent, or still the old (conflicting) one shard 0 will replace
                if time.monotonic() > deadline:
                    raise StoreError(f"shard {shard} of {num_shards} waited {SHARD_WAIT_SECONDS:.0f} s for shard 0 "
                                     f"to create teacher {name!r} in {p.store!r} ({exc}); start shard 0 with the "
                                     f"same params") from exc
                time.sleep(0.5)
    pending = writer.pending_chunks()
    resumed = len(pending) < store.info.num_chunks
    pending = [c for c in pending if c % num_shards == shard]  # shards own disjoint, chunk-aligned row ranges
    last_run.update(name=name, store=p.store, rows=0, resumed=resumed)
    lease = WriterLease(p.store, name)
    if not pending and not group:
        with io_guard(p.store, "finalising"):
            complete = writer.finalize()
        if complete:
            lease.release()
        log.info("teacher %r in %s: nothing left for shard %d of %d%s", name, p.store, shard, num_shards,
                 "" if complete else " (other shards still running)")
        return
    t_loop = time.perf_counter()
    try:
        rows = _cache(p, spec, model, device, amp, augmenter, store, writer, pending, labels) if pending else 0
    except BaseException:
        if num_shards == 1:
            lease.release()  # one process: nobody else is writing; finished chunks stay done
        raise
    t_end = time.perf_counter()
    if group:
        _dist.barrier()  # every rank's chunks are written
    with io_guard(p.store, "finalising"):
        complete = writer.finalize() if (shard == 0 or not group) else writer.pending_chunks() == []
        if complete and (shard == 0 or not group):
            lease.release()  # the last shard to finish (rank 0 after the barrier) marks the teacher complete
    if group:
        _dist.barrier()  # nobody returns before the teacher is marked complete
    left = writer.pending_chunks()
    if not complete and (num_shards == 1 or any(c % num_shards == shard for c in left)):
        raise StoreError(f"teacher {name!r} still has chunks {left[:10]} pending after the run; run the same "
                         f"command again")
    last_run.update(rows=rows, seconds_loop=t_end - t_loop, seconds_total=time.perf_counter() - t_start)
    log.info("teacher %r: %d rows in %.1f s (%.0f rows/s) -> %s", name, rows, t_end - t_loop,
             rows / max(t_end - t_loop, 1e-9), p.store)


def _cache(p: CacheParams, spec: Any, model: torch.nn.Module, device: torch.device, amp: bool, augmenter: Any,
           store: LogitStore, writer: TeacherWriter, pending: list[int], labels: np.ndarray) -> int:
    from tqdm.auto import tqdm

    info = store.info
    V, C = info.num_views, info.num_classes
    batches = _chunk_batches(info, pending, p.batch_size)
    loader = _batch_iter(spec.dataset, [ids for _, ids in batches], p.num_workers, device.type == "cuda")
    temps = list(p.temperatures)
    keep_logits = p.logits_dtype != "none"
    bg = _Writer(store, writer)
    bg.start()
    acc: dict[str, list[np.ndarray]] = {}
    current = None
    total_rows = sum(info.chunk_slice(c).stop - info.chunk_slice(c).start for c in pending)
    bar = tqdm(total=total_rows, unit="sample", unit_scale=True, dynamic_ncols=True, disable=not p.progress,
               desc=f"cache {writer.name}")
    failed = True
    try:
        for (c, ids), (images, batch_labels) in zip(batches, loader):
            if current is not None and c != current:
                bg.put(_pack(current, acc, keep_logits))
                acc = {}
            current = c
            sid = np.asarray(ids, dtype=np.int64)
            y = torch.as_tensor(batch_labels).long()
            if not torch.equal(y, torch.from_numpy(labels[sid])):
                raise DataError(f"data set {p.dataset!r} returned labels for samples {sid[:5].tolist()}… that differ "
                                f"from its label list; the data set must be deterministic")
            x = images
            row_sid = np.repeat(sid, V)
            row_view = np.tile(np.arange(V, dtype=np.int16), len(sid))
            aug = None
            if augmenter is not None:
                per_view = [np.asarray(augmenter.sample_params(sid, v), dtype=np.float32) for v in range(V)]
                aug = np.stack(per_view, axis=1).reshape(len(sid) * V, -1)  # row = sample·V + view
                x = augmenter.apply(x.repeat_interleave(V, dim=0), torch.from_numpy(aug))
            y_rows = y.repeat_interleave(V)
            x = x.to(device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = _teacher_output(model(x))
            if out.ndim != 2 or out.shape != (x.shape[0], C):
                raise ModelError(f"teacher output must have shape (batch, classes) = ({x.shape[0]}, {C}); got "
                                 f"{tuple(out.shape)}; check --teacher and that the data set has {C} classes")
            s = summarize_logits(out, y_rows.to(out.device), p.top_k, temps, row_ids=torch.from_numpy(row_sid))
            with one_thread(out.device.type == "cpu" and out.numel() < SMALL_OP_ELEMENTS):
                z = out.float()
                if p.logits_dtype == "float16" and bool((z.abs() > FP16_MAX).any()):
                    bad = torch.nonzero((z.abs() > FP16_MAX).any(dim=1)).flatten().cpu().numpy()
                    raise NumericsError(f"logits of sample ids {np.unique(row_sid[bad])[:20].tolist()} exceed the "
                                        f"float16 range; cache with --logits-dtype float32")
                part = {k: v.cpu().numpy() for k, v in s.items()}
                if keep_logits:
                    part["logits"] = z.cpu().numpy()
            part["sample_id"], part["label"], part["view"] = row_sid, y_rows.numpy(), row_view
            if aug is not None:
                part["aug_params"] = aug
            for k, v in part.items():
                acc.setdefault(k, []).append(v)
            bar.update(len(row_sid))
        if current is not None:
            bg.put(_pack(current, acc, keep_logits))
        failed = False
    finally:
        bar.close()
        # finished chunks in the queue are still written, also when the compute side failed
        bg.close()
        if bg.error is not None and not failed:
            raise bg.error
    return total_rows


def _pack(c: int, acc: dict[str, list[np.ndarray]], keep_logits: bool) -> tuple[int, dict, dict]:
    cat = {k: np.concatenate(v) for k, v in acc.items()}
    rows = {"sample_id": cat.pop("sample_id"), "label": cat.pop("label"), "view": cat.pop("view"),
            "aug_params": cat.pop("aug_params", None)}
    return c, rows, cat
