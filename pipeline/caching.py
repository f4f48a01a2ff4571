"""The one caching engine: read-ahead → teacher forward → per-row summaries on the teacher's device →
background chunk writer → done flags → completion. Image and token caching are two uses of it.

A use supplies a :class:`Job`: ``batches(chunks)`` yields ``(chunk, item)`` in chunk order (each chunk's
batches start at its first row, so a resumed run computes exactly the batches an uninterrupted one does
and the arrays come out bit-identical), and ``forward(item)`` runs the teacher and returns a :class:`Batch`
(logits, labels, the shared row arrays, and which of its rows belong to the chunk). The engine does the
rest, the same way for both:

* opening: create or reopen the store and the teacher (``overwrite`` replaces what conflicts,
  ``recache`` also a complete identical teacher), the per-teacher writer lease, torchrun / ``--shard``
  coordination (shard 0 creates, the others join after a barrier or by polling the store);
* the loop: ``summarize_logits`` (top-k, logsumexp per τ, label logit) and Sparse Logit Sampling on the
  logits' device, one copy to the host per batch, whole chunks handed to a writer thread so the zarr
  writes overlap the next forward passes;
* completion: each chunk's arrays, then its done flag; the teacher is marked complete when every flag is
  set (and the job's own extra work, e.g. greedy responses, is done).

It takes its own :class:`CacheSettings` and imports nothing from ``stages/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch

from loca_pipe.pipeline import distributed as _dist
from loca_pipe.pipeline.codecs import get_codec
from loca_pipe.pipeline.distributed import WriterLease
from loca_pipe.pipeline.errors import ConfigError, DataError, ModelError, NumericsError, StoreConflictError, StoreError
from loca_pipe.pipeline.progress import progress_bar
from loca_pipe.pipeline.store import LogitStore, StoreInfo, TeacherWriter, io_guard
from loca_pipe.pipeline.threads import pin_threads
from loca_pipe.pipeline.threads import one_thread

log = logging.getLogger(__name__)

SHARD_WAIT_SECONDS = 600.0  # how long shards > 0 wait for shard 0 to create the store and the teacher
FP16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------------------------------
# Derived fields: one place computes everything the store keeps from a batch of logits (device-agnostic;
# the store itself never imports torch).


# Below this many elements a CPU op is cheaper on one thread: ATen still splits small reductions across
# its OpenMP threads, and on a loaded machine each split waits for a descheduled thread. Measured on the
# 2-core VM under load: summarize_logits on (256, 10) took ~20 ms with 2 threads, ~1.3 ms with 1.
SMALL_OP_ELEMENTS = 1 << 18
CPU_BLOCK_ELEMENTS = 1 << 22  # logits per row block of a large CPU batch (16 MB of fp32)


@torch.no_grad()
def summarize_logits(logits: torch.Tensor, labels: torch.Tensor, top_k: int,
                     temperatures: Iterable[float], row_ids: torch.Tensor | None = None,
                     amp: bool = False) -> dict[str, torch.Tensor]:
    """Everything the store keeps for a batch of teacher logits, computed on the logits' device.

    logits (B, C) any float dtype → computed in fp32. Returns top-k logits/ids (descending), lse (B, T) =
    logsumexp(z/τ_t), and the label's logit z_y. Raises NumericsError naming the offending rows (``row_ids``
    when given) if any logit is NaN or inf — an fp16 overflow is never written silently; ``amp`` says the
    logits came from fp16 autocast (then an overflow is the likely cause, else the teacher itself).
    """
    if logits.ndim != 2:
        raise StoreError(f"teacher output must be (batch, classes); got shape {tuple(logits.shape)}")
    temperatures = list(temperatures)
    small = logits.device.type == "cpu" and logits.numel() * max(1, len(temperatures)) < SMALL_OP_ELEMENTS
    if logits.device.type == "cpu" and logits.ndim == 2 and logits.numel() > 2 * CPU_BLOCK_ELEMENTS:
        # row blocks: each of the ~6 passes over a block then runs from cache, not DRAM. Measured on a
        # (768, 32000) batch, one thread: 0.26–0.31 s whole, 0.14–0.16 s in blocks of 128 rows
        rows = max(1, CPU_BLOCK_ELEMENTS // logits.shape[1])
        ids = row_ids if row_ids is not None else torch.arange(logits.shape[0])
        parts = [_summarize(logits[i:i + rows], labels[i:i + rows], top_k, temperatures, ids[i:i + rows], amp)
                 for i in range(0, logits.shape[0], rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with one_thread(small):
        return _summarize(logits, labels, top_k, temperatures, row_ids, amp)


def _summarize(logits: torch.Tensor, labels: torch.Tensor, top_k: int, temperatures: list[float],
               row_ids: torch.Tensor | None, amp: bool = False) -> dict[str, torch.Tensor]:
    z = logits.float()
    # one pass: a row sum is finite iff the row is (bar |z| ~ 1e34, re-checked on the flagged rows only);
    # a full isfinite() mask cost more than the teacher's lm_head at a 32k vocabulary (bench_lm)
    bad = ~torch.isfinite(z.sum(dim=1))
    if bool(bad.any()):
        bad[bad.clone()] = ~torch.isfinite(z[bad]).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        ids = (row_ids[idx] if row_ids is not None else idx).tolist()
        cause = ("this is usually an fp16 overflow — cache with autocast off (--no-amp) or fix the checkpoint"
                 if amp else "the teacher ran in full precision (no autocast), so its weights or inputs hold "
                             "NaN/inf — check the checkpoint (a diverged training run) and the input data")
        raise NumericsError(f"teacher produced NaN or inf logits for {len(ids)} row(s) {ids[:20]}"
                            f"{' …' if len(ids) > 20 else ''}; {cause}")
    C = z.shape[1]
    if not 1 <= top_k <= C:
        raise StoreError(f"top-k must be in [1, {C}] for a {C}-class teacher; got {top_k}")
    labels = labels.to(z.device).long()
    if bool(((labels < 0) | (labels >= C)).any()):
        raise StoreError(f"labels must lie in [0, {C}); got values {labels[(labels < 0) | (labels >= C)].unique().tolist()[:10]}")
    topv, topi = torch.topk(z, top_k, dim=1, largest=True, sorted=True)
    # lse_τ = m/τ + log Σ exp((z − m)/τ) with m the row max (= topv[:, 0]): per τ one fused scale-and-shift,
    # an in-place exp and a sum — no (B, T, C) tensor (it cost more than a 32k-vocabulary lm_head, bench_lm)
    m = topv[:, :1]
    parts = []
    for t in temperatures:
        e = torch.sub(z, m) if t == 1.0 else torch.add(-m / t, z, alpha=1.0 / t)  # (B, C), ≤ 0
        parts.append(m[:, 0] / t + torch.log(e.exp_().sum(dim=1)))
    lse = torch.stack(parts, dim=1)                                       # (B, T)
    label_logit = z.gather(1, labels.view(-1, 1)).squeeze(1)
    return {"topk_logits": topv, "topk_ids": topi, "lse": lse, "label_logit": label_logit}


@dataclass(frozen=True)
class CacheSettings:
    """What the engine needs to know about one teacher's cache (a stage builds it from its params)."""

    store: str
    name: str
    top_k: int
    temperatures: tuple[float, ...]
    logits_dtype: str | None = None      # full logits too ("float32" | "float16"), None: top-k only
    compress_logits: bool = False
    codec: str = "lossless"              # how top-k values and ids are stored (pipeline/codecs.py)
    sample_draws: int = 0                # Sparse Logit Sampling draws per row (0: off)
    sample_tau: float = 1.0
    sample_seed: int = 0
    overwrite: bool = False              # replace a conflicting store / teacher
    recache: bool = False                # also replace a complete teacher with identical settings
    shard: int | None = None             # default: $RANK
    num_shards: int | None = None        # default: $WORLD_SIZE, else 1
    max_chunks: int | None = None        # at most this many chunks in this call (time-sliced jobs)
    amp: bool = False                    # the teacher ran under fp16 autocast (names the likely cause of NaN)
    device_type: str = "cpu"             # picks the process-group back-end under torchrun
    progress: bool = True
    unit: str = "row"


