"""Ctrl-C and repair, on real subprocesses of the installed console script.

* SIGINT mid-cache: exit 130, "interrupted; resume with: loca-pipe cache-logits …" (the same command) on stderr, the chunks already
  done are kept, and the same command finishes the store bit for bit like an uninterrupted run.
* A corrupted chunk: `verify` names it and exits 1, `info` stops calling the teacher complete, `verify
  --repair` marks exactly the bad chunks not done, and re-running the same `cache-logits` command rewrites
  only those: every chunk file equals the original's, byte for byte (only the `finished` time differs).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, subprocess_env

INTERRUPTED = "interrupted; resume with: loca-pipe"  # + the exact command (cli/main.py::interrupted_line)


def console_script() -> str:
    """The installed `loca-pipe`: next to the running python (make test runs the venv's), else on PATH."""
    here = Path(sys.executable).parent / "loca-pipe"
    found = str(here) if here.is_file() else shutil.which("loca-pipe")
    if found is None:
        pytest.fail("the `loca-pipe` console script is not installed next to this python or on PATH; run `make setup`")
    return found


def env(**extra: str) -> dict[str, str]:
    return subprocess_env(COLUMNS="200", **extra)


def run_cli(args: list, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *map(str, args)], env=env(**extra_env), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, cwd=REPO)


def toy_args(store: Path | str, *more: str) -> list[str]:
    """cache-logits options of the toy teacher/data set (40 rows, chunks of 8 → 5 chunks)."""
    return ["cache-logits", "--teacher", "toy_cache_module:teacher", "--dataset", "toy_cache_module:dataset",
            "--store", str(store), "--top-k", "3", "--temperatures", "1,4", "--chunk-rows", "8", "--batch-size", "3",
            "--device", "cpu", "--num-workers", "0", *more]


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    """A complete toy store made by the same command line (a reference: tests copy it, never modify it)."""
    path = tmp_path_factory.mktemp("toy") / "s.zarr"
    r = run_cli(toy_args(path))
    assert r.returncode == 0, r.stderr
    return path
TIME_KEYS = ("created", "finished", "versions", "run")  # attributes that record when/where, not the numbers


