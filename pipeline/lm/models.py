"""Causal language models: build small ones from a config, load any Hugging Face causal LM folder, run them
on response tokens, generate greedily, evaluate and save them (training: ``pipeline/lm/trainer.py``).

Any folder written by ``save_pretrained`` and loadable by ``AutoModelForCausalLM.from_pretrained`` works as
a teacher or a student; the default pipeline builds LLaMA-style models from ``LlamaConfig`` (or GPT-2 ones
from ``GPT2Config``) because nothing can be downloaded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline import names
from loca_pipe.pipeline.errors import ConfigError, ModelError
from loca_pipe.pipeline.lm.tokenizer import Encoded, pad_batch

log = logging.getLogger(__name__)
ARCHS = ("llama", "gpt2")


def build_lm(arch: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_length: int,
             tok=None, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM (``llama``: RMSNorm/RoPE/SwiGLU; ``gpt2``: learned positions)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if d_model % n_heads:
        raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    special = {}
    if tok is not None:
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=3 * d_model,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                          max_position_embeddings=max_length, tie_word_embeddings=True, **special)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                         n_positions=max_length, **special)
    else:
        raise ConfigError(f"unknown LM architecture {arch!r}; valid ones are {list(ARCHS)} (or load a folder)")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


ATTN_IMPLEMENTATIONS = names.LM_ATTN_IMPLEMENTATIONS  # "auto": transformers' own choice
DEVICE_MAPS = names.LM_DEVICE_MAPS  # "auto": accelerate spreads a model larger than one GPU over the GPUs (and CPU)


def load_lm(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            attn_implementation: str | None = None, device_map: str | None = None) -> torch.nn.Module:
    """Load a causal LM folder (``save_pretrained`` format) in eval mode.

    Defaults: fp32 on the CPU. ``dtype`` is the weights' (and so the logits') dtype; ``attn_implementation``
    (sdpa | eager | flash_attention_2; None or "auto" = transformers' default) is passed through;
    ``device_map="auto"`` lets accelerate place a model larger than one GPU over every GPU (then ``device``
    is ignored: the inputs go where the embedding is, :func:`input_device`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load weight bar is noise in logs and CLI output
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"no causal LM at {str(path)!r} (no config.json); train one with `loca-pipe lm-train-teacher` "
                         f"or point to a folder written by save_pretrained")
    if attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
        raise ConfigError(f"unknown attn_implementation {attn_implementation!r}; expected one of "
                          f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if (device_map or "") not in DEVICE_MAPS:
        raise ConfigError(f"unknown device_map {device_map!r}; expected '' (one device) or 'auto' (accelerate)")
    check_causal_lm_folder(path)
    kw: dict = {"dtype": dtype or torch.float32}
    if attn_implementation not in (None, "auto"):
        kw["attn_implementation"] = attn_implementation
    if device_map:
        kw["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    except ImportError as exc:  # flash_attention_2 without flash-attn, device_map without accelerate
        raise ModelError(f"cannot load {str(path)!r} with {kw}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {str(path)!r}: {exc}") from exc
    if not device_map:
        model = model.to(torch.device(device) if device is not None else torch.device("cpu"))
    return model.eval()


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embedding's device (under ``device_map="auto"`` the first GPU
    holding a layer, not necessarily the model's ``.device``)."""
    emb = model.get_input_embeddings()
    p = next(iter(emb.parameters()), None) if emb is not None else None
    if p is None:
        p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def placement(model) -> dict:
    """How a loaded model runs, for provenance: its weights' dtype, the attention implementation transformers
    picked, the device its inputs go to, and accelerate's device map (None: the whole model on that device)."""
    p = next(iter(model.parameters()), None)
    dmap = getattr(model, "hf_device_map", None)
    from loca_pipe.pipeline.lm.device import dtype_name

    return {"dtype": dtype_name(p.dtype if p is not None else torch.float32),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "device": str(input_device(model)),
            "device_map": {k: str(v) for k, v in dmap.items()} if dmap else None}


def check_causal_lm_folder(path: str | Path) -> None:
    """Refuse a model folder whose config is not one transformers can load as a causal LM (offline)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    if type(cfg) not in AutoModelForCausalLM._model_mapping:
        raise ModelError(f"{str(path)!r} is not a causal language model: its config is model_type "
                         f"{cfg.model_type!r} (architectures {getattr(cfg, 'architectures', None)}), which transformers "
                         f"cannot load as AutoModelForCausalLM; point to a causal LM folder (GPT-2, LLaMA, Qwen2, …)")


def model_vocab(model) -> int:
    """Size of the model's output layer (may exceed the tokenizer's vocabulary when padded)."""
    return int(model.get_output_embeddings().weight.shape[0])


def folder_sha256(path: str | Path) -> str:
    """Hash of a model folder's weight files (the teacher's provenance)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def check_vocab(model, tok, role: str = "teacher") -> None:
    """The model must score every token id the tokenizer can produce."""
    V, n = model_vocab(model), len(tok)
    if n > V:
        raise ModelError(f"{role} outputs {V} logits but its tokenizer has {n} tokens; the tokenizer does not "
                         f"belong to this model")


def _response_positions(seqs: Sequence[np.ndarray], prompt_len: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every response row: positions prompt_len[i]-1 .. len-2 of sequence i."""
    sel_b, sel_t = [], []
    for i, s in enumerate(seqs):
        t = torch.arange(int(prompt_len[i]) - 1, len(s) - 1)
        sel_b.append(torch.full_like(t, i))
        sel_t.append(t)
    return torch.cat(sel_b), torch.cat(sel_t)


def response_logits(model, seqs: Sequence[np.ndarray], prompt_len: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each response token, flattened in sequence order.

    Returns (logits (R, V), labels (R,)) where for sequence i the rows are the positions
    ``prompt_len[i]-1 .. len-2`` (each predicting the next token, which is the label). Right padding. The
    batch goes to the model's :func:`input_device`; both results are on the device of its logits, in the
    model's dtype.
    """
    dev = input_device(model)
    x, m = (a.to(dev) for a in pad_batch(seqs, pad_id))
    out = model(input_ids=x, attention_mask=m).logits  # (B, L, V), on the last layer's device
    b, t = (a.to(out.device) for a in _response_positions(seqs, prompt_len))
    return out[b, t], x.to(out.device)[b, t + 1]


def response_hidden(model, seqs: Sequence[np.ndarray], prompt_len: Sequence[int], pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`response_logits`, but the last hidden states (R, d) — the output projection's input."""
    dev = input_device(model)
    x, m = (a.to(dev) for a in pad_batch(seqs, pad_id))
    h = model.base_model(input_ids=x, attention_mask=m).last_hidden_state  # (B, L, d), final norm applied
    b, t = (a.to(h.device) for a in _response_positions(seqs, prompt_len))
    return h[b, t], x.to(h.device)[b, t + 1]


def output_projection(model, check_on: Sequence[np.ndarray] | None = None, pad_id: int = 0):
    """(weight (V, d), bias or None) of the model's output layer, for the fused losses.

    ``check_on``: a few sequences on which lm_head(hidden) must reproduce the model's logits (models that
    scale or cap their logits after the projection are refused with a clear error)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"the student's output layer is a {type(head).__name__}, not a linear projection; set "
                          f"fused_loss: false")
    if check_on is not None:
        with torch.no_grad():
            was = model.training
            model.eval()
            z, _ = response_logits(model, check_on, [1] * len(check_on), pad_id)
            h, _ = response_hidden(model, check_on, [1] * len(check_on), pad_id)
            model.train(was)
        if not torch.allclose(F.linear(h, head.weight, head.bias), z, rtol=1e-4, atol=1e-4):
            raise ConfigError("the student's logits are not its output projection of the last hidden states (the "
                              "model scales or caps them); set fused_loss: false")
    return head.weight, head.bias


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[np.ndarray], eos_id: int, pad_id: int, max_new_tokens: int,
                    batch_size: int = 64) -> list[np.ndarray]:
    """Greedy decoding (no sampling), left-padded batches, stopping at eos (not included in the output)."""
    model.eval()
    outs: list[np.ndarray] = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s:s + batch_size])
        dev = input_device(model)
        x, m = (a.to(dev) for a in pad_batch(chunk, pad_id, left=True))
        gen = torch.full((len(chunk), max_new_tokens), -1, dtype=torch.long, device=dev)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=dev)
        past = None
        cur_x, cur_m = x, m
        for step in range(max_new_tokens):
            pos = (cur_m.cumsum(1) - 1).clamp(min=0)
            if past is None:
                out = model(input_ids=cur_x, attention_mask=cur_m, position_ids=pos, use_cache=True)
            else:
                out = model(input_ids=cur_x[:, -1:], attention_mask=cur_m, position_ids=pos[:, -1:],
                            past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1).to(dev)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            gen[:, step] = torch.where(done, torch.full_like(nxt, -1), nxt)
            done = done | (nxt == eos_id)
            cur_x = torch.cat([cur_x, nxt.view(-1, 1)], 1)
            # finished rows keep decoding pad tokens whose outputs are discarded
            cur_m = torch.cat([cur_m, torch.ones_like(cur_m[:, :1])], 1)
            if bool(done.all()):
                break
        for row in gen.cpu().numpy():
            row = row[row >= 0]
            cut = np.flatnonzero(row == eos_id)
            outs.append(row[:cut[0]] if len(cut) else row)
    return outs


# ----------------------------------------------------------------------------------------------------
# Training goes through transformers.Trainer: pipeline/lm/trainer.py


@torch.no_grad()
def evaluate_tokens(model, enc: Encoded, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Token accuracy and perplexity on the response tokens of ``enc`` (teacher forcing)."""
    model.eval()
    nll, correct, n = 0.0, 0, 0
    for s in range(0, len(enc), batch_size):
        sl = slice(s, s + batch_size)
        logits, labels = response_logits(model, enc.ids[sl], enc.prompt_len[sl], pad_id)
        nll += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += int(labels.numel())
    return {"token_accuracy": correct / n, "perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n}


def save_lm(model, tok, out_dir: str | Path, meta: dict | None = None) -> None:
    """``save_pretrained`` the model and its tokenizer in one folder, plus ``loca_pipe.json`` metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if tok is not None:
        tok.save_pretrained(str(out_dir))
    if meta is not None:
        (out_dir / "loca_pipe.json").write_text(json.dumps(meta, indent=2))
