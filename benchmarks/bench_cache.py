"""Stage one's overhead: caching wall time ÷ pure teacher inference over the same batches (goal ≤ 1.05).

Default teacher architecture (``cnn``, as train-teacher's default) on Fashion-MNIST train, CPU, batch 256,
default chunking. In one process:

* baseline — forward passes only, ``torch.inference_mode``, on the same chunk-aligned batches, already
  materialised in memory (the floor: no data loading, no summarising, no writing);
* caching — ``stages.cache_logits.run`` end to end into a fresh store (data indexing in a prefetch thread,
  top-k / lse / label logit, background zarr writes, done flags), for a full-logit (fp32) store and a
  top-k-only store. ``loop`` is the chunk loop alone, ``total`` adds opening data, model and store.

The baseline runs before and after the caching runs; their spread shows the machine's noise.
Also printed: samples/s and bytes per sample on disk for both stores.
``LOCA_BENCH_QUICK=1`` shrinks it to 1,024 samples (seconds); ``LOCA_BENCH_SAMPLES=N`` picks N.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _baseline(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model(x)
    return time.perf_counter() - t


def main() -> None:
    from loca_pipe.pipeline import data, models
    from loca_pipe.pipeline.store import StoreInfo, default_chunk_rows
    from loca_pipe.stages import cache_logits as stage

    quick = os.environ.get("LOCA_BENCH_QUICK") == "1"
    n = int(os.environ.get("LOCA_BENCH_SAMPLES", "1024" if quick else "0")) or None
    arch, batch_size, top_k = "cnn", 256, 5
    spec = data.open_dataset("fashion-mnist", "train")
    N = min(n or len(spec.dataset), len(spec.dataset))
    C = spec.num_classes

    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        torch.manual_seed(0)
        model = models.build_model(arch, C, spec.in_channels, spec.image_size).eval()
        ckpt = tmp / f"{arch}.pt"
        torch.save(model.state_dict(), ckpt)
        Path(f"{ckpt}.json").write_text(json.dumps({"arch": arch, "num_classes": C}))

        # the stage's own batching: chunk-aligned batches of batch_size rows
        info = StoreInfo(task="classification", num_samples=N, num_views=1, num_rows=N, num_classes=C,
                         chunk_rows=default_chunk_rows(C), dataset={})
        idx = stage._chunk_batches(info, list(range(info.num_chunks)), batch_size)
        batches = [data.get_batch(spec.dataset, ids)[0] for _, ids in idx]
        _baseline(model, batches[:2])  # warm-up (allocator, oneDNN primitives)

        base = [_baseline(model, batches)]
        runs = {}
        for label, dtype in (("full fp32 logits", "float32"), ("top-k only", "none")):
            store = tmp / f"{dtype}.zarr"
            p = stage.CacheParams(checkpoint=str(ckpt), dataset="fashion-mnist", store=str(store), top_k=top_k,
                                  logits_dtype=dtype, batch_size=batch_size, device="cpu",
                                  max_samples=N if N < len(spec.dataset) else None, progress=False)
            stage.run(p)
            runs[label] = (dict(stage.last_run), _du(store) / N)
        base.append(_baseline(model, batches))
        b = float(np.mean(base))

        print(f"teacher {arch} (random init) on Fashion-MNIST train, {N} samples, batch {batch_size}, "
              f"chunk {info.chunk_rows} rows, torch threads {torch.get_num_threads()}")
        print(f"pure inference: {b:.2f} s ({N / b:.0f} samples/s); before/after {base[0]:.2f} / {base[1]:.2f} s "
              f"(spread {abs(base[0] - base[1]) / b:.1%} = machine noise)")
        for label, (r, bps) in runs.items():
            print(f"caching, {label:16s}: loop {r['seconds_loop']:.2f} s -> ratio {r['seconds_loop'] / b:.3f} "
                  f"(goal <= 1.05); end to end {r['seconds_total']:.2f} s -> ratio {r['seconds_total'] / b:.3f}; "
                  f"{N / r['seconds_loop']:.0f} samples/s; {bps:.1f} bytes/sample on disk (top-{top_k}, 2 temperatures)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
