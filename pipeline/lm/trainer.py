"""Causal-LM training through Hugging Face ``transformers.Trainer`` (accelerate underneath).

The project supplies three pieces and Trainer does the rest — one process or many (DDP / FSDP under
``torchrun`` or ``accelerate launch``), bf16 autocast, gradient accumulation, warm-up and a cosine schedule,
checkpoints and resume, evaluation during training:

- :class:`SequenceData`: the dataset is the sequence indices of an :class:`~.tokenizer.Encoded`.
- :class:`EpochSampler`: the sequence order of epoch e is a function of (seed, e) only, so a resumed run
  (Trainer re-iterates the epoch and skips the batches it had done) sees the batches an uninterrupted run
  does. With a streamed teacher (:class:`~.streaming.StreamedTeacher`) the order is its chunk-granular
  shuffle buffer's, restarted per epoch, so the teacher rows stay memory-bounded as before.
- :class:`Collator`: pads a batch, marks the tokens that are trained on (``labels``, -100 elsewhere, the
  Hugging Face convention Trainer counts tokens by) and attaches the batch's teacher rows from the token
  store (``teacher_<array>``), which Trainer moves to the device with the batch.
- :class:`LMTrainer`: ``compute_loss`` applies the method's loss (``students.make_loss``: sparse KD, LoCa,
  KD*, sampled KD, fused with the output projection or not) or cross-entropy, normalised by the tokens of
  the whole optimizer step (``num_items_in_batch``, summed over gradient-accumulation micro-batches and
  ranks), so k ranks or k accumulation steps give the gradient of one batch k times larger. A non-finite
  loss stops the run with a :class:`~loca_pipe.pipeline.errors.NumericsError` naming the step.

A run's settings are written to ``<checkpoints>/run.json``; resuming under other settings is refused
naming the keys that differ.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.errors import ConfigError, NumericsError
from loca_pipe.pipeline.lm.tokenizer import Encoded, pad_batch

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TEACHER_PREFIX = "teacher_"


class SequenceData(torch.utils.data.Dataset):
    """Item i is sequence i of the encoding (the collator builds the tensors)."""

    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> int:
        return int(i)


class EpochSampler(torch.utils.data.Sampler):
    """Sequence ids of one epoch: a permutation drawn from (seed, epoch), or, for a streamed teacher, the
    order its shuffle buffer serves them in (``stream_batch`` ids a draw) from a state reset per epoch."""

    def __init__(self, n: int, seed: int, stream=None, stream_batch: int = 1):
        self.n, self.seed, self.stream, self.stream_batch = n, seed, stream, max(1, stream_batch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.stream is None:
            yield from (int(i) for i in rng.permutation(self.n))
            return
        s = self.stream  # restart the shuffle buffer: the epoch's order depends on (seed, epoch) only
        s.rng, s.buffer, s.where, s.order, s.retired = rng, [], {}, [], []
        served = 0
        while served < self.n:
            ids = s.next_batch(self.stream_batch)
            served += len(ids)
            yield from (int(i) for i in ids)


@dataclass
class Collator:
    """A batch of sequence ids → padded ``input_ids`` / ``attention_mask``, ``labels`` (the token at each
    position that is trained on, -100 elsewhere: the response tokens, or every token with ``all_tokens``) and
    the teacher rows of the response tokens in sequence order (``teacher_<array>``)."""

    enc: Encoded
    pad_id: int
    teacher: Any = None
    all_tokens: bool = False

    def __call__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        from loca_pipe.pipeline.lm.students import _t, teacher_rows

        idx = np.asarray(idx, dtype=np.int64)
        x, m = pad_batch([self.enc.ids[i] for i in idx], self.pad_id)
        labels = x.masked_fill(m == 0, -100)
        if not self.all_tokens:
            pos = torch.arange(x.shape[1])[None, :]
            labels = labels.masked_fill(pos < torch.as_tensor(self.enc.prompt_len[idx])[:, None], -100)
        out = {"input_ids": x, "attention_mask": m, "labels": labels}
        if self.teacher is not None:
            out.update({TEACHER_PREFIX + k: _t(v, "cpu") for k, v in teacher_rows(self.teacher, idx).items()})
        return out


def _trainer_class():
    from transformers import Trainer

    class LMTrainer(Trainer):
        """Trainer with the project's loss (see the module docstring) and the seeded epoch sampler."""

        def __init__(self, *args, loss_fn: Optional[Callable] = None, sampler=None, **kw):
            super().__init__(*args, **kw)
            self.loss_fn = loss_fn
            self.fused = bool(getattr(loss_fn, "wants_hidden", False))
            self._sampler = sampler
            self.model_accepts_loss_kwargs = True  # compute_loss divides by num_items_in_batch itself
            self._loss_shifts_labels = True  # position t predicts labels[t + 1]: tokens counted on labels[:, 1:]
            self._hidden: list[torch.Tensor] = []
            if self.fused:
                self.model.base_model.register_forward_hook(lambda mod, a, out: self._hidden.append(out[0]))

        def _get_train_sampler(self, train_dataset=None):
            return self._sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            sel = labels != -100
            y = labels[sel]
            rows = {k[len(TEACHER_PREFIX):]: v for k, v in inputs.items() if k.startswith(TEACHER_PREFIX)}
            if self.fused:  # the logits never exist whole: hidden states + the output projection, chunked
                self._hidden.clear()
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1)
                h = self._hidden.pop()[:, :-1][sel]
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                loss = self.loss_fn(h, y, rows, head)
            else:
                z = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1][sel]
                loss = F.cross_entropy(z.float(), y) if self.loss_fn is None else self.loss_fn(z.float(), y, rows)
            if not bool(torch.isfinite(loss.detach())):
                raise NumericsError(f"the training loss is {float(loss.detach())} at step {self.state.global_step}; "
                                    f"lower lr (or use --dtype float32) and resume from the last checkpoint")
            if num_items_in_batch is not None and self.model.training:
                # a sum over this micro-batch's tokens ÷ the step's tokens (all micro-batches, all ranks);
                # Trainer multiplies by the number of processes, which DDP's gradient mean divides again
                loss = loss * y.numel() / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return LMTrainer


