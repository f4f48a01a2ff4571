"""Teacher soft labels for student training, read from a logit store or a targets store.

A :class:`SoftLabels` holds one teacher's cached signal for every store row and hands the training loop
batches of ``(data-set indices, augmentation parameters, teacher tensors)`` in a seeded order:

* **full logits** → ``teacher_logits`` (exact at any τ);
* **top-k only** → ``teacher_sparse``, a :class:`~loca_pipe.pipeline.calibration.SparseDist` built exactly
  from the raw top-k logits, logsumexp(z/τ) and the label's logit (``sparse_from_topk``);
* **targets store** (``loca-pipe calibrate``) → ``teacher_probs``: tempered, possibly LoCa-calibrated
  probabilities at the τ they were built for; the student then trains with method ``kd`` on them.

Rows are joined to the data set by the store's ``sample_id`` array, after checking the store's data
fingerprint against the data set's and its labels against the data set's labels. Views: when the store
caches V augmented views, epoch ``e`` trains on view ``e mod V`` of every sample (``view_policy="cycle"``)
or on a seeded random view per sample (``"random"``), and the batch carries that row's stored
augmentation parameters so the trainer replays exactly the pixels the teacher saw
(``Augmenter.apply``).

Memory: everything is loaded into one tensor per array when it fits under ``memory_limit_bytes``
(Fashion-MNIST's 60k×10 fp32 logits are 2.4 MB; ImageNet's 1.28M×1000 fp16 are 2.6 GB). A store larger
than that is streamed: each epoch visits the store's chunks in a seeded random order, ``buffer_chunks``
chunks at a time, shuffles the rows inside that buffer and yields batches from it (leftover rows carry
over to the next buffer, so every row of the epoch's view is seen exactly once per epoch). This is the
usual chunk-granular shuffle: the order is less random than a global permutation (rows of one buffer
train together), which is the price of reading whole chunks instead of one chunk per row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from loca_pipe.pipeline.errors import ConfigError, DataError, IncompleteStoreError, StoreError

log = logging.getLogger(__name__)

from loca_pipe.pipeline.names import SOFT_LABEL_FORMS as FORMS
from loca_pipe.pipeline.names import VIEW_POLICIES
from loca_pipe.pipeline.store.format import default_chunk_rows
DEFAULT_MEMORY_LIMIT = 4 << 30


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, salt): any resume replays the same order."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch ``epoch``: a permutation of range(n), a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


class BlockOrder:
    """The streamed order of an epoch over ``n`` sample positions (data-set order): blocks of ``block_rows``
    consecutive positions visited in a seeded random order, ``buffer_blocks`` blocks at a time, the positions
    of each such buffer shuffled — the usual chunk-granular shuffle, defined on the data set instead of on a
    store, so a method with no store (CE) follows it exactly as a streamed store does (:func:`run_order`).
    A pure function of (seed, epoch): any resume replays it."""

    def __init__(self, block_rows: int, buffer_blocks: int = 8):
        self.block_rows, self.buffer_blocks = max(1, int(block_rows)), max(1, int(buffer_blocks))

    def __call__(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        n_blocks = max(1, math.ceil(n / self.block_rows))
        blocks = torch.randperm(n_blocks, generator=epoch_generator(seed, epoch, 2)).tolist()
        gen = epoch_generator(seed, epoch, 3)
        out = []
        for g in range(0, n_blocks, self.buffer_blocks):
            pos = torch.cat([torch.arange(b * self.block_rows, min(n, (b + 1) * self.block_rows))
                             for b in sorted(blocks[g:g + self.buffer_blocks])])
            out.append(pos[torch.randperm(pos.numel(), generator=gen)])
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"BlockOrder(block_rows={self.block_rows}, buffer_blocks={self.buffer_blocks})"


def run_order(num_samples: int, num_classes: int, memory_limit_bytes: int,
              buffer_blocks: int = 8) -> Callable[[int, int, int], torch.Tensor]:
    """The data order every method of a run uses, from what every method knows (never from one method's
    store): :func:`epoch_permutation` (the in-memory order) when the data set's full fp32 logits
    (``num_samples × num_classes × 4`` bytes) fit ``memory_limit_bytes``, else a :class:`BlockOrder` whose
    blocks are the rows of a default store chunk for ``num_classes`` (``store.format.default_chunk_rows``),
    so a streamed store reads each chunk once per epoch. CE, KD and LoCa of one seed and one memory limit
    therefore see the same samples in the same order in both modes (``data_order`` in metrics.json)."""
    if int(num_samples) * int(num_classes) * 4 <= int(memory_limit_bytes):
        return epoch_permutation
    return BlockOrder(default_chunk_rows(int(num_classes)), buffer_blocks)


def numpy_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The teachers' training order (``train-teacher``): numpy's permutation of range(n) drawn from
    ``default_rng([seed, epoch])``. A second order function only because teacher checkpoints stay
    bit-identical to the ones written before the teachers trained through :func:`training.train_student`."""
    return torch.from_numpy(np.random.default_rng([int(seed), int(epoch)]).permutation(int(n)))


