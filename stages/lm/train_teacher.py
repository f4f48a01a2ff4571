"""Stage `lm-train-teacher`: a small causal LM trained from scratch on the training split → teacher/.

The teacher learns every next token of the training sequences (prompt and response: it should learn the
language, not only the task). Output: a ``save_pretrained`` folder with the tokenizer, ``loca_pipe.json``
(settings) and ``metrics.json`` (held-out token accuracy, perplexity, Rouge-L of greedy generations).
``init_from`` fine-tunes an existing Hugging Face causal LM folder instead (``steps: 0`` just evaluates it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.lm import evaluation, models, tokenizer, trainer
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, encode_split, set_threads, report as lm_report

log = logging.getLogger(__name__)
SECTION = "lm_train_teacher"


@dataclass(frozen=True)
class Params:
    arch: Literal["llama", "gpt2"] = "llama"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 1000              # optimizer steps (0 with epochs 0: only evaluate init_from)
    epochs: float = 0.0            # used when steps is 0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 20
    dtype: str = "auto"            # auto | bfloat16 | float16 | float32 (autocast; weights stay fp32)
    init_from: str = ""
    max_new_tokens: int = 24
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def run(p: Params) -> Report:
    base = p.base
    set_threads(base)
    tok = tokenizer.load_tokenizer(base.tokenizer_dir)
    _, train = encode_split(base, "train", tok)
    _, val = encode_split(base, "val", tok)
    test_ex, test = encode_split(base, "test", tok)
    if p.init_from:
        model = models.load_lm(p.init_from)
        tokenizer.check_same_tokenizer(tokenizer.load_tokenizer(p.init_from), tok, ("init_from model", "pipeline"))
    else:
        model = models.build_lm(p.arch, len(tok), p.d_model, p.n_layers, p.n_heads, base.max_length, tok, seed=base.seed)
    models.check_vocab(model, tok)
    from loca_pipe.pipeline.lm.device import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(base.device)
    dtype = resolve_dtype(p.dtype, device)
    t0 = time.perf_counter()
    hist = []
    if p.steps or p.epochs:  # every next token (all_tokens), through the students' trainer
        s = trainer.TrainSettings(batch_size=p.batch_size, grad_accum=p.grad_accum, steps=p.steps, epochs=p.epochs,
                                  lr=p.lr, warmup=p.warmup, seed=base.seed, dtype=dtype_name(dtype),
                                  device=device.type, progress=True)
        hist = trainer.train(model, train, None, s, pad_id=tok.pad_token_id, out_dir=base.teacher_dir / "checkpoints",
                             all_tokens=True, resume=False)
        model = model.to("cpu").float()
    train_s = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 evaluates and writes
        return lm_report(SECTION, {"rank": os.environ.get("RANK")}, {})
    ev = evaluation.evaluate(model, tok, val, [s[:n] for s, n in zip(test.ids, test.prompt_len)],
                           [ex.response for ex in test_ex], p.max_new_tokens)
    metrics = {"params": sum(x.numel() for x in model.parameters()), "train_seconds": train_s,
               "final_loss": trainer.final_loss(hist) if hist else None,
               "provenance": {"device": str(device), "dtype": dtype_name(dtype), "processes": trainer.world_size(),
                              "init_from": p.init_from or None, "steps": hist[-1]["step"] if hist else 0,
                              "batch_size": p.batch_size, "grad_accum": p.grad_accum, "lr": p.lr},
               "train_truncated": train.truncated, **{k: v for k, v in ev.items() if k != "samples"}}
    models.save_lm(model, tok, base.teacher_dir, {"stage": SECTION, "params": dataclasses.asdict(p),
                                                  "base": dataclasses.asdict(base), "history": hist})
    write_json(base.teacher_dir / "metrics.json", metrics, sort_keys=False)
    write_json(base.teacher_dir / "samples.json", ev["samples"], sort_keys=False)
    log.info("teacher: %s", metrics)
    return lm_report(SECTION, metrics, {"teacher": base.teacher_dir})