@dataclass
class TrainSettings:
    """What a training run is: ``batch_size`` is the effective batch of one optimizer step (all processes,
    all accumulation micro-batches); ``steps`` > 0 wins over ``epochs``; ``warmup``: warm-up steps, then
    cosine decay to ``min_lr_rate`` × lr; ``dtype``: float32, or bfloat16 / float16 autocast (mixed precision,
    fp32 weights); ``save_steps``: a checkpoint every N steps (0: none)."""

    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 0
    epochs: float = 0.0
    lr: float = 3e-3
    warmup: int = 20
    min_lr_rate: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    save_steps: int = 0
    eval_steps: int = 0
    log_every: int = 50
    progress: bool = False
    extra: dict = field(default_factory=dict)  # the caller's settings, compared on resume


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch(s: TrainSettings) -> int:
    """The micro-batch of one process; refused unless processes × grad_accum divides the batch."""
    w = world_size()
    if s.grad_accum < 1 or s.batch_size < 1:
        raise ConfigError(f"batch_size and grad_accum must be positive; got {s.batch_size}, {s.grad_accum}")
    if s.batch_size % (s.grad_accum * w):
        raise ConfigError(f"batch_size {s.batch_size} is not divisible by grad_accum {s.grad_accum} × {w} process(es); "
                          f"pick a batch that is a multiple of {s.grad_accum * w}")
    return s.batch_size // (s.grad_accum * w)


def last_checkpoint(out: Path) -> Optional[str]:
    """The newest *complete* ``checkpoint-N`` in ``out``: Trainer writes ``trainer_state.json`` last, so a folder
    without it is one a crash interrupted (Trainer's own ``get_last_checkpoint`` would pick it and fail)."""
    if not out.is_dir():
        return None
    done = [(int(d.name.split("-")[1]), d) for d in out.glob("checkpoint-*")
            if d.name.split("-")[1].isdigit() and (d / "trainer_state.json").exists()]
    return str(max(done)[1]) if done else None


def _compare_run(out: Path, want: dict) -> None:
    f = out / RUN_FILE
    if not f.exists():
        return
    had = json.loads(f.read_text())
    diff = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
    if diff:
        shown = ", ".join(f"{k}: {had.get(k)!r} → {want.get(k)!r}" for k in diff)
        raise ConfigError(f"the checkpoints in {str(out)!r} were written with other settings ({shown}); rerun with "
                          f"the same settings to resume, or delete that folder to start over")