def random_view(sample_id: torch.Tensor, seed: int, epoch: int, num_views: int) -> torch.Tensor:
    """The view a sample trains on in ``epoch`` under the random policy: a hash of (sample id, seed, epoch),
    so the in-memory and the streamed reader pick the same view and a resume picks it again."""
    x = sample_id.long() * 1_000_003 + int(epoch) * 7_919 + int(seed) * 104_729
    for _ in range(2):  # integer mixing (wraps mod 2^64, which torch does silently)
        x = x ^ (x >> 16)
        x = x * 73_244_475
    x = x ^ (x >> 16)
    return x.abs() % int(num_views)


@dataclass
class Batch:
    """One training batch: data-set indices, the view's augmentation parameters, the teacher tensors."""

    sample_index: torch.Tensor                 # (B,) int64 indices into the data set
    aug_params: torch.Tensor | None = None     # (B, P) float32, replayed with Augmenter.apply
    teacher: dict[str, Any] = field(default_factory=dict)  # keyword arguments of compute_loss
    rows: torch.Tensor | None = None           # (B,) store rows (None without a store)
    inputs: torch.Tensor | None = None         # (B, C, H, W) what the student saw; set by the trainer


class PlainSource:
    """Batches of data-set indices with no teacher signal (CE, or online KD with a live teacher)."""

    def __init__(self, num_samples: int, order: Callable[[int, int, int], torch.Tensor] = epoch_permutation):
        self.num_samples = int(num_samples)
        self.sample_index = torch.arange(self.num_samples)
        self.order = order  # (n, seed, epoch) → the epoch's data-set indices in training order

    def __len__(self) -> int:
        return self.num_samples

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[Batch]:
        perm = self.order(self.num_samples, seed, epoch)
        for i in range(0, self.num_samples, batch_size):
            yield Batch(sample_index=perm[i:i + batch_size])


class TensorSource:
    """Teacher logits held in memory as one (N, C) tensor indexed by data-set index — the floor any offline
    reader is measured against (benchmarks), and a way to train from logits computed elsewhere."""

    def __init__(self, logits: torch.Tensor, order: Callable[[int, int, int], torch.Tensor] = epoch_permutation):
        self.logits = logits
        self.num_samples = int(logits.shape[0])
        self.order = order

    def __len__(self) -> int:
        return self.num_samples

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[Batch]:
        perm = self.order(self.num_samples, seed, epoch)
        for i in range(0, self.num_samples, batch_size):
            idx = perm[i:i + batch_size]
            yield Batch(sample_index=idx, teacher={"teacher_logits": self.logits[idx].float()})


# ----------------------------------------------------------------------------------------------------


def _sparse_from_topk(*args: Any, **kwargs: Any) -> Any:
    from loca_pipe.pipeline.calibration import sparse_from_topk

    return sparse_from_topk(*args, **kwargs)


