"""A tiny token store for the examples: a 300-token BPE on the built-in text, a small LLaMA-style teacher
trained for a few steps, cached with `cache_teacher` (k = 8, τ ∈ {1, 2}). With your own store, replace
`tiny_store()` by your store path and the tokenized sequences it was cached on."""

from __future__ import annotations

import tempfile
from pathlib import Path

from loca_pipe.pipeline.lm import cache, models, text, tokenizer, trainer


def tiny_store(workdir: Path, codec: str = "lossless"):
    """(store path, tokenized sequences, tokenizer) of a small teacher cached under ``workdir``."""
    raw = text.default_text(30_000)
    tok = tokenizer.train_tokenizer(text.sentences(raw), 300)
    enc = tokenizer.encode_examples(tok, text.continuation_pairs(raw)[:48], "plain", 48)
    teacher = models.build_lm("llama", len(tok), 32, 2, 2, 64, tok, seed=0)
    with tempfile.TemporaryDirectory() as checkpoints:  # the project's Trainer path (transformers.Trainer)
        trainer.train(teacher, enc, None, trainer.TrainSettings(batch_size=8, steps=30, lr=1e-2, seed=0),
                      pad_id=tok.pad_token_id, out_dir=checkpoints, all_tokens=True)
    path = Path(workdir) / "teacher.zarr"
    cache.cache_teacher(str(path), "t", teacher.eval(), enc, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        top_k=8, temperatures=(1.0, 2.0), dataset={"name": "example", "split": "train",
                                                                    "fingerprint": "example"},
                        provenance={}, chunk_rows=64, batch_size=8, codec=codec)
    return str(path), enc, tok
