"""Stage `lm-train-student`: one student (method × seed) from the token cache → students/<method>-s<seed>/.

Methods: sft (CE on references), seqkd (CE on the teacher's cached greedy responses), kd (sparse token-level
KD + CE), loca (the same on LoCa-calibrated sparse targets). The student shares the pipeline's tokenizer
(checked against the teacher's). Writes ``metrics.json`` (Rouge-L, token accuracy, perplexity, seconds)
and, with ``save_model``, the student folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.lm import evaluation, models, streaming, students, tokenizer
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, data_fingerprint, encode_split, set_threads, report as lm_report

log = logging.getLogger(__name__)
SECTION = "lm_train_student"


@dataclass(frozen=True)
class Params:
    method: Literal["sft", "seqkd", "kd", "loca", "kd_sampled"] = "sft"
    seed: int = 0
    name: str = "teacher"          # teacher inside the store
    arch: Literal["llama", "gpt2"] = "llama"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    tau: float = 1.0
    alpha: float = 0.9
    beta: float = 0.5
    gamma: float = 0.5
    max_new_tokens: int = 24
    save_model: bool = False
    # MiB of teacher rows the student may hold: the whole teacher is loaded only when it fits, else it is
    # streamed from the store through a shuffle buffer of chunks (half the limit; docs/language-models.md)
    memory_limit_mb: float = 1024.0
    # a local Hugging Face causal LM folder (GPT-2, LLaMA, Qwen2, … written by save_pretrained) to start the
    # student from; empty: build one from arch/d_model/n_layers/n_heads. Its vocabulary must be the teacher's.
    init_from: str = ""
    fused_loss: bool = True  # kd/loca/kd_sampled: the chunked loss fused with the output projection
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def out_dir(p: Params) -> Path:
    return p.base.students_dir / f"{p.method}-s{p.seed}"


def run(p: Params) -> Report:
    base = p.base
    set_threads(base)
    students.check_method(p.method)
    tok = tokenizer.load_tokenizer(base.tokenizer_dir)
    examples, train = encode_split(base, "train", tok)
    _, val = encode_split(base, "val", tok)
    test_ex, test = encode_split(base, "test", tok)
    c = streaming.open_teacher(str(base.store), p.name, memory_limit_mb=p.memory_limit_mb, seed=p.seed,
                               expect_fingerprint=data_fingerprint(base, "train", examples, tok),
                               keys=students.arrays_for(p.method))
    students.check_source_matches(c, train)
    teacher_path = Path(c.attrs.get("teacher_path", ""))
    if (teacher_path / "tokenizer_config.json").exists():
        tokenizer.check_same_tokenizer(tokenizer.load_tokenizer(teacher_path), tok)
    if p.method == "seqkd":
        train = students.seqkd_encoding(train, c.greedy_responses(), tok.eos_token_id, base.max_length)
    kd = students.KDSettings(p.tau, p.alpha, p.beta, p.gamma)
    loss = students.make_loss(p.method, c, kd, fused=p.fused_loss)
    if p.init_from:  # checked before any training: a causal LM, and the teacher's vocabulary (ids and size)
        model = models.load_lm(p.init_from)
        students.check_student_vocab(model, p.init_from, tok, c.num_classes)
    else:
        model = models.build_lm(p.arch, c.num_classes, p.d_model, p.n_layers, p.n_heads, base.max_length, tok,
                                seed=p.seed)
    sampler = c if isinstance(c, streaming.StreamedTeacher) and loss is not None else None
    t0 = time.perf_counter()
    hist = models.train_lm(model, train, loss, steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=p.seed,
                           pad_id=tok.pad_token_id, progress=True, sampler=sampler)
    train_s = time.perf_counter() - t0
    ev = evaluation.evaluate(model, tok, val, [s[:n] for s, n in zip(test.ids, test.prompt_len)],
                             [ex.response for ex in test_ex], p.max_new_tokens)
    metrics = {"method": p.method, "seed": p.seed, "train_seconds": train_s, "final_loss": hist[-1]["loss"],
               "teacher_rows": "streamed" if sampler is not None else "in memory",
               "teacher_buffer_peak_mib": c.peak_buffer_bytes / 2**20,
               "tokens_per_s": hist[-1]["tokens_per_s"], **{k: v for k, v in ev.items() if k != "samples"}}
    out = out_dir(p)
    write_json(out / "metrics.json", metrics, sort_keys=False)
    write_json(out / "samples.json", {"samples": ev["samples"], "history": hist, "params": dataclasses.asdict(p)},
               sort_keys=False)
    if p.save_model:
        models.save_lm(model, tok, out / "model", {"stage": SECTION, "params": dataclasses.asdict(p)})
    log.info("student %s seed %d: %s", p.method, p.seed, metrics)
    return lm_report(SECTION, metrics, {"student": out})
