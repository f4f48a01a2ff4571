"""Verification on demand (`loca-pipe verify`) and chunk-wise repair: mark exactly the bad chunks not done, so
re-running the same `loca-pipe cache-logits` (or `lm-cache`) command rewrites only those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.core.sync import sync

from loca_pipe.pipeline import layout
from loca_pipe.pipeline.errors import StoreError
from loca_pipe.pipeline.progress import progress_bar
from loca_pipe.pipeline.store.checked import _is_checksum_error
from loca_pipe.pipeline.store.format import ATTR, VERIFY_ATTR, StoreInfo, cache_command, io_guard, now
from loca_pipe.pipeline.store.logit_store import LogitStore

INDEX_FLAG = "index"  # BadChunk.flag of a token store's offsets / position chunk (pipeline/lm/cache.py::_write_index)


@dataclass(frozen=True)
class BadChunk:
    """One chunk file that failed verification."""

    array: str                 # array path in the store, e.g. 'teachers/strong/logits'
    chunk: tuple[int, ...]     # chunk grid coordinates
    file: str                  # the chunk's store key (its file, relative to the store folder)
    reason: str                # 'CRC32C mismatch' | 'missing file' | a decoding error
    teachers: tuple[str, ...]  # teachers whose data it is (every teacher for the shared row arrays)
    row_chunk: int | None      # the store's row chunk it belongs to (None: not row-aligned)
    flag: str | None           # the done-flag array that repair clears for it (INDEX: a token store's sequence
                               # index, rewritten from the data by the next lm-cache; None: not repairable chunk-wise)

    def describe(self) -> str:
        rows = f", row chunk {self.row_chunk}" if self.row_chunk is not None else ""
        return f"array {self.array!r} chunk {list(self.chunk)}{rows} (file {self.file!r}): {self.reason}"


def _chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _key_exists(arr: zarr.Array, key: str) -> bool:
    return bool(sync(arr.store_path.store.exists(key)))


def _flag_for(group: zarr.Group, name: str, arr: zarr.Array, info: StoreInfo, flag: str) -> tuple[str | None, Any]:
    """(flag array name, how a chunk coordinate maps to its flag index) for array ``name`` of ``group``.

    From the array's table entry (pipeline/layout.py) when it has one; a codec's own top-k arrays (and arrays
    of older stores) are mapped by their shape."""
    spec = layout.spec(name)
    if spec is not None:
        if spec.writer == layout.INDEX:  # offsets / position: a function of the data, rewritten whole chunks at open
            return INDEX_FLAG, lambda co: co[0]
        if spec.writer == layout.FLAG:
            return name, lambda co: co[0]
        if spec.flag is not None:
            return (spec.flag, lambda co: co[0]) if spec.flag in group.array_keys() else (None, None)
        if spec.dims[0] == "row":
            return flag, lambda co: co[0]
        return None, None
    if name == flag or name.endswith("_done"):  # a flag array: chunk c of it is flag c
        return name, lambda co: co[0]
    if arr.ndim >= 1 and arr.shape[0] == info.num_rows and arr.chunks[0] == info.chunk_rows:
        return flag, lambda co: co[0]
    prefix = name.split("_")[0]
    side = f"{prefix}_done"
    if side != name and side in group.array_keys() and group[side].shape[0] == arr.cdata_shape[0]:
        return side, lambda co: co[0]  # e.g. LM greedy_ids chunk g ↔ greedy_done[g]
    return None, None


def _scan_group(group: zarr.Group, names: Iterable[str], info: StoreInfo, flag: str, owners: tuple[str, ...],
                done: dict[str, np.ndarray | None], bar: Any) -> list[BadChunk]:
    bad: list[BadChunk] = []
    for name in names:
        arr = group[name]
        fname, to_flag = _flag_for(group, name, arr, info, flag)
        for coords in np.ndindex(*arr.cdata_shape):
            coords = tuple(int(c) for c in coords)
            if fname is not None and fname != name and done.get(fname) is not None \
                    and not _is_done(done[fname], to_flag(coords)):
                # a pending chunk (no done flag): nothing claims its files yet, whatever a killed write left there
                # (a torn file, other numbers) is rewritten by the resume, so it is not damage to report
                bar.update(1)
                continue
            key = _chunk_key(arr, coords)
            reason = None
            try:
                arr.blocks[coords]
            except ValueError as exc:
                reason = "CRC32C mismatch (the file is corrupted)" if _is_checksum_error(exc) else f"unreadable ({exc})"
            except Exception as exc:  # a decoder error on garbage bytes (zstd, truncated file)
                reason = f"unreadable ({type(exc).__name__}: {exc})"
            if reason is None and np.issubdtype(arr.dtype, np.signedinteger) and arr.fill_value is not None \
                    and int(arr.fill_value) < 0 and fname is not None \
                    and (done.get(fname) is not None or fname == INDEX_FLAG):
                # an id/label array never holds only its negative fill value where the chunk is marked done (a
                # token store's index is written whole when the store is opened)
                idx = to_flag(coords)
                marked = fname == INDEX_FLAG or (idx < len(done[fname]) and done[fname][idx])
                if marked and not _key_exists(arr, key):
                    reason = "missing file (chunk marked done)"
            if reason is not None:
                rc = coords[0] if (arr.ndim >= 1 and arr.shape[0] == info.num_rows
                                   and arr.chunks[0] == info.chunk_rows) or name == flag else None
                bad.append(BadChunk(arr.path, coords, key, reason, owners, rc, fname))
            bar.update(1)
    return bad


def _is_done(flags: np.ndarray, idx: int) -> bool:
    return bool(idx < len(flags) and flags[idx])


def _flags(group: zarr.Group) -> dict[str, np.ndarray | None]:
    out = {}
    for name in group.array_keys():
        if name == "done" or name.endswith("_done"):
            try:
                out[name] = group[name][:]
            except ValueError:  # a corrupted flag chunk: verify names it; the flags are unknown, so every chunk of
                out[name] = None  # the arrays it covers is checked and none is called missing
    return out


def verify_store(path: str, teachers: Iterable[str] | None = None, record: bool = True,
                 progress: bool = False) -> dict[str, Any]:
    """Check every chunk of every array (the shared row arrays and each teacher's) against its CRC32C.

    Returns ``{"path", "task", "chunks_checked", "bad": [BadChunk…], "teachers": {name: [bad row chunks]}}``. With
    ``record``, a teacher with bad chunks gets the attribute ``verify_failed`` (its chunks and the time), so
    ``describe``/``loca-pipe info`` no longer call it complete; a later clean verify or a repair removes it.
    """
    store = LogitStore.open(path, mode="r+" if record else "r")
    names = list(teachers) if teachers else store.teachers
    for t in names:
        store._teacher_group(t)  # unknown teacher → StoreError naming the ones there
    root = store.group
    row_names = [k for k in root.array_keys()]
    total = sum(int(np.prod(root[k].cdata_shape)) for k in row_names)
    groups = {t: store._teacher_group(t) for t in names}
    total += sum(int(np.prod(g[k].cdata_shape)) for g in groups.values() for k in g.array_keys())
    bad: list[BadChunk] = []
    with progress_bar(total=total, desc="verify", unit="chunk", enabled=progress) as bar:
        bad += _scan_group(root, row_names, store.info, "rows_done", tuple(store.teachers), _flags(root), bar)
        for t, g in groups.items():
            bad += _scan_group(g, list(g.array_keys()), store.info, "done", (t,), _flags(g), bar)
    per: dict[str, list[int]] = {t: sorted({b.row_chunk for b in bad if t in b.teachers and b.row_chunk is not None})
                                 for t in names}
    if record:
        try:
            _record_verify(store, groups, bad, per)
        except (StoreError, OSError) as exc:  # a read-only copy can still be verified
            logging.getLogger(__name__).warning("verify: result not recorded in %s (%s)", path, exc)
    return {"path": str(path), "task": store.info.task, "chunks_checked": total, "bad": bad, "teachers": per}


def _record_verify(store: "LogitStore", groups: dict[str, zarr.Group], bad: list[BadChunk],
                   per: dict[str, list[int]]) -> None:
    with io_guard(store.path, "recording the verify result"):
        for t in groups:
            a = store.teacher_attrs(t)
            if not a:  # its creation was interrupted: nothing of it counts yet, nothing to record
                continue
            hit = [b for b in bad if t in b.teachers]
            if hit:
                a[VERIFY_ATTR] = {"time": now(), "chunks": [b.describe() for b in hit[:50]], "row_chunks": per[t]}
                groups[t].attrs[ATTR] = a
            elif VERIFY_ATTR in a:
                a.pop(VERIFY_ATTR)
                groups[t].attrs[ATTR] = a


def invalidate_chunks(path: str, bad: Iterable[BadChunk]) -> dict[str, list[int]]:
    """Repair step: delete each bad chunk file and clear the done flag it belongs to; mark the teachers
    concerned incomplete. Re-running the same `loca-pipe cache-logits` command then rewrites exactly those
    chunks (for the shared row arrays: every teacher's chunk, each by its own command).

    Takes each teacher's writer lease (a job still writing it is refused). Raises StoreError for a chunk that
    no done flag covers (it cannot be rewritten chunk-wise; re-cache the teacher with --overwrite).
    Returns ``{teacher: [row chunks cleared]}``.
    """
    # deferred on purpose: pipeline/distributed.py imports torch (torch.distributed ranks), and the store package
    # stays torch-free at import (tests/pipeline/test_imports.py); only a repair needs the lease
    from loca_pipe.pipeline.distributed import WriterLease

    bad = list(bad)
    store = LogitStore.open(path, mode="r+")
    loose = [b for b in bad if b.flag is None]
    if loose:
        raise StoreError(f"{len(loose)} bad chunk(s) are not covered by a done flag ({loose[0].describe()}); they "
                         f"cannot be rewritten chunk by chunk — re-cache the teacher with `{cache_command(store.info.task)} "
                         f"--overwrite` (or restore the store from a copy)")
    owners = sorted({t for b in bad for t in b.teachers})
    leases = [WriterLease(str(path), t) for t in owners]
    cleared: dict[str, set[int]] = {t: set() for t in owners}
    taken: list[Any] = []
    with io_guard(str(path), "repairing"):
        try:
            for lease in leases:
                lease.acquire()
                taken.append(lease)
            for b in bad:
                arr = store.group[b.array]
                sync(arr.store_path.store.delete(b.file))
                parent = store.group if "/" not in b.array else store.group[b.array.rsplit("/", 1)[0]]
                idx = b.chunk[0]
                if b.flag == INDEX_FLAG:  # no flag to clear: every teacher is marked incomplete until lm-cache
                    for t in store.teachers:  # has rewritten the index chunk from the data
                        cleared.setdefault(t, set())
                elif b.flag == "rows_done":  # a shared row chunk: every teacher rewrites (and re-checks) it
                    parent[b.flag][idx] = 0
                    for t in store.teachers:
                        store._teacher_group(t)["done"][idx] = 0
                        cleared.setdefault(t, set()).add(idx)
                else:
                    parent[b.flag][idx] = 0
                    for t in b.teachers:
                        cleared.setdefault(t, set()).add(idx)
            for t in cleared:
                g = store._teacher_group(t)
                a = store.teacher_attrs(t)
                if not a:
                    continue
                a.pop(VERIFY_ATTR, None)
                a["complete"] = False
                g.attrs[ATTR] = a
        finally:
            for lease in taken:
                lease.release()
    return {t: sorted(c) for t, c in cleared.items()}