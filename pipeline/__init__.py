"""loca_pipe.pipeline — the library: LoCa calibration, KD losses, the logit store, data and models.

Pure tensor maths (calibration, losses) stays free of I/O; nothing here reads argv or YAML.
Users who only want LoCa inside their own training loop need just this package::

    from loca_pipe.pipeline import loca_from_logits, kd_loss

The maths names are re-exported lazily (PEP 562 ``__getattr__``): importing ``loca_pipe.pipeline`` (which every
``loca_pipe.pipeline.X`` import does, the CLI's included) must not import torch, so a usage error answers in a
fraction of a second (tests/cli/test_fast_usage.py). ``from loca_pipe.pipeline import kd_loss`` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

from loca_pipe.pipeline.errors import (
    ConfigError,
    DataError,
    IncompleteStoreError,
    LocaError,
    ModelError,
    NumericsError,
    StoreConflictError,
    StoreError,
)

_ERRORS = ["ConfigError", "DataError", "IncompleteStoreError", "LocaError", "ModelError", "NumericsError",
           "StoreConflictError", "StoreError"]
# name → the module that defines it (each module keeps its own __all__; this package re-exports them all)
_CALIBRATION = ["LocaResult", "LocaWarning", "SparseDist", "check_alpha", "loca", "loca_calibrate",
                "loca_calibrate_blocks", "loca_from_logits", "loca_label_logit", "loca_sparse", "mis_instruction_mask",
                "sparse_from_topk", "swap", "swap_sparse"]
_LOSSES = ["METHODS", "CROSS_DISTANCES", "LossConfig", "Method", "blockkd_terms", "ce_loss", "compute_loss", "dkd_loss",
           "get_method", "kd_star_loss", "method_help", "dkd_warmup", "kd_loss", "loca_kd_loss", "ls_kd_loss",
           "sparse_kd_loss", "standardize_logits"]
# tests/pipeline/test_imports.py checks these lists are the modules' __all__
_LAZY = {**{n: "calibration" for n in _CALIBRATION}, **{n: "losses" for n in _LOSSES}}


def __getattr__(name: str) -> Any:
    # Deferred on purpose: calibration and losses import torch (see the module docstring).
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name == "__all__":
        return _ERRORS + _CALIBRATION + _LOSSES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
