"""Stage `lm-tokenizer`: a byte-level BPE trained on the training split (prompts and responses) → tokenizer/.

``from_model`` instead copies the tokenizer of an existing Hugging Face model folder (bring-your-own teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.lm import text, tokenizer
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, report as lm_report

SECTION = "lm_tokenizer"


@dataclass(frozen=True)
class Params:
    vocab_size: int = 1024
    from_model: str = ""
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def run(p: Params) -> Report:
    base = p.base
    if p.from_model:
        tok = tokenizer.load_tokenizer(p.from_model)
        tok.save_pretrained(str(base.tokenizer_dir))
    else:
        train, _ = text.read_jsonl(base.split("train"), "dolly")
        corpus = [text.render_prompt(ex, base.template) + ex.response for ex in train]
        tok = tokenizer.train_tokenizer(corpus, p.vocab_size, base.tokenizer_dir)
    info = {"vocab": len(tok), "fingerprint": tokenizer.tokenizer_fingerprint(tok), "from_model": p.from_model}
    write_json(base.tokenizer_dir / "loca_pipe.json", info, sort_keys=False)
    return lm_report(SECTION, info, {"tokenizer": base.tokenizer_dir})
