"""The two commonest usage errors — an unknown command, an unknown option — answered before typer is imported.

typer 0.29 imports pydantic to build its commands (about 0.2 s of the 0.5 s a typo cost); the console script
(:func:`main`) first checks ``argv`` against :data:`loca_pipe.cli.usage_table.TABLE` — every command, its usage
line and its long options, generated from the typer app itself (:func:`build_table`) — and, when the input holds
one of those two errors, prints exactly what typer would (``error: …``, the usage line, the ``--help`` hint;
exit 2). Anything else — a valid command line, ``--help``, short options, a missing value, a bad choice —
goes to typer unchanged. The table carries a hash of the CLI modules it was generated from; when they changed
since, it is not used (a stale table can never refuse a valid option). ``tests/cli/test_fast_usage.py`` checks
that the table equals a fresh generation and that every answer equals typer's own, byte for byte.

Regenerate after changing a command or an option: ``python -m loca_pipe.cli.fast_usage --write``.
"""

from __future__ import annotations

import hashlib
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
TABLE_FILE = HERE / "usage_table.py"
ROOT_FLAGS = ("--verbose", "-v", "-vv")  # root options the fast path understands (anything else: typer)
EXIT_USAGE = 2


def sources_hash() -> str:
    """Hash of the CLI modules whose declarations the table mirrors (every cli/*.py but the table itself)."""
    h = hashlib.sha256()
    for path in sorted(HERE.glob("*.py")):
        if path.name != TABLE_FILE.name:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_table(app: Any) -> dict[str, Any]:
    """{root: …, commands: {name: {usage, options: {long name: takes a value}}}} from the typer app."""
    import typer

    group = typer.main.get_command(app)
    root_ctx = group.context_class(group, info_name="loca-pipe")

    def longs(cmd: Any) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for p in cmd.get_params(root_ctx):
            if getattr(p, "param_type_name", "") != "option":
                continue
            takes: bool | None = False if (p.is_flag or p.count) else True if p.nargs == 1 else None
            for name in [*p.opts, *p.secondary_opts]:
                if name.startswith("--"):
                    out[name] = takes  # None: several values (the fast path leaves that command line to typer)
        return out

    commands = {}
    for name, cmd in group.commands.items():  # registration order: the order typer suggests commands in
        ctx = cmd.context_class(cmd, info_name=name, parent=root_ctx)
        lenient = bool((getattr(cmd, "context_settings", None) or {}).get("ignore_unknown_options")) or cmd.allow_extra_args
        # a command that takes what it does not know (or a sub-group) is never answered fast: options None
        commands[name] = {"usage": cmd.get_usage(ctx),
                          "options": None if lenient or hasattr(cmd, "commands") else longs(cmd)}
    return {"hash": sources_hash(), "root": {"usage": group.get_usage(root_ctx), "options": longs(group)},
            "commands": commands}


def _fail(message: str, usage: str, path: str) -> int:
    message = " ".join(message.split())
    if message[:1].isupper() and not message[:2].isupper():
        message = message[0].lower() + message[1:]
    sys.stderr.write(f"error: {message}\n{usage}\nTry '{path} --help' for help.\n")
    return EXIT_USAGE


def _no_such_option(opt: str, options: dict[str, Any]) -> str:
    possible = get_close_matches(opt, list(options))
    return f"No such option: {opt}" + (f" (Possible options: {', '.join(sorted(possible))})" if possible else "")


def check(argv: Sequence[str], table: dict[str, Any]) -> int | None:
    """The exit code after printing typer's answer to an unknown command or option in ``argv``; None when
    ``argv`` holds neither (or anything the fast path does not model: then typer decides)."""
    if any(not a.isprintable() for a in argv) or "--help" in argv or "--version" in argv:
        return None
    root = table["root"]
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        tok = argv[i]
        if tok.startswith("--") and tok != "--" and "=" not in tok and tok not in root["options"]:
            return _fail(_no_such_option(tok, root["options"]), root["usage"], "loca-pipe")
        if tok not in ROOT_FLAGS:
            return None
        i += 1
    if i == len(argv):
        return None
    name = argv[i]
    cmd = table["commands"].get(name)
    if cmd is None:
        matches = get_close_matches(name, list(table["commands"]))
        message = f"No such command {name!r}." + (f" Did you mean {', '.join(repr(m) for m in matches)}?"
                                                  if matches else "")
        return _fail(message, root["usage"], "loca-pipe")
    options, rest = cmd["options"], list(argv[i + 1:])
    if options is None:
        return None
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok == "--":
            return None
        if tok.startswith("--"):
            opt, eq, _ = tok.partition("=")
            if opt not in options:
                return _fail(_no_such_option(opt, options), cmd["usage"], f"loca-pipe {name}")
            takes = options[opt]
            if takes is None or (not takes and eq):
                return None  # several values, or a value given to a flag: typer's message
            if takes and not eq:
                if j + 1 >= len(rest):
                    return None  # a missing value: typer's message
                j += 1  # the value, whatever it looks like
        elif tok.startswith("-") and tok != "-":
            return None  # a short option or a negative number: typer parses those
        j += 1
    return None


def main() -> None:
    """The console script: the fast answer where it applies, else the full CLI."""
    argv = sys.argv[1:]
    try:
        from loca_pipe.cli.usage_table import TABLE
    except ImportError:
        TABLE = None
    if TABLE is not None and TABLE.get("hash") == sources_hash():
        code = check(argv, TABLE)
        if code is not None:
            sys.exit(code)
    from loca_pipe.cli.main import main as full

    full()


def _write() -> None:
    from loca_pipe.cli.main import app

    table = build_table(app)
    import pprint

    TABLE_FILE.write_text('"""Generated by `python -m loca_pipe.cli.fast_usage --write` from the typer app (do not edit):\n'
                          'the commands, their usage lines and long options, for the fast usage errors."""\n\n'
                          f"TABLE = {pprint.pformat(table, width=116, sort_dicts=False)}\n")
    print(f"wrote {TABLE_FILE} ({len(table['commands'])} commands, hash {table['hash']})")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _write()
    else:
        main()
