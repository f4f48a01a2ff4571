"""`loca-pipe cache-logits` (stage one) and `loca-pipe info` (what a logit store holds)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loca_pipe.cli.options import Amp, Dataset, Device, DeviceOption, Progress, Root, choices, comma_list, store_option
from loca_pipe.pipeline.names import LOGIT_DTYPES


LogitsDtype = choices("LogitsDtype", (*LOGIT_DTYPES, "none"))  # pipeline/names.py; none: top-k only


def _temperatures(text: Optional[str]) -> Optional[list[float]]:
    return comma_list(text, "--temperatures", float, "'1,4'")


def cache_logits(
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model NAME or module:callable (default: the checkpoint sidecar's arch).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Teacher state-dict file; its <ckpt>.json sidecar gives arch and num_classes.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Teacher name in the store (default: checkpoint stem, else the arch); with --params, picks the entry of cache.teachers.")] = None,
    dataset: Dataset = None,
    root: Root = None,
    split: Annotated[Optional[str], typer.Option(help="Data set split (train|test).")] = None,
    store: Annotated[Optional[str], typer.Option(help="Logit store path (a Zarr v3 folder; several teachers share one).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k logits and ids to keep per row (1..C).")] = None,
    temperatures: Annotated[Optional[str], typer.Option(help="Comma-separated τ list; logsumexp(z/τ) is stored for each (default 1,4).")] = None,
    logits_dtype: Annotated[Optional[LogitsDtype], typer.Option(help="dtype of the full logits; 'none' keeps top-k only.")] = None,
    compress_logits: Annotated[Optional[bool], typer.Option("--compress-logits/--no-compress-logits", help="zstd on float arrays (logits barely compress; off by default).")] = None,
    views: Annotated[Optional[int], typer.Option(help="0: the clean image once per sample; V>0: V replayable crop-flip views per sample.")] = None,
    view_seed: Annotated[Optional[int], typer.Option(help="Seed of the augmented views.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows (samples × views) per forward pass.")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers (default min(4, CPUs); in-memory data sets use a faster batch path).")] = None,
    device: DeviceOption = None,
    amp: Amp = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per store chunk (default: ~4 MiB of logits, at most 8192).")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Cache only the first N samples (quick runs).")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Re-cache this teacher (also when complete), replacing a store of another data set; an interrupted identical run is resumed.")] = None,
    progress: Progress = None,
    shard: Annotated[Optional[int], typer.Option(help="This process caches chunks c with c % num_shards == shard (default: $RANK, else 0).")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Processes sharing the work on one store (default: $WORLD_SIZE, else 1).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="Params file whose section 'cache' gives the defaults (options override it).")] = None,
) -> None:
    """Run a teacher once over a data set and add its logits to a logit store (resumes after a crash)."""
    from loca_pipe.stages import cache_logits as stage

    overrides: dict[str, Any] = {
        "teacher": teacher, "checkpoint": str(checkpoint) if checkpoint else None, "dataset": dataset,
        "root": root, "split": split, "store": store, "top_k": top_k, "temperatures": _temperatures(temperatures),
        "logits_dtype": logits_dtype.value if logits_dtype else None, "compress_logits": compress_logits,
        "views": views, "view_seed": view_seed, "batch_size": batch_size, "num_workers": num_workers,
        "device": device.value if device else None, "amp": amp, "chunk_rows": chunk_rows,
        "max_samples": max_samples, "overwrite": overwrite, "recache": overwrite, "progress": progress, "shard": shard,
        "num_shards": num_shards,
    }
    if params is not None:
        runs = stage.load_params(str(params), teacher_key=name, overrides=overrides)
    else:
        runs = stage.load_params({}, overrides={**overrides, "name": name})
    for p in runs:
        typer.echo(str(stage.run(p)), err=True)


def _short(h: Any, n: int = 12) -> str:
    return str(h)[:n] if h else "-"


def info(
    store: Annotated[Optional[str], typer.Argument(metavar="STORE", help="Logit store path (or --store).")] = None,
    store_opt: Annotated[Optional[str], typer.Option("--store", help="Logit store path (the same as the argument STORE).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
) -> None:
    """Print what a logit store holds: teachers, samples, classes, k, dtypes, temperatures, completeness, provenance."""
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.pipeline.store import VERIFY_ATTR, LogitStore

    path = store_option(store, store_opt)
    if path is None:
        raise ConfigError("info needs a logit store: `loca-pipe info STORE` (or --store STORE)")
    d = LogitStore.open(path).describe()
    if as_json:
        typer.echo(json.dumps(d, indent=2, sort_keys=True, default=str))
        return
    ds = d["dataset"]
    lines = [
        f"store {d['path']}  (format {d['format']} v{d['format_version']}, task {d['task']})",
        f"  rows      {d['num_rows']} = {d['num_samples']} samples x {d['num_views']} view(s); "
        f"{d['num_classes']} classes; {d['num_chunks']} chunks of {d['chunk_rows']} rows",
        f"  data set  {ds.get('name')} / {ds.get('split')}  fingerprint {_short(ds.get('fingerprint'))}  "
        f"transform {ds.get('transform')}",
    ]
    if d.get("aug_param_names"):
        lines.append(f"  views     {ds.get('augment')} seed {ds.get('view_seed')}, aug_params {d['aug_param_names']}")
    lines.append(f"  teachers  {len(d['teachers'])}")
    for t, a in d["teachers"].items():
        if a.get(VERIFY_ATTR):
            state = (f"CORRUPT (verify found bad chunks {a[VERIFY_ATTR].get('row_chunks')}; run `loca-pipe verify "
                     f"{path} --repair`)")
        else:
            state = "complete" if a.get("complete") else f"INCOMPLETE ({a['chunks_done']}/{d['num_chunks']} chunks)"
        lines.append(f"    {t}: {state}; top-k {a.get('top_k')}; temperatures {a.get('temperatures')}; "
                     f"full logits {a.get('logits_dtype') or 'no'}"
                     + (f"; codec {a['codec'].get('name')} v{a['codec'].get('version')}" if a.get("codec") else ""))
        lines.append(f"      teacher {a.get('teacher')}  checkpoint sha256 {_short(a.get('checkpoint_sha256'))}  "
                     f"weights {_short(a.get('weights_sha256'))}  amp {a.get('amp')}")
        v = a.get("versions") or {}
        lines.append(f"      created {a.get('created')}  finished {a.get('finished', '-')}  "
                     + " ".join(f"{k} {v[k]}" for k in sorted(v)))
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("cache-logits")(cache_logits)
    app.command("info")(info)
