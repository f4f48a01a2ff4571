"""Stage `lm-export`: the token store → Parquet in the per-token column convention (pipeline/lm/export.py),
for Hugging Face datasets, Axolotl's KD trainer or any loop; optionally LoCa-calibrated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loca_pipe.pipeline.errors import ConfigError, StoreConflictError
from loca_pipe.pipeline.lm import tokenizer
from loca_pipe.stages import Report
from loca_pipe.stages.lm.common import LMBase, data_fingerprint, encode_split, report as lm_report

SECTION = "lm_export"


@dataclass(frozen=True)
class Params:
    name: str = "teacher"               # the teacher in the store
    tau: float = 1.0                    # must be a cached temperature
    alpha: Optional[float] = None       # LoCa α: export calibrated log-probs (None: the teacher's own)
    out: str = ""                       # the Parquet file ('' = <workdir>/export/<name>-tau<τ>[-loca<α>].parquet)
    tokenizer: str = ""                 # tokenizer folder ('' = the pipeline's); must be the store's
    rows_per_group: int = 256           # sequences per Parquet row group (memory while writing)
    format: str = "axolotl"             # axolotl | distillkit (its raw top-k columns; pipeline/lm/export.py)
    base: LMBase = LMBase()


def output_path(p: Params) -> Path:
    if p.out:
        return Path(p.out)
    tag = f"{p.name}-tau{p.tau:g}" + (f"-loca{p.alpha:g}" if p.alpha is not None else "") + \
        ("" if p.format == "axolotl" else f"-{p.format}")
    return p.base.root / "export" / f"{tag}.parquet"


def run(p: Params) -> Report:
    from loca_pipe.pipeline.lm.dataset import TokenStoreDataset
    from loca_pipe.pipeline.lm.export import export_parquet
    from loca_pipe.pipeline.lm.streaming import TokenTeacher

    base = p.base
    if p.rows_per_group < 1:
        raise ConfigError(f"lm_export.rows_per_group must be ≥ 1; got {p.rows_per_group}")
    t = TokenTeacher(str(base.store), p.name)
    t.tau_index(p.tau)  # a τ the store lacks: refused before anything is read or written
    tok_dir = Path(p.tokenizer) if p.tokenizer else base.tokenizer_dir
    tok = tokenizer.load_tokenizer(tok_dir)
    want = t.dataset.get("tokenizer")
    if want is not None and tokenizer.tokenizer_fingerprint(tok) != want:
        raise StoreConflictError(f"the tokenizer at {str(tok_dir)!r} is not the one the store was cached with "
                                 f"(fingerprint {tokenizer.tokenizer_fingerprint(tok)} ≠ {want}); pass the store's "
                                 f"tokenizer (--tokenizer) or re-cache")
    examples, enc = encode_split(base, "train", tok)
    ds = TokenStoreDataset(str(base.store), enc, teacher=p.name, tau=p.tau, alpha=p.alpha,
                           expect_fingerprint=data_fingerprint(base, "train", examples, tok))
    info = export_parquet(ds, output_path(p), p.rows_per_group, format=p.format)
    return lm_report(SECTION, info, {"parquet": info["path"]},
                     shown={k: info[k] for k in ("path", "format", "sequences", "tokens", "bytes", "tau", "alpha", "top_k")})
