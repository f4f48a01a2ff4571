"""Stage `lm-cache`: run the teacher once over the training split's response tokens → store.zarr.

Per response token: top-k logits and ids, logsumexp(z/τ) for each declared τ, the next token's logit;
optionally the Sparse Logit Sampling form (``sample_draws`` ids drawn from p at ``sample_tau``) and the
teacher's greedy responses for SeqKD (``greedy_max_new_tokens``). Resumable: re-running the same command
after a crash continues from the first unwritten chunk. Writes ``cache_report.json`` next to the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline import caching
from loca_pipe.pipeline.lm import cache, device as lm_device, models, tokenizer
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, data_fingerprint, encode_split, set_threads, report as lm_report

log = logging.getLogger(__name__)
SECTION = "lm_cache"


@dataclass(frozen=True)
class Params:
    teacher: str = ""             # a Hugging Face causal LM folder; "" = this pipeline's teacher/
    name: str = "teacher"
    top_k: int = 20
    temperatures: tuple[float, ...] = (1.0, 2.0)
    logits_dtype: Literal["none", "float16", "float32"] = "none"   # full logits too (small vocabularies only)
    id_dtype: Literal["auto", "int16", "int32", "int64"] = "auto"
    sample_draws: int = 12
    sample_tau: float = 1.0
    greedy_max_new_tokens: int = 24
    chunk_rows: int = 4096
    batch_size: int = 64
    overwrite: bool = False       # replace only what conflicts (an identical store / teacher is resumed)
    recache: bool = False         # also re-cache a complete identical teacher (what --overwrite on the command line does)
    codec: str = "lossless"       # how top-k values and ids are stored (pipeline/codecs.py; docs/store-format.md)
    max_chunks: int = 0           # > 0: write at most this many chunks in this run (time-sliced jobs)
    dtype: str = "auto"           # the teacher's weights and logits: auto | bfloat16 | float16 | float32 (pipeline/lm/device.py)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2, passed to transformers
    device_map: str = ""          # "" = the whole teacher on lm_base.device; "auto" = accelerate spreads it over the GPUs
    length_window: int = 1024     # batch sequences by length within windows of this many (0 = in data order); rows stay in data order
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def run(p: Params) -> Report:
    base = p.base
    set_threads(base)
    device = lm_device.resolve_device(base.device)  # before anything is read: a bad device or dtype fails at once
    dtype = lm_device.resolve_dtype(p.dtype, device)
    teacher_dir = Path(p.teacher) if p.teacher else base.teacher_dir
    tok = tokenizer.load_tokenizer(base.tokenizer_dir)
    teacher_tok = tokenizer.load_tokenizer(teacher_dir) if (teacher_dir / "tokenizer.json").exists() or \
        (teacher_dir / "tokenizer_config.json").exists() else tok
    tokenizer.check_same_tokenizer(teacher_tok, tok, ("teacher", "pipeline"))
    model = models.load_lm(teacher_dir, device=device, dtype=dtype, attn_implementation=p.attn_implementation,
                           device_map=p.device_map or None)
    models.check_vocab(model, tok)
    examples, enc = encode_split(base, "train", tok)
    dataset = {"name": "lm-train", "split": "train", "fingerprint": data_fingerprint(base, "train", examples, tok),
               "template": base.template, "max_length": base.max_length, "truncated": enc.truncated,
               "tokenizer": tokenizer.tokenizer_fingerprint(tok)}
    prov = {"teacher_path": str(teacher_dir), "teacher_sha256": models.folder_sha256(teacher_dir),
            "arch": getattr(model.config, "model_type", "?")}
    t0 = time.perf_counter()
    rep = cache.cache_teacher(str(base.store), p.name, model, enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                              top_k=p.top_k, temperatures=p.temperatures,
                              dataset=dataset, provenance=prov, chunk_rows=p.chunk_rows, batch_size=p.batch_size,
                              logits_dtype=None if p.logits_dtype == "none" else p.logits_dtype, id_dtype=p.id_dtype,
                              sample_draws=p.sample_draws, sample_tau=p.sample_tau, seed=base.seed,
                              greedy_max_new_tokens=p.greedy_max_new_tokens, overwrite=p.overwrite,
                              recache=p.recache, codec=p.codec, max_chunks=p.max_chunks or None, progress=True,
                              length_window=p.length_window)
    out = {**rep.to_dict(), "wall_seconds": time.perf_counter() - t0, "truncated_sequences": enc.truncated,
           "prompt_tokens_stored": 0, "bytes": cache.store_bytes(str(base.store))}
    out["bytes_per_token"] = sum(out["bytes"].values()) / max(1, rep.extra["tokens"])
    if caching.resolve_shard(None, None)[0] == 0:  # under torchrun: rank 0 writes the report (its rows are its share)
        write_json(base.cache_report, out, sort_keys=False)
    log.info("cache: %s", out)
    return lm_report(SECTION, out, {"store": base.store, "cache_report": base.cache_report},
                     shown={k: v for k, v in out.items() if k != "bytes"})
