"""Scale-out benchmark (issue 8), two ratios measured in one run on this machine.

1. **Caching, 2 torchrun ranks vs 1 process**: `cache-logits` of the `cnn` teacher (random weights) over the
   first N Fashion-MNIST training images, once as one process (torch on 2 threads) and once as
   `torchrun --nproc-per-node 2` (gloo, one thread per rank), each into a fresh store. Printed: wall time of
   the whole command (process start, imports, rendezvous included) and the caching loop's own time.
2. **Analysis, dask LocalCluster of 2 worker processes vs one process**: H4's ``pipeline.analysis.analyze`` over
   the synthetic ImageNet-sized store of ``benchmarks/bench_analyze.py`` (1,281,167 rows × 1000 classes fp16,
   built with its ``build_store``), on dask's threaded scheduler and on a 2-worker cluster, each in a fresh
   child process; only the analysis call is timed.

``LOCA_BENCH_QUICK=1``: 1,024 images and a 20,000-row store (seconds). ``LOCA_BENCH_TMP``: where stores go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick() -> bool:
    return os.environ.get("LOCA_BENCH_QUICK") == "1"


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    return env


def cache_run(ranks: int, store: Path, samples: int) -> dict[str, float]:
    args = ["cache-logits", "--teacher", "cnn", "--dataset", "fashion-mnist", "--store", str(store),
            "--max-samples", str(samples), "--chunk-rows", "1024", "--batch-size", "256", "--device", "cpu",
            "--no-progress", "--name", "cnn"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "loca_pipe.cli.main", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "loca_pipe.cli.main", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(2 if ranks == 1 else 1), capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"cache-logits ({ranks} rank(s)) failed:\n{r.stderr[-3000:]}")
    loops = [float(x) for x in re.findall(r"rows cached in ([0-9.]+) s", r.stderr)]
    return {"wall": wall, "loop": max(loops) if loops else float("nan")}


def _analyze(store: str, cluster: bool) -> dict:
    from loca_pipe.pipeline.analysis import AnalysisOptions, analyze

    opts = AnalysisOptions(tau=1.0, alphas=(0.95,))
    if not cluster:
        t0 = time.perf_counter()
        (rep,) = analyze(store, None, opts)
        return {"seconds": time.perf_counter() - t0, "mis": rep.metrics["mis_instructed"]}
    from distributed import Client, LocalCluster

    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as lc, Client(lc) as client:
        client.run(lambda: None)  # workers up before timing
        t0 = time.perf_counter()
        (rep,) = analyze(store, None, opts, client=client)
        return {"seconds": time.perf_counter() - t0, "mis": rep.metrics["mis_instructed"]}


def analyze_child(store: Path, cluster: bool) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_dist", "--analyze", str(store),
                        "cluster" if cluster else "single"], env=_env(2), capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"analysis child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks import bench_analyze

    samples = 1024 if _quick() else 60000
    rows = 20_000 if _quick() else 1_281_167
    tmp_root = os.environ.get("LOCA_BENCH_TMP", tempfile.gettempdir())
    need = rows * 1000 * 2 * 1.1 + (1 << 28)
    if shutil.disk_usage(tmp_root).free < need:
        print(f"bench_dist: not enough free disk in {tmp_root}; set LOCA_BENCH_TMP or LOCA_BENCH_QUICK=1")
        return
    work = Path(tempfile.mkdtemp(prefix="loca-bench-dist-", dir=tmp_root))
    try:
        print(f"bench_dist: caching {samples:,} Fashion-MNIST images with the cnn teacher; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        one = cache_run(1, work / "one.zarr", samples)
        two = cache_run(2, work / "two.zarr", samples)
        from loca_pipe.pipeline.store import LogitStore

        a = LogitStore.open(str(work / "one.zarr")).teacher("cnn")["logits"][:]
        b = LogitStore.open(str(work / "two.zarr")).teacher("cnn")["logits"][:]
        same = bool((a == b).all())
        print(f"  1 process (2 threads): {one['wall']:.1f} s wall, caching loop {one['loop']:.1f} s")
        print(f"  torchrun 2 ranks (1 thread each): {two['wall']:.1f} s wall, slowest rank's loop {two['loop']:.1f} s")
        print(f"  ratio 1 process / 2 ranks: wall {one['wall'] / two['wall']:.2f}x, loop "
              f"{one['loop'] / two['loop']:.2f}x; stores bit-identical: {same}")

        store = work / "synthetic.zarr"
        t0 = time.perf_counter()
        built = bench_analyze.build_store(store, rows)
        print(f"bench_dist: synthetic store {rows:,} rows x 1000 classes fp16, {built['chunks']} chunks, built in "
              f"{time.perf_counter() - t0:.1f} s")
        single = analyze_child(store, cluster=False)
        cluster = analyze_child(store, cluster=True)
        assert single["mis"] == cluster["mis"] == built["mis_numpy"], (single, cluster, built["mis_numpy"])
        print(f"  analysis, one process (threads): {single['seconds']:.1f} s; LocalCluster 2 workers: "
              f"{cluster['seconds']:.1f} s; ratio {single['seconds'] / cluster['seconds']:.2f}x; "
              f"mis-instructed rows equal ({single['mis']:,})")
        print(f"  load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--analyze":
        print(json.dumps(_analyze(sys.argv[2], sys.argv[3] == "cluster")))
    else:
        main()