def train(model, enc: Encoded, loss_fn: Optional[Callable], s: TrainSettings, *, pad_id: int, out_dir: str | Path,
          teacher=None, all_tokens: bool = False, eval_enc: Optional[Encoded] = None, resume: bool = True,
          keep_checkpoints: bool = False, callbacks: Sequence = ()) -> list[dict]:
    """Train ``model`` on ``enc`` through Trainer; returns the log history (loss, lr, grad norm, tokens/s).

    ``loss_fn``: ``students.make_loss`` (None = cross-entropy on the trained tokens); ``teacher``: the source
    the collator reads teacher rows from (``streaming.open_teacher``), also the sampler's order when streamed.
    Checkpoints go to ``out_dir``; with ``resume`` the last one there is continued (its settings must be
    these); they are deleted when the run ends unless ``keep_checkpoints``. ``callbacks``: extra Trainer callbacks."""
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from loca_pipe.pipeline.lm.streaming import StreamedTeacher

    if s.steps <= 0 and s.epochs <= 0:
        raise ConfigError("give steps (> 0) or epochs (> 0)")
    if s.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {s.dtype!r}: the trainer takes float32, bfloat16 or float16")
    micro = per_device_batch(s)
    out = Path(out_dir)
    hf_logging.set_verbosity_error()
    want = {"batch_size": s.batch_size, "grad_accum": s.grad_accum, "steps": s.steps, "epochs": s.epochs, "lr": s.lr,
            "warmup": s.warmup, "seed": s.seed, "dtype": s.dtype, "processes": world_size(), **s.extra}
    last = last_checkpoint(out) if resume else None
    if last is not None:
        _compare_run(out, want)
    elif out.is_dir():
        shutil.rmtree(out)  # no checkpoint to continue: start clean
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / RUN_FILE).write_text(json.dumps(want, indent=2, default=str))
    stream = teacher if isinstance(teacher, StreamedTeacher) else None
    sampler = EpochSampler(len(enc), s.seed, stream, micro * world_size())
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=s.grad_accum, max_steps=s.steps if s.steps > 0 else -1,
        num_train_epochs=s.epochs if s.steps <= 0 else 1, learning_rate=s.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": s.min_lr_rate},
        warmup_steps=s.warmup, weight_decay=s.weight_decay, adam_beta2=0.95, max_grad_norm=s.max_grad_norm,
        seed=s.seed, bf16=s.dtype == "bfloat16", fp16=s.dtype == "float16", use_cpu=s.device == "cpu",
        logging_steps=max(1, s.log_every), save_strategy="steps" if s.save_steps else "no",
        save_steps=max(1, s.save_steps), save_total_limit=2,
        eval_strategy="steps" if (s.eval_steps and eval_enc is not None) else "no", eval_steps=max(1, s.eval_steps),
        report_to=[], disable_tqdm=not s.progress, remove_unused_columns=False, dataloader_num_workers=0,
        average_tokens_across_devices=True, ddp_find_unused_parameters=False, include_num_input_tokens_seen="all",
    )
    cls = _trainer_class()
    collate = Collator(enc, pad_id, teacher, all_tokens)
    trainer = cls(model=model, args=args, train_dataset=SequenceData(enc), data_collator=collate,
                  eval_dataset=SequenceData(eval_enc) if eval_enc is not None and s.eval_steps else None,
                  loss_fn=loss_fn, sampler=sampler, callbacks=list(callbacks) or None)
    _quiet(trainer, s.progress)
    if eval_enc is not None and s.eval_steps:
        trainer.get_eval_dataloader = _eval_loader(trainer, eval_enc, pad_id, micro)
    if getattr(loss_fn, "wants_hidden", False):  # refuse models whose logits are not lm_head(hidden), once
        from loca_pipe.pipeline.lm.models import output_projection

        output_projection(model, check_on=[enc.ids[i] for i in range(min(2, len(enc)))], pad_id=pad_id)
    result = trainer.train(resume_from_checkpoint=last)
    model.eval()
    hist = [dict(h) for h in trainer.state.log_history]
    hist.append({"step": trainer.state.global_step, "train_loss": float(result.training_loss),
                 "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
                 "tokens_seen": int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)})
    if not keep_checkpoints and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out, ignore_errors=True)
    return hist


def _quiet(trainer, progress: bool) -> None:
    """Nothing on stdout (the CLI prints its JSON there): the log dicts go to the history only; with
    ``progress`` the project's bar on stderr (``progress.progress_bar``: one line per update off a terminal,
    where Trainer's own tqdm bar writes a carriage-return line of tens of kB per run into a log)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    from loca_pipe.pipeline.progress import progress_bar

    class Bar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = progress_bar(total=state.max_steps, desc="train", unit="step")
                self.bar.update(state.global_step)  # a resumed run starts where its checkpoint was

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(Bar)


def _eval_loader(trainer, enc: Encoded, pad_id: int, batch: int):
    """Evaluation batches of the held-out encoding in order (cross-entropy on its response tokens)."""
    def get(eval_dataset=None):
        dl = torch.utils.data.DataLoader(SequenceData(enc), batch_size=batch, collate_fn=Collator(enc, pad_id))
        return trainer.accelerator.prepare(dl)

    return get


def final_loss(hist: list[dict]) -> Optional[float]:
    """The last logged training loss of a :func:`train` history."""
    losses = [h["loss"] for h in hist if "loss" in h]
    return float(losses[-1]) if losses else None
