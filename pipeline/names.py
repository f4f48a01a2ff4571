"""The choice lists the CLI offers, defined once in a leaf that imports nothing (no torch, no zarr).

The CLI builds its option types from these at import time, so a usage error (`loca-pipe --bogus`) answers
without loading torch or zarr (tests/cli/test_fast_usage.py checks ``sys.modules``). The library module that owns
each list imports it from here, so ``pipeline.data.DATASETS`` and the others keep their old names.
"""

from __future__ import annotations

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "module:callable")  # pipeline/data.py
AUGMENTATIONS = ("none", "crop-flip")                    # pipeline/augment.py
LOGIT_DTYPES = ("float32", "float16")                    # the store's full-logit dtypes (pipeline/store/format.py)
TARGET_FORMS = ("auto", "dense", "sparse")               # pipeline/targets.py FORMS
SOFT_LABEL_FORMS = ("auto", "logits", "topk")            # pipeline/soft_labels.py FORMS
VIEW_POLICIES = ("cycle", "random")                      # pipeline/soft_labels.py
LM_ID_DTYPES = ("auto", "int16", "int32", "int64")       # pipeline/lm/cache.py ID_DTYPES
LM_METHODS = ("sft", "seqkd", "kd", "loca", "kd_sampled", "kd_star")  # pipeline/lm/students.py METHODS (its keys)
LM_DTYPES = ("auto", "bfloat16", "float16", "float32")   # pipeline/lm/device.py DTYPES
LM_ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # pipeline/lm/models.py ("auto": transformers' choice)
LM_DEVICE_MAPS = ("", "auto")  # pipeline/lm/models.py ("auto": accelerate spreads a model larger than one GPU)
LM_CODECS = ("lossless", "fp16", "bf16", "q8", "compact", "compact7")  # pipeline/codecs.py CHOICES (the --codec choices)
LM_EXPORT_FORMATS = ("axolotl", "distillkit")  # pipeline/lm/export.py FORMATS (lm-export --format)
# What a report table may show: final-epoch accuracies (pipeline/report/table.py METRICS). metrics.json also holds
# best_test_top1 (the best epoch *on the test set*: selecting an epoch by its test score is early stopping on test),
# so the report never offers it.
REPORT_METRICS = ("test_top1", "test_top5")
