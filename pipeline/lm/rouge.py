"""Rouge-L F1 from the longest common subsequence (Lin 2004), as the LoCa paper scores generations.

Tokens: lower-cased runs of ``[a-z0-9]`` (the default tokenizer of Google's ``rouge-score``, without
stemming). P = LCS / len(candidate), R = LCS / len(reference), F = 2PR / (P + R) (β = 1); 0 when either side
is empty or nothing matches. Corpus score = mean of the per-example F values, ×100 in reports.
"""

from __future__ import annotations

import re
from typing import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len a · len b) time, O(len b) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """Rouge-L F1 of one candidate against one reference, in [0, 1]."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def rouge_l_corpus(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-example Rouge-L F1 × 100."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return float("nan")
    return 100.0 * sum(rouge_l(c, r) for c, r in zip(candidates, references)) / len(candidates)
