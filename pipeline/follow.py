"""The mechanism, measured: does a student follow its teacher's mistakes?

On the teacher's **mis-instructed training rows** (label not the strict winner, ties counted: exactly
:func:`~loca_pipe.pipeline.calibration.mis_instruction_mask`, the rule LoCa calibrates by), count

* ``follow_teacher`` — the share where the student predicts the teacher's wrong class (the best class other
  than the label), and
* ``follow_label`` — the share where the student predicts the label.

A CE student (which never saw the teacher) is the reference: what KD adds on top of it is what the
teacher taught. Works for any logit store: full logits, or top-k only (the teacher's kept logits and the
label's logit are scattered into a −inf row, which keeps the label-vs-best-other comparison exact). With
several cached views the first view of each sample is used (the student predicts the un-augmented image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loca_pipe.pipeline.calibration import mis_instruction_mask

__all__ = ["TeacherMistakes", "follow_rates", "teacher_mistakes"]


@dataclass(frozen=True)
class TeacherMistakes:
    """One teacher's training rows in data-set order (view 0): sample ids, labels, the mis-instruction
    mask and the teacher's best non-label class."""

    teacher: str
    sample_id: np.ndarray   # (S,) int64 data-set indices
    label: np.ndarray       # (S,) int64
    mis: np.ndarray         # (S,) bool
    wrong: np.ndarray       # (S,) int64: argmax over classes other than the label

    @property
    def ratio(self) -> float:
        return float(self.mis.mean()) if self.mis.size else 0.0


def _dense_rows(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mis = mis_instruction_mask(z, labels)
    wrong = z.scatter(1, labels.view(-1, 1), -math.inf).argmax(1)
    return mis, wrong


def teacher_mistakes(store_path: str, teacher: str | None = None, chunk_rows: int = 65_536) -> TeacherMistakes:
    """Read one teacher of a logit store and find its mis-instructed rows (view 0 of every sample)."""
    from loca_pipe.pipeline.store import LogitStore

    tv = LogitStore.open(store_path).teacher(teacher)
    sample_id = np.asarray(tv["sample_id"][:], np.int64)
    label = np.asarray(tv["label"][:], np.int64)
    view = np.asarray(tv["view"][:], np.int64)
    rows = np.flatnonzero(view == 0)
    num_classes = int(tv.store.info.num_classes)
    mis_parts, wrong_parts = [], []
    for lo in range(0, rows.size, chunk_rows):
        r = rows[lo:lo + chunk_rows]
        y = torch.from_numpy(label[r])
        if tv.has_full_logits:
            z = torch.from_numpy(np.asarray(tv.read("logits", r), np.float32))
        else:
            ids = torch.from_numpy(np.asarray(tv.read("topk_ids", r), np.int64))
            z = torch.full((r.size, num_classes), -math.inf)
            z.scatter_(1, y.view(-1, 1), torch.from_numpy(np.asarray(tv.read("label_logit", r), np.float32)).view(-1, 1))
            z.scatter_(1, ids, torch.from_numpy(np.asarray(tv.read("topk_logits", r), np.float32)))
        m, w = _dense_rows(z, y)
        mis_parts.append(m.numpy())
        wrong_parts.append(w.numpy())
    order = np.argsort(sample_id[rows], kind="stable")
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    return TeacherMistakes(teacher=tv.name, sample_id=sample_id[rows][order], label=label[rows][order],
                           mis=cat(mis_parts, bool)[order], wrong=cat(wrong_parts, np.int64)[order])


def follow_rates(pred: np.ndarray | torch.Tensor, t: TeacherMistakes) -> dict[str, Any]:
    """Shares (%) of the teacher's mis-instructed rows where the student (``pred``: its top-1 class for
    every data-set index) predicts the teacher's wrong class / the label. None when there are no such rows."""
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred, np.int64)
    p = pred[t.sample_id]
    n = int(t.mis.sum())
    out: dict[str, Any] = {"teacher": t.teacher, "rows": int(t.mis.size), "mis_rows": n,
                           "mis_ratio": round(100.0 * t.ratio, 4)}
    if n == 0:
        out.update(follow_teacher=None, follow_label=None,
                   note="the teacher has no mis-instructed training rows: nothing to follow")
        return out
    out["follow_teacher"] = round(100.0 * float((p[t.mis] == t.wrong[t.mis]).mean()), 4)
    out["follow_label"] = round(100.0 * float((p[t.mis] == t.label[t.mis]).mean()), 4)
    return out
