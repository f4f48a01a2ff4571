"""Language-model token cache: bytes per stored token, caching overhead, sparse vs dense KD loss, layouts.

All in one process, against baselines measured in the same run:

1. bytes per stored response token (all arrays on disk, incl. offsets/position/labels) at k = 20 and
   k = 128, with the float arrays raw and with zstd — lossless in the kept values (fp32 top-k logits);
   DistillKit reports ~300 B/token at k = 128 with lossy packing;
2. caching time ÷ teacher-forward time on the same batches (goal ≤ 1.10): the caching loop of
   ``cache_teacher`` (the one engine: summaries in a thread beside the next forward, background writes)
   against forward-only runs right before and after it, plus end to end and the process CPU time;
3. sparse-KD loss (k = 20 top-k from the cache arrays → SparseDist → sparse_kd_loss, forward + backward)
   vs dense-KD loss (kd_loss on full teacher logits) at a 32k vocabulary;
4. the ragged layout: the store's Zarr flat arrays + offsets vs an Arrow IPC file of list<fixed_size_list>
   columns (the same values + offsets layout): bytes, full read, 200 random sequences;
5. a shuffled epoch through the public dataset (``TokenStoreDataset`` + ``BlockShuffleSampler``: every item
   decoded through the codec, normalised at τ, built into tensors) ÷ the same sequences' raw teacher rows
   (top-k logits and ids, lse, label logit) read in the same order from a memory-mapped Arrow IPC file
   (goal ≤ 1.5); also a uniformly shuffled epoch (each item may decode a whole block), the peak bytes of
   decoded blocks the dataset held, and the same epoch through the decoded memory-mapped sidecar
   (``sidecar=True``) with its one-time build timed apart.
6. length-bucketed caching: on sequences of mixed lengths (log-normal, 8–240 tokens, as instruction data
   are), the padding share of the forward batches and the caching time with ``length_window`` 1024 vs
   batches in data order (0), in the same run.

Teacher: a LLaMA-style model from a config (d = 256, 4 layers, 32,000-token vocabulary), random weights,
random token sequences with 16-token prompts and 48-token responses. ``LOCA_BENCH_QUICK=1``: 4,000-token
vocabulary, d = 64, 1 layer, few sequences (seconds).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QUICK = os.environ.get("LOCA_BENCH_QUICK") == "1"


def _setup():
    from loca_pipe.pipeline.lm import models
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    V, d, L, n = (4000, 64, 1, 24) if QUICK else (32000, 256, 4, 128)
    P, Rlen = 16, 48
    torch.manual_seed(0)
    model = models.build_lm("llama", V, d, L, 4, P + Rlen + 1, None, seed=0).eval()
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, V, P + Rlen).astype(np.int64) for _ in range(n)]
    return model, Encoded(ids, np.full(n, P, np.int64)), V


def _cache(path, model, enc, k, compress=False, temps=(1.0, 2.0)):
    from loca_pipe.pipeline.lm import cache

    return cache.cache_teacher(str(path), "t", model, enc, pad_id=0, eos_id=2, top_k=k, temperatures=temps,
                               dataset={"name": "bench", "split": "train", "fingerprint": "b"}, provenance={},
                               chunk_rows=_chunk_rows(enc), batch_size=16, compress_logits=compress)


def _chunk_rows(enc) -> int:
    # whole chunks only: zarr stores an edge chunk at full size, which would inflate raw bytes per token
    R = int(enc.response_len.sum())
    return R if QUICK else R // 4


@torch.inference_mode()
def _forward_only(model, enc, batch_size=16):
    """Tokens/s of the teacher forward alone (padding, model, response-row gather: what caching runs)."""
    from loca_pipe.pipeline.lm.models import response_logits

    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for s in range(0, len(enc), batch_size):
        z, _ = response_logits(model, enc.ids[s:s + batch_size], enc.prompt_len[s:s + batch_size], 0)
        n += z.shape[0]
    _forward_only.cpu = time.process_time() - c0
    return n / (time.perf_counter() - t0)


def bytes_per_token(tmp: Path, model, enc) -> None:
    from loca_pipe.pipeline.lm.cache import store_bytes

    print("\n[1] bytes per stored response token (whole store on disk; top-k logits fp32 = lossless)")
    for k in (20, 128):
        for compress in (False, True):
            p = tmp / f"k{k}-{int(compress)}"
            rep = _cache(p, model, enc, k, compress)
            b = store_bytes(str(p))
            tot = sum(b.values()) / rep.rows
            top = (b.get("teachers/t/topk_logits", 0) + b.get("teachers/t/topk_ids", 0)) / rep.rows
            print(f"  k={k:4d} float zstd={'on ' if compress else 'off'}: {tot:7.1f} B/token total, "
                  f"{top:7.1f} B/token in top-k logits+ids (raw values: {k * 4} + {k * 2} B)"
                  f"{'  — DistillKit ~300 B/token at k=128, lossy' if k == 128 and compress else ''}")
            shutil.rmtree(p)


def caching_overhead(tmp: Path, model, enc) -> None:
    print("\n[2] caching time ÷ teacher forward time (same batches of 16 sequences, k=20, 2 τ, one process)")
    fwd, fwd_cpu = [_forward_only(model, enc)], [_forward_only.cpu]
    reps = []
    for i in range(2):
        p = tmp / f"speed{i}"
        c0 = time.process_time()
        rep = _cache(p, model, enc, 20)
        reps.append((rep, time.process_time() - c0))
        shutil.rmtree(p)
        fwd.append(_forward_only(model, enc))
        fwd_cpu.append(_forward_only.cpu)
    R = reps[0][0].rows
    print(f"  forward alone {', '.join(f'{R / x:.2f} s' for x in fwd)} ({max(fwd):,.0f} tok/s best)")
    for i, (rep, cpu) in enumerate(reps):
        alone = R / np.mean(fwd[i:i + 2])  # the forward-only runs right before and after this one
        print(f"  run {i}: caching loop {rep.seconds_loop:.2f} s, end to end {rep.seconds_total:.2f} s "
              f"({R / rep.seconds_total:,.0f} tok/s); RATIO loop ÷ neighbouring forward {rep.seconds_loop / alone:.3f} "
              f"(goal ≤ 1.10), end to end {rep.seconds_total / alone:.3f}; in-run forward share "
              f"{rep.seconds_forward:.2f} s (loop ÷ it {rep.seconds_loop / rep.seconds_forward:.3f}); process CPU {cpu:.2f} s "
              f"÷ forward's {np.mean(fwd_cpu[i:i + 2]):.2f} s = {cpu / np.mean(fwd_cpu[i:i + 2]):.3f} (the caching "
              f"work itself, wherever it ran)")


def loss_speed() -> None:
    from loca_pipe.pipeline.calibration import sparse_from_topk
    from loca_pipe.pipeline.losses import kd_loss, sparse_kd_loss

    R, V, k, tau = (256, 4000, 20, 1.0) if QUICK else (1024, 32000, 20, 1.0)
    print(f"\n[3] KD loss forward+backward, {R} tokens × {V} vocabulary, k={k}")
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(R, V, generator=g) * 3
    y = torch.randint(0, V, (R,), generator=g)
    topv, topi = torch.topk(zt, k, 1)
    lse = torch.logsumexp(zt / tau, 1)
    zy = zt.gather(1, y.view(-1, 1)).squeeze(1)
    zs0 = torch.randn(R, V, generator=g)

    def dense():
        zs = zs0.clone().requires_grad_(True)
        kd_loss(zs, zt, tau, teacher_is="logits").backward()

    def sparse():
        zs = zs0.clone().requires_grad_(True)
        sd = sparse_from_topk(topv, topi, lse, zy, y, tau)
        sparse_kd_loss(zs, sd, tau).backward()

    def best(fn, n=5 if not QUICK else 2):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    td, ts = best(dense), best(sparse)
    print(f"  dense KD {td * 1e3:.1f} ms, sparse KD {ts * 1e3:.1f} ms → sparse ÷ dense = {ts / td:.2f}")
    print(f"  teacher bytes read per token: dense fp32 {V * 4:,} B vs sparse k={k} {k * 6 + 12} B")


def layouts(tmp: Path, model, enc) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import zarr

    from loca_pipe.pipeline.lm.cache import store_bytes

    print("\n[4] ragged layout: Zarr flat + offsets (the store) vs Arrow list<fixed_size_list> (IPC file)")
    p = tmp / "layout"
    _cache(p, model, enc, 20)
    g = zarr.open_group(str(p), mode="r")
    t0 = time.perf_counter()
    off = g["offsets"][:]
    zl, zi = g["teachers/t/topk_logits"][:], g["teachers/t/topk_ids"][:]
    t_zarr = time.perf_counter() - t0
    K = zl.shape[1]
    b = store_bytes(str(p))
    zbytes = b["teachers/t/topk_logits"] + b["teachers/t/topk_ids"] + b["offsets"]
    offsets32 = pa.array(off.astype(np.int32))
    col_l = pa.ListArray.from_arrays(offsets32, pa.FixedSizeListArray.from_arrays(pa.array(zl.ravel()), K))
    col_i = pa.ListArray.from_arrays(offsets32, pa.FixedSizeListArray.from_arrays(pa.array(zi.ravel()), K))
    table = pa.table({"topk_logits": col_l, "topk_ids": col_i})
    for comp in (None, "zstd"):
        f = tmp / f"layout-{comp}.arrow"
        with ipc.new_file(str(f), table.schema, options=ipc.IpcWriteOptions(compression=comp)) as w:
            w.write_table(table)
        t0 = time.perf_counter()
        t = ipc.open_file(str(f)).read_all()
        lv = t.column("topk_logits").combine_chunks().flatten().flatten().to_numpy().reshape(-1, K)
        t_arrow = time.perf_counter() - t0
        assert np.array_equal(lv, zl)
        print(f"  Arrow IPC ({comp or 'raw'}): {f.stat().st_size / len(zl):6.1f} B/token, full read {t_arrow * 1e3:6.1f} ms")
    print(f"  Zarr store            : {zbytes / len(zl):6.1f} B/token, full read {t_zarr * 1e3:6.1f} ms "
          f"(top-k logits raw fp32, ids zstd, CRC32C per chunk)")
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, len(off) - 1, 200)
    t0 = time.perf_counter()
    arr = g["teachers/t/topk_logits"]
    for i in seqs:
        arr[int(off[i]):int(off[i + 1])]
    t_rz = time.perf_counter() - t0
    t0 = time.perf_counter()
    with pa.memory_map(str(tmp / "layout-None.arrow")) as src:
        colt = ipc.open_file(src).read_all().column("topk_logits")  # zero-copy over the mapped file
        for i in seqs:
            colt[int(i)].values.flatten().to_numpy()
    t_ra = time.perf_counter() - t0
    t0 = time.perf_counter()
    mem = g["teachers/t/topk_logits"][:]
    for i in seqs:
        mem[int(off[i]):int(off[i + 1])]
    t_rm = time.perf_counter() - t0
    print(f"  200 random sequences from disk: Zarr {t_rz * 1e3:.1f} ms (decodes a whole chunk per read), Arrow "
          f"memory-mapped {t_ra * 1e3:.1f} ms; Zarr loaded whole first (what students do) {t_rm * 1e3:.1f} ms")
    shutil.rmtree(p)


def dataset_epoch(tmp: Path, model, enc) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from loca_pipe.pipeline.lm.cache import open_lm_cache
    from loca_pipe.pipeline.lm.dataset import BlockShuffleSampler, TokenStoreDataset

    print("\n[5] a shuffled epoch through TokenStoreDataset vs the same rows from a memory-mapped Arrow file")
    for codec in ("lossless", "compact"):
        p = tmp / f"ds-{codec}"
        from loca_pipe.pipeline.lm import cache

        cache.cache_teacher(str(p), "t", model, enc, pad_id=0, eos_id=2, top_k=20, temperatures=(1.0, 2.0),
                            dataset={"name": "bench", "split": "train", "fingerprint": "b"}, provenance={},
                            chunk_rows=max(64, _chunk_rows(enc) // 4), batch_size=16, codec=codec)
        c = open_lm_cache(str(p))
        off32 = pa.array(c.offsets.astype(np.int32))
        K = c.topk_logits.shape[1]

        def ragged(a):
            flat = pa.array(np.ascontiguousarray(a).reshape(-1))
            return pa.ListArray.from_arrays(off32, pa.FixedSizeListArray.from_arrays(flat, a.shape[1]) if a.ndim > 1
                                            else flat)
        table = pa.table({"topk_logits": ragged(c.topk_logits), "topk_ids": ragged(c.topk_ids.astype(np.int32)),
                          "lse": ragged(c.lse), "label_logit": ragged(c.label_logit)})
        f = tmp / f"ds-{codec}.arrow"
        with ipc.new_file(str(f), table.schema) as w:
            w.write_table(table)
        TokenStoreDataset(str(p), enc, tau=2.0)[0]  # warm-up (imports, first torch calls), not timed
        order = list(BlockShuffleSampler(TokenStoreDataset(str(p), enc, tau=2.0), window_blocks=2, seed=0))

        def epoch(ds) -> float:
            t0 = time.perf_counter()
            for i in order:
                ds[i]
            return time.perf_counter() - t0

        def arrow() -> float:
            t0 = time.perf_counter()
            with pa.memory_map(str(f)) as src:
                t = ipc.open_file(src).read_all()
                cols = [t.column(k) for k in ("topk_logits", "topk_ids", "lse", "label_logit")]
                for i in order:
                    for col in cols:
                        v = col[int(i)].values
                        (v.flatten() if pa.types.is_fixed_size_list(v.type) else v).to_numpy()
            return time.perf_counter() - t0

        # the decoded sidecar (sidecar=True): built once (timed apart), then epochs of memory-map slices
        t0 = time.perf_counter()
        side = TokenStoreDataset(str(p), enc, tau=2.0, sidecar=True)
        t_build = time.perf_counter() - t0
        # best of 3 of each, interleaved (epochs of tens of ms on a shared machine); a fresh dataset per
        # block-shuffled epoch, so each one reads and decodes its blocks
        runs: dict[str, list[float]] = {"ds": [], "ar": [], "side": []}
        for _ in range(3):
            ds = TokenStoreDataset(str(p), enc, tau=2.0, cache_blocks=2)
            runs["ds"].append(epoch(ds))
            runs["ar"].append(arrow())
            runs["side"].append(epoch(side))
        t_ds, t_ar, t_side = (min(runs[k]) for k in ("ds", "ar", "side"))
        peak = max(sum(v.nbytes for v in blk.values()) for _, blk in ds._cache.values())
        uni = TokenStoreDataset(str(p), enc, tau=2.0, cache_blocks=2)
        perm = np.random.default_rng(0).permutation(len(uni))
        t0 = time.perf_counter()
        for i in perm:
            uni[int(i)]
        t_uni = time.perf_counter() - t0
        side_bytes = sum(f.stat().st_size for f in side.sidecar_path.iterdir())
        print(f"  {codec:8s}: {len(order)} sequences, k={K}: dataset (block-shuffled) {t_ds * 1e3:.1f} ms, Arrow "
              f"memory-mapped {t_ar * 1e3:.1f} ms (best of 3 each) → ratio {t_ds / t_ar:.2f} (goal ≤ 1.5); uniformly shuffled "
              f"{t_uni * 1e3:.1f} ms ({uni.blocks_read} block decodes for {len(ds.block_seqs)} blocks); decoded "
              f"blocks held ≤ 2 × {peak / 1024:.0f} KiB")
        print(f"  {codec:8s} with sidecar=True: an epoch {t_side * 1e3:.1f} ms → RATIO {t_side / t_ar:.2f} "
              f"(goal ≤ 1.5), plus a one-time build of {t_build * 1e3:.1f} ms (dataset opening included; "
              f"{side_bytes / ds.t.num_rows:.0f} B/token on disk, memory-mapped)")
        shutil.rmtree(p)
        shutil.rmtree(side.sidecar_path.parent)


def bucketing(tmp: Path) -> None:
    from loca_pipe.pipeline.lm import cache, models
    from loca_pipe.pipeline.lm.tokenizer import Encoded
    from loca_pipe.pipeline.store import StoreInfo

    V, d, L, n = (4000, 64, 1, 48) if QUICK else (32000, 256, 4, 96)
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(48), 0.7, n), 8, 240).astype(int)
    enc = Encoded([rng.integers(3, V, m).astype(np.int64) for m in lengths], np.maximum(1, lengths // 3))
    model = models.build_lm("llama", V, d, L, 4, 256, None, seed=0).eval()
    R = int(enc.offsets()[-1])
    info = StoreInfo(task="causal-lm", num_samples=n, num_views=1, num_rows=R, num_classes=V, chunk_rows=R, dataset={})
    print(f"\n[6] length-bucketed caching: {n} sequences of {lengths.min()}–{lengths.max()} tokens (median "
          f"{int(np.median(lengths))}), batches of 16, one chunk")
    secs = {}
    for w in (0, 1024, 0, 1024):  # alternated, so drift on a shared machine hits both
        pad = cache.TokenJob(model, enc, 0, 16, info, w).padding([0])
        t0 = time.perf_counter()
        cache.cache_teacher(str(tmp / f"bucket{w}"), "t", model, enc, pad_id=0, eos_id=2, top_k=20,
                            temperatures=(1.0, 2.0), dataset={"name": "bench", "fingerprint": "b"}, provenance={},
                            chunk_rows=R, batch_size=16, length_window=w)
        secs.setdefault(w, []).append(time.perf_counter() - t0)
        shutil.rmtree(tmp / f"bucket{w}")
        print(f"  length_window {w:4d}: padding {pad:.1%} of the batch tokens, caching {secs[w][-1]:.2f} s")
    print(f"  RATIO caching time bucketed ÷ data order {min(secs[1024]) / min(secs[0]):.3f} (best of 2 each)")


def main() -> None:
    torch.set_num_threads(int(os.environ.get("LOCA_BENCH_THREADS", "1")))
    model, enc, V = _setup()
    print(f"teacher: LLaMA-style, vocabulary {V}, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(enc)} sequences × {int(enc.response_len[0])} response tokens; torch threads {torch.get_num_threads()}"
          f"{' (QUICK)' if QUICK else ''}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_lm_"))
    try:
        bytes_per_token(tmp, model, enc)
        caching_overhead(tmp, model, enc)
        loss_speed()
        layouts(tmp, model, enc)
        dataset_epoch(tmp, model, enc)
        bucketing(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