@dataclass
class Batch:
    """One teacher forward: logits (B, C) on the teacher's device, labels (B,), shared row arrays (B, …).

    ``keep`` selects the rows that belong to the chunk (token batches cover whole sequences, which may
    straddle a chunk boundary): a slice or row indices; None keeps all. A ``row`` entry in ``rows`` (each
    row's index in the store) lets a job hand rows over in another order (length-bucketed token batches):
    each chunk is put back in ``row`` order before it is written.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    rows: dict[str, np.ndarray]
    keep: slice | np.ndarray | None = None

    @property
    def kept(self) -> int:
        if self.keep is None:
            return len(self.labels)
        return self.keep.stop - self.keep.start if isinstance(self.keep, slice) else len(self.keep)


class Job(Protocol):
    def batches(self, chunks: list[int]) -> Iterable[tuple[int, Any]]: ...
    def forward(self, item: Any) -> Batch: ...


@dataclass
class CacheReport:
    """What one call cached (``rows`` = 0 when there was nothing left to do)."""

    name: str
    store: str
    rows: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    resumed: bool = False
    complete: bool = False
    seconds_loop: float = 0.0
    seconds_forward: float = 0.0
    seconds_total: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | dict(self.extra)


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes): the teacher's numerical identity."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard, num_shards): as given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    n = num_shards if num_shards is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    k = shard if shard is not None else int(os.environ.get("RANK", "0") or 0)
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"shard must be in [0, num_shards) with num_shards >= 1; got shard {k} of {n}")
    return k, n


def chunk_batches(info: StoreInfo, chunks: list[int], rows_per_batch: int) -> list[tuple[int, list[int]]]:
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


def prefetch(it: Iterable[Any], depth: int) -> Iterator[Any]:
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


class _Worker(threading.Thread):
    """A pipeline stage in its own thread: ``handle(item)`` for each queued item, in order.

    An error is kept (and re-raised by the next ``put``); the queue keeps draining so the producer never
    blocks. ``close()`` lets the queue drain — finished chunks are kept — then stops.
    """

    def __init__(self, name: str, depth: int = 2):
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def handle(self, item: Any) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Called once after the last item (not after an error, here or upstream)."""

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            if self.error is not None:
                continue
            try:
                self.handle(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self.error = exc
        if self.error is None and self.do_flush:
            try:
                self.flush()
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

    inline = False  # True: ``put`` handles the item in the caller's thread (the thread is never started)
    do_flush = True

    def put(self, item: Any) -> None:
        if self.inline:
            self.handle(item)
            return
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self, flush: bool = True) -> None:
        if self.inline:
            if flush:
                self.flush()
            return
        if self.is_alive():
            self.do_flush = flush  # after a failure upstream the last, partial chunk is dropped
            self.q.put(None)
            self.join()