def _files(store: Path) -> dict[str, bytes]:
    """Every chunk file of the store (lease files and zarr.json excluded: those are compared as JSON)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".lease")}


def _meta(store: Path) -> dict[str, object]:
    out = {}
    for p in sorted(store.rglob("zarr.json")):
        m = json.loads(p.read_text())
        a = (m.get("attributes") or {}).get("loca_pipe")
        if isinstance(a, dict):
            m["attributes"]["loca_pipe"] = {k: v for k, v in a.items() if k not in TIME_KEYS}
        out[str(p.relative_to(store))] = m
    return out


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    changed = [k for k in fa if fa[k] != fb[k]]
    assert not changed, changed
    assert _meta(a) == _meta(b)


@pytest.mark.slow
def test_sigint_mid_cache_exits_130_and_the_same_command_resumes(tmp_path, toy_store, reliability):
    store = tmp_path / "s.zarr"
    args = toy_args(store, "--progress")
    proc = subprocess.Popen([console_script(), *args], env=env(LOCA_TEST_SLEEP="0.15"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    done = store / "teachers" / "teacher" / "done" / "c"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())):  # wait until the first chunk is marked done
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    import shlex

    assert err.rstrip().splitlines()[-1] == f"{INTERRUPTED} {shlex.join(map(str, args))}", err
    assert "Traceback" not in err
    reliability("interrupted", "Ctrl-C (SIGINT) while cache-logits runs, after its first chunk is done",
                f"exit code 130; {INTERRUPTED} cache-logits … (the same command)",
                "every chunk marked done; the same command resumes the rest, bit-identical to an uninterrupted run")

    from loca_pipe.pipeline.store import LogitStore

    s = LogitStore.open(str(store))
    left = s.pending_chunks("teacher")
    assert 0 < len(left) < s.info.num_chunks and not s.is_complete("teacher")  # stopped midway, work kept
    kept = {c: s.teacher("teacher", allow_incomplete=True)["logits"][s.info.chunk_slice(c)]
            for c in range(s.info.num_chunks) if c not in left}
    r = run_cli(toy_args(store))  # the same command, rerun
    assert r.returncode == 0, r.stderr
    assert "(resumed)" in r.stderr
    s = LogitStore.open(str(store))
    assert s.is_complete("teacher")
    for c, z in kept.items():  # nothing already written was lost or rewritten differently
        np.testing.assert_array_equal(s.teacher("teacher")["logits"][s.info.chunk_slice(c)], z)
    assert_same_store(store, toy_store)


def _flip(path: Path, at: int = 5) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_corrupt_verify_repair_recache_is_bit_identical(tmp_path, toy_store, reliability):
    store = tmp_path / "s.zarr"
    shutil.copytree(toy_store, store)
    original = tmp_path / "original.zarr"
    shutil.copytree(toy_store, original)
    assert run_cli(["verify", store]).returncode == 0

    _flip(store / "teachers" / "teacher" / "logits" / "c" / "2" / "0")  # a teacher array
    _flip(store / "label" / "c" / "4", at=-1)  # a shared row array (every teacher depends on it)
    r = run_cli(["verify", store])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    bad = [line for line in r.stderr.splitlines() if line.startswith("BAD ")]
    assert bad == [
        "BAD array 'label' chunk [4], row chunk 4 (file 'label/c/4'): CRC32C mismatch (the file is corrupted); "
        "teacher(s) teacher",
        "BAD array 'teachers/teacher/logits' chunk [2, 0], row chunk 2 (file 'teachers/teacher/logits/c/2/0'): "
        "CRC32C mismatch (the file is corrupted); teacher(s) teacher"], r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("error: ")] == [
        f"error: 2 chunk(s) of '{store}' failed verification (listed above); run `loca-pipe verify {store} --repair`, "
        f"then re-run the teachers' `loca-pipe cache-logits` commands"]

    reliability("verify-corrupt", "`loca-pipe verify STORE` on a store with a flipped bit in a teacher chunk and "
                "in a shared row chunk", f"{bad[1]} (one BAD line per chunk); exit code 1",
                "nothing is changed except the teacher's verify_failed record: `info` calls it CORRUPT, not complete")
    info = run_cli(["info", "--store", store, "--json"])
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["teachers"]["teacher"]["complete"] is False  # known-bad is never complete
    assert "CORRUPT" in run_cli(["info", store]).stdout

    r = run_cli(["verify", store, "--repair"])
    assert r.returncode == 1 and "marked not done (teacher: chunks [2, 4])" in r.stderr, r.stderr
    reliability("verify-repair", "`loca-pipe verify STORE --repair`, then the same cache-logits command again",
                [x for x in r.stderr.splitlines() if x.startswith("error: ")][0].removeprefix("error: "),
                "all other chunks; the rerun recomputes only the 2 bad chunks and every chunk file equals the "
                "original byte for byte")
    from loca_pipe.pipeline.store import LogitStore

    s = LogitStore.open(str(store))
    assert s.pending_chunks("teacher") == [2, 4] and not s.is_complete("teacher")
    assert list(np.flatnonzero(s.group["rows_done"][:] == 0)) == [4]

    r = run_cli(toy_args(store))  # the same command as the one that made the store
    assert r.returncode == 0, r.stderr
    assert "16 rows cached" in r.stderr  # two chunks of 8 rows, nothing else recomputed
    assert run_cli(["verify", store]).returncode == 0
    assert_same_store(store, original)


def test_verify_finds_a_deleted_chunk_file_of_a_done_chunk(tmp_path, toy_store):
    from loca_pipe.pipeline.store import invalidate_chunks, verify_store

    store = tmp_path / "s.zarr"
    shutil.copytree(toy_store, store)
    (store / "teachers" / "teacher" / "topk_ids" / "c" / "1" / "0").unlink()
    rep = verify_store(str(store))
    assert [(b.array, b.chunk, b.reason) for b in rep["bad"]] == [
        ("teachers/teacher/topk_ids", (1, 0), "missing file (chunk marked done)")]
    assert invalidate_chunks(str(store), rep["bad"]) == {"teacher": [1]}
    from loca_pipe.pipeline.store import LogitStore

    assert LogitStore.open(str(store)).pending_chunks("teacher") == [1]


def test_token_store_repair_rewrites_the_sequence_index_and_teacher_chunks(tmp_path):
    """A token store: a corrupted teacher chunk, a corrupted ``position`` chunk and a deleted ``offsets`` chunk
    (the index lm-cache writes once from the data) are found, repaired and rewritten by the same lm-cache run,
    bit for bit; readers refuse the teacher in between, and the CLI names `lm-cache`, not `cache-logits`.
    Before, repair refused ``offsets`` (no done flag) and a repaired ``position`` chunk made lm-cache refuse the
    store ("holds other sequence boundaries")."""
    import importlib.util

    from loca_pipe.pipeline.errors import IncompleteStoreError
    from loca_pipe.pipeline.store import LogitStore, verify_store

    spec = importlib.util.spec_from_file_location("layout_tests", REPO / "tests" / "pipeline" / "test_layout.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    store, original = tmp_path / "tok.zarr", tmp_path / "original.zarr"
    make = dict(sample_draws=2, greedy_max_new_tokens=2, greedy_chunk=2)
    lt._tiny_token_store(store, **make)
    shutil.copytree(store, original)

    _flip(store / "teachers" / "t" / "lse" / "c" / "1" / "0")
    _flip(store / "position" / "c" / "2")
    (store / "offsets" / "c" / "0").unlink()
    rep = verify_store(str(store), record=False)
    assert sorted((b.array, b.chunk, b.reason.split(" (")[0]) for b in rep["bad"]) == [
        ("offsets", (0,), "missing file"), ("position", (2,), "CRC32C mismatch"),
        ("teachers/t/lse", (1, 0), "CRC32C mismatch")]
    assert all(b.flag is not None for b in rep["bad"]), "every bad chunk is repairable chunk by chunk"

    r = run_cli(["verify", store, "--repair"])
    err = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 1 and len(err) == 1 and "`loca-pipe lm-cache` command" in err[0], r.stderr
    assert "cache-logits" not in r.stderr
    with pytest.raises(IncompleteStoreError, match="re-run the same `loca-pipe lm-cache` command"):
        LogitStore.open(str(store)).teacher("t")
    assert LogitStore.open(str(store)).pending_chunks("t") == [1]

    lt._tiny_token_store(store, **make)  # the same lm-cache call as the one that made the store
    assert verify_store(str(store), record=False)["bad"] == []
    assert LogitStore.open(str(store)).is_complete("t")
    assert_same_store(store, original)
