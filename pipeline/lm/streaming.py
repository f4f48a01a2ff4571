"""A causal-LM teacher read from the token store chunk by chunk, with bounded memory.

:func:`open_teacher` gives the students their teacher rows: the whole teacher loaded into memory
(:class:`~loca_pipe.pipeline.lm.cache.LMTeacherCache`, which ``open_lm_cache`` fills from this reader) only when its arrays fit a stated memory limit,
otherwise a :class:`StreamedTeacher` that keeps a shuffle buffer of row blocks (about one store chunk of
rows each, whole sequences) and serves batches of sequences from it — the image path's chunk-granular
shuffle. Only the sequence index (``offsets``, N + 1 int64) is held whole; it is 8 bytes per sequence.

Every read goes through the store's checked read (CRC32C kept), so a corrupted or truncated chunk is named
(array, chunk, rows, file) the moment it is reached, mid-epoch or mid-analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from loca_pipe.pipeline import layout
from loca_pipe.pipeline.errors import ConfigError, StoreConflictError, StoreError
from loca_pipe.pipeline.store import CheckedArray, TeacherView, read_checked, require_tau

# The row-aligned arrays the students and the analysis read, from the store's one table (pipeline/layout.py):
# every token-store array whose first dimension is the row, except the image-only view arrays (the view index is
# always 0 here, crop-flip parameters never exist) and the optional full logits (token students learn from the
# top-k). A new row array in the table is read here
# without an edit. "root" arrays are the store group's, the rest the teacher's.
NOT_SERVED = ("view", "aug_params", "logits")


def served(where: str) -> tuple[str, ...]:
    """The row arrays of ``where`` (layout.ROOT or layout.TEACHER) a token reader serves (read at call time)."""
    return tuple(a.name for a in layout.arrays(where) if a.dims[0] == "row" and "causal-lm" in a.tasks
                 and a.name not in NOT_SERVED)


# what the teacher's codec (pipeline/codecs.py) stores in its own arrays and :meth:`TokenTeacher.read` decodes
DECODED = tuple(a.name for a in layout.arrays(layout.TEACHER) if a.codec)
# Rows read per call when streaming (the store's small int arrays go through zarr: a few calls per million rows)
READ_BLOCK_ROWS = 1 << 16


class TokenTeacher:
    """Row-level read access to one complete causal-LM teacher of a token store, never loading it whole."""

    def __init__(self, store_path: str, name: str | None = None, expect_fingerprint: str | None = None):
        from loca_pipe.pipeline.lm.cache import open_token_store

        store = open_token_store(store_path, expect_fingerprint)
        self.store = store
        self.view: TeacherView = store.teacher(name)  # refuses incomplete teachers
        g = self.view.group
        self.path = str(store_path)
        self.offsets = np.asarray(store.group["offsets"][:], dtype=np.int64)
        self.temperatures = list(self.view.temperatures)
        self.num_classes = store.info.num_classes
        self.chunk_rows = store.info.chunk_rows
        self.attrs = self.view.attrs
        self.dataset = dict(store.info.dataset)
        from loca_pipe.pipeline.codecs import codec_of

        self.codec = codec_of(self.attrs)  # refuses a codec (version) this reader does not know
        self.top_k = self.view.top_k
        self._coded = {k: g[k] for k in self.codec.arrays(self.num_classes, self.top_k, len(self.temperatures))}
        self.arrays = {k: store.group[k] for k in served(layout.ROOT)}  # as stored; the top-k through the codec
        self.arrays.update({k: g[k] for k in served(layout.TEACHER) if k in g and k not in DECODED})
        self.keys = tuple(self.arrays) + DECODED  # every array a reader may ask for
        self.has_sampled = "sampled_ids" in g and "sampled_counts" in g
        self.has_greedy = "greedy_ids" in g

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def row_bytes(self, keys: Sequence[str] | None = None) -> int:
        """Bytes per row in memory of the given arrays (all the students' arrays by default)."""
        keys = keys or self.keys
        decoded = {"topk_logits": 4 * self.top_k,  # float32 logits; ids as the codec returns them
                   "topk_ids": self.top_k * (np.dtype(self._coded["topk_ids"].dtype).itemsize
                                             if self.codec.name == "lossless" else 8)}
        return sum(decoded[k] if k in decoded else
                   int(np.prod(self.arrays[k].shape[1:], dtype=np.int64)) * np.dtype(self.arrays[k].dtype).itemsize
                   for k in keys)

    def nbytes(self) -> int:
        """Bytes the whole teacher would take in memory (what ``open_teacher`` compares with the limit)."""
        return self.num_rows * self.row_bytes() + self.offsets.nbytes

    def tau_index(self, tau: float) -> int:
        return require_tau(self.temperatures, tau)  # the one τ rule (every reader)

    # -- reads --------------------------------------------------------------------------------------
    def read(self, lo: int, hi: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the given arrays (CRC32C checked; a bad chunk raises a StoreError naming it)."""
        keys = keys or self.keys
        out = {k: CheckedArray(self.arrays[k])[lo:hi] for k in keys if k not in DECODED}
        if any(k in DECODED for k in keys):
            coded = {k: CheckedArray(a)[lo:hi] for k, a in self._coded.items()}
            lse = out["lse"] if "lse" in out else CheckedArray(self.arrays["lse"])[lo:hi]
            zl, ids = self.codec.decode(coded, lse, self.temperatures, self.num_classes, self.top_k)
            if self.codec.name == "lossless":
                ids = coded["topk_ids"]  # keep the stored (narrow) dtype, as open_lm_cache does
            out.update({k: v for k, v in (("topk_logits", zl), ("topk_ids", ids)) if k in keys})
        return out

    def blocks(self, keys: Sequence[str] | None = None, block_rows: int = READ_BLOCK_ROWS
               ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Consecutive row blocks of ``block_rows`` (a multiple of the chunk rows), in store order."""
        step = max(1, block_rows // self.chunk_rows) * self.chunk_rows
        for lo in range(0, self.num_rows, step):
            hi = min(self.num_rows, lo + step)
            yield slice(lo, hi), self.read(lo, hi, keys)

    def greedy_responses(self) -> list[np.ndarray]:
        if not self.has_greedy:
            raise StoreError("this teacher was cached without greedy responses; re-cache with greedy_max_new_tokens > 0 "
                             "(SeqKD needs them)")
        return [row[row >= 0] for row in read_checked(self.view.group["greedy_ids"])]

    def check_labels(self, labels_of: Any) -> None:
        """The store's next-token labels must equal the data's response tokens, compared block by block.

        ``labels_of(lo, hi)`` returns the data's labels of rows [lo, hi)."""
        for sl, d in self.blocks(("label",)):
            want = labels_of(sl.start, sl.stop)
            if not np.array_equal(d["label"], want):
                bad = sl.start + int(np.flatnonzero(d["label"] != want)[0])
                raise StoreConflictError(f"the teacher cache's next-token labels differ from this data's response tokens "
                                         f"(first at row {bad}); re-cache the teacher on the same data and tokenizer")


# ----------------------------------------------------------------------------------------------------
# Batches of sequences for the students


class _Source:
    """What the students' losses need of a teacher besides its rows."""

    t: TokenTeacher
    keys: tuple[str, ...]

    @property
    def attrs(self) -> dict[str, Any]:
        return self.t.attrs

    @property
    def num_classes(self) -> int:
        return self.t.num_classes

    def tau_index(self, tau: float) -> int:
        return self.t.tau_index(tau)

    def greedy_responses(self) -> list[np.ndarray]:
        return self.t.greedy_responses()


@dataclass(eq=False)  # identity, not array comparison
class _Block:
    seqs: np.ndarray            # sequence ids of this block
    lo: int                     # first row
    data: dict[str, np.ndarray]  # rows lo .. lo + n
    left: list[int] = field(default_factory=list)  # sequences not yet served this epoch


class StreamedTeacher(_Source):
    """Batches of sequences served from a shuffle buffer of row blocks, memory bounded by ``buffer_bytes``.

    The sequences are cut into blocks of whole sequences of about one store chunk of rows (a block starts at
    the first sequence that begins in its chunk). Each epoch visits the blocks in a random order; up to
    ``buffer_blocks`` are loaded at a time, a batch draws its sequences at random (without replacement) from
    every sequence left in the buffer, and a block whose sequences are all served is dropped and the next
    one read. Memory: ``buffer_blocks`` blocks of rows (``buffer_bytes`` / the largest block's bytes).
    """

    def __init__(self, teacher: TokenTeacher, buffer_bytes: int, seed: int = 0, keys: Sequence[str] | None = None):
        self.t = teacher
        self.keys = tuple(keys or teacher.keys)
        off = teacher.offsets
        starts = off[:-1]
        chunk_of = starts // teacher.chunk_rows
        cut = np.flatnonzero(np.diff(chunk_of)) + 1
        self.block_seqs = np.split(np.arange(teacher.num_sequences), cut)
        rows = np.array([off[s[-1] + 1] - off[s[0]] for s in self.block_seqs])
        self.block_bytes = int(rows.max()) * teacher.row_bytes(self.keys)
        self.buffer_blocks = max(1, int(buffer_bytes) // max(1, self.block_bytes))
        if self.buffer_blocks < 2:
            self.buffer_blocks = 1
        self.rng = np.random.default_rng(seed)
        self.buffer: list[_Block] = []
        self.where: dict[int, _Block] = {}
        self.order: list[int] = []
        self.retired: list[_Block] = []  # served out by the last batch: kept until the loss has read its rows
        self.peak_buffer_bytes = 0

    def _load(self, b: int) -> _Block:
        seqs = self.block_seqs[b]
        lo, hi = int(self.t.offsets[seqs[0]]), int(self.t.offsets[seqs[-1] + 1])
        blk = _Block(seqs, lo, self.t.read(lo, hi, self.keys), list(seqs))
        for s in seqs:
            self.where[int(s)] = blk
        return blk

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_blocks:
            if not self.order:
                if self.buffer:
                    return  # finish this epoch's buffered blocks before starting a new permutation
                self.order = list(self.rng.permutation(len(self.block_seqs)))
            self.buffer.append(self._load(self.order.pop()))
        held = sum(_nbytes(b.data) for b in self.buffer + self.retired)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)

    def next_batch(self, batch_size: int) -> np.ndarray:
        """Sequence ids of the next batch (distinct; at most ``batch_size``)."""
        for b in self.retired:
            for s in b.seqs:
                if self.where.get(int(s)) is b:
                    del self.where[int(s)]
        self.retired = []
        self._fill()
        pool = [(bi, j) for bi, b in enumerate(self.buffer) for j in range(len(b.left))]
        take = self.rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)
        picked = [pool[i] for i in take]
        out = np.array([self.buffer[bi].left[j] for bi, j in picked], dtype=np.int64)
        for bi, j in sorted(picked, key=lambda p: -p[1]):
            self.buffer[bi].left.pop(j)
        for b in [b for b in self.buffer if not b.left]:
            self.buffer.remove(b)
            self.retired.append(b)
        return out

    def batch(self, seq_idx: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows of the given sequences (concatenated in that order): from the buffer for the sequences of the
        last :meth:`next_batch`, read from the store for any other."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        off = self.t.offsets
        for s in seq_idx:
            s = int(s)
            blk = self.where.get(s)
            lo, hi = int(off[s]), int(off[s + 1])
            if blk is None:  # not from the last batch: read it
                d = self.t.read(lo, hi, self.keys)
                for k in self.keys:
                    parts[k].append(d[k])
            else:
                for k in self.keys:
                    parts[k].append(blk.data[k][lo - blk.lo:hi - blk.lo])
        return {k: np.concatenate(v) for k, v in parts.items()}


def _nbytes(d: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in d.values())


class InMemoryTeacher(_Source):
    """The whole teacher in memory (it fits the limit): batches drawn uniformly, as before streaming existed."""

    def __init__(self, teacher: TokenTeacher, seed: int = 0, keys: Sequence[str] | None = None):
        self.t = teacher
        self.keys = tuple(keys or teacher.keys)
        self.data = teacher.read(0, teacher.num_rows, self.keys)
        self.rng = np.random.default_rng(seed)
        self.peak_buffer_bytes = _nbytes(self.data)

    def next_batch(self, batch_size: int) -> np.ndarray:
        n = self.t.num_sequences
        return self.rng.choice(n, size=min(batch_size, n), replace=False)

    def batch(self, seq_idx: Sequence[int]) -> dict[str, np.ndarray]:
        off = self.t.offsets
        rows = np.concatenate([np.arange(off[i], off[i + 1]) for i in seq_idx])
        return {k: v[rows] for k, v in self.data.items()}


def parse_memory_limit(limit_mb: float) -> int:
    if not (limit_mb > 0):
        raise ConfigError(f"memory_limit_mb must be a positive number of MiB (the teacher rows a student may hold); "
                          f"got {limit_mb}")
    return int(limit_mb * 2**20)


def open_teacher(store_path: str, name: str | None, *, memory_limit_mb: float, seed: int = 0,
                 expect_fingerprint: str | None = None, keys: Sequence[str] | None = None,
                 buffer_fraction: float = 0.5):
    """The students' teacher: loaded whole when it fits ``memory_limit_mb``, else streamed with a shuffle buffer
    of ``buffer_fraction`` × the limit (the rest is headroom for the batch being read and the loss)."""
    limit = parse_memory_limit(memory_limit_mb)
    t = TokenTeacher(store_path, name, expect_fingerprint)
    keys = tuple(k for k in (keys or t.keys) if k in t.keys)
    need = t.num_rows * t.row_bytes(keys)
    if need <= limit:
        return InMemoryTeacher(t, seed, keys)
    s = StreamedTeacher(t, int(limit * buffer_fraction), seed, keys)
    if s.block_bytes > limit * buffer_fraction:
        raise ConfigError(f"memory_limit_mb={memory_limit_mb} is below one block of the token store "
                          f"({s.block_bytes / 2**20:.1f} MiB for {len(keys)} arrays at {t.chunk_rows} rows a chunk); "
                          f"raise it to at least {2 * s.block_bytes / 2**20:.0f}")
    return s
