"""The language-model stages, one module per stage of lm/dvc.yaml, mirroring ``pipeline/lm/``."""
