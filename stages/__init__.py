"""The pipeline's stages: one module per stage of dvc.yaml (image) and of lm/dvc.yaml (``stages/lm/``).

The one stage contract, the same for image and language-model stages:

- a frozen params dataclass (``XParams`` for an image stage, ``Params`` in ``stages/lm/``) holding every
  setting the stage reads, built from its params.yaml section by ``stages.config.load_section`` (or the
  stage's ``load_params`` when one section yields several runs, e.g. one per teacher); an LM stage's
  params also carry the shared ``lm_base`` section as ``params.base`` (``stages.lm.common.load``);
- ``run(params)``: does the work, writes the outputs and returns what the command prints (a report, or
  None when the stage prints as it goes). Nothing else is needed to run a stage: no second argument, no
  ``main()``.

The CLI commands (``cli/``) are thin: options → params (options override single values) → ``run`` →
print the report. Output paths are written once: in params.yaml (``=section.key`` references) or in one
derivation here (``stages.lm.common.LMBase``, ``train_teacher.checkpoint_path``, ``train_student.run_name``).
"""
