"""Settings shared by every language-model stage (section ``lm_base`` of lm/params.yaml) and the paths they
derive. Every output path of the LM pipeline is computed here, once, from ``workdir``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loca_pipe.pipeline import io as _io
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.threads import pin_threads
from loca_pipe.stages import Report
from loca_pipe.stages.config import load_section

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


@dataclass(frozen=True)
class LMOutputs:
    """Every output of the LM pipeline, relative to ``lm_base.workdir``: the one place these names are written.
    lm/dvc.yaml interpolates the same keys (``${lm_base.outputs.store}``), so DVC tracks what the stages write."""

    data: str = "data"                    # lm-prepare: train/val/test.jsonl and report.json
    tokenizer: str = "tokenizer"          # lm-tokenizer
    teacher: str = "teacher"              # lm-train-teacher: the model folder, metrics.json, samples.json
    store: str = "store.zarr"             # lm-cache: the token store
    cache_report: str = "cache_report.json"  # lm-cache: what it cached, bytes per token
    analysis: str = "analysis"            # lm-analyze
    students: str = "students"            # lm-train-student: one folder per run, <method>-s<seed>
    report: str = "report"                # lm-report


def _under_workdir(key: str) -> property:
    """The property ``Path(workdir) / outputs.<key>`` of LMBase."""
    return property(lambda self: self.root / getattr(self.outputs, key), doc=f"workdir / outputs.{key}")


@dataclass(frozen=True)
class LMBase:
    """workdir: folder every output goes under (names in ``outputs``); template: plain | chat; max_length:
    tokens per sequence (longer ones are truncated and counted); threads: torch CPU threads (2 cores here);
    device: auto | cpu | cuda | cuda:N (``pipeline/lm/device.py``; auto = a GPU where one exists)."""

    workdir: str = "lm-work"  # without an lm_base section: never write into the image pipeline's data/
    seed: int = 0
    template: str = "plain"
    max_length: int = 64
    threads: int = 1
    device: str = "auto"
    outputs: LMOutputs = LMOutputs()

    @property
    def root(self) -> Path:
        return Path(self.workdir)

    # workdir / outputs.<key>, one property per output
    data_dir = _under_workdir("data")
    tokenizer_dir = _under_workdir("tokenizer")
    teacher_dir = _under_workdir("teacher")
    store = _under_workdir("store")
    cache_report = _under_workdir("cache_report")
    analysis_dir = _under_workdir("analysis")
    students_dir = _under_workdir("students")
    report_dir = _under_workdir("report")

    def split(self, name: str) -> Path:
        return self.data_dir / f"{name}.jsonl"


def load(cls: type[T], section: str, params: str | Path | dict = DEFAULT_PARAMS,
         overrides: dict[str, Any] | None = None, base_overrides: dict[str, Any] | None = None) -> T:
    """This stage's params from one params file: its section, with ``base`` built from ``lm_base``;
    ``overrides`` / ``base_overrides`` win (None values skipped). Without the default ``params.yaml`` in the current
    folder every setting has its default (a named file that is missing is refused). The one loader,
    :func:`loca_pipe.stages.config.load_section`, with the LM pipeline's shared section."""
    return load_section(cls, section, params, overrides, shared=(LMBase, "lm_base"), shared_overrides=base_overrides,
                        default_optional=True)


def report(section: str, values: dict[str, Any], outputs: dict[str, Any], shown: dict[str, Any] | None = None) -> Report:
    """An LM stage's report: its command prints ``shown`` as indented JSON (default: the values, Report's own text)."""
    text = "" if shown is None else json.dumps(shown, indent=2, default=_io.jsonable)
    return Report(section, values, outputs, text)


def set_threads(base: LMBase) -> None:
    pin_threads(max(1, base.threads))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def encode_split(base: LMBase, name: str, tok):
    """(examples, Encoded) of one prepared split under this base's template and max_length."""
    from loca_pipe.pipeline.lm import text, tokenizer

    examples, _ = text.read_jsonl(base.split(name), "dolly")
    return examples, tokenizer.encode_examples(tok, examples, base.template, base.max_length)


def data_fingerprint(base: LMBase, name: str, examples, tok) -> str:
    """Identity of the cached token rows: examples + template + tokenizer + max_length (never paths)."""
    import hashlib

    from loca_pipe.pipeline.lm import text, tokenizer

    h = hashlib.sha256(f"{text.fingerprint_examples(examples, base.template)}|{tokenizer.tokenizer_fingerprint(tok)}|"
                       f"{base.max_length}|{name}".encode())
    return h.hexdigest()[:16]