class SoftLabels:
    """One teacher's cached signal joined to a data set; yields :class:`Batch` es in a seeded order.

    Build it with :func:`load_soft_labels` (logit store) or :func:`load_targets` (targets store).
    ``arrays`` maps names to (R, ...) numpy/zarr arrays; ``kind`` says how a batch becomes loss inputs.
    """

    def __init__(self, *, source: str, teacher: str, kind: str, num_classes: int, num_views: int,
                 sample_id: np.ndarray, label: np.ndarray, view: np.ndarray, aug_params: Any,
                 arrays: dict[str, Any], chunk_rows: int, tau: float, tau_index: int = 0,
                 memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT, buffer_chunks: int = 8,
                 view_policy: str = "cycle", meta: dict[str, Any] | None = None,
                 order: Callable[[int, int, int], torch.Tensor] | None = None):
        if view_policy not in VIEW_POLICIES:
            raise ConfigError(f"view policy must be one of {list(VIEW_POLICIES)}; got {view_policy!r}")
        self.source, self.teacher, self.kind = source, teacher, kind
        self.num_classes, self.num_views = int(num_classes), int(num_views)
        self.tau, self.tau_index = float(tau), int(tau_index)
        self.chunk_rows = int(chunk_rows)
        self.view_policy = view_policy
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.meta = dict(meta or {})
        self.sample_id = torch.from_numpy(np.asarray(sample_id, np.int64))
        self.label = torch.from_numpy(np.asarray(label, np.int64))
        self.view = torch.from_numpy(np.asarray(view, np.int64))
        self.num_rows = int(self.sample_id.shape[0])
        self._aug_src = aug_params
        self._src = arrays
        self.nbytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())
        if aug_params is not None:
            self.nbytes += int(np.prod(aug_params.shape)) * 4
        self.in_memory = self.nbytes <= memory_limit_bytes
        self.rows_of_view = [torch.nonzero(self.view == v).flatten() for v in range(self.num_views)]
        self.num_samples = int(self.rows_of_view[0].numel()) if self.num_views else 0
        for v, r in enumerate(self.rows_of_view):
            if r.numel() != self.num_samples:
                raise StoreError(f"{source!r}: view {v} has {r.numel()} rows but view 0 has {self.num_samples}; "
                                 f"the store's view array is inconsistent — re-cache it")
        if self.in_memory:
            self.tensors = {k: torch.from_numpy(np.ascontiguousarray(a[...])) for k, a in arrays.items()}
            self.aug = (torch.from_numpy(np.asarray(aug_params[...], np.float32))
                        if aug_params is not None else None)
        else:
            self.tensors, self.aug = {}, None
            log.info("%s: %.1f GB of teacher signal exceeds the memory limit; streaming with a %d-chunk "
                     "shuffle buffer", source, self.nbytes / 1e9, self.buffer_chunks)
        # (S, V) table: row of sample position s (order of view 0) in view v; used by the random policy
        if self.num_views > 1:
            order0 = self.sample_id[self.rows_of_view[0]]
            table = torch.empty(self.num_samples, self.num_views, dtype=torch.int64)
            pos = torch.full((int(self.sample_id.max()) + 1,), -1, dtype=torch.int64)
            pos[order0] = torch.arange(self.num_samples)
            for v, rows in enumerate(self.rows_of_view):
                p = pos[self.sample_id[rows]]
                if bool((p < 0).any()):
                    raise StoreError(f"{source!r}: view {v} holds samples that view 0 does not; re-cache the store")
                table[p, v] = rows
            self.row_table = table
        else:
            self.row_table = self.rows_of_view[0].view(-1, 1) if self.num_views else torch.empty(0, 1)
        # the same table by sample position in data-set order (sample ids ascending): an order's position p
        # is the p-th smallest sample id, whichever order the store's rows are in (identity for a store
        # written in data-set order, so the in-memory order is unchanged there)
        by_id = torch.argsort(self.sample_id[self.row_table[:, 0]], stable=True) if self.num_views else \
            torch.empty(0, dtype=torch.int64)
        self.pos_rows = self.row_table[by_id]
        self.pos_sid = self.sample_id[self.pos_rows[:, 0]] if self.num_views else torch.empty(0, dtype=torch.int64)
        # the epoch order: given (the run's, :func:`run_order`), else the in-memory permutation or, streamed,
        # the block order over this store's chunks
        self.order = order or (epoch_permutation if self.in_memory else BlockOrder(self.chunk_rows, self.buffer_chunks))
        if not self.in_memory and self.order is epoch_permutation:
            log.warning("%s: streamed in a global permutation order (the run's order): every buffer reads most "
                        "chunks; raise memory_limit_gb to hold this teacher signal", source)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def has_views(self) -> bool:
        return self._aug_src is not None

    def view_for_epoch(self, epoch: int) -> int:
        """The view the cycle policy trains on in ``epoch`` (views cycle: e mod V)."""
        return int(epoch) % self.num_views

    # -- epoch order ----------------------------------------------------------------------------------
    def epoch_rows(self, epoch: int, seed: int) -> torch.Tensor:
        """Store rows of epoch ``epoch`` in training order: one row per sample, the samples in ``self.order``."""
        pos = self.order(self.num_samples, seed, epoch)
        if self.view_policy == "random" and self.num_views > 1:
            v = random_view(self.pos_sid[pos], seed, epoch, self.num_views)
            return self.pos_rows[pos, v]
        return self.pos_rows[pos, self.view_for_epoch(epoch)]

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """Batches of epoch ``epoch`` (every sample once, in one of its views)."""
        rows = self.epoch_rows(epoch, seed)
        if self.in_memory:
            for i in range(0, rows.numel(), batch_size):
                yield self._batch(rows[i:i + batch_size], self.tensors, self.aug, offset=None)
        else:
            yield from self._stream(rows, batch_size)

    def _batch(self, rows: torch.Tensor, tensors: dict[str, torch.Tensor], aug: torch.Tensor | None,
               offset: torch.Tensor | None) -> Batch:
        local = rows if offset is None else offset
        t = {k: v[local] for k, v in tensors.items()}
        return Batch(sample_index=self.sample_id[rows], rows=rows,
                     aug_params=None if aug is None else aug[local], teacher=self._loss_inputs(t, self.label[rows]))

    def _loss_inputs(self, t: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
        if self.kind == "logits":
            return {"teacher_logits": t["logits"].float()}
        if self.kind == "probs":
            return {"teacher_probs": t["probs"].float()}
        if self.kind == "topk":
            lse = t["lse"]
            lse = lse[:, self.tau_index] if lse.ndim == 2 else lse
            sd = _sparse_from_topk(t["topk_logits"].float(), t["topk_ids"].long(), lse.float(),
                                   t["label_logit"].float(), labels, self.tau)
            return {"teacher_sparse": sd}
        if self.kind == "sparse":
            from loca_pipe.pipeline.calibration import SparseDist

            return {"teacher_sparse": SparseDist(t["ids"].long(), t["probs"].float(), t["tail"].float())}
        raise StoreError(f"unknown soft-label kind {self.kind!r}")  # pragma: no cover - set internally

    def _stream(self, rows: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """The epoch's ``rows`` for a store larger than memory: segment by segment (about ``buffer_chunks``
        chunks of rows, a whole number of batches), reading the chunks a segment's rows lie in; a chunk the
        previous segment read is reused (a block order's buffer may straddle two segments)."""
        seg = max(batch_size, (self.buffer_chunks * self.chunk_rows) // batch_size * batch_size)
        cache: dict[int, dict[str, torch.Tensor]] = {}
        for s0 in range(0, rows.numel(), seg):
            want = rows[s0:s0 + seg]
            chunk_of = torch.div(want, self.chunk_rows, rounding_mode="floor")
            chunks = torch.unique(chunk_of).tolist()
            cache = {c: cache[c] if c in cache else self._read_chunk(c) for c in chunks}
            # buffer position of a row: chunk c's rows sit at [start_c, start_c + its length) of the buffer
            starts = torch.zeros(chunks[-1] + 1, dtype=torch.int64)
            lengths = torch.tensor([next(iter(cache[c].values())).shape[0] for c in chunks])
            starts[torch.tensor(chunks)] = torch.cumsum(lengths, 0) - lengths
            local = want - chunk_of * self.chunk_rows + starts[chunk_of]
            buf = {k: torch.cat([cache[c][k] for c in chunks]) for k in cache[chunks[0]]}
            aug = buf.pop("__aug", None)
            for i in range(0, want.numel(), batch_size):
                yield self._batch(want[i:i + batch_size], buf, aug, offset=local[i:i + batch_size])

    def _read_chunk(self, c: int) -> dict[str, torch.Tensor]:
        lo, hi = c * self.chunk_rows, min(self.num_rows, (c + 1) * self.chunk_rows)
        part = {k: torch.from_numpy(np.ascontiguousarray(a[lo:hi])) for k, a in self._src.items()}
        if self._aug_src is not None:
            part["__aug"] = torch.from_numpy(np.asarray(self._aug_src[lo:hi], np.float32))
        return part


# ----------------------------------------------------------------------------------------------------
# checks shared by both store kinds


def check_join(source: str, what: str, store_fp: str | None, spec: Any, store_classes: int, student_classes: int,
               sample_id: np.ndarray, label: np.ndarray) -> None:
    """The store fits the data set and the student: fingerprint, classes, sample ids and labels."""
    fp = getattr(spec, "fingerprint", None)
    if store_fp is not None and fp is not None and store_fp != fp:
        raise DataError(
            f"{what} {source!r} was built from data with fingerprint {store_fp!r}, but data set "
            f"{getattr(spec, 'name', '?')!r} split {getattr(spec, 'split', '?')!r} has fingerprint {fp!r}; "
            f"train on the data set the store was cached from, or re-cache the teacher on this data")
    if store_classes != student_classes:
        raise StoreError(
            f"{what} {source!r} has {store_classes} classes but the student outputs {student_classes}; "
            f"pick a store cached for this data set or a student with {store_classes} outputs")
    n = len(spec.labels)
    if sample_id.size and (sample_id.min() < 0 or sample_id.max() >= n):
        raise DataError(f"{what} {source!r} refers to sample ids up to {int(sample_id.max())} but the data set has "
                        f"{n} samples; it was cached from another data set — re-cache it")
    ds_labels = np.asarray(spec.labels, np.int64)[sample_id]
    bad = np.flatnonzero(ds_labels != label)
    if bad.size:
        raise DataError(f"{what} {source!r}: {bad.size} row(s) have labels that differ from the data set "
                        f"(first sample id {int(sample_id[bad[0]])}: store {int(label[bad[0]])}, data "
                        f"{int(ds_labels[bad[0]])}); the store belongs to another data set or order — re-cache it")


def load_soft_labels(store_path: str, spec: Any, *, teacher: str | None = None, student_classes: int | None = None,
                     tau: float = 4.0, form: str = "auto", memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
                     buffer_chunks: int = 8, view_policy: str = "cycle",
                     order: Callable[[int, int, int], torch.Tensor] | None = None) -> SoftLabels:
    """Open a complete teacher in a logit store and join it to data set ``spec`` (a ``DatasetSpec``).

    ``form``: ``logits`` (full logits; error if not stored), ``topk`` (sparse from top-k + lse at τ; τ must
    be declared in the store), or ``auto`` (full logits when stored, else top-k).
    """
    from loca_pipe.pipeline.store import LogitStore

    if form not in FORMS:
        raise ConfigError(f"soft-label form must be one of {list(FORMS)}; got {form!r}")
    store = LogitStore.open(store_path)
    try:
        tv = store.teacher(teacher)
    except IncompleteStoreError as exc:
        raise IncompleteStoreError(f"cannot train from this store: {exc}") from exc
    info = store.info
    if info.task != "classification":
        raise StoreError(f"store {store_path!r} holds a {info.task!r} teacher; train-student needs a classification store")
    classes = int(student_classes if student_classes is not None else spec.num_classes)
    sample_id, label, view = tv["sample_id"][:], tv["label"][:], tv["view"][:]
    check_join(store_path, "store", info.dataset.get("fingerprint"), spec, info.num_classes, classes, sample_id, label)
    if int(getattr(spec, "num_classes", classes)) != info.num_classes:
        raise StoreError(f"store {store_path!r} has {info.num_classes} classes but data set {spec.name!r} has "
                         f"{spec.num_classes}; pick the store cached for this data set")
    use = form
    if form == "auto":
        use = "logits" if tv.has_full_logits else "topk"
    if use == "logits" and not tv.has_full_logits:
        raise StoreError(f"teacher {tv.name!r} in {store_path!r} keeps only top-{tv.top_k} logits; use form "
                         f"'topk' (or auto), or re-cache with full logits")
    tau_index = 0
    if use == "logits":
        arrays = {"logits": tv["logits"]}
    else:
        tau_index = tv.tau_index(tau)
        if tau_index < 0:  # full logits exist but τ was not declared: top-k form impossible at this τ
            raise StoreError(f"τ={tau} was not declared when teacher {tv.name!r} was cached (it has "
                             f"{tv.temperatures}); pass --tau as one of {tv.temperatures}, use form 'logits', or re-cache with "
                             f"--temperatures including {tau}")
        arrays = {"topk_logits": tv["topk_logits"], "topk_ids": tv["topk_ids"], "lse": tv["lse"],
                  "label_logit": tv["label_logit"]}
    aug = tv["aug_params"] if info.aug_param_names else None
    sl = SoftLabels(source=store_path, teacher=tv.name, kind=use, num_classes=info.num_classes,
                    num_views=info.num_views, sample_id=sample_id, label=label, view=view, aug_params=aug,
                    arrays=arrays, chunk_rows=info.chunk_rows, tau=tau, tau_index=tau_index,
                    memory_limit_bytes=memory_limit_bytes, buffer_chunks=buffer_chunks, view_policy=view_policy,
                    order=order, meta={"store": store_path, "teacher": tv.name, "dataset": info.dataset,
                          "aug_param_names": list(info.aug_param_names), "provenance": tv.attrs})
    if use == "topk" and sl.in_memory:
        # the lse column at τ is all the batch needs: slice once instead of per batch
        sl.tensors["lse"] = sl.tensors["lse"][:, tau_index].contiguous()
    return sl


def _target_methods() -> dict[str, str]:
    from loca_pipe.pipeline.losses import METHODS

    return {name: m.targets_loss for name, m in METHODS.items() if m.targets_loss}


# loss method to apply on precomputed targets (the targets already hold the, possibly calibrated, teacher
# distribution): derived from the registry's ``targets_loss`` (losses.METHODS), never listed here
TARGET_METHODS = _target_methods()


def load_targets(path: str, spec: Any, *, method: str, alpha: float, tau: float, student_classes: int | None = None,
                 teacher: str | None = None, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT, buffer_chunks: int = 8,
                 view_policy: str = "cycle", order: Callable[[int, int, int], torch.Tensor] | None = None
                 ) -> SoftLabels:
    """Precomputed targets (``loca-pipe calibrate``) for ``method`` at (α, τ), joined to data set ``spec``.

    ``kd``/``dkd`` read the plain KD targets, ``loca``/``loca_dkd`` the LoCa targets at α; the returned
    SoftLabels has ``.method`` = the loss to apply to them (``kd`` or ``dkd``: the calibration is already in
    the targets). An α or τ the store was not built for is refused, naming the ones it holds.
    """
    from loca_pipe.pipeline.targets import TargetsStore

    if method not in TARGET_METHODS:
        raise ConfigError(f"method {method!r} cannot train from precomputed targets (they hold probabilities, not "
                          f"logits); use one of {sorted(TARGET_METHODS)}, or train {method!r} from the logit store")
    try:
        ts = TargetsStore(path)
    except IncompleteStoreError as exc:
        raise IncompleteStoreError(f"cannot train from this targets store: {exc}") from exc
    from loca_pipe.pipeline.store import find_tau

    if find_tau((ts.tau,), tau) is None:
        raise StoreError(f"targets store {path!r} was built at τ={ts.tau:g}, this run asks τ={tau:g}; set "
                         f"train_student.tau to {ts.tau:g}, or re-run `loca-pipe calibrate --tau {tau:g}`")
    from loca_pipe.pipeline.losses import METHODS

    a = float(alpha) if METHODS[method].loca else None
    if a is not None and not any(math.isclose(a, x, rel_tol=1e-9) for x in ts.alphas):
        raise StoreError(f"targets store {path!r} holds LoCa targets for α in {list(ts.alphas)}, not α={a:g}; pick "
                         f"one of those, or re-run `loca-pipe calibrate` with --alpha {a:g}")
    tv = ts.teacher(teacher)
    src = ts.attrs.get("source") or {}
    classes = int(ts.attrs["num_classes"])
    sample_id, label, view = ts["sample_id"][:], ts["label"][:], ts["view"][:]
    check_join(path, "targets store", src.get("fingerprint"), spec,
               classes, int(student_classes if student_classes is not None else spec.num_classes), sample_id, label)
    if tv.form == "dense":
        kind, arrays = "probs", {"probs": tv.dense(a)}
    else:
        if "sparse" not in METHODS[TARGET_METHODS[method]].teachers:
            raise StoreError(f"targets of teacher {tv.name!r} in {path!r} are sparse (top-k); {method!r} needs dense "
                             f"probabilities — use kd/loca, or calibrate from a store with full logits")
        ids, probs, tail = tv.sparse(a)
        kind, arrays = "sparse", {"ids": ids, "probs": probs, "tail": tail}
    has_aug = "aug_params" in ts.group
    sl = SoftLabels(source=path, teacher=tv.name, kind=kind, num_classes=classes,
                    num_views=int(src.get("num_views") or 1), sample_id=sample_id, label=label, view=view,
                    aug_params=ts["aug_params"] if has_aug else None, arrays=arrays,
                    chunk_rows=int(ts.attrs.get("chunk_rows") or max(1, len(sample_id))), tau=tau,
                    memory_limit_bytes=memory_limit_bytes, buffer_chunks=buffer_chunks, view_policy=view_policy,
                    order=order, meta={"store": path, "teacher": tv.name, "dataset": src.get("dataset") or {},
                          "provenance": (src.get("teachers") or {}).get(tv.name, {}), "alpha": a, "tau": ts.tau})
    sl.method = TARGET_METHODS[method]
    return sl
