"""Stage `lm-train-student`: one student (method × seed) from the token cache → students/<run>/.

Methods (``pipeline/lm/students.py::METHODS``): sft (CE on references), seqkd (CE on the teacher's cached greedy
responses), kd (sparse token-level KD + CE), loca (the same on LoCa-calibrated sparse targets), kd_sampled
(Sparse Logit Sampling targets), kd_star (KD with the teacher's mis-instructed tokens dropped from the KD term).
Training goes through ``transformers.Trainer`` (``pipeline/lm/trainer.py``): one process or ``torchrun``,
bf16, gradient accumulation, checkpoints and resume. The student shares the pipeline's tokenizer (checked
against the teacher's). Writes ``metrics.json`` (Rouge-L, token accuracy, perplexity, the mechanism metric,
seconds and the run's provenance), ``samples.json`` and, with ``save_model``, the student folder ``model/``.

The run folder is ``run_name`` or ``<method>-s<seed>``; a folder that holds a run with other settings is
refused (naming the keys that differ) unless ``overwrite`` — give the run its own ``run_name`` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.lm import evaluation, models, streaming, students, tokenizer, trainer
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, data_fingerprint, encode_split, read_json, set_threads, report as lm_report

log = logging.getLogger(__name__)
SECTION = "lm_train_student"
# settings that do not change what a run computes (a rerun with other values is the same run)
NOT_RUN_KEYS = ("threads", "progress", "save_model", "overwrite", "resume", "keep_checkpoints", "run_name")


@dataclass(frozen=True)
class Params:
    method: str = "sft"            # a name in pipeline/lm/students.py::METHODS
    seed: int = 0
    name: str = "teacher"          # teacher inside the store
    arch: Literal["llama", "gpt2"] = "llama"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 400               # optimizer steps; 0: train for ``epochs`` instead
    epochs: float = 0.0
    batch_size: int = 32           # sequences per optimizer step (all processes, all accumulation micro-batches)
    grad_accum: int = 1            # micro-batches per step; must divide batch_size / processes
    lr: float = 3e-3
    warmup: int = 20               # warm-up steps, then cosine decay to 10 % of lr
    weight_decay: float = 0.01
    dtype: str = "auto"            # auto | bfloat16 | float16 | float32: autocast precision (weights stay fp32)
    save_steps: int = 0            # a checkpoint every N steps under <run>/checkpoints (0: none); resumed after a crash
    eval_steps: int = 0            # held-out loss every N steps during training (0: only at the end)
    resume: bool = True            # continue from the run's last checkpoint when one exists (same settings only)
    keep_checkpoints: bool = False  # keep <run>/checkpoints after a finished run
    run_name: str = ""             # the run folder under students/; "" = <method>-s<seed>
    overwrite: bool = False        # replace a run folder that holds a run with other settings
    progress: bool = True          # a progress bar (loss, steps/s, ETA) on stderr
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
    return p.base.students_dir / (p.run_name or f"{p.method}-s{p.seed}")


def run_settings(p: Params) -> dict[str, Any]:
    """What distinguishes this run from another in the same folder (everything but NOT_RUN_KEYS)."""
    d = dataclasses.asdict(p)
    d.pop("base")
    return {k: v for k, v in d.items() if k not in NOT_RUN_KEYS}


def check_clash(p: Params) -> None:
    """Refuse to replace a finished run written with other settings (the image ``train-student``'s rule)."""
    f = out_dir(p) / "metrics.json"
    if p.overwrite or not f.exists():
        return
    had = read_json(f).get("settings")
    want = run_settings(p)
    if had is None:
        return
    diff = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
    if diff:
        shown = ", ".join(f"{k} {had.get(k)!r} → {want.get(k)!r}" for k in diff)
        raise ConfigError(f"{str(out_dir(p))!r} holds a run with other settings ({shown}); pass --run-name NAME for a "
                          f"run folder of its own, or --overwrite to replace it")


def run(p: Params) -> Report:
    from loca_pipe.pipeline.lm.device import dtype_name, resolve_device, resolve_dtype

    base = p.base
    set_threads(base)
    method = students.check_method(p.method)
    device = resolve_device(base.device)
    dtype = resolve_dtype(p.dtype, device)
    trainer.per_device_batch(trainer.TrainSettings(batch_size=p.batch_size, grad_accum=p.grad_accum))
    tok = tokenizer.load_tokenizer(base.tokenizer_dir)
    examples, train = encode_split(base, "train", tok)
    _, val = encode_split(base, "val", tok)
    test_ex, test = encode_split(base, "test", tok)
    c = streaming.open_teacher(str(base.store), p.name, memory_limit_mb=p.memory_limit_mb, seed=p.seed,
                               expect_fingerprint=data_fingerprint(base, "train", examples, tok),
                               keys=method.arrays)
    students.check_source_matches(c, train)
    teacher_path = Path(c.attrs.get("teacher_path", ""))
    if (teacher_path / "tokenizer_config.json").exists():
        tokenizer.check_same_tokenizer(tokenizer.load_tokenizer(teacher_path), tok)
    train_ref = train  # the store's rows are these sequences' response tokens
    if method.data == "greedy":
        train = students.seqkd_encoding(train, c.greedy_responses(), tok.eos_token_id, base.max_length)
    kd = students.KDSettings(p.tau, p.alpha, p.beta, p.gamma)
    loss = students.make_loss(p.method, c, kd, fused=p.fused_loss)
    if p.init_from:  # checked before any training: a causal LM, and the teacher's vocabulary (ids and size)
        model = models.load_lm(p.init_from)
        students.check_student_vocab(model, p.init_from, tok, c.num_classes)
    else:
        model = models.build_lm(p.arch, c.num_classes, p.d_model, p.n_layers, p.n_heads, base.max_length, tok,
                                seed=p.seed)
    check_clash(p)  # after every input check: a bad input is named first
    out = out_dir(p)
    settings = trainer.TrainSettings(batch_size=p.batch_size, grad_accum=p.grad_accum, steps=p.steps, epochs=p.epochs,
                                     lr=p.lr, warmup=p.warmup, weight_decay=p.weight_decay, seed=p.seed,
                                     dtype=dtype_name(dtype), device=device.type, save_steps=p.save_steps,
                                     eval_steps=p.eval_steps, progress=p.progress, extra=run_settings(p))
    t0 = time.perf_counter()
    hist = trainer.train(model, train, loss, settings, pad_id=tok.pad_token_id, out_dir=out / "checkpoints",
                         teacher=c if loss is not None else None, eval_enc=val, resume=p.resume,
                         keep_checkpoints=p.keep_checkpoints)
    train_s = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 evaluates and writes
        return lm_report(SECTION, {"rank": os.environ.get("RANK")}, {})
    model = model.to("cpu").float()
    ev = evaluation.evaluate(model, tok, val, [s[:n] for s, n in zip(test.ids, test.prompt_len)],
                             [ex.response for ex in test_ex], p.max_new_tokens, prompts=[ex.instruction + (f" [{ex.context}]" if ex.context else "") for ex in test_ex])
    mech = evaluation.mechanism(model, train_ref, str(base.store), p.name, tok.pad_token_id)
    tokens = hist[-1]["tokens_seen"]
    metrics = {"method": p.method, "seed": p.seed, "run": out.name, "train_seconds": train_s,
               "final_loss": trainer.final_loss(hist),
               "teacher_rows": "streamed" if isinstance(c, streaming.StreamedTeacher) and loss is not None else "in memory",
               "teacher_buffer_peak_mib": c.peak_buffer_bytes / 2**20,
               "tokens_per_s": tokens / max(hist[-1]["train_seconds"], 1e-9),
               **{k: v for k, v in ev.items() if k != "samples"}, **mech,
               "provenance": {"device": str(device), "dtype": dtype_name(dtype), "weights_dtype": "float32",
                              "processes": trainer.world_size(), "init_from": p.init_from or None,
                              "tau": p.tau, "alpha": p.alpha if method.loca else None, "beta": p.beta,
                              "gamma": p.gamma, "steps": hist[-1]["step"], "epochs": p.epochs or None,
                              "batch_size": p.batch_size, "grad_accum": p.grad_accum, "lr": p.lr,
                              "max_length": base.max_length, "store": str(base.store), "teacher": p.name},
               "settings": run_settings(p)}
    write_json(out / "metrics.json", metrics, sort_keys=False)
    write_json(out / "samples.json", {"samples": ev["samples"], "history": hist, "params": dataclasses.asdict(p)},
               sort_keys=False)
    if p.save_model:
        models.save_lm(model, tok, out / "model", {"stage": SECTION, "params": dataclasses.asdict(p)})
    log.info("student %s seed %d: %s", p.method, p.seed, metrics)
    return lm_report(SECTION, metrics, {"student": out})
