"""`loca-pipe verify`: check every chunk's CRC32C of a logit store, name the bad ones, and (``--repair``) mark
exactly those chunks not done so that re-running the same `loca-pipe cache-logits` (token stores: `lm-cache`)
command rewrites them."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from loca_pipe.cli.options import comma_list, store_option


def verify(
    store: Annotated[Optional[str], typer.Argument(metavar="STORE", help="Logit store path (or --store).")] = None,
    store_opt: Annotated[Optional[str], typer.Option("--store", help="Logit store path (the same as the argument STORE).")] = None,
    teachers: Annotated[Optional[str], typer.Option("--teachers", "-t", help="Comma-separated teachers to check (default: all; the shared row arrays are always checked).")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Delete the bad chunk files and mark those chunks not done (the teacher becomes incomplete); then re-run its cache-logits (token stores: lm-cache) command.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar over the chunks.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check every chunk of every teacher against its CRC32C; exit 1 naming the bad ones (array, chunk, file)."""
    from loca_pipe.pipeline.errors import ConfigError, StoreError
    from loca_pipe.pipeline.store import INDEX_FLAG, cache_command, invalidate_chunks, verify_store

    path = store_option(store, store_opt)
    if path is None:
        raise ConfigError("verify needs a logit store: `loca-pipe verify STORE` (or --store STORE)")
    rep = verify_store(path, comma_list(teachers, "--teachers"), record=True, progress=progress)
    bad = rep["bad"]
    cleared = invalidate_chunks(path, bad) if (repair and bad) else {}
    if as_json:
        typer.echo(json.dumps({"path": rep["path"], "chunks_checked": rep["chunks_checked"],
                               "bad": [b.__dict__ for b in bad], "repaired": cleared}, indent=2, default=list))
    elif not bad:
        typer.echo(f"store {path}: all {rep['chunks_checked']} chunks pass their CRC32C check")
    else:
        for b in bad:
            typer.echo(f"BAD {b.describe()}; teacher(s) {', '.join(b.teachers) or '-'}", err=True)
    if not bad:
        return
    command = cache_command(rep["task"])  # cache-logits, or lm-cache for a token store
    if repair:
        which = "; ".join(f"{t}: chunks {c}" for t, c in cleared.items() if c)
        if any(b.flag == INDEX_FLAG for b in bad):
            which = "; ".join(filter(None, (which, "the sequence index, rewritten from the data")))
        raise StoreError(f"{len(bad)} bad chunk(s) in {path!r} marked not done ({which}); re-run each teacher's "
                         f"`{command}` command (same options) to rewrite only those chunks")
    raise StoreError(f"{len(bad)} chunk(s) of {path!r} failed verification (listed above); run `loca-pipe verify "
                     f"{path} --repair`, then re-run the teachers' `{command}` commands")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("verify")(verify)
