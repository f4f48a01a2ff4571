"""Stage `lm-plan`: a dry run of a params file — no weights read, no GPU, nothing written.

It checks what the LM stages will need (the data file, the teacher and student folders' configs, the
tokenizers once present and that they agree) and says what the job will cost: the teacher's and the
student's parameter counts (built on PyTorch's ``meta`` device from ``config.json`` alone) and their weights'
bytes at the dtype they will run in, the response tokens to cache (the training split tokenized exactly as
``lm-cache`` will), the teacher forwards to run (sequences, tokens, ≈ 2·params FLOPs per token, greedy
tokens), the store's size (bytes per token from the store's array table × tokens) and the student runs
(methods × seeds, optimizer steps). Problems are listed in the report and end the command with one error line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, LocaError
from loca_pipe.pipeline.lm.device import DTYPES
from loca_pipe.stages import Report
from loca_pipe.stages.config import read_params
from loca_pipe.stages.lm import common

SECTION = "lm_plan"


@dataclass(frozen=True)
class Params:
    methods: tuple[str, ...] = ("sft", "seqkd", "kd", "loca", "kd_sampled")  # the student runs to plan
    seeds: tuple[int, ...] = (0, 1, 2)
    base: common.LMBase = common.LMBase()  # lm_base, filled in by common.load


def _run_dtype(spec: str, device: str) -> str:
    """The dtype a model will run in, decided without a GPU: ``auto`` is bf16 on a GPU (``device`` auto or
    cuda…, assuming one with bf16) and fp32 on the CPU."""
    spec = (spec or "auto").lower()
    if spec not in DTYPES:
        raise ConfigError(f"unknown dtype {spec!r}; expected one of {', '.join(DTYPES)}")
    if spec != "auto":
        return spec
    return "float32" if (device or "auto").lower() == "cpu" else "bfloat16"


def count_parameters(folder: Path) -> tuple[int, int, Any]:
    """(parameters, output vocabulary, config) of the causal LM ``folder`` describes, from its config alone:
    the model is built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loca_pipe.pipeline.lm.models import check_causal_lm_folder, model_vocab

    check_causal_lm_folder(folder)
    cfg = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters()), model_vocab(model), cfg


def bytes_per_token(vocab: int, top_k: int, temperatures: int, sample_draws: int, codec: str) -> int:
    """Raw bytes the store holds per response token: every row array of the store's table (pipeline/layout.py)
    and the codec's top-k arrays, before zstd (which the integer arrays always get: an upper bound)."""
    from loca_pipe.pipeline import layout
    from loca_pipe.pipeline.codecs import get_codec

    sizes = layout.Sizes(dims={"row": 1, "chunk": 1, "class": vocab, "k": top_k, "temperature": temperatures,
                               "draw": sample_draws, "sequence": 1, "sequence_edge": 1, "new_token": 1,
                               "greedy_chunk": 1}, chunks={"row": 1, "sequence": 1}, num_classes=vocab,
                        task="causal-lm")
    total = 0
    for a in layout.ARRAYS:
        if a.dims[0] == "row" and a.present(sizes) and not a.codec:
            total += np.dtype(a.dtype(sizes)).itemsize * math.prod(a.shape(sizes)[1:])
    for width, dt, _ in get_codec(codec).arrays(vocab, top_k, temperatures).values():
        total += np.dtype(dt).itemsize * width
    return total


