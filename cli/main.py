"""The `loca-pipe` command line: a thin typer wrapper over the stages.

Each command module under ``loca_pipe.cli`` exposes ``register(app)``. Library code raises
:class:`~loca_pipe.pipeline.errors.LocaError`; :func:`main` prints its message and exits 1 — a user
error never shows a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from loca_pipe import __version__
from loca_pipe.cli import analyze, cache, lm, teacher, train
from loca_pipe.pipeline.errors import LocaError

app = typer.Typer(
    name="loca-pipe",
    help="Offline teacher-logit caching and LoCa calibration for knowledge distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loca-pipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v info, -vv debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Configure logging once, here, never at import."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


for _module in (teacher, cache, analyze, train, lm):
    _module.register(app)


def main() -> None:
    """Console-script entry point: a LocaError becomes a one-line message and exit code 1."""
    try:
        app(standalone_mode=False)
    except LocaError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
