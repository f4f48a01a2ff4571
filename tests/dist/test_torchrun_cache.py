"""`cache-logits` under torchrun: 2 real concurrent ranks (gloo, CPU) fill one store; a rank killed mid-run,
then the job restarted, leaves the store bit-identical to a single-process run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from loca_pipe.pipeline.distributed import WriterLease
from loca_pipe.pipeline.store import LogitStore
from loca_pipe.stages.cache_logits import run

from .conftest import subprocess_env, torchrun
from .test_faults import arrays, assert_same, toy


def cache_args(store: Path) -> list[str]:
    return ["cache-logits", "--teacher", "toy_cache_module:teacher", "--dataset", "toy_cache_module:dataset",
            "--store", str(store), "--top-k", "3", "--temperatures", "1,4", "--chunk-rows", "4", "--batch-size",
            "3", "--device", "cpu", "--num-workers", "0", "--no-progress"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(t) for t in text]
    return out


@pytest.mark.slow
def test_two_ranks_then_rank_killed_and_restarted_is_bit_identical(tmp_path, reliability):
    ref = tmp_path / "ref.zarr"
    run(toy(ref, chunk_rows=4))  # one process, the reference
    want = arrays(ref)

    # 1. a slow 2-rank job (both ranks write concurrently); SIGKILL one rank once both have finished a chunk
    killed = tmp_path / "killed.zarr"
    job = subprocess.Popen(torchrun(2, *cache_args(killed)), env=subprocess_env(LOCA_TEST_SLEEP="0.3"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = killed / "teachers" / "teacher" / "done" / "c"
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        flags = {int(p.name) for p in done.iterdir()} if done.is_dir() else set()
        if any(c % 2 == 0 for c in flags) and any(c % 2 == 1 for c in flags):
            break
        time.sleep(0.05)
    assert job.poll() is None, f"the slow job ended before the kill: {job.communicate()[1][-3000:]}"
    ranks = _children(job.pid)
    assert len(ranks) == 2, ranks
    import os

    os.kill(ranks[1], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    store = LogitStore.open(str(killed))
    pending = store.pending_chunks("teacher")
    assert 0 < len(pending) < store.info.num_chunks, pending
    assert not store.is_complete("teacher")
    lease = WriterLease(str(killed), "teacher").read()
    assert lease is not None  # the dead job's lease stays; its pid is dead, so the restart takes it over

    # 2. the same job again: resumes, completes, bit-identical
    res = subprocess.run(torchrun(2, *cache_args(killed)), env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(arrays(killed), want)
    assert WriterLease(str(killed), "teacher").read() is None  # released by rank 0 after the final barrier
    assert "(resumed)" in res.stderr and "rows cached" in res.stderr, res.stderr[-3000:]
    reliability("rank-killed", "torchrun, 2 ranks: one rank SIGKILLed mid-run (torchrun stops the job), "
                "then the same torchrun command again",
                "torchrun reports the failed rank and exits non-zero; `loca-pipe info` shows the teacher INCOMPLETE "
                "(k/n chunks); readers refuse it; the restart prints `… rows cached … (resumed)`",
                "every chunk whose done flag was set (the dead job's lease is stale and taken over); the restart "
                "computes only the rest; the store is bit-identical to one process")
