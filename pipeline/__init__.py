"""loca_pipe.pipeline — the library: LoCa calibration, KD losses, the logit store, data and models.

Pure tensor maths (calibration, losses) stays free of I/O; nothing here reads argv or YAML.
Users who only want LoCa inside their own training loop need just this package::

    from loca_pipe.pipeline import loca_from_logits, kd_loss
"""

from loca_pipe.pipeline.calibration import (
    LocaResult,
    LocaWarning,
    SparseDist,
    check_alpha,
    loca,
    loca_calibrate,
    loca_calibrate_blocks,
    loca_from_logits,
    loca_label_logit,
    loca_sparse,
    mis_instruction_mask,
    sparse_from_topk,
)
from loca_pipe.pipeline.losses import (
    METHODS,
    LossConfig,
    Method,
    ce_loss,
    compute_loss,
    dkd_loss,
    dkd_warmup,
    kd_loss,
    loca_kd_loss,
    ls_kd_loss,
    sparse_kd_loss,
    standardize_logits,
)
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

from loca_pipe.pipeline import calibration as _calibration
from loca_pipe.pipeline import losses as _losses

_ERRORS = ["ConfigError", "DataError", "IncompleteStoreError", "LocaError", "ModelError", "NumericsError",
           "StoreConflictError", "StoreError"]
# one list per module, kept by that module; this package re-exports them all
__all__ = _ERRORS + _calibration.__all__ + _losses.__all__
