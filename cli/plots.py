"""`loca-pipe plots`: DVC's plots as one offline HTML page.

`dvc plots show` writes a page whose charts load vega from a CDN, so it is blank without a network. This
command asks DVC for the same plots (`dvc plots show --json`: each chart's vega-lite spec with its data
inlined, and the image plots' files) and renders every chart to SVG in-process with vl-convert (vega and
vega-lite compiled into a wheel: no JavaScript, no network), then writes one self-contained page.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else (shutil.which("dvc") or "dvc")


def plots(
    out: Annotated[Path, typer.Option("--out", help="The HTML page to write.")] = Path("dvc_plots/offline.html"),
    repo: Annotated[Path, typer.Option("--repo", help="The DVC project folder (dvc.yaml's plots).")] = Path("."),
) -> None:
    """Render the DVC project's plots (vega-lite charts and image plots) into one offline HTML page."""
    from loca_pipe.pipeline.errors import ConfigError
    from loca_pipe.stages.config import check_writable

    if not (repo / "dvc.yaml").is_file():
        raise ConfigError(f"no dvc.yaml in {str(repo)!r}; run `loca-pipe plots` from the project folder or pass "
                          f"--repo")
    from loca_pipe.pipeline.guard import FILE, check_outputs

    check_outputs({"--repo (dvc.yaml)": repo / "dvc.yaml"}, {"--out": (out, FILE)})
    check_writable(str(out.parent), "the plots page", "--out")
    proc = subprocess.run([_dvc(), "plots", "show", "--json"], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`dvc plots show --json` failed in {str(repo)!r}: "
                          f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}; run "
                          f"`dvc repro` first so the plots' files exist")
    import vl_convert as vlc

    data = json.loads(proc.stdout).get("data", {})
    parts, n = [], 0
    for name, entries in data.items():
        for e in entries:
            if e.get("type") == "vega":
                body = vlc.vegalite_to_svg(e["content"])
            elif e.get("type") == "image" and e.get("url") and Path(e["url"]).is_file():
                mime = mimetypes.guess_type(e["url"])[0] or "image/png"
                b64 = base64.b64encode(Path(e["url"]).read_bytes()).decode()
                body = f'<img alt="{html.escape(name)}" src="data:{mime};base64,{b64}" style="max-width:100%">'
            else:
                continue
            n += 1
            parts.append(f"<section><h2>{html.escape(name)}</h2>\n{body}\n</section>")
    if n == 0:
        raise ConfigError(f"dvc reports no plots with data in {str(repo)!r}; run `dvc repro` first")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>loca-pipe plots</title></head>"
            "<body style='font-family:sans-serif'>\n" + "\n".join(parts) + "\n</body></html>\n")
    from loca_pipe.pipeline.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    typer.echo(f"{n} plots -> {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("plots")(plots)
