"""LoCa's cost: LoCa + KD loss ÷ plain KD loss (goal ≤ 1.10; the paper measured 1.22 on GPU), and offline
LoCa calibration throughput over a large fp16 logit array against a plain memory pass.

Part 1 — loss time, CPU, one thread (the machine has 2 shared cores), batches 64×100 and 256×1000,
τ = 4, α = 0.95, teachers with ~20 % mis-instruction. Timed in one process, interleaved (KD, LoCa, KD,
LoCa, …) and the best of several rounds taken, so machine noise hits both alike:

* ``kd``       — ``kd_loss(student, teacher_logits, τ, teacher_is="logits")`` (plain KD, the baseline);
* ``loca``     — ``loca_kd_loss(...)`` (KD against the LoCa-calibrated teacher, fused);
* ``loca-ref`` — calibrate with ``loca_from_logits`` then KD on the (B, C) calibrated probabilities (what
  a straightforward implementation does), for scale;
* ``mdistiller`` — mdistiller's formulation (softmax + F.kl_div) for reference.
Forward only (the paper's "KD loss" column) and forward + backward (what a training step pays).

Part 2 — offline calibration of an N × 1000 fp16 logit array (N = 1,000,000: 2 GB in, 2 GB out) in row
blocks with ``loca_calibrate_blocks`` (softmax at τ, LoCa, fp16 out), against, on the same blocks in the same
run: ``copy`` = ``np.copyto`` fp16 → fp16 (a pure memory pass) and ``softmax-only`` = fp16 → fp32,
softmax(z/τ), → fp16 (what any tempered target costs; exp over every entry is unavoidable). Prints
samples/s, GB/s (bytes read + written) and the ratios.

All times are CPU time of the calling thread (``time.thread_time``; torch runs with one intra-op thread, so
all work happens there): on a shared, oversubscribed machine wall-clock ratios swing by 2× from run to
run, CPU-time ratios do not. ``LOCA_BENCH_QUICK=1`` shrinks both parts to seconds (N = 20,000). ``LOCA_BENCH_ROWS=N`` picks N.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.calibration import loca_calibrate_blocks, loca_from_logits
from loca_pipe.pipeline.losses import kd_loss, loca_kd_loss

TAU, ALPHA = 4.0, 0.95


def _teacher(B: int, C: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    zs = torch.randn(B, C, generator=gen)
    zt = torch.randn(B, C, generator=gen) * 2
    y = torch.randint(0, C, (B,), generator=gen)
    good = torch.rand(B, generator=gen) < 0.8  # ~80 % of rows: the teacher is right (label boosted)
    zt[good, y[good]] += 12.0
    return zs, zt, y


def _mdistiller_kd(zs, zt, tau):
    return F.kl_div(F.log_softmax(zs / tau, 1), F.softmax(zt / tau, 1), reduction="none").sum(1).mean() * tau**2


def _time_interleaved(fns: dict, n: int, rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up
        for _ in range(max(3, n // 10)):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.thread_time()
            for _ in range(n):
                f()
            best[k] = min(best[k], (time.thread_time() - t) / n)
    return best


def bench_loss(quick: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"part 1: loss time per call, CPU, {torch.get_num_threads()} thread(s), tau={TAU}, alpha={ALPHA}, "
          f"best of interleaved rounds")
    for B, C in ((64, 100), (256, 1000)):
        zs, zt, y = _teacher(B, C, gen)
        mis = float((zt.argmax(1) != y).float().mean())
        zs_g = zs.clone().requires_grad_(True)

        def kd():
            return kd_loss(zs, zt, TAU, teacher_is="logits")

        def loca():
            return loca_kd_loss(zs, zt, y, TAU, ALPHA, teacher_is="logits")

        def loca_ref():
            return kd_loss(zs, loca_from_logits(zt, y, ALPHA, TAU).probs, TAU, teacher_is="probs")

        def mdist():
            return _mdistiller_kd(zs, zt, TAU)

        def kd_bw():
            kd_loss(zs_g, zt, TAU, teacher_is="logits").backward()

        def loca_bw():
            loca_kd_loss(zs_g, zt, y, TAU, ALPHA, teacher_is="logits").backward()

        n = (200 if B == 64 else 20) if quick else (2000 if B == 64 else 200)
        rounds = 3 if quick else 7
        with torch.no_grad():
            fw = _time_interleaved({"kd": kd, "loca": loca, "loca-ref": loca_ref, "mdistiller": mdist}, n, rounds)
        bw = _time_interleaved({"kd": kd_bw, "loca": loca_bw}, n, rounds)
        print(f"  {B}x{C} (mis-instruction {mis:.0%}): forward kd {fw['kd'] * 1e6:.1f} us, loca "
              f"{fw['loca'] * 1e6:.1f} us -> ratio loca/kd = {fw['loca'] / fw['kd']:.3f}  "
              f"(calibrate-then-KD {fw['loca-ref'] / fw['kd']:.3f}, mdistiller-style KD {fw['mdistiller'] / fw['kd']:.3f})")
        print(f"  {B}x{C} forward+backward: kd {bw['kd'] * 1e6:.1f} us, loca {bw['loca'] * 1e6:.1f} us -> "
              f"ratio {bw['loca'] / bw['kd']:.3f}")


def bench_offline(quick: bool) -> None:
    N = int(os.environ.get("LOCA_BENCH_ROWS", 20_000 if quick else 1_000_000))
    C = 1000
    rng = np.random.default_rng(0)
    print(f"part 2: offline LoCa over a {N:,} x {C} fp16 array ({N * C * 2 / 1e9:.2f} GB in, same out), "
          f"{torch.get_num_threads()} thread(s)")
    t0 = time.thread_time()
    # one random 32k-row tile, repeated: throughput does not depend on the values, generation would dominate
    tile_rows = min(N, 32_768)
    tile = rng.standard_normal((tile_rows, C), dtype=np.float32) * 2
    ty = rng.integers(0, C, tile_rows)
    good = rng.random(tile_rows) < 0.8  # the teacher is right on ~80 % of rows
    tile[np.nonzero(good)[0], ty[good]] += 12.0
    tile16 = tile.astype(np.float16)
    z = np.empty((N, C), np.float16)
    y = np.empty(N, np.int64)
    for s in range(0, N, tile_rows):
        e = min(N, s + tile_rows)
        z[s:e] = tile16[: e - s]
        y[s:e] = ty[: e - s]
    out = np.zeros_like(z)  # touched, so the first timed pass does not pay for page faults
    print(f"  (generated in {time.thread_time() - t0:.1f} s)")
    gbytes = 2 * z.nbytes / 1e9  # read + write

    def run_copy(br):
        for s in range(0, N, br):
            np.copyto(out[s:s + br], z[s:s + br])

    def run_softmax(br):  # the floor for any tempered target: fp16 -> fp32, softmax(z/tau), -> fp16
        for s in range(0, N, br):
            p = torch.softmax(torch.from_numpy(z[s:s + br]).float().div_(TAU), dim=1)
            torch.from_numpy(out[s:s + br]).copy_(p)

    def run_loca(br):
        return loca_calibrate_blocks(z, y, ALPHA, TAU, out=out, block_rows=br)

    results: dict[str, list[float]] = {}
    blocks = (1024, 8192)
    cal = None
    for _ in range(1 if quick else 2):
        for br in blocks:
            for name, fn in (("copy", run_copy), ("softmax", run_softmax), ("loca", run_loca)):
                t = time.thread_time()
                r = fn(br)
                results.setdefault(f"{name}@{br}", []).append(time.thread_time() - t)
                if name == "loca":
                    cal = r[0]
    best = {k: min(v) for k, v in results.items()}
    for br in blocks:
        tc, ts, tl = best[f"copy@{br}"], best[f"softmax@{br}"], best[f"loca@{br}"]
        print(f"  block {br:>5} rows: copy {tc:.2f} s ({gbytes / tc:.2f} GB/s) | softmax-only {ts:.2f} s "
              f"({N / ts:,.0f} samples/s) | loca {tl:.2f} s = {N / tl:,.0f} samples/s, {gbytes / tl:.2f} GB/s "
              f"-> loca/copy {tl / tc:.1f}x, loca/softmax-only {tl / ts:.2f}x")
    print(f"  calibrated rows: {cal.mean():.1%}")


def main() -> None:
    quick = os.environ.get("LOCA_BENCH_QUICK") == "1"
    prev = torch.get_num_threads()
    # one thread: the machine's 2 cores are shared, and oversubscribed intra-op threads make every op wait
    torch.set_num_threads(1)
    try:
        bench_loss(quick)
        bench_offline(quick)
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    main()
