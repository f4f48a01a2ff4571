"""The `loca-pipe` command line: a thin typer wrapper over the stages.

Each command module under ``loca_pipe.cli`` exposes ``register(app)``; command modules import the library
(torch, zarr) only inside their commands, so ``--help`` and usage errors answer without loading it.

Exit codes (README "Command line"):

* 0 — done (also ``--help``, ``--version`` and bare ``loca-pipe``, which prints the help);
* 1 — a :class:`~loca_pipe.pipeline.errors.LocaError` (bad input or bad state), or a write failing with
  EACCES/EPERM/EROFS/ENOSPC/EDQUOT past the up-front output checks: one ``error: …`` line;
* 2 — a usage error (unknown option or command, a value of the wrong type or outside the choices, a
  missing argument): one ``error: …`` line plus the usage line and where to find ``--help``;
* 130 — interrupted (Ctrl-C / SIGINT): "interrupted; resume with: loca-pipe …" naming the exact command
  (``train-student`` gains ``--resume``) for the commands that resume (:data:`RESUMES`), else the command that
  starts again. Work already finished is kept (done chunks of a store, finished targets, a run's last checkpoint).

A remote store (an fsspec URL such as ``s3://bucket/x.zarr``) whose client fails — no credentials, no such bucket,
no network, permission denied — is one ``error:`` line naming the URL and the fix, exit 1.

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


# Remote stores (fsspec URLs, issue #20): failures of the object store's client, recognised by class name anywhere in
# the exception chain, so no cloud library is imported here. First match wins: (names, what happened, the fix).
_REMOTE_ERRORS = (
    (("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
      "DefaultCredentialsError"),
     "no credentials were found",
     "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / ~/.aws/credentials; other back-ends: their "
     "own credentials), then run the same command again"),
    (("NoSuchBucket",), "the bucket does not exist", "create the bucket or fix the URL"),
    (("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
      "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "gaierror", "ConnectionError",
      "ConnectionRefusedError", "TimeoutError"),
     "the object store cannot be reached",
     "check the network and the endpoint (AWS_ENDPOINT_URL for an S3-compatible server), then run the same command again"),
    (("PermissionError", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"),
     "permission denied",
     "check that these credentials may read and write the bucket (its policy, the key's rights)"),
)


_NOT_STORES = ("file://", "http://", "https://", "tcp://", "tls://", "ucx://", "inproc://", "ws://", "wss://")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _remote_line(exc: BaseException, argv: Sequence[str]) -> str | None:
    """One line for a failure of a remote store's client (None: not one): the URL, what happened, the fix."""
    import re

    chain = _chain(exc)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    codes = {str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) for e in chain
             if isinstance(getattr(e, "response", None), dict)}
    text = " ".join(str(e) for e in chain)
    urls = [a for a in argv if re.match(r"^[a-z][a-z0-9+.-]*://", a)] or re.findall(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", text)
    urls = [u for u in urls if not u.startswith(_NOT_STORES)]  # a dask scheduler, an endpoint: not a store
    if not urls:
        return None
    local = [e for e in chain if isinstance(e, OSError) and e.filename and "://" not in str(e.filename)]
    if local:  # a local file failed (the write-errno line or a bug), even when a URL was given too
        return None
    if "bucket does not exist" in text.lower():  # s3fs turns NoSuchBucket into a FileNotFoundError with this text
        codes.add("NoSuchBucket")
    for kinds, what, fix in _REMOTE_ERRORS:
        if names & set(kinds) or codes & set(kinds):
            return f"cannot use the store {urls[0]!r}: {what}; {fix}"
    return None


# Commands whose re-run continues the interrupted work (done chunks, finished targets, the last checkpoint), and the
# options that make it so; every other command starts again from the beginning when re-run.
RESUMES = {"cache-logits": (), "calibrate": (), "lm-cache": (), "train-student": ("--resume",)}
_DROP_ON_RESUME = {"train-student": ("--overwrite", "--no-resume")}


def interrupted_line(argv: Sequence[str]) -> str:
    """The interrupt message: the exact command that resumes (with --resume where needed), or the one that starts
    again for a command that does not resume."""
    import shlex

    args = list(argv)
    name = next((a for a in args if not a.startswith("-")), "")
    if name in RESUMES:
        args = [a for a in args if a not in _DROP_ON_RESUME.get(name, ())]
        args += [o for o in RESUMES[name] if o not in args]
        return f"interrupted; resume with: loca-pipe {shlex.join(args)}"
    return (f"interrupted; this command does not resume — `loca-pipe {shlex.join(args)}` starts it again "
            f"(outputs already finished are kept)")


def _interrupted(argv: Sequence[str] | None = None) -> None:
    typer.echo(f"\n{interrupted_line(sys.argv[1:] if argv is None else argv)}", err=True)
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
        _interrupted(argv)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt, or an interrupt typer turned into Abort
        if got_sigint:
            _interrupted(argv)
        typer.echo("error: aborted (end of input)", err=True)
        sys.exit(1)
    except click_errors as exc:
        if got_sigint:
            _interrupted(argv)
        sys.exit(_show_usage_error(exc, list(argv) if argv is not None else sys.argv[1:]))
    except Exception as exc:
        if got_sigint:  # whatever the interrupt turned into while unwinding
            _interrupted(argv)
        errors = sys.modules.get("loca_pipe.pipeline.errors")  # loaded by whatever raised a LocaError
        if errors is not None and isinstance(exc, errors.LocaError):
            cause = exc.__cause__  # a store error over a remote client's failure: say what failed and the fix
            remote = _remote_line(cause, list(argv) if argv is not None else sys.argv[1:]) if cause else None
            typer.secho(f"error: {remote or exc}", err=True, fg=typer.colors.RED)
            sys.exit(1)
        remote = _remote_line(exc, list(argv) if argv is not None else sys.argv[1:])
        if remote is not None:  # a remote store's client failed: credentials, bucket, network, permission
            typer.secho(f"error: {remote}", err=True, fg=typer.colors.RED)
            sys.exit(1)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:  # a write failing after the up-front checks
            typer.secho(f"error: {_os_error_line(exc)}", err=True, fg=typer.colors.RED)
            sys.exit(1)
        raise
    if got_sigint:  # typer turns KeyboardInterrupt into a returned 130 in non-standalone mode
        _interrupted(argv)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
