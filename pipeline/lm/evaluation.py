"""Held-out evaluation of a causal LM: Rouge-L of greedy generations against the reference responses,
token accuracy and perplexity of the reference responses under teacher forcing; and the token-level
mechanism metric on the teacher's mis-instructed training tokens."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from loca_pipe.pipeline.lm.models import evaluate_tokens, greedy_generate, response_logits
from loca_pipe.pipeline.lm.rouge import rouge_l_corpus
from loca_pipe.pipeline.lm.tokenizer import Encoded

MECHANISM_SEQUENCES = 512  # training sequences the mechanism metric reads (a forward each; 0 = all)
SAMPLES = 5  # test prompts whose generations are kept (samples.json; the report shows them side by side)


def evaluate(model, tok, val: Encoded, test_prompts: list[np.ndarray], test_refs: list[str],
             max_new_tokens: int, prompts: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Token accuracy / perplexity on ``val`` and Rouge-L of greedy generations on the test prompts."""
    t0 = time.perf_counter()
    out = evaluate_tokens(model, val, tok.pad_token_id)
    gen = greedy_generate(model, test_prompts, tok.eos_token_id, tok.pad_token_id, max_new_tokens)
    texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
    out["rouge_l"] = rouge_l_corpus(texts, test_refs)
    out["eval_seconds"] = time.perf_counter() - t0
    shown = list(prompts) if prompts is not None else [None] * len(texts)
    out["samples"] = [{"prompt": q, "generation": t, "reference": r}
                      for q, t, r in list(zip(shown, texts, test_refs))[:SAMPLES]]
    return out


@torch.no_grad()
def mechanism(model, enc: Encoded, store: str, name: Optional[str], pad_id: int, batch_size: int = 64,
              max_sequences: int = MECHANISM_SEQUENCES) -> dict[str, Any]:
    """On the teacher's mis-instructed response tokens of ``enc`` (the store's rows: the *training* split), the
    share where the student's top prediction is the teacher's wrong top token (``follows_teacher``) and the
    share where it is the reference token (``recovers_label``). Mis-instruction is the project's one rule
    (:func:`~loca_pipe.pipeline.calibration.mis_instruction_mask`, τ = 1, on the stored sparse teacher); the
    teacher's top token is its largest stored top-k logit. The first ``max_sequences`` sequences are used (0: all;
    the count is recorded); the store is read a batch of sequences at a time."""
    from loca_pipe.pipeline.calibration import mis_instruction_mask, sparse_from_topk
    from loca_pipe.pipeline.lm.streaming import TokenTeacher

    t = TokenTeacher(store, name)
    ti = t.tau_index(1.0) if any(abs(x - 1.0) < 1e-9 for x in t.temperatures) else 0
    tau = float(t.temperatures[ti])
    keys = ("topk_logits", "topk_ids", "lse", "label_logit", "label")
    model.eval()
    n_mis = follow = recover = 0
    n = len(enc) if max_sequences <= 0 else min(len(enc), max_sequences)
    for s in range(0, n, batch_size):
        sl = slice(s, min(n, s + batch_size))
        d = t.read(int(t.offsets[sl.start]), int(t.offsets[sl.stop]), keys)
        y = torch.as_tensor(d["label"].astype(np.int64))
        zl = torch.as_tensor(d["topk_logits"]).float()
        ids = torch.as_tensor(d["topk_ids"].astype(np.int64))
        sd = sparse_from_topk(zl, ids, torch.as_tensor(np.ascontiguousarray(d["lse"][:, ti])).float(),
                              torch.as_tensor(d["label_logit"]).float(), y, tau)
        mis = mis_instruction_mask(sd, y)
        if not bool(mis.any()):
            continue
        z, labels = response_logits(model, enc.ids[sl], enc.prompt_len[sl], pad_id)
        if not torch.equal(labels, y):
            from loca_pipe.pipeline.errors import StoreConflictError

            raise StoreConflictError("the store's labels are not this data's response tokens; re-cache the teacher")
        top = z.argmax(-1)
        wrong = ids.gather(1, zl.argmax(1, keepdim=True)).view(-1)
        n_mis += int(mis.sum())
        follow += int(((top == wrong) & mis).sum())
        recover += int(((top == y) & mis).sum())
    return {"mechanism": {"split": "train", "sequences": n, "mis_tokens": n_mis, "tau": tau,
                          "follows_teacher": follow / n_mis if n_mis else None,
                          "recovers_label": recover / n_mis if n_mis else None}}
