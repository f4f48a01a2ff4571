"""The `loca-pipe` command line: a thin typer wrapper over the stages.

Each command module under ``loca_pipe.cli`` exposes ``register(app)``; command modules import the library
(torch, zarr) only inside their commands, so ``--help`` and usage errors answer without loading it.

Exit codes (README "Command line"):

* 0 — done (also ``--help``, ``--version`` and bare ``loca-pipe``, which prints the help);
* 1 — a :class:`~loca_pipe.pipeline.errors.LocaError` (bad input or bad state), or a write failing with
  EACCES/EPERM/EROFS/ENOSPC/EDQUOT past the up-front output checks: one ``error: …`` line;
* 2 — a usage error (unknown option or command, a value of the wrong type or outside the choices, a
  missing argument): one ``error: …`` line plus the usage line and where to find ``--help``;
* 130 — interrupted (Ctrl-C / SIGINT): "interrupted; rerun the same command to resume". Work already
  finished is kept (done chunks of a store, finished targets, a run's last checkpoint).

No case prints a traceback except a bug (an exception that is not one of the above).
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from typing import Annotated, Any, Sequence

import typer

from loca_pipe import __version__
from loca_pipe.cli import analyze, cache, lm, plots, store, teacher, train
from loca_pipe.pipeline.oserrors import WRITE_REASONS

INTERRUPTED = "interrupted; rerun the same command to resume"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

app = typer.Typer(
    name="loca-pipe",
    help="Offline teacher-logit caching and LoCa calibration for knowledge distillation.",
    pretty_exceptions_enable=False,
    add_completion=False,
    invoke_without_command=True,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loca-pipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v info, -vv debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Configure logging once, here, never at import. Bare `loca-pipe` prints this help and exits 0."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


for _module in (teacher, cache, store, analyze, train, lm, plots):
    _module.register(app)


def _click_exception_types() -> tuple[type, ...]:
    """ClickException of the click typer uses (typer 0.29 vendors its own, ``typer._click``) and of the
    stand-alone ``click`` package when it is installed — whichever raised, it is caught."""
    types: list[type] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _usage_context(argv: Sequence[str]) -> Any:
    """A click context for the command named in ``argv`` (for a usage error raised without one)."""
    try:
        group = typer.main.get_command(app)
        root = group.context_class(group, info_name="loca-pipe")
        name = next((a for a in argv if not a.startswith("-")), None)
        cmd = group.get_command(root, name) if name else None
        return root if cmd is None else cmd.context_class(cmd, info_name=name, parent=root)
    except Exception:  # best effort: the error line is what matters
        return None


def _show_usage_error(exc: Any, argv: Sequence[str]) -> int:
    """One ``error: …`` line, then (usage errors) the usage line and the --help hint; returns the exit code."""
    message = " ".join(str(exc.format_message()).split()).replace("Value error, ", "")
    if message[:1].isupper() and not message[:2].isupper():
        message = message[0].lower() + message[1:]
    typer.echo(f"error: {message}", err=True)
    code = int(getattr(exc, "exit_code", 1) or 1)
    if code != EXIT_USAGE:  # a ClickException that is not a usage error (e.g. FileError)
        return code
    ctx = getattr(exc, "ctx", None) or _usage_context(argv)
    if ctx is not None:
        typer.echo(ctx.get_usage(), err=True)
        typer.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
    else:
        typer.echo("Try 'loca-pipe --help' for help.", err=True)
    return code


_WRITE_ERRNOS = WRITE_REASONS  # the one errno table, pipeline/oserrors.py


def _os_error_line(exc: OSError) -> str:
    where = f" {exc.filename!r}" if exc.filename else ""
    return (f"cannot write{where}: {_WRITE_ERRNOS[exc.errno]} ({errno.errorcode.get(exc.errno, exc.errno)}); "
            f"work already finished is kept — free space or fix the permissions (or choose another output), then "
            f"run the same command again")


def _interrupted() -> None:
    typer.echo(f"\n{INTERRUPTED}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: errors become one line and an exit code (see the module docstring)."""
    got_sigint: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        got_sigint.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        previous = None
    try:
        _main(argv, got_sigint)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None, got_sigint: list[int]) -> None:
    click_errors = _click_exception_types()
    try:
        rc = app(args=list(argv) if argv is not None else None, prog_name="loca-pipe", standalone_mode=False)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt, or an interrupt typer turned into Abort
        if got_sigint:
            _interrupted()
        typer.echo("error: aborted (end of input)", err=True)
        sys.exit(1)
    except click_errors as exc:
        if got_sigint:
            _interrupted()
        sys.exit(_show_usage_error(exc, list(argv) if argv is not None else sys.argv[1:]))
    except Exception as exc:
        if got_sigint:  # whatever the interrupt turned into while unwinding
            _interrupted()
        errors = sys.modules.get("loca_pipe.pipeline.errors")  # loaded by whatever raised a LocaError
        if errors is not None and isinstance(exc, errors.LocaError):
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            sys.exit(1)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:  # a write failing after the up-front checks
            typer.secho(f"error: {_os_error_line(exc)}", err=True, fg=typer.colors.RED)
            sys.exit(1)
        raise
    if got_sigint:  # typer turns KeyboardInterrupt into a returned 130 in non-standalone mode
        _interrupted()
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
