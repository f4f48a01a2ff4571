"""The GPU check: `python -m benchmarks gpu [--device cuda|cuda:N|cpu] [--tiny] [--peak-tflops X]`.

Needs PyTorch, transformers, accelerate and torchvision (all in the project's pins) and no network: every
model is built from a config with random weights and the data are random.

1. **LM teacher** — a LLaMA-style teacher built from a ``LlamaConfig`` (d = 1024, 16 layers, 32,000-token
   vocabulary: 0.27 B parameters), saved with ``save_pretrained`` and loaded back through
   ``pipeline/lm/models.py::load_lm`` in bf16 with sdpa attention (the dtype ``auto`` picks on a GPU with
   bf16), then 512 sequences of mixed lengths (64-token prompts, 16–448-token responses) cached by
   ``cache_teacher`` (top-k 20, τ 1 and 2, length-bucketed batches of 16). Prints tokens/s, the caching
   loop ÷ the forward passes alone over the same batches, the forward's model FLOPs (2 × parameters ×
   tokens through the model, padding included) ÷ the chip's bf16 peak, and peak GPU memory.
2. **LM student step** — a 0.1 B LLaMA student (d = 512, 8 layers) in fp32 weights under bf16 autocast,
   AdamW, LoCa-KD from the store just written: the fused vocabulary-scale loss on the student's hidden
   states against the stored top-k / lse / label logit. Prints ms per step, tokens/s, peak memory.
3. **Image path** — ``cache-logits`` (``stages/cache_logits.py``) with a torchvision ResNet-50 teacher under
   fp16 autocast on 8,192 random 3×64×64 images of 100 classes, against the forward passes alone; then
   one KD epoch of a ResNet-18 student from the store (``pipeline/training.py::train_student``).

Without a CUDA GPU it exits with status 3 and one line saying so. ``--device cpu --tiny`` runs every part
on tiny models in seconds (the suite runs it), so the code paths are tested where no GPU exists.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (SXM parts where both exist)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}
_IMAGES = {"n": 8192, "side": 64, "classes": 100}


def synthetic_images(split: str = "train"):
    """Random 3×side×side images with random labels (the image part's data set, ``benchmarks.gpu:synthetic_images``)."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n, side, C = _IMAGES["n"], _IMAGES["side"], _IMAGES["classes"]
    x = torch.randn(n, 3, side, side, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    ds.targets, ds.num_classes = y.tolist(), C
    return ds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS (max so far)"


def _peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in BF16_PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


def _mfu(flops: float, seconds: float, peak: float | None) -> str:
    rate = flops / max(seconds, 1e-9) / 1e12
    return f"{rate:.1f} TFLOP/s" + (f" = {rate / peak:.1%} of the chip's bf16 peak ({peak:.0f})" if peak else
                                    " (chip peak unknown: pass --peak-tflops)")


def lm_part(device: torch.device, tiny: bool, tmp: Path, peak: float | None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loca_pipe.pipeline.lm import cache, device as lm_device, models
    from loca_pipe.pipeline.lm.tokenizer import Encoded
    from loca_pipe.pipeline.store import StoreInfo

    V, d, layers, heads, n, P, Rmax = (512, 64, 2, 4, 24, 8, 40) if tiny else (32000, 1024, 16, 16, 512, 64, 448)
    dtype = lm_device.resolve_dtype("auto" if device.type == "cuda" else "bfloat16", device)
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=int(d * 2.75), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=P + Rmax + 1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp / "teacher"))
    teacher = models.load_lm(tmp / "teacher", device=device, dtype=dtype, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in teacher.parameters())
    rng = np.random.default_rng(0)
    resp = np.clip(rng.lognormal(np.log(Rmax / 3), 0.6, n), 16 if not tiny else 4, Rmax).astype(int)
    enc = Encoded([rng.integers(3, V, P + r).astype(np.int64) for r in resp], np.full(n, P, np.int64))
    R = int(enc.response_len.sum())
    info = StoreInfo(task="causal-lm", num_samples=n, num_views=1, num_rows=R, num_classes=V, chunk_rows=4096,
                     dataset={})
    job = cache.TokenJob(teacher, enc, 0, 16, info, 1024)
    chunks = list(range(info.num_chunks))
    print(f"[LM teacher] LLaMA-style, {n_params / 1e6:,.1f} M parameters, {lm_device.dtype_name(dtype)}, sdpa, on {device}; {n} sequences, "
          f"{R:,} response tokens; batches of 16 by length (padding {job.padding(chunks):.1%})")

    def forward_only() -> tuple[float, int]:
        tokens = 0
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, item in job.batches(chunks):
                job.forward(item)
                L = max(len(enc.ids[i]) for i in item[0])
                tokens += len(item[0]) * L
        _sync(device)
        return time.perf_counter() - t0, tokens

    forward_only()  # warm-up (kernels, allocator)
    _reset_peak(device)
    fwd = [forward_only()]
    rep = cache.cache_teacher(str(tmp / "lm.zarr"), "t", teacher, enc, pad_id=0, eos_id=2, top_k=20,
                              temperatures=(1.0, 2.0), dataset={"name": "gpu-check", "fingerprint": "g"},
                              provenance={}, chunk_rows=4096, batch_size=16, length_window=1024)
    _sync(device)
    fwd.append(forward_only())
    t_fwd = float(np.mean([s for s, _ in fwd]))
    padded = fwd[0][1]
    print(f"  forward alone {t_fwd:.2f} s ({R / t_fwd:,.0f} response tok/s); model FLOPs {_mfu(2 * n_params * padded, t_fwd, peak)}")
    print(f"  caching loop {rep.seconds_loop:.2f} s ({R / rep.seconds_loop:,.0f} tok/s), end to end "
          f"{rep.seconds_total:.2f} s; RATIO caching ÷ forward {rep.seconds_loop / t_fwd:.3f}")
    print(f"  peak memory {_peak(device)}; store {rep.extra['dtype']} teacher, run {json.dumps({k: rep.extra[k] for k in ('device', 'num_processes', 'length_window')})}")
    del teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tmp / "lm.zarr", enc


def student_step(device: torch.device, tiny: bool, store: Path, enc, peak: float | None) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loca_pipe.pipeline.calibration import loca_sparse, sparse_from_topk
    from loca_pipe.pipeline.lm.cache import open_lm_cache
    from loca_pipe.pipeline.lm.models import response_hidden
    from loca_pipe.pipeline.lm.vocab_losses import KDTarget, fused_linear_kd_loss

    c = open_lm_cache(str(store))
    V = c.num_classes
    d, layers, heads, B, steps = (32, 1, 2, 4, 3) if tiny else (512, 8, 8, 16, 10)
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=int(d * 2.75), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(len(s) for s in enc.ids) + 1)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    amp = device.type == "cuda" or tiny  # bf16 autocast (on the CPU too in --tiny, to run the same path)
    head = model.get_output_embeddings()
    t_index = c.tau_index(1.0)

    def step(idx: np.ndarray) -> int:
        seqs = [enc.ids[i] for i in idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            hidden, labels = response_hidden(model, seqs, enc.prompt_len[idx], 0)
        rows = c.rows(idx)
        on = dict(device=labels.device)
        sd = sparse_from_topk(torch.as_tensor(c.topk_logits[rows], **on),
                              torch.as_tensor(c.topk_ids[rows].astype(np.int64), **on),
                              torch.as_tensor(c.lse[rows, t_index], **on), torch.as_tensor(c.label_logit[rows], **on),
                              labels, 1.0)
        sd, _ = loca_sparse(sd, labels, 0.9)
        loss = fused_linear_kd_loss(hidden.float(), head.weight, head.bias, KDTarget.sparse(sd, labels, 0.5, 0.5), 1.0,
                                    256, recompute=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return int(labels.numel())

    rng = np.random.default_rng(0)
    step(rng.choice(len(enc), B, replace=False))  # warm-up
    _reset_peak(device)
    _sync(device)
    t0, tokens, through = time.perf_counter(), 0, 0
    for _ in range(steps):
        idx = rng.choice(len(enc), B, replace=False)
        tokens += step(idx)
        through += sum(len(enc.ids[i]) for i in idx)
    _sync(device)
    dt = time.perf_counter() - t0
    print(f"[LM student] LLaMA-style, {n_params / 1e6:,.1f} M parameters, fp32 weights, bf16 autocast, AdamW, LoCa-KD "
          f"from the store (fused loss); batch {B} sequences, {steps} steps")
    print(f"  {dt / steps * 1e3:.1f} ms/step, {tokens / dt:,.0f} response tok/s; model FLOPs "
          f"{_mfu(6 * n_params * through, dt, peak)}; peak memory {_peak(device)}")


def image_part(device: torch.device, tiny: bool, tmp: Path) -> None:
    from loca_pipe.pipeline import data as _data
    from loca_pipe.pipeline.losses import LossConfig
    from loca_pipe.pipeline.models import build_model
    from loca_pipe.pipeline.soft_labels import load_soft_labels
    from loca_pipe.pipeline.training import ImageSet, TrainConfig, train_student
    from loca_pipe.stages import cache_logits as stage

    _IMAGES.update(n=64, side=32, classes=10) if tiny else _IMAGES.update(n=8192, side=64, classes=100)
    teacher_arch, student_arch, batch = ("resnet18", "resnet18", 32) if tiny else ("resnet50", "resnet18", 256)
    name = "benchmarks.gpu:synthetic_images"
    spec = _data.open_dataset(name, "train")
    model = build_model(teacher_arch, spec.num_classes, spec.in_channels, spec.image_size).to(device).eval()
    amp = device.type == "cuda"
    x_all = torch.stack([spec.dataset[i][0] for i in range(len(spec.dataset))])

    def forward_only() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            for s in range(0, len(x_all), batch):
                model(x_all[s:s + batch].to(device, non_blocking=True))
        _sync(device)
        return time.perf_counter() - t0

    forward_only()  # warm-up
    _reset_peak(device)
    fwd = [forward_only()]
    p = stage.CacheParams(teacher=teacher_arch, dataset=name, store=str(tmp / "img.zarr"), top_k=5,
                          temperatures=(1.0, 4.0), logits_dtype="none", batch_size=batch, device=device.type,
                          amp=True, num_workers=0, progress=False)
    rep = dict(stage.run(p))
    fwd.append(forward_only())
    t_fwd = float(np.mean(fwd))
    N = len(spec.dataset)
    print(f"[image teacher] torchvision {teacher_arch} (random weights), fp16 autocast {'on' if amp else 'off (CPU)'}, "
          f"{N} images 3×{spec.image_size}×{spec.image_size}, {spec.num_classes} classes, batch {batch}, on {device}")
    print(f"  forward alone {t_fwd:.2f} s ({N / t_fwd:,.0f} img/s); cache-logits loop {rep['seconds_loop']:.2f} s "
          f"({N / rep['seconds_loop']:,.0f} img/s), end to end {rep['seconds_total']:.2f} s; RATIO caching ÷ forward "
          f"{rep['seconds_loop'] / t_fwd:.3f}; peak memory {_peak(device)}")
    del model
    images = ImageSet(spec.dataset, device)
    labels = torch.as_tensor(spec.labels, dtype=torch.int64)
    source = load_soft_labels(str(tmp / "img.zarr"), spec, tau=4.0)
    torch.manual_seed(2)
    student = build_model(student_arch, spec.num_classes, spec.in_channels, spec.image_size)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.05, milestones=(), seed=0, amp=True)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    train_student(student, images=images, labels=labels, source=source, method="kd", loss_cfg=LossConfig(), cfg=cfg,
                  do_eval=False)
    _sync(device)
    dt = time.perf_counter() - t0
    print(f"[image student] {student_arch}, one KD epoch from the store (τ 4, batch {batch}, fp16 autocast on CUDA): "
          f"{dt:.2f} s, {N / dt:,.0f} img/s; peak memory {_peak(device)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (default cuda) or cpu (with --tiny: the CPU check)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data: seconds, any device")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak, when not in the table")
    args = ap.parse_args(argv)
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.pipeline.lm.device import available_devices, resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"benchmarks gpu: this check needs a CUDA GPU: {exc} (`--device cpu --tiny` runs its code paths on "
              f"tiny models)", file=sys.stderr)
        return 3
    if device.type == "cpu" and not args.tiny:
        print("benchmarks gpu: --device cpu runs only with --tiny (the full-size check is for a GPU; devices here: "
              f"{', '.join(available_devices())})", file=sys.stderr)
        return 3
    torch.manual_seed(0)
    peak = _peak_tflops(device, args.peak_tflops)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU check on {device} ({gpu}); torch {torch.__version__}{', --tiny' if args.tiny else ''}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="loca_gpu_check_"))
    try:
        store, enc = lm_part(device, args.tiny, tmp, peak)
        student_step(device, args.tiny, store, enc, peak)
        image_part(device, args.tiny, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
