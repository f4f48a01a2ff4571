"""The pipeline's stages: one module per stage of dvc.yaml (image) and of lm/dvc.yaml (``stages/lm/``).

The one stage contract, the same for image and language-model stages:

- a frozen params dataclass (``XParams`` for an image stage, ``Params`` in ``stages/lm/``) holding every
  setting the stage reads, built from its params.yaml section by ``stages.config.load_section`` (or the
  stage's ``load_params`` when one section yields several runs, e.g. one per teacher); an LM stage's
  params also carry the shared ``lm_base`` section as ``params.base`` (``stages.lm.common.load``, the same loader
  with a shared section);
- ``run(params) -> Report``: does the work, writes the outputs and returns a :class:`Report`: what it
  measured (``report["key"]``), the paths it wrote (``report.outputs``) and the text its command prints
  (``str(report)``). Nothing else is needed to run a stage: no second argument, no ``main()``, no other
  entry point.

The CLI commands (``cli/``) are thin: options → params (options override single values) → ``run`` →
print ``str(report)`` (or ``report.to_json()`` with ``--json``). Output paths are written once: in
params.yaml (``=section.key`` references; dvc.yaml interpolates the same keys) or in one derivation here
(``stages.lm.common.LMBase``, ``train_teacher.checkpoint_path``, ``pipeline.student_spec.run_name``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from loca_pipe.pipeline.io import jsonable


@dataclass(frozen=True, eq=False)
class Report(Mapping[str, Any]):
    """What one stage run did; every stage's ``run`` returns one.

    ``values``: what it measured or wrote, JSON-able, read as ``report[key]`` (a read-only view); ``outputs``:
    what → path of everything it wrote; ``text``: what its command prints (default: the values as indented
    JSON). As a mapping it compares like its values (``report == {"a": 1}``) and, like a dict, is not hashable.
    """

    stage: str
    values: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "outputs", MappingProxyType({k: str(v) for k, v in self.outputs.items()}))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dict(self.values), indent=indent, default=jsonable)

    def __str__(self) -> str:
        return self.text or self.to_json()

    def __repr__(self) -> str:
        return f"Report(stage={self.stage!r}, keys={list(self.values)}, outputs={dict(self.outputs)})"

    def __reduce__(self):  # a MappingProxyType does not pickle: rebuild from plain dicts
        return (Report, (self.stage, dict(self.values), dict(self.outputs), self.text))
