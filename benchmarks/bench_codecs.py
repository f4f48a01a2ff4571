"""Token-store codecs: bytes per token against the error each introduces, beside DistillKit's scheme.

For each codec (pipeline/codecs.py) a real token store is written through ``cache_teacher`` at k = 128
and read back with ``open_lm_cache``; the error is measured against the full teacher logits of the same
tokens (recomputed): KL(p ‖ q) at τ = 1 and at the stored τ = 2, where q is what a reader reconstructs
(decoded top-k, exact label, the rest of the mass spread over the other ids), and |q_label − p_label|.
``lossless`` carries only the top-k truncation; each other codec's excess over it is its own error.

Teachers: a small LLaMA-style LM trained here on the default text (1,024-token BPE, as the LM
pipeline's default teacher; a trained stand-in because no trained teacher is shipped), and a random
LLaMA-style one at a 32,000-token vocabulary. ``polytail`` is DistillKit's published scheme (16 exact
values in fp16 + a degree-8 polynomial fit of the rest of the top-k log-probs, ids bit-packed),
re-implemented from its description as the anchor. ``LOCA_BENCH_QUICK=1``: smaller teachers, few tokens.
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
K, TEMPS = 128, (1.0, 2.0)
ORDER = ("lossless", "fp16", "bf16", "q8", "polytail", "compact", "compact7", "compact6")


def _trained_teacher():
    from loca_pipe.pipeline.lm import models, text, tokenizer

    raw = text.default_text(60_000 if QUICK else 400_000)
    tok = tokenizer.train_tokenizer(text.sentences(raw), 1024)
    pairs = text.continuation_pairs(raw)
    enc = tokenizer.encode_examples(tok, pairs[: 400 if QUICK else 4000], "plain", 64)
    model = models.build_lm("llama", len(tok), 96, 2, 4, 64, tok, seed=0)
    import tempfile

    from loca_pipe.pipeline.lm import trainer

    with tempfile.TemporaryDirectory() as ck:
        trainer.train(model, enc, None, trainer.TrainSettings(batch_size=32, steps=20 if QUICK else 400, lr=3e-3),
                      pad_id=tok.pad_token_id, out_dir=ck, all_tokens=True)
    held = tokenizer.encode_examples(tok, pairs[-(24 if QUICK else 96):], "plain", 64)
    return "trained LLaMA-style, V=1024 (default LM size)", model.eval(), held, tok.pad_token_id


def _random_teacher():
    from loca_pipe.pipeline.lm import models
    from loca_pipe.pipeline.lm.tokenizer import Encoded

    V, d, L, n = (4000, 64, 1, 8) if QUICK else (32000, 256, 4, 24)
    model = models.build_lm("llama", V, d, L, 4, 65, None, seed=0).eval()
    rng = np.random.default_rng(0)
    enc = Encoded([rng.integers(3, V, 64).astype(np.int64) for _ in range(n)], np.full(n, 16, np.int64))
    return f"random LLaMA-style, V={V}", model, enc, 0


def _full_logits(model, enc, pad_id):
    from loca_pipe.pipeline.lm.models import response_logits

    zs, ys = [], []
    with torch.inference_mode():
        for s in range(0, len(enc), 8):
            z, y = response_logits(model, enc.ids[s:s + 8], enc.prompt_len[s:s + 8], pad_id)
            zs.append(z.float())
            ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def run_teacher(tmp: Path, label: str, model, enc, pad_id: int) -> None:
    from loca_pipe.pipeline.codecs import reconstruction_error
    from loca_pipe.pipeline.lm import cache

    z, y = _full_logits(model, enc, pad_id)
    R = len(y)
    print(f"\n{label}: {R} response tokens, top-k {K}, temperatures {list(TEMPS)}")
    print(f"  {'codec':9s} {'B/token':>8s} {'top-k B/token':>13s} {'KL τ=1':>10s} {'KL τ=2':>10s} "
          f"{'excess τ=1':>10s} {'|Δp_label|':>10s}")
    base = None
    for name in ORDER:
        path = tmp / name
        t0 = time.perf_counter()
        cache.cache_teacher(str(path), "t", model, enc, pad_id=pad_id, eos_id=2, top_k=K, temperatures=TEMPS,
                            dataset={"name": "bench", "split": "train", "fingerprint": "b"}, provenance={},
                            chunk_rows=R, batch_size=8, codec=name)
        c = cache.open_lm_cache(str(path))
        b = cache.store_bytes(str(path))
        top = sum(v for k, v in b.items() if k.startswith("teachers/t/topk")) / R
        errs = [reconstruction_error(z, y, c.topk_logits, c.topk_ids, t) for t in TEMPS]
        base = errs[0]["kl"] if name == "lossless" else base
        print(f"  {name:9s} {sum(b.values()) / R:8.1f} {top:13.1f} {errs[0]['kl']:10.2e} {errs[1]['kl']:10.2e} "
              f"{errs[0]['kl'] - base:10.2e} {errs[0]['dp_label']:10.2e}   ({time.perf_counter() - t0:.1f} s)")
        shutil.rmtree(path)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("LOCA_BENCH_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="bench_codecs_"))
    try:
        print("B/token: the whole store on disk per token (offsets, labels, lse, label logit included); "
              "excess = KL above lossless (the codec's own error; lossless = top-k truncation only)")
        for make in (_trained_teacher, _random_teacher):
            run_teacher(tmp, *make())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
