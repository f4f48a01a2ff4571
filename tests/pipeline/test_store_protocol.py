"""The store's write/verify/repair protocol as a state machine (hypothesis): create, write chunks, get killed
mid-write (some arrays of a chunk written, no done flag, a torn or stray chunk file), resume, corrupt a chunk,
verify, repair, re-cache, read — in any order.

Invariants: every read returns exactly the bytes that were written or raises a named LocaError (never other
numbers, never a bare zarr error); verify names exactly the corrupted chunks; and once every chunk is written
again, the store equals one written without faults, array by array.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from loca_pipe.pipeline.caching import summarize_logits
from loca_pipe.pipeline.errors import IncompleteStoreError, LocaError, StoreError
from loca_pipe.pipeline.store import LogitStore, StoreInfo, invalidate_chunks, verify_store

R, CH, C, K, TAUS = 12, 4, 6, 2, (1.0, 2.0)
N_CHUNKS = R // CH
PROV = {"checkpoint_sha256": "abc"}
_g = np.random.default_rng(7)
Z = _g.normal(0, 3, (R, C)).astype(np.float32)
Y = _g.integers(0, C, R).astype(np.int64)
_S = {k: v.numpy() for k, v in summarize_logits(torch.from_numpy(Z), torch.from_numpy(Y), K, TAUS).items()}
CHUNK_ARRAYS = {**_S, "logits": Z}
# arrays a fault may hit: raw fp32 (read by the fast path), zstd ids, and a shared row array (every teacher's)
FAULTY = ("teachers/t/logits", "teachers/t/topk_ids", "teachers/t/lse", "label")


def _info() -> StoreInfo:
    return StoreInfo(task="classification", num_samples=R, num_views=1, num_rows=R, num_classes=C, chunk_rows=CH,
                     dataset={"name": "toy", "split": "train", "fingerprint": "fp", "view_seed": None})


def _write(store: LogitStore, writer, c: int) -> None:
    sl = store.info.chunk_slice(c)
    store.write_rows(c, np.arange(sl.start, sl.stop), Y[sl], np.zeros(sl.stop - sl.start))
    writer.write_chunk(c, {k: v[sl] for k, v in CHUNK_ARRAYS.items()})


def _chunk_file(path: str, array: str, c: int) -> Path:
    nd = 1 if array == "label" or array.endswith("label_logit") else 2
    return Path(path, *array.split("/"), "c", str(c), *(["0"] if nd == 2 else []))


def _arrays(store: LogitStore) -> dict[str, np.ndarray]:
    g = store.group["teachers"]["t"]
    out = {f"teachers/t/{k}": g[k][:] for k in g.array_keys()}
    out.update({k: store.group[k][:] for k in store.group.array_keys()})
    return out


class StoreProtocol(RuleBasedStateMachine):
    @initialize()
    def create(self):
        self.dir = tempfile.mkdtemp(prefix="store-protocol-")
        self.path = str(Path(self.dir, "s.zarr"))
        self.store = LogitStore.create_or_open(self.path, _info())
        self.writer = self.store.begin_teacher("t", PROV, K, TAUS)
        self.done: set[int] = set()          # chunks whose done flag is set
        self.bad: set[tuple[str, int]] = set()  # (array, chunk) files corrupted since written
        self.finalized = False

    def teardown(self):
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------------
    @precondition(lambda self: self.writer is not None)
    @rule(c=st.integers(0, N_CHUNKS - 1))
    def write_chunk(self, c):
        if c in self.writer.pending_chunks():  # a resume never rewrites a chunk marked done
            _write(self.store, self.writer, c)
            self.done.add(c)

    @precondition(lambda self: self.writer is not None)
    @rule(c=st.integers(0, N_CHUNKS - 1), torn=st.booleans())
    def killed_mid_write(self, c, torn):
        """Some arrays of chunk c written (with other numbers), no done flag; a torn file or a stray temporary."""
        if c not in self.writer.pending_chunks():
            return
        sl = self.store.info.chunk_slice(c)
        g = self.writer.group
        g["logits"][sl] = Z[sl] + 1.0
        g["lse"][sl] = 0.0
        if torn:  # a store without atomic writes: half a file
            f = _chunk_file(self.path, "teachers/t/topk_logits", c)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"\x01\x02\x03")
        else:  # LocalStore's temporary, left behind by the kill
            f = _chunk_file(self.path, "teachers/t/logits", c)
            f.with_name(f.name + ".partial").write_bytes(b"junk")
        self.writer = None  # the process is gone

    @precondition(lambda self: self.writer is None)
    @rule()
    def resume(self):
        self.store = LogitStore.create_or_open(self.path, _info())
        self.writer = self.store.begin_teacher("t", PROV, K, TAUS)
        assert set(self.writer.pending_chunks()) == set(range(N_CHUNKS)) - self.done

    @precondition(lambda self: self.writer is not None)
    @rule()
    def finalize(self):
        assert self.writer.finalize() == (len(self.done) == N_CHUNKS)
        self.finalized = self.finalized or len(self.done) == N_CHUNKS

    # -- faults, verify, repair ---------------------------------------------------------------------
    @rule(array=st.sampled_from(FAULTY), c=st.integers(0, N_CHUNKS - 1), at=st.integers(0, 40))
    def corrupt(self, array, c, at):
        if c not in self.done or (array, c) in self.bad:  # flipping the same byte twice would restore the file
            return
        f = _chunk_file(self.path, array, c)
        data = bytearray(f.read_bytes())
        data[at % len(data)] ^= 0x5A
        f.write_bytes(bytes(data))
        self.bad.add((array, c))

    @rule()
    def verify(self):
        got = verify_store(self.path)
        assert {(b.array, b.row_chunk) for b in got["bad"]} == self.bad
        assert got["teachers"]["t"] == sorted({c for _, c in self.bad})

    @rule()
    def repair(self):
        got = verify_store(self.path)
        cleared = invalidate_chunks(self.path, got["bad"])
        if self.bad:
            assert cleared["t"] == sorted({c for _, c in self.bad})
        self.done -= {c for _, c in self.bad}
        self.bad.clear()
        if self.writer is not None:  # the writer of this process sees the cleared flags
            self.writer = self.store.begin_teacher("t", PROV, K, TAUS)

    @rule()
    def recache(self):
        """The same cache command again: resume, write every pending chunk, finalize."""
        self.resume()
        for c in self.writer.pending_chunks():
            _write(self.store, self.writer, c)
            self.done.add(c)
        assert self.writer.finalize()
        self.finalized = True

    # -- reads --------------------------------------------------------------------------------------
    @rule(key=st.sampled_from(["logits", "topk_logits", "topk_ids", "lse", "label_logit", "label"]),
          c=st.integers(0, N_CHUNKS - 1))
    def read(self, key, c):
        sl = self.store.info.chunk_slice(c)
        try:
            view = LogitStore.open(self.path).teacher("t")
            got = view[key][sl.start:sl.stop]
        except IncompleteStoreError:
            assert len(self.done) < N_CHUNKS or not self.finalized
            return
        except LocaError as exc:  # a named error, and only for a chunk that really is damaged
            array = "label" if key == "label" else f"teachers/t/{key}"
            assert (array, c) in self.bad, exc
            assert isinstance(exc, StoreError) and f"chunk {c}" in str(exc)
            return
        expect = Y if key == "label" else CHUNK_ARRAYS[key]
        np.testing.assert_array_equal(got, expect[sl].astype(got.dtype))

    @invariant()
    def flags_match(self):
        if hasattr(self, "path"):
            assert set(range(N_CHUNKS)) - set(LogitStore.open(self.path).pending_chunks("t")) == self.done

    def check_final(self):
        """Once repaired and re-cached, the store equals one written without faults, array by array."""
        self.repair()
        self.recache()
        clean_path = str(Path(self.dir, "clean.zarr"))
        clean = LogitStore.create_or_open(clean_path, _info())
        w = clean.begin_teacher("t", PROV, K, TAUS)
        for c in range(N_CHUNKS):
            _write(clean, w, c)
        assert w.finalize()
        got, want = _arrays(LogitStore.open(self.path)), _arrays(clean)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert verify_store(self.path)["bad"] == []


class CompletedStoreProtocol(StoreProtocol):
    def teardown(self):
        if hasattr(self, "dir"):
            try:
                self.check_final()
            finally:
                super().teardown()


# CI replays a fixed sequence of examples (derandomize), so a landing never depends on the draw; a local run
# draws new ones each time (that is how the pending-chunk and double-flip cases above were found)
CompletedStoreProtocol.TestCase.settings = settings(max_examples=6, stateful_step_count=10, deadline=None,
                                                    derandomize=os.environ.get("CI") == "true")
TestStoreProtocol = pytest.mark.slow(CompletedStoreProtocol.TestCase)  # ~10–40 s on the shared 2-core VM


def test_a_torn_file_of_a_pending_chunk_is_not_damage(tmp_path):
    """Found by the state machine (seed 44643767707768282765861047746812567317): a kill that leaves a torn
    topk_logits file in chunk 0 and no done flag; verify must not name it (the resume rewrites it), and after
    the resume it holds the written bytes."""
    path = str(tmp_path / "s.zarr")
    store = LogitStore.create_or_open(path, _info())
    w = store.begin_teacher("t", PROV, K, TAUS)
    _write(store, w, 2)
    f = _chunk_file(path, "teachers/t/topk_logits", 0)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"\x01\x02\x03")
    assert verify_store(path)["bad"] == []
    store = LogitStore.create_or_open(path, _info())
    w = store.begin_teacher("t", PROV, K, TAUS)
    assert sorted(w.pending_chunks()) == [0, 1]
    for c in (0, 1):
        _write(store, w, c)
    assert w.finalize() and verify_store(path)["bad"] == []
    np.testing.assert_array_equal(LogitStore.open(path).teacher("t")["topk_logits"][:], CHUNK_ARRAYS["topk_logits"])
    # a done chunk's torn file is still damage
    f.write_bytes(b"\x01\x02\x03")
    assert [(b.array, b.row_chunk) for b in verify_store(path)["bad"]] == [("teachers/t/topk_logits", 0)]
