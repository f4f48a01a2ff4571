"""Held-out evaluation of a causal LM: Rouge-L of greedy generations against the reference responses,
token accuracy and perplexity of the reference responses under teacher forcing."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from loca_pipe.pipeline.lm.models import evaluate_tokens, greedy_generate
from loca_pipe.pipeline.lm.rouge import rouge_l_corpus
from loca_pipe.pipeline.lm.tokenizer import Encoded


def evaluate(model, tok, val: Encoded, test_prompts: list[np.ndarray], test_refs: list[str],
             max_new_tokens: int) -> dict[str, Any]:
    """Token accuracy / perplexity on ``val`` and Rouge-L of greedy generations on the test prompts."""
    t0 = time.perf_counter()
    out = evaluate_tokens(model, val, tok.pad_token_id)
    gen = greedy_generate(model, test_prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens)
    texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
    out["rouge_l"] = rouge_l_corpus(texts, test_refs)
    out["eval_seconds"] = time.perf_counter() - t0
    out["samples"] = [{"generation": t, "reference": r} for t, r in list(zip(texts, test_refs))[:5]]
    return out