def _folder(path: Path, role: str, problems: list[str], out: dict[str, Any], device: str, dtype: str) -> Any:
    """Check one model folder and fill its entry; returns its tokenizer when the folder has one."""
    from loca_pipe.pipeline.lm import tokenizer

    entry: dict[str, Any] = {"path": str(path)}
    out[role] = entry
    if not (path / "config.json").exists():
        problems.append(f"{role} folder {str(path)!r} has no config.json")
        return None
    try:
        n, vocab, cfg = count_parameters(path)
    except LocaError as exc:
        problems.append(str(exc))
        return None
    run_dtype = _run_dtype(dtype, device)
    entry.update(model_type=cfg.model_type, parameters=n, vocab=vocab, dtype=run_dtype,
                 weights_gb=n * DTYPES[run_dtype].itemsize / 1e9,
                 weight_files=sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin")))
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return tokenizer.load_tokenizer(path)
    return None


def run(p: Params, params: str | Path | dict = common.DEFAULT_PARAMS, base_overrides: dict | None = None) -> Report:
    """Plan the job ``params`` describes (``p``: this stage's section, with ``lm_base``)."""
    from loca_pipe.pipeline.lm import text, tokenizer
    from loca_pipe.stages.lm import cache as cache_stage, prepare as prepare_stage, tokenizer as tok_stage

    data = params if isinstance(params, dict) else read_params(params)
    base = p.base
    prep = common.load(prepare_stage.Params, prepare_stage.SECTION, data, base_overrides=base_overrides)
    tk = common.load(tok_stage.Params, tok_stage.SECTION, data, base_overrides=base_overrides)
    cp = common.load(cache_stage.Params, cache_stage.SECTION, data, base_overrides=base_overrides)
    student = dict(data.get("lm_train_student") or {})  # read by key: its stage validates the section itself
    problems: list[str] = []
    out: dict[str, Any] = {"device": base.device, "max_length": base.max_length, "template": base.template}

    # models: configs only, never weights
    teacher_dir = Path(cp.teacher) if cp.teacher else base.teacher_dir
    if not cp.teacher and not (teacher_dir / "config.json").exists():  # the pipeline's own, not trained yet
        out["teacher"], teacher_tok = {"path": str(teacher_dir), "note": "made by lm-train-teacher (not yet)"}, None
    else:
        teacher_tok = _folder(teacher_dir, "teacher", problems, out, base.device, cp.dtype)
    student_tok = None
    if student.get("init_from"):
        student_tok = _folder(Path(student["init_from"]), "student", problems, out, base.device,
                              str(student.get("dtype", "auto")))

    # the tokenizer the pipeline will use
    tok = None
    if base.tokenizer_dir.exists():
        tok, where = tokenizer.load_tokenizer(base.tokenizer_dir), str(base.tokenizer_dir)
    elif tk.from_model and Path(tk.from_model).exists():
        tok, where = tokenizer.load_tokenizer(tk.from_model), tk.from_model
    elif tk.from_model:
        where = None
        problems.append(f"lm_tokenizer.from_model {tk.from_model!r} does not exist")
    else:
        where = None  # lm-tokenizer trains one on the training split: tokens cannot be counted before
    out["tokenizer"] = {"path": where, "vocab": len(tok) if tok is not None else None}
    for role, other in (("teacher", teacher_tok), ("student", student_tok)):
        if tok is not None and other is not None:
            try:
                tokenizer.check_same_tokenizer(other, tok, (role, "pipeline"))
            except LocaError as exc:
                problems.append(str(exc))
        if tok is not None and role in out and out[role].get("vocab") is not None and len(tok) > out[role]["vocab"]:
            problems.append(f"{role} outputs {out[role]['vocab']} logits but the tokenizer has {len(tok)} tokens")

    # the training split, as lm-prepare will cut it (or has)
    examples = None
    if base.split("train").exists():
        examples, _ = text.read_jsonl(base.split("train"), "dolly")
    elif prep.source != "default" and not Path(prep.source).exists():
        problems.append(f"lm_prepare.source {prep.source!r} does not exist")
    else:
        if prep.source == "default":
            allx = text.continuation_pairs(text.default_text(prep.text_chars))
        else:
            allx, _ = text.read_jsonl(prep.source, prep.format, prep.on_bad_line)
        rest = len(allx) - prep.val_size - prep.test_size
        train = rest if prep.train_size == 0 else min(prep.train_size, rest)
        examples = text.split_examples(allx, {"val": prep.val_size, "test": prep.test_size, "train": max(0, train)},
                                       base.seed)["train"]
    seqs = len(examples) if examples is not None else None
    out["train_sequences"] = seqs

    # the cache: tokens, forwards, store size
    temps = len(cp.temperatures)
    vocab = out.get("teacher", {}).get("vocab")
    cache_plan: dict[str, Any] = {"top_k": cp.top_k, "temperatures": list(cp.temperatures), "codec": cp.codec,
                                  "sample_draws": cp.sample_draws, "greedy_max_new_tokens": cp.greedy_max_new_tokens}
    if vocab is not None:
        cache_plan["bytes_per_token"] = bytes_per_token(vocab, cp.top_k, temps, cp.sample_draws, cp.codec)
    if tok is not None and examples is not None:
        enc = tokenizer.encode_examples(tok, examples, base.template, base.max_length)
        R = int(enc.response_len.sum())
        cache_plan.update(response_tokens=R, forward_tokens=int(sum(len(s) for s in enc.ids)),
                          truncated_sequences=int(enc.truncated), greedy_tokens=seqs * cp.greedy_max_new_tokens)
        if "bytes_per_token" in cache_plan:  # + offsets (8 B) and greedy ids (4 B × G) per sequence
            cache_plan["store_gb"] = (R * cache_plan["bytes_per_token"] + seqs * (8 + 4 * cp.greedy_max_new_tokens)) / 1e9
        if "parameters" in out.get("teacher", {}):
            cache_plan["teacher_forward_tflop"] = 2 * out["teacher"]["parameters"] * cache_plan["forward_tokens"] / 1e12
    out["cache"] = cache_plan

    # the student runs
    runs = {"methods": list(p.methods), "seeds": list(p.seeds), "runs": len(p.methods) * len(p.seeds)}
    for key in ("epochs", "steps", "batch_size", "grad_accum", "lr"):
        if key in student:
            runs[key] = student[key]
    if seqs and student.get("epochs") and student.get("batch_size"):
        runs["steps_per_run"] = math.ceil(seqs / int(student["batch_size"])) * int(student["epochs"])
    out["students"] = runs
    out["problems"] = problems
    return common.report(SECTION, out, {})


def check(rep: Report) -> None:
    """One error line when the plan found problems (after the plan itself has been printed)."""
    problems = rep.values["problems"]
    if problems:
        raise ConfigError(f"lm-plan found {len(problems)} problem(s): {'; '.join(problems)}")
