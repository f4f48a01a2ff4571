"""Tokenizers and token sequences for the language-model path.

A byte-level BPE (``tokenizers``) trained on the default text, wrapped in ``PreTrainedTokenizerFast`` and
saved/loaded as an ordinary Hugging Face tokenizer folder, so any HF causal LM's own tokenizer works the
same way. Sequences are ``[bos] + prompt + response + [eos]``; the prompt and the response are encoded
separately so the boundary is exact, and only response tokens (including the final eos) are trained on,
distilled and counted.

Length limit (``max_length`` tokens): a sequence that does not fit is truncated, never refused, and
counted in ``EncodeReport.truncated``: the prompt keeps at most its last ``max_length // 2`` tokens
(the end of a prompt is what the response depends on most), then the response is cut at the end (its eos
is then lost). Every sequence keeps at least one response token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, DataError, ModelError
from loca_pipe.pipeline.lm.text import Example, render_prompt

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE of ``vocab_size`` tokens (specials included) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL):
        raise ConfigError(f"a byte-level BPE needs vocab_size >= {256 + len(SPECIAL)} (256 bytes + specials); "
                          f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL["pad_token"], SPECIAL["bos_token"],
                                                                          SPECIAL["eos_token"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (``save_pretrained`` format); it must define an eos token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"no tokenizer folder at {str(path)!r}; make one with `loca-pipe lm-tokenizer --from-model "
                         f"TEACHER_FOLDER` (your model's tokenizer) or `loca-pipe lm-tokenizer` (a new BPE on the data)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer at {str(path)!r} has no eos token; responses need one to end")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """Content hash of the vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(repr(vocab).encode())
    h.update(repr([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]).encode())
    return h.hexdigest()[:16]


def check_same_tokenizer(teacher_tok, student_tok, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise ModelError naming the first token id whose token differs (or the special tokens that differ)."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    inv_a = {i: t for t, i in a.items()}
    inv_b = {i: t for t, i in b.items()}
    for i in range(max(len(inv_a), len(inv_b), max(inv_a, default=-1) + 1, max(inv_b, default=-1) + 1)):
        ta, tb = inv_a.get(i), inv_b.get(i)
        if ta != tb:
            raise ModelError(
                f"{names[0]} and {names[1]} tokenizers differ: first differing token id {i}: {names[0]} has {ta!r}, "
                f"{names[1]} has {tb!r} ({names[0]} vocabulary {len(a)}, {names[1]} {len(b)}); token-level distillation "
                f"needs the same tokenizer — use the {names[0]}'s tokenizer for the {names[1]}")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            raise ModelError(f"{names[0]} and {names[1]} tokenizers differ in {attr}: {getattr(teacher_tok, attr)} vs "
                             f"{getattr(student_tok, attr)}")


@dataclass
class Encoded:
    """Token sequences: ``ids[i]`` = bos + prompt + response (+ eos); the response starts at ``prompt_len[i]``."""

    ids: list[np.ndarray]
    prompt_len: np.ndarray  # (N,) int64: tokens before the first response token
    truncated: int = 0
    truncated_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def response_len(self) -> np.ndarray:
        return np.array([len(s) for s in self.ids], np.int64) - self.prompt_len

    def offsets(self) -> np.ndarray:
        """(N+1,) int64 row offsets of each sequence's response tokens in a flat token store."""
        return np.concatenate([[0], np.cumsum(self.response_len)]).astype(np.int64)


def encode_examples(tok, examples: Sequence[Example], template: str, max_length: int) -> Encoded:
    """Tokenize examples into bos + prompt + response + eos, truncating as the module docstring says."""
    if max_length < 4:
        raise ConfigError(f"max_length must be at least 4 tokens; got {max_length}")
    bos = tok.bos_token_id
    eos = tok.eos_token_id
    ids, plen, trunc = [], [], []
    for n, ex in enumerate(examples):
        p = tok(render_prompt(ex, template), add_special_tokens=False)["input_ids"]
        r = tok(ex.response, add_special_tokens=False)["input_ids"]
        if not r:
            raise DataError(f"example {n}: the response encodes to no tokens; drop empty responses")
        p = ([bos] if bos is not None else []) + list(p)
        r = list(r) + [eos]
        if len(p) + len(r) > max_length:
            trunc.append(n)
            keep_p = min(len(p), max(1, max_length // 2), max_length - 1)
            p = p[len(p) - keep_p:]
            r = r[:max_length - len(p)]
        ids.append(np.asarray(p + r, dtype=np.int64))
        plen.append(len(p))
    return Encoded(ids, np.asarray(plen, np.int64), len(trunc), trunc)


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int, left: bool = False):
    """Right- (or left-) pad int sequences → (input_ids (B, L) long, attention_mask (B, L) long)."""
    import torch

    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), int(pad_id), dtype=torch.long)
    m = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(np.asarray(s), dtype=torch.long)
        if left:
            x[i, L - len(s):] = t
            m[i, L - len(s):] = 1
        else:
            x[i, :len(s)] = t
            m[i, :len(s)] = 1
    return x, m
