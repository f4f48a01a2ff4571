"""The one progress bar of every long loop: throughput, ETA, and one line per update off a terminal.

tqdm draws its bar with carriage returns. On a terminal that redraws one line; piped to a file or a CI
log the updates pile up into one very long line. Off a terminal this module therefore rewrites each
carriage-return update as its own line and throttles updates to one every ``LOG_INTERVAL`` seconds, so a
log gets a readable line per update ("cache strong:  40%|… | 24.0k/60.0k [00:13<00:20, 1.8ksample/s]").

Usage (``bar.set_postfix(loss=…, acc=…)`` adds live numbers)::

    with progress_bar(total=n, desc="analyze", unit="row", enabled=True) as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""

from __future__ import annotations

import sys
from typing import IO, Any

# Seconds between updates when the output is a file: a line every 10 s keeps a 10-minute job to ~60 lines.
LOG_INTERVAL = 10.0


class _LineWriter:
    """A file wrapper that turns tqdm's carriage-return redraws into one line each."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._at_line_start = True

    def write(self, s: str) -> int:
        out = []
        for ch in s.replace("\r", "\n"):
            if ch == "\n":
                if self._at_line_start:
                    continue          # a redraw of an empty line, or the newline after a line already ended
                self._at_line_start = True
            else:
                self._at_line_start = False
            out.append(ch)
        if out:
            self._stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | float | None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: IO[str] | None = None, **kwargs: Any):
    """A tqdm bar with throughput (unit/s, SI-scaled) and an ETA; one line per update off a terminal.

    ``enabled=False`` gives a disabled bar (every method is a no-op), so callers never branch.
    """
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    tty = is_terminal(stream)
    opts: dict[str, Any] = dict(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                                leave=True)
    if tty:
        opts.update(dynamic_ncols=True, mininterval=0.5, file=stream)
    else:
        opts.update(file=_LineWriter(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL * 6,
                    ncols=100, ascii=True)
    opts.update(kwargs)
    return tqdm(**opts)
