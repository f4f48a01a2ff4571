"""Faults and bad input on one store: corruption, torn chunks, full disk, two writers, half-written teachers.

Every test records its row of the fault table (docs/reliability.md) through the ``reliability`` fixture.
"""

from __future__ import annotations

import errno
import re
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.distributed import WriterLease, job_id
from loca_pipe.pipeline.errors import IncompleteStoreError, StoreConflictError, StoreError
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.stages.cache_logits import CacheParams, run

TEACHER_ARRAYS = ("logits", "topk_logits", "topk_ids", "lse", "label_logit", "done")
ROW_ARRAYS = ("sample_id", "label", "view", "rows_done")


def toy(store: Path | str, **kw) -> CacheParams:
    base = dict(teacher="toy_cache_module:teacher", dataset="toy_cache_module:dataset", store=str(store), top_k=3,
                temperatures=(1.0, 4.0), chunk_rows=8, batch_size=3, device="cpu", num_workers=0, progress=False)
    base.update(kw)
    return CacheParams(**base)


def arrays(path: Path | str) -> dict[str, np.ndarray]:
    s = LogitStore.open(str(path))
    v = s.teacher("teacher")
    out = {k: v[k][:] for k in TEACHER_ARRAYS}
    out.update({k: s.group[k][:] for k in ROW_ARRAYS})
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """An uninterrupted single-process run: what every fault-and-resume must reproduce bit for bit."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run(toy(path))
    return arrays(path)


def test_corrupted_chunk_is_named_on_read(tmp_path, reference, reliability):
    path = tmp_path / "s.zarr"
    run(toy(path))
    chunk = path / "teachers" / "teacher" / "logits" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x40  # one flipped bit in the stored numbers
    chunk.write_bytes(bytes(raw))
    view = LogitStore.open(str(path)).teacher("teacher")
    pattern = (r"array 'teachers/teacher/logits' of the logit store: chunk 2 \(rows 16\.\.23, file "
               r"'teachers/teacher/logits/c/2/0'\) failed its CRC32C checksum")
    with pytest.raises(StoreError, match=pattern) as err:
        view["logits"][:]  # the zarr-style read every stage uses
    with pytest.raises(StoreError, match=pattern):
        view.probs(4.0, rows=[0, 17])  # an index read touching the chunk
    np.testing.assert_array_equal(view["logits"][0:16], reference["logits"][0:16])  # other chunks still read
    np.testing.assert_array_equal(view.read("logits", slice(24, 40)), reference["logits"][24:40])
    reliability("corrupted-chunk", "one bit flipped in a logits chunk file on disk",
                str(err.value), "every other chunk reads normally; nothing is returned for the bad chunk")


def test_torn_chunk_with_done_flag_fails_checksum(tmp_path, reliability):
    """A chunk file cut short (a store without atomic writes, power loss) whose flag did land: CRC catches it."""
    path = tmp_path / "s.zarr"
    run(toy(path))
    chunk = path / "teachers" / "teacher" / "topk_logits" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-9] + b"\0" * 9)  # the tail overwritten: torn write
    view = LogitStore.open(str(path)).teacher("teacher")
    with pytest.raises(StoreError, match=r"chunk 1 \(rows 8\.\.15, file 'teachers/teacher/topk_logits/c/1/0'\) "
                                         r"failed its CRC32C") as err:
        view.sparse(4.0)
    reliability("torn-chunk", "a chunk file torn (last bytes lost) although its done flag was written",
                str(err.value), "the other chunks; the torn chunk is never returned as numbers")


def test_half_written_teacher_is_refused_to_readers(tmp_path, reliability):
    path = tmp_path / "s.zarr"
    run(toy(path))
    store = LogitStore.open(str(path), mode="r+")
    store.group["teachers"]["teacher"]["done"][3] = 0  # as if chunk 3 were still being written
    a = store.teacher_attrs("teacher")
    store.group["teachers"]["teacher"].attrs["loca_pipe"] = {**a, "complete": False}
    with pytest.raises(IncompleteStoreError, match=r"teacher 'teacher' in .* is incomplete \(1 of 5 chunks not "
                                                   r"written\).*re-run the same") as err:
        LogitStore.open(str(path)).teacher("teacher")
    reliability("half-written", "a reader opens a teacher whose run is still writing (or crashed)",
                str(err.value), "the store is untouched; re-running cache-logits writes only chunk 3")
    run(toy(path))
    assert LogitStore.open(str(path)).is_complete("teacher")


def test_full_disk_stops_with_message_and_resumes(tmp_path, monkeypatch, reference, reliability):
    """ENOSPC injected at zarr's file write (LocalStore's _put) from the 3rd chunk on; then space comes back."""
    import zarr.storage._local as local

    real = local._put

    def full(p, value, exclusive=False):
        if "/teachers/teacher/" in Path(p).as_posix() and "/c/" in Path(p).as_posix() \
                and Path(p).as_posix().split("/c/")[1].split("/")[0] not in ("0", "1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
        return real(p, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full)
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match=r"while writing chunk 2: the disk is full \(ENOSPC.*chunks already finished "
                                         r"are kept.*same command again to resume") as err:
        run(toy(path))
    assert LogitStore.open(str(path)).pending_chunks("teacher") == [2, 3, 4]
    assert WriterLease(str(path), "teacher").read() is None  # the lease of the failed run is released
    monkeypatch.setattr(local, "_put", real)
    run(toy(path))
    assert_same(arrays(path), reference)
    reliability("disk-full", "the disk fills while chunk 2 is written (ENOSPC from the file write)",
                str(err.value), "chunks 0-1 (done flags set); the same command resumes at chunk 2, bit-identical")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_second_job_on_one_teacher_refuses_until_the_first_is_gone(tmp_path, reference, reliability):
    path = tmp_path / "s.zarr"
    run(toy(path))
    other = _sleeper()  # a live process of another job holds the lease
    try:
        lease = WriterLease(str(path), "teacher")
        Path(lease.path).parent.mkdir(parents=True, exist_ok=True)
        Path(lease.path).write_text(json.dumps({"job": f"test-job-{other.pid:x}", "host": socket.gethostname(),
                                                "pid": other.pid, "time": "2026-01-01T00:00:00+00:00"}))
        with pytest.raises(StoreConflictError, match=r"teacher 'teacher' in .* is being written by another job "
                                                     r"\(job test-job-.*pid \d+.*delete the lease file .*"
                                                     r"writer-teacher\.lease") as err:
            run(toy(path, overwrite=True))
        assert_same(arrays(path), reference)  # the refused job changed nothing, even with --overwrite
    finally:
        other.kill()
        other.wait()
    run(toy(path))  # its process is dead on this host: the lease is stale and taken over
    assert WriterLease(str(path), "teacher").read() is None  # ... and released at completion
    reliability("two-writers", "a second job starts writing a teacher another live job is writing",
                str(err.value), "the first job's lease and every chunk; the refused job writes nothing")


def test_lease_is_shared_by_one_job_and_exclusive_across_jobs(tmp_path, monkeypatch):
    lease = WriterLease(str(tmp_path), "t")
    monkeypatch.setenv("LOCA_JOB_ID", "job-a")
    a = WriterLease(str(tmp_path), "t")
    assert a.acquire()["job"] == "job-a"
    assert WriterLease(str(tmp_path), "t").acquire()["job"] == "job-a"  # a second rank of job a joins
    monkeypatch.setenv("LOCA_JOB_ID", "job-b")
    with pytest.raises(StoreConflictError, match=r"job job-a, host"):
        WriterLease(str(tmp_path), "t").acquire()
    WriterLease(str(tmp_path), "t").release()  # not ours: kept
    assert lease.read()["job"] == "job-a"
    monkeypatch.setenv("LOCA_JOB_ID", "job-a")
    a.release()
    assert lease.read() is None
    # torchrun ranks: same agent (parent pid) and port → one job; a plain process → host:pid
    monkeypatch.delenv("LOCA_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert job_id() == f"torchrun:{socket.gethostname()}:{os.getppid()}:29500"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert job_id() == "torchrun:exp7:node0:29500"


@pytest.mark.parametrize("key, kw, err, match, tried", [
    ("not-a-store", {}, StoreError, r"is not a loca-pipe logit store", "a reader pointed at a folder that is not a store"),
    ("missing-store", {}, StoreError, r"no logit store at .*create one with `loca-pipe cache-logits",
     "a reader pointed at a path where nothing exists"),
    ("unknown-url", {}, StoreError, r"cannot open logit store 'nosuch://bucket/s.zarr': Protocol not known: nosuch; "
                                    r"use a local path or an fsspec URL", "a store URL with a protocol fsspec does not know (nosuch://)"),
])
def test_bad_store_locations(tmp_path, key, kw, err, match, tried, reliability):
    if key == "not-a-store":
        import zarr

        zarr.open_group(str(tmp_path / "x.zarr"), mode="w").attrs["other"] = 1
        target = str(tmp_path / "x.zarr")
    elif key == "missing-store":
        target = str(tmp_path / "nothing.zarr")
    else:
        target = "nosuch://bucket/s.zarr"
    with pytest.raises(err, match=match) as e:
        LogitStore.open(target)
    reliability(key, tried, str(e.value), "nothing is read or written")


def test_garbage_lease_file_is_taken_over(tmp_path):
    path = tmp_path / "s.zarr"
    run(toy(path))
    lease = WriterLease(str(path), "teacher")
    Path(lease.path).write_bytes(b"\xff\x00 not json")
    run(toy(path))  # a complete teacher: a no-op that takes over the garbage lease and releases it
    assert lease.read() is None


@pytest.fixture
def small_fs(tmp_path):
    """A real tmpfs of a chosen size mounted in tmp_path (needs root and mount permission; else skipped)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size_kib: int) -> Path:
        opt = f"size={size_kib}k" if not mounted else f"remount,size={size_kib}k"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opt, "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); the ENOSPC injection test covers it")
        mounted.append(size_kib)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_real_full_filesystem_then_space_back(tmp_path, small_fs, reference, reliability):
    """A real small file system (tmpfs) fills mid-run; after growing it, the same command resumes bit-identically."""
    ref_dir = tmp_path / "sized.zarr"
    run(toy(ref_dir))
    used_kib = int(subprocess.run(["du", "-sk", str(ref_dir)], capture_output=True, text=True).stdout.split()[0])
    mnt = small_fs(max(8, used_kib * 6 // 10))  # room for about 60 % of the store
    path = mnt / "s.zarr"
    with pytest.raises(StoreError, match=r"the disk is full \(ENOSPC.*chunks already finished are kept.*same command "
                                         r"again to resume") as err:
        run(toy(path))
    small_fs(used_kib * 3)  # space is back
    run(toy(path))
    assert_same(arrays(path), reference)
    reliability("disk-full-tmpfs", "a real small file system (tmpfs, ~60 % of the store's size) fills mid-run; then "
                "it is grown and the same command runs again",
                re.sub(r"while [^:]+:", "while <step>:", str(err.value)),  # any step: where the disk fills varies
                "every chunk written before the disk filled; the re-run completes the store bit-identically")
