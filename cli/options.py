"""Option parsing shared by the command modules."""

from __future__ import annotations

from typing import Any, Callable, Optional

from loca_pipe.pipeline.errors import ConfigError


def comma_list(text: Optional[str], option: str, kind: Callable[[str], Any] = str,
               example: str = "'0.9,0.95'") -> Optional[list[Any]]:
    """``"0.9, 0.95"`` → ``[0.9, 0.95]`` (None stays None: the option was not given)."""
    if text is None:
        return None
    try:
        return [kind(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise ConfigError(f"{option} takes comma-separated values such as {example}; got {text!r}") from exc