class ChunkWriter(_Worker):
    """Writes finished chunks (shared rows, then teacher arrays, then the done flag) off the compute thread."""

    def __init__(self, store: LogitStore, writer: TeacherWriter, depth: int = 2):
        super().__init__("loca-pipe-store-writer", depth)
        self.store, self.writer = store, writer
        self.written = 0

    def handle(self, item: Any) -> None:
        c, rows, arrays = item
        with io_guard(self.store.path, f"writing chunk {c}"):
            self.store.write_rows(c, **rows)
            self.writer.write_chunk(c, arrays)
        self.written += 1


class Summarizer(_Worker):
    """Per-row summaries of each forward's logits, on their device, while the teacher runs the next batch.

    Gathers a chunk's rows and hands the whole chunk to ``out`` (a ChunkWriter). On a CPU teacher it runs
    on its own intra-op thread(s) — half of torch's, at least one — so the forward keeps the rest; torch's
    thread count is per thread, so the forward's setting is untouched.
    """

    def __init__(self, s: CacheSettings, num_classes: int, out: ChunkWriter, threads: int):
        super().__init__("loca-pipe-summarizer", depth=2)
        self.s, self.C, self.out, self.threads = s, num_classes, out, threads
        self.acc: dict[str, list[np.ndarray]] = {}
        self.current: int | None = None
        self.gen: torch.Generator | None = None

    def run(self) -> None:
        pin_threads(self.threads)  # this thread's intra-op count (pipeline/threads.py)
        super().run()

    def handle(self, item: tuple[int, Batch]) -> None:
        c, b = item
        s = self.s
        if c != self.current:
            if self.current is not None:
                self.out.put(_pack(self.current, self.acc))
            self.acc, self.current, self.gen = {}, c, None
        z = b.logits
        sid = b.rows.get("sample_id")
        out = summarize_logits(z, b.labels.to(z.device), s.top_k, s.temperatures, amp=s.amp,
                               row_ids=torch.from_numpy(sid) if sid is not None else None)
        if s.sample_draws:
            if self.gen is None:  # one generator per chunk, consumed batch by batch: resume draws the same
                self.gen = _chunk_generator(s.sample_seed, c, z.device)
            out.update(sample_sparse(z, s.sample_draws, s.sample_tau, self.gen))
        with one_thread(z.device.type == "cpu" and z.numel() < SMALL_OP_ELEMENTS):
            if s.logits_dtype == "float16" and bool((z.float().abs() > FP16_MAX).any()):
                bad = torch.nonzero((z.float().abs() > FP16_MAX).any(dim=1)).flatten().cpu().numpy()
                ids = np.unique(sid[bad])[:20].tolist() if sid is not None else bad[:20].tolist()
                raise NumericsError(f"logits of sample ids {ids} exceed the float16 range; cache with "
                                    f"--logits-dtype float32")
            if s.logits_dtype:
                out["logits"] = z.float()
            part = {k: v.cpu().numpy() for k, v in out.items()}  # the one host copy of the batch
        part.update(b.rows)
        part["label"] = b.labels.cpu().numpy()
        if b.keep is not None:
            part = {k: v[b.keep] for k, v in part.items()}
        for k, v in part.items():
            self.acc.setdefault(k, []).append(v)

    def flush(self) -> None:
        if self.current is not None:
            self.out.put(_pack(self.current, self.acc))


