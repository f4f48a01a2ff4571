"""A distillation step from the token store ÷ an SFT step on the same model, through the same trainer.

``transformers.Trainer`` via ``pipeline/lm/trainer.py``, V = 32,000, sequences of 512 tokens (32 prompt + 480
response), batch 4, a shrunk LLaMA (d_model 64, 1 layer) so it runs in about a minute on the CPU; fp32.
Each variant runs in its own child process: time per optimizer step (median of the steps after two warm-up
steps) and peak memory (VmHWM, the kernel's peak RSS, reset to the current RSS just before training: the
peak above what the process held before the run, i.e. the step's activations, logits, gradients, optimizer
state and the teacher rows; /proc, Linux).

Variants: ``sft`` (the stage's SFT: the model's logits + cross-entropy), ``sft-fused`` (cross-entropy through
the chunked fused loss, β = 0: the same computation path as KD without the teacher), ``kd`` (the stage's
default: sparse top-20 KD + CE, fused, teacher rows from the store), ``loca`` (the same, LoCa-calibrated).
Ratios: kd ÷ sft (what a user switching from SFT to KD pays) and kd ÷ sft-fused (the teacher side alone).
Goal (issue 19): ≤ 1.15× time and ≤ 1.10× peak memory.

``LOCA_BENCH_QUICK=1``: V = 4,000, 128-token sequences (seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = os.environ.get("LOCA_BENCH_QUICK") == "1"
V, L, P = (4000, 128, 16) if QUICK else (32000, 512, 32)
BATCH, STEPS, N_SEQ, D = 4, (4 if QUICK else 8), 32, 64
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("sft", "sft-fused", "kd", "loca")


def _data():
    import numpy as np

    from loca_pipe.pipeline.lm.tokenizer import Encoded

    rng = np.random.default_rng(0)
    ids = [np.concatenate([rng.integers(3, V, L - 1), [1]]).astype(np.int64) for _ in range(N_SEQ)]
    return Encoded(ids, np.full(N_SEQ, P, np.int64))


def _store(path: str) -> None:
    import torch

    from loca_pipe.pipeline.lm import cache, models

    torch.manual_seed(0)
    teacher = models.build_lm("llama", V, 32, 1, 2, L, None, seed=1).eval()
    cache.cache_teacher(path, "t", teacher, _data(), pad_id=0, eos_id=1, top_k=20, temperatures=(1.0,),
                        dataset={"name": "bench", "split": "train", "fingerprint": "b"}, provenance={},
                        chunk_rows=4096, batch_size=2, sample_draws=0)


def _hwm() -> int:
    import re

    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _rss() -> int:
    import re

    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def child(variant: str, store: str) -> dict:
    import gc

    import numpy as np
    import torch
    from transformers import TrainerCallback

    from loca_pipe.pipeline.lm import models, streaming, students, trainer
    torch.set_num_threads(int(os.environ.get("LOCA_BENCH_THREADS", "1")))
    enc = _data()
    model = models.build_lm("llama", V, D, 1, 2, L, None, seed=0)
    src, loss = None, None
    if variant in ("kd", "loca"):
        src = streaming.open_teacher(store, "t", memory_limit_mb=1024, keys=students.arrays_for(variant))
        loss = students.make_loss(variant, src, students.KDSettings(tau=1.0, alpha=0.9), fused=True)
    elif variant == "sft-fused":
        loss = _ce_only()
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss()
    with tempfile.TemporaryDirectory() as ck:
        trainer.train(model, enc, loss, trainer.TrainSettings(batch_size=BATCH, steps=STEPS, lr=1e-3, warmup=1),
                      pad_id=0, out_dir=ck, teacher=src, callbacks=[Clock()])
    return {"variant": variant, "step_s": float(np.median(times[2:])), "peak_mib": (_hwm() - base) / 2**20,
            "tokens_per_step": BATCH * (L - P)}


def _ce_only():
    """The fused loss with only the CE term (β = 0): a dense target of no rows would be refused, so the
    target is built per call from the labels alone."""
    import torch

    from loca_pipe.pipeline.lm.vocab_losses import KDTarget, fused_linear_kd_loss

    def loss(h, y, rows, head):
        tg = KDTarget(ids=torch.zeros(len(y), 1, dtype=torch.long, device=y.device),
                      weights=torch.zeros(len(y), 1, device=y.device), tail=None, labels=y, beta=0.0, gamma=1.0)
        return fused_linear_kd_loss(h, head.weight, head.bias, tg, 1.0)

    loss.wants_hidden = True
    return loss


def main() -> None:
    print(f"bench_lm_train: V={V:,}, sequence {L} ({L - P} response tokens), batch {BATCH}, LLaMA d={D} 1 layer, "
          f"{STEPS} steps through transformers.Trainer, fp32, CPU (quick={QUICK})")
    with tempfile.TemporaryDirectory() as d:
        store = str(Path(d) / "s.zarr")
        _store(store)
        res = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lm_train", "--child", v, store], cwd=REPO,
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
            res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'variant':<10} {'s/step':>8} {'tok/s':>8} {'peak MiB':>9}")
    for v, r in res.items():
        print(f"{v:<10} {r['step_s']:8.3f} {r['tokens_per_step'] / r['step_s']:8.0f} {r['peak_mib']:9.1f}")
    for num, den in (("kd", "sft"), ("kd", "sft-fused"), ("loca", "sft")):
        a, b = res[num], res[den]
        print(f"ratio {num} ÷ {den}: time {a['step_s'] / b['step_s']:.2f}× (goal ≤ 1.15), "
              f"peak memory {a['peak_mib'] / max(b['peak_mib'], 1e-9):.2f}× (goal ≤ 1.10)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
