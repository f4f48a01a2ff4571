"""The project's one exception family.

Every error a user can act on is a :class:`LocaError` (a ``ValueError``), so the CLI can print the
message and exit 1 without a traceback. Messages say what was expected, what came instead, and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable


def did_you_mean(name: object, choices: "Iterable[object]") -> str:
    """``"did you mean 'kd'? "`` for the closest of ``choices`` to a misspelled ``name`` (difflib, cutoff 0.6), else
    ``""`` — the one did-you-mean of every message (data sets, methods, params keys and sections, models)."""
    import difflib

    close = difflib.get_close_matches(str(name), sorted(str(c) for c in choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


class LocaError(ValueError):
    """Base class of every error loca-pipe raises for bad input or bad state."""


class ConfigError(LocaError):
    """A params file, option or argument is missing, unknown or out of range."""


class DataError(LocaError):
    """A data set is unknown, unreadable, or does not match what a store was built from."""


class ModelError(LocaError):
    """A model name is unknown, or a checkpoint does not fit the architecture."""


class StoreError(LocaError):
    """A logit store is missing, foreign, or inconsistent with the request."""


class IncompleteStoreError(StoreError):
    """A store (or one teacher in it) is still being written, or was left half-written by a crash."""


class StoreConflictError(StoreError):
    """A store exists but belongs to another data set, teacher checkpoint or settings."""


class NumericsError(LocaError):
    """NaN or inf where a finite number is required (teacher outputs, inputs to the maths, a loss)."""
