"""A token store exported to Parquet in the community's per-token column convention, read by
``datasets.load_dataset("parquet", data_files=...)`` (one row per sequence, list columns per position).

Position j of a row describes the next token, input_ids[j + 1] (Axolotl's alignment, its KD README
"Target alignment"); rows that predict no response token (the prompt, the last position) have
``target_mask`` 0 and ``target_logprobs`` −1e9. Every log-prob is normalised over the teacher's FULL
vocabulary at the export's τ with the stored exact lse (z/τ − lse_τ), LoCa-calibrated when α is given.

=================  ========================  ==========================================================
column             type                      read by / holds
=================  ========================  ==========================================================
input_ids          list<int32>               every trainer: bos + prompt + response (+ eos)
attention_mask     list<int8>                every trainer: all 1 (unpadded)
labels             list<int64>               HF / Axolotl: input_ids with the prompt −100 (model shifts)
target_token_ids   list<list<int32>> (L, K)  Axolotl KD: the teacher's top-k ids for token j + 1
target_logprobs    list<list<float32>>       Axolotl KD: their log-probs (full-vocabulary, τ, LoCa'd)
target_mask        list<list<int8>>          Axolotl KD: 1 where position j predicts a response token
label_logprob      list<float32>             loca-pipe: log p(input_ids[j + 1]) — exact outside the top-k
label_in_topk      list<bool>                loca-pipe: input_ids[j + 1] is among the top-k
tail_mass          list<float32>             loca-pipe: mass outside top-k ∪ {label} (the missing mass)
sample_id          int64                     loca-pipe: the sequence's index in the store
=================  ========================  ==========================================================

``format="distillkit"`` writes DistillKit's raw top-k form instead (the schema ``lm-import`` reads,
pipeline/lm/import_distillkit.py): ``input_ids`` list<uint64>, ``labels`` list<int64> (prompt −100),
``token_ids`` list<list<uint64>> and ``top_values`` list<list<float32>> with L − 1 rows per sequence, row j the
teacher's top-k for input_ids[j + 1] as log-probs at τ (LoCa'd with α); rows of prompt positions hold ids
0…K−1 at −1e9 (masked by ``labels``). DistillKit has no column for the label's log-prob outside the top-k or
the lse at other τ, so those are not exported in this form (an import flags such labels as unknown).

The file's schema metadata ``loca_pipe`` (JSON) records τ, α, the teacher, top-k, the codec, the store's
dataset fingerprint and this table's conventions. The export is written to ``<out>.tmp`` row group by row
group (memory: one row group of sequences + the dataset's decoded blocks) and renamed at the end, so a
failed export leaves any earlier file untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from loca_pipe.pipeline.lm.dataset import TokenStoreDataset

PAD_LOGPROB = -1e9  # Axolotl's padding value for masked target log-probs (never −inf: no NaN in a loss)


def _schema(meta: dict[str, Any]):
    import pyarrow as pa

    lst = pa.list_
    return pa.schema([("sample_id", pa.int64()), ("input_ids", lst(pa.int32())), ("attention_mask", lst(pa.int8())),
                      ("labels", lst(pa.int64())), ("target_token_ids", lst(lst(pa.int32()))),
                      ("target_logprobs", lst(lst(pa.float32()))), ("target_mask", lst(lst(pa.int8()))),
                      ("label_logprob", lst(pa.float32())), ("label_in_topk", lst(pa.bool_())),
                      ("tail_mass", lst(pa.float32()))], metadata={"loca_pipe": json.dumps(meta)})


def _batch(items: list[tuple[int, dict]], schema, K: int):
    import pyarrow as pa

    lens = np.array([len(it["input_ids"]) for _, it in items], np.int64)
    off = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    inner = pa.array(np.arange(0, int(lens.sum()) * K + 1, K, dtype=np.int32))

    def flat(key, dtype):
        return np.concatenate([it[key].numpy() for _, it in items]).astype(dtype)

    def ragged(values):
        return pa.ListArray.from_arrays(off, pa.array(values))

    def nested(values):
        return pa.ListArray.from_arrays(off, pa.ListArray.from_arrays(inner, pa.array(values.reshape(-1))))

    mask = flat("teacher_mask", bool)
    lp = flat("teacher_logprobs", np.float32)
    lp[~mask] = PAD_LOGPROB
    cols = [pa.array([i for i, _ in items], pa.int64()), ragged(flat("input_ids", np.int32)),
            ragged(np.ones(int(lens.sum()), np.int8)), ragged(flat("labels", np.int64)),
            nested(flat("teacher_ids", np.int32)), nested(lp),
            nested(np.repeat(mask[:, None], K, 1).astype(np.int8)),
            ragged(flat("label_logprob", np.float32)), ragged(flat("label_in_topk", bool)),
            ragged(flat("tail_mass", np.float32))]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _distillkit_schema(meta: dict[str, Any]):
    import pyarrow as pa

    lst = pa.list_
    return pa.schema([("input_ids", lst(pa.uint64())), ("labels", lst(pa.int64())),
                      ("token_ids", lst(lst(pa.uint64()))), ("top_values", lst(lst(pa.float32())))],
                     metadata={"loca_pipe": json.dumps(meta)})


def _distillkit_batch(items: list[tuple[int, dict]], schema, K: int):
    """DistillKit's raw top-k form: L − 1 teacher rows per sequence, row j scoring input_ids[j + 1]; rows that
    predict no response token (the prompt) hold ids 0…K−1 at PAD_LOGPROB and are masked by ``labels`` (−100)."""
    import pyarrow as pa

    lens = np.array([len(it["input_ids"]) for _, it in items], np.int64)
    rows = np.maximum(lens - 1, 0)
    off = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    roff = pa.array(np.concatenate([[0], np.cumsum(rows)]).astype(np.int32))
    inner = pa.array(np.arange(0, int(rows.sum()) * K + 1, K, dtype=np.int32))
    cut = [(it, int(n)) for (_, it), n in zip(items, rows)]
    mask = np.concatenate([it["teacher_mask"].numpy()[:n] for it, n in cut]).astype(bool)
    ids = np.concatenate([it["teacher_ids"].numpy()[:n] for it, n in cut]).astype(np.uint64)
    lp = np.concatenate([it["teacher_logprobs"].numpy()[:n] for it, n in cut]).astype(np.float32)
    ids[~mask] = np.arange(K, dtype=np.uint64)
    lp[~mask] = PAD_LOGPROB
    cols = [pa.ListArray.from_arrays(off, pa.array(np.concatenate([it["input_ids"].numpy() for _, it in items])
                                                   .astype(np.uint64))),
            pa.ListArray.from_arrays(off, pa.array(np.concatenate([it["labels"].numpy() for _, it in items])
                                                   .astype(np.int64))),
            pa.ListArray.from_arrays(roff, pa.ListArray.from_arrays(inner, pa.array(ids.reshape(-1)))),
            pa.ListArray.from_arrays(roff, pa.ListArray.from_arrays(inner, pa.array(lp.reshape(-1))))]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


FORMATS = {"axolotl": (_schema, _batch), "distillkit": (_distillkit_schema, _distillkit_batch)}


def export_parquet(ds: TokenStoreDataset, out: str | Path, rows_per_group: int = 256,
                   format: str = "axolotl") -> dict[str, Any]:
    """Write every sequence of ``ds`` (store order) to ``out`` in ``format`` (axolotl | distillkit); returns what
    was written."""
    import pyarrow.parquet as pq

    if format not in FORMATS:
        from loca_pipe.pipeline.errors import ConfigError

        raise ConfigError(f"export format must be one of {list(FORMATS)}; got {format!r}")
    make_schema, make_batch = FORMATS[format]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = ds.t
    meta = {"format": format, "tau": ds.tau, "alpha": ds.alpha, "teacher": t.view.name if hasattr(t.view, "name") else None,
            "top_k": t.top_k, "vocab_size": t.num_classes, "codec": t.attrs.get("codec") or {"name": "lossless"},
            "dataset": t.dataset, "store": t.path,
            "convention": "position j describes input_ids[j+1] (Axolotl; DistillKit: teacher row j); log-probs over "
                          f"the full vocabulary at tau, masked positions {PAD_LOGPROB}"}
    schema = make_schema(meta)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    try:
        with pq.ParquetWriter(str(tmp), schema) as w:
            items: list[tuple[int, dict]] = []
            for i in range(len(ds)):
                items.append((i, ds[i]))
                if len(items) >= rows_per_group:
                    w.write_batch(make_batch(items, schema, t.top_k))
                    n, items = n + len(items), []
            if items:
                w.write_batch(make_batch(items, schema, t.top_k))
                n += len(items)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "sequences": n, "tokens": t.num_rows, "bytes": out.stat().st_size, **meta}


__all__ = ["export_parquet", "FORMATS", "PAD_LOGPROB"]
