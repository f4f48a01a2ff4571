"""Tiny fixtures for the language-model tests: a 300-token BPE, a 2-layer d=32 LLaMA, ~24 sequences."""

from __future__ import annotations

import pytest
import torch

from loca_pipe.pipeline.lm import models, text, tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lm_text() -> str:
    return text.default_text(60_000)


@pytest.fixture(scope="session")
def tok(lm_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tokenizer.train_tokenizer(text.sentences(lm_text), 300, out)
    return tokenizer.load_tokenizer(out)


@pytest.fixture(scope="session")
def pairs(lm_text):
    return text.continuation_pairs(lm_text)[:24]


@pytest.fixture(scope="session")
def enc(tok, pairs):
    return tokenizer.encode_examples(tok, pairs, "plain", 40)


def spread(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Re-initialise weights with a large std so logits are far from uniform (no near-ties in top-k)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.fixture(scope="session")
def teacher(tok):
    return spread(models.build_lm("llama", len(tok), 32, 2, 2, 64, tok, seed=0), seed=1)


@pytest.fixture(scope="session")
def trained_teacher(tok, enc, tmp_path_factory):
    """A teacher trained briefly on the fixture data, so it is right on some tokens and wrong on others."""
    from loca_pipe.pipeline.lm import trainer

    m = models.build_lm("llama", len(tok), 32, 2, 2, 64, tok, seed=0)
    trainer.train(m, enc, None, trainer.TrainSettings(batch_size=8, steps=40, lr=1e-2), pad_id=tok.pad_token_id,
                  out_dir=tmp_path_factory.mktemp("teacher-ck"), all_tokens=True)
    return m.eval()

