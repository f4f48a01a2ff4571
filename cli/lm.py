"""`loca-pipe lm-*`: the language-model path (issue 7), one command per stage of lm/dvc.yaml.

Every command reads its section of ``--params`` (default ``params.yaml`` in the current folder; the LM
pipeline keeps its own in ``lm/params.yaml``) plus ``lm_base``; options override single values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loca_pipe.cli.options import choices, comma_list
from loca_pipe.pipeline.guard import check_lm
from loca_pipe.pipeline.names import LM_ATTN_IMPLEMENTATIONS as ATTN_IMPLEMENTATIONS
from loca_pipe.pipeline.names import LM_DEVICE_MAPS as DEVICE_MAPS
from loca_pipe.pipeline.names import LM_DTYPES as DTYPES
from loca_pipe.pipeline.names import LM_ID_DTYPES as ID_DTYPES
from loca_pipe.pipeline.names import LM_METHODS as METHODS
from loca_pipe.pipeline.lm.text import BAD_LINE_POLICIES, TEMPLATES
from loca_pipe.pipeline.names import LM_CODECS as CHOICES
from loca_pipe.pipeline.names import LM_EXPORT_FORMATS as EXPORT_FORMATS

ParamsOpt = Annotated[Path, typer.Option(help="Params file (sections lm_base and the command's own, e.g. lm_cache).")]
WorkdirOpt = Annotated[Optional[str], typer.Option(help="Folder every LM output goes under (lm_base.workdir).")]


Template = choices("Template", TEMPLATES)  # pipeline/lm/text.py
BadLine = choices("BadLine", BAD_LINE_POLICIES)  # pipeline/lm/text.py


Method = choices("Method", METHODS)  # pipeline/names.py


Codec = choices("Codec", CHOICES)  # pipeline/names.py (pipeline/codecs.py CHOICES), never copied by hand
ExportFormat = choices("ExportFormat", EXPORT_FORMATS)  # pipeline/names.py (pipeline/lm/export.py FORMATS)


IdDtype = choices("IdDtype", ID_DTYPES)  # pipeline/names.py


Dtype = choices("Dtype", DTYPES)  # pipeline/names.py (pipeline/lm/device.py)
Attn = choices("Attn", ATTN_IMPLEMENTATIONS)  # pipeline/names.py (pipeline/lm/models.py)
DeviceMap = choices("DeviceMap", [m for m in DEVICE_MAPS if m])
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (lm_base.device; auto = a GPU where one exists).")]
CacheDtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", help="The model's weights and logits (auto = bfloat16 on a GPU that supports it, else float32).")]


def _base(workdir: Optional[str], **kw: Any) -> dict[str, Any]:
    return {"workdir": workdir, **kw}


def _floats(text: Optional[str], opt: str) -> Optional[list[float]]:
    return comma_list(text, opt, float, "'1,2'")


def lm_prepare(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    source: Annotated[Optional[str], typer.Option(help="'default' (World English Bible pairs) or a Dolly / prompt-response JSONL file.")] = None,
    template: Annotated[Optional[Template], typer.Option(help="Prompt template.")] = None,
    on_bad_line: Annotated[Optional[BadLine], typer.Option(help="A bad JSONL line: skip it (reported) or stop with its line number.")] = None,
    train_size: Annotated[Optional[int], typer.Option(help="Training examples (0 = all after val/test).")] = None,
    val_size: Annotated[Optional[int], typer.Option(help="Held-out examples for token accuracy / perplexity.")] = None,
    test_size: Annotated[Optional[int], typer.Option(help="Held-out prompts for Rouge-L of greedy generations.")] = None,
) -> None:
    """Read instruction/response data and write the train/val/test splits."""
    from loca_pipe.stages.lm import common as lm_common, prepare as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {
        "source": source, "on_bad_line": on_bad_line.value if on_bad_line else None, "train_size": train_size,
        "val_size": val_size, "test_size": test_size}, _base(workdir, template=template.value if template else None))
    check_lm("lm-prepare", p)  # pipeline/guard.py: outputs never overlap inputs
    typer.echo(str(stage.run(p)))


def lm_tokenizer(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="BPE vocabulary size (specials included).")] = None,
    from_model: Annotated[Optional[str], typer.Option(help="Copy the tokenizer of this Hugging Face model folder instead of training one.")] = None,
) -> None:
    """Train a byte-level BPE on the training split (or copy a model's tokenizer)."""
    from loca_pipe.stages.lm import common as lm_common, tokenizer as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {"vocab_size": vocab_size, "from_model": from_model},
                        _base(workdir))
    check_lm("lm-tokenizer", p)  # pipeline/guard.py: outputs never overlap inputs
    typer.echo(str(stage.run(p)))


TrainDtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", help="Training precision (autocast; weights stay fp32; auto = bf16 on a GPU that has it, else fp32).")]
MaxLengthOpt = Annotated[Optional[int], typer.Option(help="Tokens per sequence (lm_base.max_length; must be the cache's).")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Optimizer steps (0: train for --epochs instead).")]
EpochsOpt = Annotated[Optional[float], typer.Option(help="Epochs over the training split (used when --steps is 0).")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Sequences per optimizer step (all processes and accumulation micro-batches).")]
GradAccumOpt = Annotated[Optional[int], typer.Option(help="Gradient-accumulation micro-batches per step (must divide the batch per process).")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW; warm-up then cosine to 10 %).")]
InitOpt = Annotated[Optional[str], typer.Option(help="Start from this Hugging Face causal LM folder.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="torch CPU threads.")]


def _train_opts(steps, epochs, batch_size, grad_accum, lr, init_from, dtype) -> dict[str, Any]:
    return {"steps": steps, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
            "init_from": init_from, "dtype": dtype.value if dtype else None}


def lm_train_teacher(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: GradAccumOpt = None,
    lr: LrOpt = None,
    init_from: InitOpt = None,
    device: DeviceOpt = None,
    dtype: TrainDtypeOpt = None,
    max_length: MaxLengthOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Train the small teacher LM from scratch (or fine-tune/evaluate a local HF model; --steps 0 only evaluates)."""
    from loca_pipe.stages.lm import common as lm_common, train_teacher as stage

    p = lm_common.load(stage.Params, stage.SECTION, params,
                       _train_opts(steps, epochs, batch_size, grad_accum, lr, init_from, dtype),
                       _base(workdir, threads=threads, device=device, max_length=max_length))
    check_lm("lm-train-teacher", p)  # pipeline/guard.py: outputs never overlap inputs
    typer.echo(str(stage.run(p)))


def lm_cache(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: a Hugging Face causal LM folder (default: the pipeline's teacher/).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k logits/ids kept per response token.")] = None,
    temperatures: Annotated[Optional[str], typer.Option(help="Comma-separated τ list; logsumexp(z/τ) stored for each.")] = None,
    id_dtype: Annotated[Optional[IdDtype], typer.Option(help="Token-id dtype check (auto = smallest that holds the vocabulary).")] = None,
    sample_draws: Annotated[Optional[int], typer.Option(help="Sparse Logit Sampling draws per token (0 = off).")] = None,
    greedy_max_new_tokens: Annotated[Optional[int], typer.Option(help="Cache the teacher's greedy responses up to N tokens (SeqKD; 0 = off).")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Re-cache the teacher (also when complete), replacing a store of other data; an interrupted identical run is resumed.")] = None,
    max_chunks: Annotated[Optional[int], typer.Option(help="Write at most N chunks now (resume later).")] = None,
    codec: Annotated[Optional[Codec], typer.Option(help="How top-k values and ids are stored: lossless (default, fp32 logits) or a compact lossy codec; lse and the label logit stay exact (docs/store-format.md).")] = None,
    device: DeviceOpt = None,
    dtype: CacheDtypeOpt = None,
    attn_implementation: Annotated[Optional[Attn], typer.Option(help="Attention kernel passed to transformers (auto = its default).")] = None,
    device_map: Annotated[Optional[DeviceMap], typer.Option(help="auto: accelerate spreads a teacher larger than one GPU over the GPUs (ignores --device).")] = None,
    length_window: Annotated[Optional[int], typer.Option(help="Batch sequences by length within windows of N sequences (0 = data order); the store keeps the data's row order.")] = None,
) -> None:
    """Run the teacher once over the response tokens and write the token store (resumes after a crash)."""
    from loca_pipe.stages.lm import cache as stage, common as lm_common

    p = lm_common.load(stage.Params, stage.SECTION, params, {
        "teacher": teacher, "top_k": top_k, "temperatures": _floats(temperatures, "--temperatures"),
        "id_dtype": id_dtype.value if id_dtype else None, "sample_draws": sample_draws,
        "greedy_max_new_tokens": greedy_max_new_tokens, "overwrite": overwrite, "recache": overwrite,
        "max_chunks": max_chunks, "codec": codec.value if codec else None, "dtype": dtype.value if dtype else None,
        "attn_implementation": attn_implementation.value if attn_implementation else None,
        "device_map": device_map.value if device_map else None, "length_window": length_window},
        _base(workdir, device=device))
    check_lm("lm-cache", p)  # pipeline/guard.py: outputs never overlap inputs
    typer.echo(str(stage.run(p)))


def lm_analyze(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    tau: Annotated[Optional[float], typer.Option(help="Temperature of p (must have been cached).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoCa α for the calibration statistics.")] = None,
) -> None:
    """Token-level mis-instruction ratios (overall, by position, by token frequency) → analysis/."""
    from loca_pipe.stages.lm import analyze as stage, common as lm_common

    p = lm_common.load(stage.Params, stage.SECTION, params, {"tau": tau, "alpha": alpha}, _base(workdir))
    check_lm("lm-analyze", p)  # pipeline/guard.py: outputs never overlap inputs
    typer.echo(str(stage.run(p)))


def lm_train_student(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    method: Annotated[Optional[Method], typer.Option(help=f"{' | '.join(METHODS)} (pipeline/lm/students.py::METHODS).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Student seed (init and batch order).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher name in the store (lm_train_student.name).")] = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: GradAccumOpt = None,
    lr: LrOpt = None,
    tau: Annotated[Optional[float], typer.Option(help="KD temperature τ (must have been cached).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoCa α (0 < α < 1).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="KD loss weight β.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="CE loss weight γ.")] = None,
    init_from: InitOpt = None,
    device: DeviceOpt = None,
    dtype: TrainDtypeOpt = None,
    max_length: MaxLengthOpt = None,
    save_model: Annotated[Optional[bool], typer.Option("--save-model/--no-save-model", help="Keep the trained student as <run>/model (a Hugging Face folder).")] = None,
    save_steps: Annotated[Optional[int], typer.Option(help="A checkpoint every N steps (resumed after a crash; 0: none).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue from the run's last checkpoint (same settings only).")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="Run folder under students/ (default <method>-s<seed>).")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite/--no-overwrite", help="Replace a run folder that already holds a run with other settings (otherwise refused).")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Train one student from the token cache and evaluate it (Rouge-L, token accuracy, perplexity)."""
    from loca_pipe.stages.lm import common as lm_common, train_student as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {
        "method": method.value if method else None, "seed": seed, "name": teacher, "tau": tau, "alpha": alpha,
        "beta": beta, "gamma": gamma, "save_model": save_model, "save_steps": save_steps, "resume": resume,
        "run_name": run_name, "overwrite": overwrite, "progress": progress,
        **_train_opts(steps, epochs, batch_size, grad_accum, lr, init_from, dtype)},
        _base(workdir, threads=threads, device=device, max_length=max_length))
    check_lm("lm-train-student", p)  # pipeline/guard.py: outputs never overlap inputs
    from loca_pipe.pipeline.lm.students import METHODS as LM_REGISTRY

    if getattr(LM_REGISTRY.get(p.method), "loca", False):  # the image path's α rule: refused outside (0, 2), warned at ≥ 1, before any folder
        from loca_pipe.pipeline.student_spec import check_alpha_range

        check_alpha_range(p.alpha, "--alpha")
    typer.echo(str(stage.run(p)))


def lm_report(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print where the table went, not the table (lm/dvc.yaml: `make repro-lm` prints it once, at the end).")] = False,
) -> None:
    """Mean ± std over seeds of every student method → report/table.md (printed) and report/results.json."""
    from loca_pipe.stages.lm import common as lm_common, report as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {}, _base(workdir))
    check_lm("lm-report", p)  # pipeline/guard.py: outputs never overlap inputs
    rep = stage.run(p)
    typer.echo(f"report: {rep.outputs['table']}" if quiet else str(rep))


def lm_plan(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
) -> None:
    """Dry run of a params file: checks paths, model configs and tokenizers, and prints the job's size (tokens,
    teacher forwards, store bytes, weights' memory at the dtype) without loading weights or using a GPU."""
    from loca_pipe.stages.lm import common as lm_common, plan as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {}, _base(workdir))
    rep = stage.run(p, params, _base(workdir))
    typer.echo(str(rep))
    stage.check(rep)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    for name, fn in (("lm-prepare", lm_prepare), ("lm-tokenizer", lm_tokenizer), ("lm-train-teacher", lm_train_teacher),
                     ("lm-cache", lm_cache), ("lm-plan", lm_plan), ("lm-analyze", lm_analyze), ("lm-train-student", lm_train_student),
                     ("lm-report", lm_report), ("lm-export", lm_export), ("lm-import", lm_import)):
        app.command(name)(fn)


# ----------------------------------------------------------------------------------------------------
# #21: the token store for other tools (registered by register above)


def lm_export(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    tau: Annotated[Optional[float], typer.Option(help="Temperature of the exported log-probs (must have been cached).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoCa α: export calibrated log-probs (default: the teacher's own).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Parquet file to write (default <workdir>/export/<teacher>-tau<τ>.parquet).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder (default: the pipeline's); must be the store's.")] = None,
    format: Annotated[Optional[ExportFormat], typer.Option("--format", help="axolotl (default: target_* columns + label log-prob, tail) or distillkit (its raw top-k columns, what lm-import reads).")] = None,
) -> None:
    """Export the token store to Parquet (Axolotl's target_token_ids / target_logprobs / target_mask + labels, label log-prob, tail mass; or DistillKit's token_ids / top_values)."""
    from loca_pipe.stages.lm import common as lm_common, export as stage

    p = lm_common.load(stage.Params, stage.SECTION, params, {"tau": tau, "alpha": alpha, "out": out,
                                                             "tokenizer": tokenizer,
                                                             "format": format.value if format else None}, _base(workdir))
    typer.echo(str(stage.run(p)))


def lm_import(
    parquet: Annotated[Path, typer.Argument(help="The DistillKit Parquet cache (raw top-k, or compressed with --compression-config).")],
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Token store to write (default <workdir>/store.zarr, what lm-analyze reads).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Teacher name in the store (default 'teacher').")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="The teacher's vocabulary size (required for raw top-k; the compression config's d otherwise).")] = None,
    compression_config: Annotated[Optional[str], typer.Option(help="DistillKit YAML holding the logprob_compressor the cache was captured with.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="The cache's tokenizer folder: checked against the ids and recorded in the store.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out store (the whole store; it is swapped only once the import is complete).")] = False,
) -> None:
    """Import a DistillKit Parquet logit cache into a token store (lm-analyze and LoCa then run on it; docs/language-models.md)."""
    import json

    from loca_pipe.pipeline.guard import LOGITS, check_outputs
    from loca_pipe.pipeline.lm import import_distillkit as imp
    from loca_pipe.stages.lm import common as lm_common

    p = lm_common.load(imp.Params, imp.SECTION, params, {
        "name": name, "vocab_size": vocab_size, "compression_config": compression_config, "tokenizer": tokenizer,
        "out": out, "overwrite": overwrite or None}, _base(workdir))
    dest = imp.output_path(p)
    check_outputs({"PARQUET": parquet, "--compression-config": p.compression_config or None,
                   "--tokenizer": p.tokenizer or None}, {"--out": (dest, LOGITS)})  # pipeline/guard.py
    comp = imp.load_compression(p.compression_config) if p.compression_config else None
    rep = imp.import_distillkit(str(parquet), str(dest), name=p.name, vocab_size=p.vocab_size or None,
                                compression=comp, tokenizer_dir=p.tokenizer or None, chunk_rows=p.chunk_rows,
                                overwrite=p.overwrite)
    typer.echo(json.dumps(rep, indent=2))
