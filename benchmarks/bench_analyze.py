"""Analysis and target-writing throughput on a synthetic ImageNet-sized logit store (issue 4).

Generates 1,281,167 × 1,000 fp16 full logits (≈ 2.6 GB; random normal logits with a label bump of 4.1, so
≈ 20 % of rows mis-instruct) with the store API into a temporary folder, then measures in the same run:

- raw sequential read of the store's files (plain ``readinto``), warm (page cache) and cold (after
  ``posix_fadvise(DONTNEED)`` on those files only);
- a zarr read of the same arrays without computing anything (decode + CRC32C);
- the full logits into memory: ``np.load`` of the same array saved as .npy vs the store's checked read
  (``store.read_checked``: chunk files read in place, CRC32C verified) vs plain zarr, interleaved;
- the analysis (``pipeline.analysis.analyze``: every statistic, exact entropy from the full logits, the
  per-sample Parquet) in a child process — time, GB/s, ratio to the raw read, and the child's peak RSS
  (VmHWM, absolute and above its post-import baseline);
- the same with ``entropy="topk"`` (summary arrays only, never the full logits);
- writing the LoCa targets for one α (dense kd + loca_0.95, validated) in a child process.

``LOCA_BENCH_QUICK=1`` shrinks the store to 20,000 rows and measures in-process (RSS figures then include the
benchmark's own memory; the cold analysis is not repeated).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

C = 1000
BUMP = 4.1  # label-logit bump: ~20 % of rows have a larger non-label logit among 999 N(0,1) (measured)
TAU = 1.0  # the paper's ImageNet temperature
ALPHA = 0.95


def _quick() -> bool:
    return os.environ.get("LOCA_BENCH_QUICK") == "1"


def _rows() -> int:
    return 20_000 if _quick() else 1_281_167


def build_store(path: Path, R: int) -> dict:
    """Write the synthetic store with the store API, chunks generated in two threads."""
    import torch

    from loca_pipe.pipeline.caching import summarize_logits
    from loca_pipe.pipeline.store import LogitStore, StoreInfo, default_chunk_rows

    chunk = default_chunk_rows(C, bytes_per_value=2)  # ~4 MiB fp16 logit chunks
    info = StoreInfo("classification", R, 1, R, C, chunk, {"name": "synthetic-imagenet", "fingerprint": f"bench-{R}",
                                                         "split": "train"})
    st = LogitStore.create_or_open(str(path), info, overwrite=True)
    w = st.begin_teacher("synthetic_r50", {"arch": "synthetic"}, top_k=5, temperatures=[TAU], logits_dtype="float16")
    torch.set_num_threads(1)

    def one(c: int) -> int:
        rng = np.random.default_rng(c)
        sl = info.chunk_slice(c)
        n = sl.stop - sl.start
        y = rng.integers(0, C, n)
        z = rng.standard_normal((n, C), dtype=np.float32)
        z[np.arange(n), y] += BUMP
        st.write_rows(c, np.arange(sl.start, sl.stop), y, np.zeros(n, np.int16))
        s = summarize_logits(torch.from_numpy(z), torch.from_numpy(y), 5, [TAU])
        w.write_chunk(c, {**{k: v.numpy() for k, v in s.items()}, "logits": z})
        return int((z.argmax(1) != y).sum())

    with ThreadPoolExecutor(2) as ex:
        mis = sum(ex.map(one, range(info.num_chunks)))
    assert w.finalize()
    return {"rows": R, "chunk_rows": chunk, "chunks": info.num_chunks, "mis_numpy": mis}


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict this store's files (and only them) from the page cache."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(path: Path) -> tuple[int, float]:
    """Sequential read of every file of the store into one reused buffer: (bytes, seconds)."""
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in _files(path):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(mv)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def zarr_read(path: Path) -> float:
    """Read every chunk of the arrays the analysis reads through the store's checked read (TeacherView), in the
    analysis's block pattern (64k rows per call), without computing anything: seconds. Raw local arrays (the
    fp16 logits, the fp32 summaries) take the store's fast path; the compressed int arrays go through zarr."""
    from loca_pipe.pipeline.analysis import LOGITS_BLOCK_BYTES, SMALL_BLOCK_ROWS
    from loca_pipe.pipeline.store import LogitStore

    st = LogitStore.open(str(path))
    tv = st.teacher()
    R, ch = st.info.num_rows, st.info.chunk_rows
    small_rows = max(1, SMALL_BLOCK_ROWS // ch) * ch
    logit_rows = max(1, LOGITS_BLOCK_BYTES // (ch * C * 2)) * ch
    t0 = time.perf_counter()
    for s in range(0, R, small_rows):
        for k in ("topk_logits", "topk_ids", "lse", "label_logit", "label", "view", "sample_id"):
            tv[k][s:s + small_rows]
    for s in range(0, R, logit_rows):
        tv["logits"][s:s + logit_rows]
    return time.perf_counter() - t0


def checked_read_vs_npy(path: Path, work: Path, repeats: int = 6) -> dict:
    """The store's checked read of the full logits (CRC32C verified, ``store.read_checked``) against ``np.load``
    of the same array saved as .npy, and plain zarr ``arr[:]``, interleaved in one run: best of ``repeats``."""
    import gc

    from loca_pipe.pipeline.store import LogitStore, read_checked

    arr = LogitStore.open(str(path)).teacher()["logits"].zarr
    npy = work / "logits.npy"
    np.save(npy, read_checked(arr))
    gc.collect()
    best = {"npy": float("inf"), "checked": float("inf"), "zarr": float("inf")}
    for _ in range(repeats):
        for name, fn in (("npy", lambda: np.load(npy)), ("checked", lambda: read_checked(arr)),
                         ("zarr", lambda: arr[:])):
            t0 = time.perf_counter()
            x = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            del x
            gc.collect()
    npy.unlink()
    return {**best, "bytes": int(np.prod(arr.shape)) * arr.dtype.itemsize}


def _status(key: str) -> int:
    import re

    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def measure(what: str, store: str, out: str, entropy: str = "auto") -> dict:
    """Run the analysis (``what`` = "analyze") or the target writing once; time, CPU time, RSS of this process."""
    import resource

    from loca_pipe.pipeline.analysis import AnalysisOptions, analyze
    from loca_pipe.pipeline.targets import write_targets

    base = _status("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if what == "analyze":
        (rep,) = analyze(store, None, AnalysisOptions(tau=TAU, alphas=(ALPHA,), entropy=entropy), samples_dir=out,
                         progress=not _quick())
        extra = {"mis": rep.metrics["mis_instructed"], "ratio": rep.metrics["mis_instruction_ratio"],
                 "top5": rep.metrics["top5"]}
    else:
        rep = write_targets(store, out, [ALPHA], TAU)
        extra = {"violations": rep.violations, "calibrated_rows": rep.teachers["synthetic_r50"]["calibrated_rows"]}
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"seconds": dt, "cpu_seconds": cpu, "base_rss": base, "peak_rss": _status("VmHWM"), **extra}


CHILD = "import json, sys; from benchmarks.bench_analyze import measure; print(json.dumps(measure(*sys.argv[1:5])))"
REPO = Path(__file__).resolve().parents[1]


def child(what: str, store: Path, out: Path, entropy: str = "auto") -> dict:
    """``measure`` in a fresh process (its peak RSS is the analysis's own); in-process when quick."""
    if _quick():
        return measure(what, str(store), str(out), entropy)
    r = subprocess.run([sys.executable, "-c", CHILD, what, str(store), str(out), entropy], capture_output=True,
                       text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    R = _rows()
    tmp_root = os.environ.get("LOCA_BENCH_TMP", tempfile.gettempdir())
    need = R * C * 2 * 2.1 + R * C * 4 * 2 * 1.05 + (1 << 28)  # store + kd/loca fp32 targets + Parquet
    free = shutil.disk_usage(tmp_root).free
    print(f"bench_analyze: {R:,} rows × {C} classes fp16 (quick={os.environ.get('LOCA_BENCH_QUICK') == '1'}); "
          f"free disk in {tmp_root}: {_gb(free)}, needed ≈ {_gb(need)}")
    if free < need:
        print("bench_analyze: not enough free disk; set LOCA_BENCH_TMP to a roomier folder or LOCA_BENCH_QUICK=1")
        return
    work = Path(tempfile.mkdtemp(prefix="loca-bench-analyze-", dir=tmp_root))
    try:
        store = work / "store.zarr"
        t0 = time.perf_counter()
        built = build_store(store, R)
        t_build = time.perf_counter() - t0
        nbytes, _ = raw_read(store)  # warm the page cache and count the bytes
        print(f"  store: {_gb(nbytes)} in {built['chunks']} chunks of {built['chunk_rows']} rows, written in "
              f"{t_build:.1f} s ({nbytes / t_build / 1e9:.2f} GB/s); numpy mis-instructions {built['mis_numpy']:,} "
              f"({built['mis_numpy'] / R:.1%})")
        _, t_raw_warm = raw_read(store)
        t_zarr = zarr_read(store)
        cr = checked_read_vs_npy(store, work)
        a_warm = child("analyze", store, work / "samples_warm")
        drop_cache(store)
        _, t_raw_cold = raw_read(store)
        drop_cache(store)
        a_cold = a_warm if _quick() else child("analyze", store, work / "samples_cold")  # quick: skip repeats
        a_topk = child("analyze", store, work / "samples_topk", entropy="topk")
        assert a_warm["mis"] == built["mis_numpy"] == a_cold["mis"], (a_warm, built)
        gbps = lambda t: nbytes / t / 1e9  # noqa: E731
        print(f"  raw sequential read, warm: {t_raw_warm:.2f} s = {gbps(t_raw_warm):.2f} GB/s; "
              f"cold: {t_raw_cold:.2f} s = {gbps(t_raw_cold):.2f} GB/s")
        print(f"  store read in the analysis's pattern (checked: CRC32C; no compute, one thread), warm: {t_zarr:.2f} s = {gbps(t_zarr):.2f} GB/s "
              f"(ratio to raw warm {t_raw_warm / t_zarr:.2f})")
        print(f"  full logits ({_gb(cr['bytes'])}) into memory, warm, best of 6 interleaved: np.load of an .npy "
              f"{cr['npy']:.2f} s; the store's checked read (CRC32C verified) {cr['checked']:.2f} s = "
              f"{cr['checked'] / cr['npy']:.2f}× npy (goal ≤ 1.5); plain zarr arr[:] {cr['zarr']:.2f} s = "
              f"{cr['zarr'] / cr['npy']:.2f}× npy")
        for name, a, t_raw in (("warm", a_warm, t_raw_warm), ("cold", a_cold, t_raw_cold)):
            print(f"  analysis ({name} cache, exact entropy from full logits): {a['seconds']:.2f} s = "
                  f"{gbps(a['seconds']):.2f} GB/s, {R / a['seconds']:,.0f} rows/s; ratio to raw {name} read "
                  f"{t_raw / a['seconds']:.2f} (goal ≥ 0.5); peak RSS {a['peak_rss'] / 2**30:.2f} GiB "
                  f"(+{(a['peak_rss'] - a['base_rss']) / 2**20:.0f} MiB over the post-import baseline; goal ≤ 2 GB); "
                  f"CPU time {a['cpu_seconds']:.1f} s")
        print(f"  analysis from the summary arrays only (entropy=topk, logits not read): {a_topk['seconds']:.2f} s = "
              f"{R / a_topk['seconds']:,.0f} rows/s; peak RSS {a_topk['peak_rss'] / 2**30:.2f} GiB; "
              f"CPU time {a_topk['cpu_seconds']:.1f} s")
        print(f"  (load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores — wall times scale "
              f"with it; the CPU times do not)")
        print(f"  mis-instruction ratio {a_warm['ratio']:.4f}, teacher top-5 {a_warm['top5']:.4f}")
        tg = child("targets", store, work / "targets.zarr")
        tbytes = sum(f.stat().st_size for f in _files(work / "targets.zarr"))
        print(f"  LoCa targets for one α ({ALPHA}, τ={TAU:g}; dense kd + loca, validated): {tg['seconds']:.1f} s, "
              f"{_gb(tbytes)} written ({tbytes / tg['seconds'] / 1e9:.2f} GB/s), {R / tg['seconds']:,.0f} rows/s; "
              f"violations {tg['violations']}; calibrated rows {tg['calibrated_rows']:,}; "
              f"peak RSS {tg['peak_rss'] / 2**30:.2f} GiB; CPU time {tg['cpu_seconds']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
