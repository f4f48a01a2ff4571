"""Vocabulary-scale KD losses and streamed LM students: peak memory and time against today's path.

1. Loss at T = 4,096 tokens × V = 32,000 (d = 256 hidden), forward + backward, CPU, one variant per child
   process (its peak RSS, VmHWM, above the baseline after the inputs are built; time best of 3):
   - today: logits = h Wᵀ + b materialised, ``sparse_kd_loss`` (k = 20 top-k ∪ label ∪ tail) + γ·CE;
   - ``chunked_kd_loss`` on the same materialised logits;
   - ``fused_linear_kd_loss`` (logits one chunk at a time), gradients recomputed in backward / kept from forward.
   Each child checks its loss and gradients against today's within fp32 tolerance.
2. An LM student streaming a token store larger than its memory limit: the store's teacher arrays, the
   limit, the student's peak RSS and buffer peak, in a child process, against the same student with the
   store loaded whole.

``LOCA_BENCH_QUICK=1``: T = 512, V = 4,000, and a small store (seconds).
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
T, V, D, K = (512, 4000, 64, 20) if QUICK else (4096, 32000, 256, 20)
TAU, BETA, GAMMA = 1.0, 0.5, 0.5
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("today", "chunked", "fused-recompute", "fused-keep")


def _hwm() -> int:
    import re

    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5), so a peak is the measured code's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss() -> int:
    import re

    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _inputs():
    import torch

    from loca_pipe.pipeline.calibration import sparse_from_topk

    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g)
    W = torch.randn(V, D, generator=g) * 0.05
    b = torch.zeros(V)
    y = torch.randint(0, V, (T,), generator=g)
    # a teacher's sparse summary (top-k logits, lse, label logit), made chunk by chunk (never (T, V) at once)
    tl, ti, lse, zl = [], [], [], []
    for a in range(0, T, 256):
        zt = torch.randn(min(256, T - a), V, generator=g) * 2
        top = zt.topk(K, 1)
        tl.append(top.values)
        ti.append(top.indices)
        lse.append(torch.logsumexp(zt / TAU, 1))
        zl.append(zt.gather(1, y[a:a + 256, None])[:, 0])
    sd = sparse_from_topk(torch.cat(tl), torch.cat(ti), torch.cat(lse), torch.cat(zl), y, TAU)
    return h, W, b, y, sd


def loss_child(variant: str) -> dict:
    """One variant: forward + backward three times; peak RSS above the post-setup baseline, best time."""
    import torch
    import torch.nn.functional as F

    from loca_pipe.pipeline.losses import sparse_kd_loss
    from loca_pipe.pipeline.lm.vocab_losses import KDTarget, chunked_kd_loss, fused_linear_kd_loss

    torch.set_num_threads(int(os.environ.get("LOCA_BENCH_THREADS", "2")))
    h0, W0, b0, y, sd = _inputs()
    tg = KDTarget.sparse(sd, y, BETA, GAMMA)
    ref_path = Path(os.environ["LOCA_BENCH_REF"])

    def run():
        h, W, b = (x.clone().requires_grad_(True) for x in (h0, W0, b0))
        if variant == "today":
            z = F.linear(h, W, b)
            loss = BETA * sparse_kd_loss(z, sd, TAU) + GAMMA * F.cross_entropy(z, y)
        elif variant == "chunked":
            z = F.linear(h, W, b)
            loss = chunked_kd_loss(z, tg, TAU)
        else:
            loss = fused_linear_kd_loss(h, W, b, tg, TAU, recompute=variant == "fused-recompute")
        loss.backward()
        return loss.detach(), h.grad, W.grad, b.grad

    import gc

    gc.collect()
    _reset_peak()
    base = _rss()
    best, out = float("inf"), None
    for _ in range(3):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    peak = _hwm() - base
    if variant == "today":
        torch.save(out, ref_path)
        err = {"loss": 0.0, "h": 0.0, "W": 0.0, "b": 0.0}
    else:
        ref = torch.load(ref_path)
        err = {k: float(((a - r).abs().max() / r.abs().max().clamp_min(1e-30))) for k, a, r in
               zip(("loss", "h", "W", "b"), out, ref)}
    return {"variant": variant, "seconds": best, "peak_bytes": peak, "loss": float(out[0]), "max_rel_err": err}


CHILD = "import json, sys; from benchmarks import bench_vocab as b; print(json.dumps(b.{fn}(*sys.argv[1:])))"


def _child(fn: str, *args: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(fn=fn), *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# LM student streaming a store larger than its limit


def build_token_store(path: str, sequences: int, resp: int, vocab: int, k: int, chunk_rows: int) -> dict:
    """A synthetic causal-LM store written with the store API (no teacher model: random summaries)."""
    import numpy as np

    from loca_pipe.pipeline.lm.cache import _write_index
    from loca_pipe.pipeline.lm.tokenizer import Encoded
    from loca_pipe.pipeline.store import LogitStore, StoreInfo

    P = 8
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, vocab, P + resp).astype(np.int64) for _ in range(sequences)]
    enc = Encoded(ids, np.full(sequences, P, np.int64))
    R = sequences * resp
    info = StoreInfo(task="causal-lm", num_samples=sequences, num_views=1, num_rows=R, num_classes=vocab,
                     chunk_rows=chunk_rows, dataset={"name": "bench", "split": "train", "fingerprint": "bench"})
    st = LogitStore.create_or_open(path, info, overwrite=True)
    _write_index(st, enc)
    w = st.begin_teacher("t", {"arch": "synthetic"}, top_k=k, temperatures=[1.0], logits_dtype=None)
    labels = np.concatenate([s[P:] for s in ids])
    seq = np.repeat(np.arange(sequences), resp)
    for c in range(info.num_chunks):  # summaries synthesised directly (a teacher forward at V = 32k is not the point)
        sl = info.chunk_slice(c)
        n = sl.stop - sl.start
        y = labels[sl]
        tl = -np.sort(-rng.normal(0, 2, (n, k)).astype(np.float32), axis=1)
        ti = rng.integers(0, vocab, (n, k)).astype(np.int32)
        ti[:, 0] = np.where(rng.random(n) < 0.6, y, ti[:, 0])  # the label is the top-1 on ~60 % of rows
        zl = np.where(ti[:, 0] == y, tl[:, 0], tl[:, -1] - 1.0).astype(np.float32)
        lse = (np.log(np.exp(tl).sum(1) + np.exp(zl)) + 0.5).astype(np.float32)[:, None]
        st.write_rows(c, sample_id=seq[sl], label=y, view=np.zeros(n, np.int16))
        w.write_chunk(c, {"topk_logits": tl, "topk_ids": ti.astype(np.dtype(w.group["topk_ids"].dtype)), "lse": lse,
                          "label_logit": zl})
    assert w.finalize()
    return {"sequences": sequences, "rows": R, "prompt": P, "vocab": vocab}


def student_child(store: str, limit_mb: str, steps: str) -> dict:
    """Train a tiny LoCa student for ``steps`` steps from ``store`` under ``limit_mb``; peak RSS above baseline."""
    import gc

    import numpy as np
    import torch

    from loca_pipe.pipeline.lm import models, streaming, students
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    torch.set_num_threads(1)
    t = streaming.TokenTeacher(store, "t")
    P = 8
    off = t.offsets
    # the data: prompts + the store's labels as responses (what check_source_matches would accept)
    lab = streaming.TokenTeacher(store, "t")
    ids = []
    for s_lo in range(0, t.num_sequences, 4096):
        s_hi = min(t.num_sequences, s_lo + 4096)
        d = lab.read(int(off[s_lo]), int(off[s_hi]), ("label",))["label"]
        for i in range(s_lo, s_hi):
            ids.append(np.concatenate([np.full(P, 3), d[off[i] - off[s_lo]:off[i + 1] - off[s_lo]]]).astype(np.int64))
    enc = Encoded(ids, np.full(len(ids), P, np.int64))
    model = models.build_lm("llama", t.num_classes, 32, 1, 2, 64, None, seed=0)
    gc.collect()
    _reset_peak()
    base = _rss()
    src = streaming.open_teacher(store, "t", memory_limit_mb=float(limit_mb), seed=0,
                                 keys=students.arrays_for("loca"))
    students.check_source_matches(src, enc)
    loss = students.make_loss("loca", src, students.KDSettings(tau=1.0, alpha=0.9), fused=True)
    from loca_pipe.pipeline.lm import trainer

    streamed = isinstance(src, streaming.StreamedTeacher)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as ck:
        trainer.train(model, enc, loss, trainer.TrainSettings(batch_size=16, steps=int(steps), lr=1e-3), pad_id=0,
                      out_dir=ck, teacher=src)
    return {"mode": "streamed" if streamed else "in memory", "seconds": time.perf_counter() - t0,
            "peak_above_base": _hwm() - base, "buffer_peak": src.peak_buffer_bytes, "teacher_bytes": t.nbytes(),
            "store_rows": t.num_rows}


def main() -> None:
    print(f"bench_vocab: T={T:,} tokens × V={V:,} vocabulary, d={D}, sparse k={K}, τ={TAU:g}, β=γ=0.5 "
          f"(quick={QUICK}); torch threads {os.environ.get('LOCA_BENCH_THREADS', '2')}")
    with tempfile.TemporaryDirectory(prefix="loca-bench-vocab-") as tmp:
        env = {"LOCA_BENCH_REF": str(Path(tmp) / "ref.pt")}
        res = {v: _child("loss_child", v, env=env) for v in VARIANTS}
        t0, m0 = res["today"]["seconds"], res["today"]["peak_bytes"]
        for v in VARIANTS:
            r = res[v]
            e = r["max_rel_err"]
            print(f"  {v:16s} {r['seconds']:.2f} s ({r['seconds'] / t0:.2f}× today's; goal ≤ 1.1), peak memory "
                  f"{r['peak_bytes'] / 2**20:,.0f} MiB ({r['peak_bytes'] / max(m0, 1):.0%} of today's; goal ≤ 25 %); "
                  f"max rel. error vs today: loss {e['loss']:.1e}, dL/dh {e['h']:.1e}, dL/dW {e['W']:.1e}, "
                  f"dL/db {e['b']:.1e}")
        seqs, resp, vocab, k, ch = (600, 32, 4000, 20, 512) if QUICK else (40_000, 64, 32000, 20, 4096)
        store = str(Path(tmp) / "tokens.zarr")
        t1 = time.perf_counter()
        built = build_token_store(store, seqs, resp, vocab, k, ch)
        from loca_pipe.pipeline.lm import streaming

        need = streaming.TokenTeacher(store, "t").row_bytes(("topk_logits", "topk_ids", "lse", "label_logit"))
        need *= built["rows"]
        limit = max(1.0, need / 2**20 / 8)  # an eighth of what the teacher arrays need
        print(f"  token store: {built['rows']:,} response tokens × k={k} (vocabulary {vocab:,}), the students' arrays "
              f"{need / 2**20:,.1f} MiB in memory, written in {time.perf_counter() - t1:.1f} s")
        steps = "10" if QUICK else "20"
        s_stream = _child("student_child", store, f"{limit}", steps)
        s_whole = _child("student_child", store, f"{need / 2**20 * 4}", steps)
        for s, lim in ((s_stream, limit), (s_whole, need / 2**20 * 4)):
            print(f"  LoCa student, memory_limit_mb={lim:,.1f} → {s['mode']}: {steps} steps in {s['seconds']:.1f} s; "
                  f"peak RSS +{s['peak_above_base'] / 2**20:,.1f} MiB over its baseline; teacher rows held at most "
                  f"{s['buffer_peak'] / 2**20:,.1f} MiB")
        print(f"  ratio streamed ÷ whole: peak RSS {s_stream['peak_above_base'] / max(1, s_whole['peak_above_base']):.2f}, "
              f"time {s_stream['seconds'] / s_whole['seconds']:.2f}")
        print(f"  (load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