# ----------------------------------------------------------------------------------------------------
# Sparse Logit Sampling, vectorised on the logits' device


def sample_sparse(logits: torch.Tensor, draws: int, tau: float, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Sparse Logit Sampling (Anshumann et al. 2025): ``draws`` ids from p = softmax(z/τ) with replacement.

    Returns ``sampled_ids`` (R, S) int32 — the distinct ids drawn, most drawn first (ties: smaller id
    first) — and ``sampled_counts`` (R, S) int32 counts; unused slots id -1 / count 0.
    ``counts / draws`` is an unbiased estimate of p. No per-row Python: one multinomial over the batch,
    then runs of equal ids found by a sort of the whole (R, S) block. ``generator`` must live on the
    logits' device; the same generator state gives the same draws.
    """
    R, S = logits.shape[0], int(draws)
    p = torch.softmax(logits.float() / tau, dim=-1)
    idx = torch.multinomial(p, S, replacement=True, generator=generator)             # (R, S)
    srt = torch.sort(idx, dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]                                           # a run of one id starts
    slot = torch.cumsum(new.long(), dim=1) - 1                                       # run number per draw
    counts = torch.zeros((R, S), dtype=torch.long, device=srt.device).scatter_add_(1, slot, torch.ones_like(slot))
    ids = torch.full((R, S), -1, dtype=torch.long, device=srt.device).scatter_(1, slot, srt)
    V = logits.shape[1]
    key = torch.where(counts > 0, -counts * (V + 1) + ids, torch.full_like(ids, 1 << 62))  # most drawn, then id
    order = torch.argsort(key, dim=1)
    return {"sampled_ids": ids.gather(1, order).to(torch.int32),
            "sampled_counts": counts.gather(1, order).to(torch.int32)}


def _chunk_generator(seed: int, c: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + c)


# ----------------------------------------------------------------------------------------------------


def open_for_writing(s: CacheSettings, info: StoreInfo, provenance: dict[str, Any],
                     extra_dims: dict[str, dict[str, int]] | None = None,
                     on_store: Any = None) -> tuple[LogitStore, TeacherWriter]:
    """Create or reopen the store and the teacher; ``overwrite`` replaces only what conflicts, ``recache``
    also a complete teacher. ``on_store(store)`` runs before the teacher exists (store-level arrays)."""
    with io_guard(s.store, "opening the store"):
        try:
            store = LogitStore.create_or_open(s.store, info, overwrite=False)
        except StoreConflictError:
            if not s.overwrite:
                raise
            log.warning("--overwrite: replacing store %s", s.store)
            store = LogitStore.create_or_open(s.store, info, overwrite=True)
    if store.info.task != info.task:
        raise StoreError(f"store {s.store!r} is a {store.info.task!r} store; this run writes {info.task!r}")
    lease = WriterLease(s.store, s.name)
    with io_guard(s.store, f"taking the writer lease of teacher {s.name!r}"):
        lease.acquire()  # a second job refuses here (ranks of one job share the lease)
    try:
        return _open_teacher(s, store, provenance, extra_dims, on_store)
    except BaseException:
        lease.release()  # refused (conflict, another codec, bad settings): leave no lease behind
        raise


def _open_teacher(s: CacheSettings, store: LogitStore, provenance: dict[str, Any],
                  extra_dims: dict[str, dict[str, int]] | None, on_store: Any) -> tuple[LogitStore, TeacherWriter]:
    with io_guard(s.store, f"creating teacher {s.name!r}"):
        if on_store is not None:
            on_store(store)
        args = (s.name, provenance, s.top_k, s.temperatures, s.logits_dtype)
        kw = dict(compress_logits=s.compress_logits, codec=s.codec, extra_dims=(extra_dims or {}).get("dims"),
                  extra_chunks=(extra_dims or {}).get("chunks"))
        if s.recache and s.name in store.teachers and store.is_complete(s.name):
            log.warning("--overwrite: re-caching complete teacher %r in %s", s.name, s.store)
            return store, store.begin_teacher(*args, overwrite=True, **kw)
        try:  # an identical teacher is kept (and resumed)
            writer = store.begin_teacher(*args, overwrite=False, **kw)
        except StoreConflictError:
            if not s.overwrite:
                raise
            log.warning("--overwrite: replacing teacher %r in %s", s.name, s.store)
            writer = store.begin_teacher(*args, overwrite=True, **kw)
    return store, writer


def _open_sharded(s: CacheSettings, info: StoreInfo, provenance: dict[str, Any], shard: int, num_shards: int,
                  group: bool, **kw: Any) -> tuple[LogitStore, TeacherWriter]:
    """Shard 0 creates (or replaces) the store and the teacher; the others join what it made."""
    joiner = replace(s, overwrite=False, recache=False)
    if shard == 0:
        try:
            return open_for_writing(s, info, provenance, **kw)
        finally:
            if group:
                _dist.barrier()  # the others open what rank 0 made (or fail fast if it failed)
    if group:
        _dist.barrier()
        return open_for_writing(joiner, info, provenance, **kw)
    deadline = time.monotonic() + SHARD_WAIT_SECONDS
    while True:  # without a process group: poll the store until shard 0 has made the teacher
        try:
            if not LogitStore.open(s.store).teacher_attrs(s.name):  # StoreError while absent
                raise StoreError(f"teacher {s.name!r} is still being created")
            return open_for_writing(joiner, info, provenance, **kw)
        except StoreError as exc:  # absent, or still the old (conflicting) one shard 0 will replace
            if time.monotonic() > deadline:
                raise StoreError(f"shard {shard} of {num_shards} waited {SHARD_WAIT_SECONDS:.0f} s for shard 0 "
                                 f"to create teacher {s.name!r} in {s.store!r} ({exc}); start shard 0 with the "
                                 f"same params") from exc
            time.sleep(0.5)


def cache(s: CacheSettings, info: StoreInfo, provenance: dict[str, Any], job: Job, *,
          extra_dims: dict[str, dict[str, int]] | None = None, on_store: Any = None,
          finish: Any = None) -> CacheReport:
    """Cache one teacher into ``s.store`` (resumable, shardable); returns what this call did.

    ``finish(writer, shard, num_shards) -> bool`` (optional) does the job's work outside the row chunks
    after them and says whether it is all done; the teacher is complete only then. ``extra_dims``
    ``{"dims": {dimension: size}, "chunks": {dimension: chunk length}}`` sizes the job's own dimensions, so the
    store's table (pipeline/layout.py) creates the arrays that have them (a token store's sampled and greedy ids).
    """
    t_start = time.perf_counter()
    codec = get_codec(s.codec)
    codec.check(info.num_classes, s.top_k)
    if s.sample_draws:
        provenance = {**provenance, "sample_draws": int(s.sample_draws), "sample_tau": float(s.sample_tau),
                      "sample_seed": int(s.sample_seed)}
    shard, num_shards = resolve_shard(s.shard, s.num_shards)
    # under torchrun (MASTER_ADDR set, WORLD_SIZE > 1) the ranks join a process group: rank 0 creates the
    # store and teacher before a barrier, and finalises after one; without a group, shards poll the store.
    group = num_shards > 1 and s.shard is None and _dist.init_from_env(s.device_type)
    if group and _dist.world() != (shard, num_shards):
        group = False  # explicit shards that differ from the group's ranks: poll instead
    kw = dict(extra_dims=extra_dims, on_store=on_store)
    store, writer = _open_sharded(s, info, provenance, shard, num_shards, group, **kw)
    lease = WriterLease(s.store, s.name)
    pending = writer.pending_chunks()
    rep = CacheReport(name=s.name, store=s.store, resumed=len(pending) < store.info.num_chunks,
                      chunks_skipped=store.info.num_chunks - len(pending))
    todo = [c for c in pending if c % num_shards == shard]  # shards own disjoint, chunk-aligned row ranges
    if s.max_chunks is not None:
        todo = todo[:s.max_chunks]
    t_loop = time.perf_counter()
    try:
        if todo:
            rep.rows, rep.seconds_forward = _loop(s, store, writer, job, todo)
            rep.chunks_written = len(todo)
        rep.seconds_loop = time.perf_counter() - t_loop
        extra_ok = finish(writer, shard, num_shards) if finish is not None else True
    except BaseException:
        if num_shards == 1:
            lease.release()  # one process: nobody else is writing; finished chunks stay done
        raise
    if group:
        _dist.barrier()  # every rank's chunks are written
    with io_guard(s.store, "finalising"):
        if shard == 0 or not group:  # the last shard to finish (rank 0 after the barrier) marks it complete
            rep.complete = bool(extra_ok) and writer.finalize()
        else:
            rep.complete = not writer.pending_chunks()
        if num_shards == 1 or (rep.complete and (shard == 0 or not group)):
            lease.release()
    if group:
        _dist.barrier()  # nobody returns before the teacher is marked complete
    left = writer.pending_chunks()
    if s.max_chunks is None and not rep.complete and extra_ok and \
            (num_shards == 1 or any(c % num_shards == shard for c in left)):
        raise StoreError(f"teacher {s.name!r} still has chunks {left[:10]} pending after the run; run the same "
                         f"command again")
    rep.seconds_total = time.perf_counter() - t_start
    if rep.rows:
        log.info("teacher %r: %d rows in %.1f s (%.0f rows/s) -> %s", s.name, rep.rows, rep.seconds_loop,
                 rep.rows / max(rep.seconds_loop, 1e-9), s.store)
    else:
        log.info("teacher %r in %s: nothing left for shard %d of %d%s", s.name, s.store, shard, num_shards,
                 "" if rep.complete else " (other shards still running)")
    return rep


def _loop(s: CacheSettings, store: LogitStore, writer: TeacherWriter, job: Job, todo: list[int]) -> tuple[int, float]:
    """The chunk loop: forward here; summaries, host copies and chunk assembly in a Summarizer thread; zarr
    writes in a ChunkWriter thread — so the teacher's next forward overlaps both."""
    info = store.info
    total_rows = sum(info.chunk_slice(c).stop - info.chunk_slice(c).start for c in todo)
    bg = ChunkWriter(store, writer)
    sm = Summarizer(s, info.num_classes, bg, threads=max(1, torch.get_num_threads() // 2))
    bg.start()
    fwd_seconds, failed = 0.0, True
    bar = progress_bar(total=total_rows, desc=f"cache {s.name}", unit=s.unit, enabled=s.progress)
    try:
        for c, item in job.batches(todo):
            t0 = time.perf_counter()
            b = job.forward(item)
            fwd_seconds += time.perf_counter() - t0
            z = b.logits
            if z.ndim != 2 or z.shape[1] != info.num_classes:
                raise ModelError(f"teacher output must have shape (batch, classes) = ({z.shape[0]}, "
                                 f"{info.num_classes}); got {tuple(z.shape)}; check the teacher and that the data "
                                 f"has {info.num_classes} classes")
            if not sm.is_alive() and not sm.inline:
                # a small CPU batch (an image classifier's (256, 10)) is summarised in ~1 ms: handing it to a
                # thread costs more (GIL hand-offs against the forward's Python) than doing it here
                sm.inline = z.device.type == "cpu" and z.numel() < SMALL_OP_ELEMENTS
                if not sm.inline:
                    sm.start()
            sm.put((c, b))
            bar.update(b.kept)
        failed = False
    finally:
        bar.close()
        sm.close(flush=not failed)  # summarise what was handed over; whole chunks go on to the writer
        bg.close()  # finished chunks in the queue are still written, also when the compute side failed
        for err in (sm.error, bg.error):
            if err is not None and not failed:
                raise err
    return total_rows, fwd_seconds


def _pack(c: int, acc: dict[str, list[np.ndarray]]) -> tuple[int, dict, dict]:
    cat = {k: np.concatenate(v) for k, v in acc.items()}
    if "row" in cat:  # rows handed over out of order (Batch.rows["row"]): back to the store's order
        order = np.argsort(cat.pop("row"), kind="stable")
        cat = {k: v[order] for k, v in cat.items()}
    n = len(cat["label"])
    rows = {"sample_id": cat.pop("sample_id"), "label": cat.pop("label"),
            "view": cat.pop("view", np.zeros(n, np.int16)), "aug_params": cat.pop("aug_params", None)}
    return c, rows, cat


# ----------------------------------------------------------------------------------------------------
# The image use: (samples × views) rows of a labelled image data set


@dataclass
class ImageJob:
    """Batches of whole samples (× V augmented views) from a data set, through ``model`` on ``device``."""

    dataset: Any
    labels: np.ndarray                 # (N,) the data set's label list (each batch is checked against it)
    model: torch.nn.Module
    device: torch.device
    info: StoreInfo
    batch_size: int
    augmenter: Any = None              # views > 0: crop-flip parameters per (sample, view)
    num_workers: int | None = None
    amp: bool = False
    name: str = "data set"

    def batches(self, chunks: list[int]) -> Iterator[tuple[int, Any]]:
        idx = chunk_batches(self.info, chunks, self.batch_size)
        loader = image_batches(self.dataset, [ids for _, ids in idx], self.num_workers, self.device.type == "cuda")
        for (c, ids), (images, labels) in zip(idx, loader):
            yield c, (ids, images, labels)

    def forward(self, item: Any) -> Batch:
        ids, images, batch_labels = item
        V = self.info.num_views
        sid = np.asarray(ids, dtype=np.int64)
        y = torch.as_tensor(batch_labels).long()
        if not torch.equal(y, torch.from_numpy(self.labels[sid])):
            raise DataError(f"data set {self.name!r} returned labels for samples {sid[:5].tolist()}… that differ "
                            f"from its label list; the data set must be deterministic")
        rows = {"sample_id": np.repeat(sid, V), "view": np.tile(np.arange(V, dtype=np.int16), len(sid))}
        x = images
        if self.augmenter is not None:
            per_view = [np.asarray(self.augmenter.sample_params(sid, v), dtype=np.float32) for v in range(V)]
            rows["aug_params"] = np.stack(per_view, axis=1).reshape(len(sid) * V, -1)  # row = sample·V + view
            x = self.augmenter.apply(x.repeat_interleave(V, dim=0), torch.from_numpy(rows["aug_params"]))
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = teacher_output(self.model(x))
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ModelError(f"teacher output must have shape (batch, classes) = ({x.shape[0]}, "
                             f"{self.info.num_classes}); got {tuple(out.shape)}")
        return Batch(out, y.repeat_interleave(V), rows)


def teacher_output(out: Any) -> torch.Tensor:
    """The logits tensor of a model's output (a tensor, or an object with ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(f"the teacher must return a logits tensor (batch, classes); it returned {type(out).__name__}")


def image_batches(dataset: Any, batches: list[list[int]], num_workers: int | None, pin: bool) -> Any:
    """(images, labels) per batch of sample indices, in order.

    In-memory data sets with a ``get_batch(indices)`` fast path (pipeline.data.TensorImageDataset) are
    indexed whole-batch in a prefetch thread; anything else goes through a DataLoader with workers.
    """
    fast = getattr(dataset, "get_batch", None)
    if not callable(fast):
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin)
    return prefetch((fast(ids) for ids in batches), depth=2)


__all__ = ["ImageJob", "image_batches", "teacher_output", "CacheSettings", "CacheReport", "Batch", "Job", "cache", "open_for_writing", "chunk_batches", "prefetch",
           "ChunkWriter", "Summarizer", "sample_sparse", "resolve_shard", "weights_sha256", "SHARD_WAIT_SECONDS"]
