"""loca-pipe: offline teacher-logit caching and LoCa calibration for knowledge distillation.

The library lives in :mod:`loca_pipe.pipeline`, the DVC stages in :mod:`loca_pipe.stages`, and the
command line in :mod:`loca_pipe.cli`.
"""

__version__ = "0.1.0"
