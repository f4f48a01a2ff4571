"""A tiny student run through ``pipeline/lm/trainer.py``, as its own process (the DDP and kill/resume tests start
it under ``torchrun`` or kill it): ``python -m tests.lm.trainer_run STORE WEIGHTS CHECKPOINTS [options]``.

The data (24 sequences over a 64-token vocabulary) and the student (LLaMA, d_model 16) are built from fixed
seeds, so every process and every run sees the same ones; the store is written by :func:`write_store`."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

V, D = 64, 16


def data():
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    rng = np.random.default_rng(0)
    ids, plen = [], []
    for _ in range(24):
        n, p = int(rng.integers(8, 16)), int(rng.integers(2, 5))
        ids.append(np.concatenate([rng.integers(2, V, n - 1), [1]]).astype(np.int64))
        plen.append(p)
    return Encoded(ids, np.array(plen, dtype=np.int64))


def student(seed: int = 3):
    from loca_pipe.pipeline.lm import models

    return models.build_lm("llama", V, D, 1, 2, 32, None, seed=seed)


def write_store(path: str) -> str:
    """A k = 4, τ ∈ {1, 2} token store of a random-weight teacher on :func:`data` (as ``lm-cache`` writes it)."""
    from loca_pipe.pipeline.lm import cache, models

    teacher = models.build_lm("llama", V, 32, 1, 2, 32, None, seed=7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    cache.cache_teacher(path, "t", teacher.eval(), data(), pad_id=0, eos_id=1, top_k=4, temperatures=(1.0, 2.0),
                        dataset={"name": "x", "split": "train", "fingerprint": "f"}, provenance={}, chunk_rows=32,
                        batch_size=8, sample_draws=4)
    return path


def main() -> None:
    from transformers import TrainerCallback

    from loca_pipe.pipeline.lm import streaming, students, trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("weights")
    ap.add_argument("checkpoints")
    ap.add_argument("--method", default="loca")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--memory-limit-mb", type=float, default=64.0)
    a = ap.parse_args()
    torch.set_num_threads(1)

    class Slow(TrainerCallback):  # the kill test's run: slow enough to be killed between checkpoints
        def on_step_end(self, args, state, control, **kw):
            time.sleep(a.sleep)

    src = streaming.open_teacher(a.store, "t", memory_limit_mb=a.memory_limit_mb,
                                 keys=students.arrays_for(a.method))
    model = student()
    loss = students.make_loss(a.method, src, students.KDSettings(tau=1.0, alpha=0.9), fused=True)
    s = trainer.TrainSettings(batch_size=a.batch, grad_accum=a.grad_accum, steps=a.steps, lr=1e-2, warmup=1,
                              save_steps=a.save_steps, log_every=1)
    trainer.train(model, data(), loss, s, pad_id=0, out_dir=a.checkpoints, teacher=src,
                  callbacks=[Slow()] if a.sleep else ())
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, a.weights)


if __name__ == "__main__":
    main()
