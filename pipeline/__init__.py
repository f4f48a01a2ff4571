"""loca_pipe.pipeline — the library: LoCa calibration, KD losses, the logit store, data and models.

Pure tensor maths (calibration, losses) stays free of I/O; nothing here reads argv or YAML.
"""

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

__all__ = [
    "ConfigError",
    "DataError",
    "IncompleteStoreError",
    "LocaError",
    "ModelError",
    "NumericsError",
    "StoreConflictError",
    "StoreError",
]
