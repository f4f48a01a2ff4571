"""The follow-rate metric against a hand count on a tiny store (full logits and top-k only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loca_pipe.pipeline.follow import follow_rates, teacher_mistakes
from loca_pipe.pipeline.store import LogitStore, StoreInfo
from tests.helpers import write_teacher

C = 4
# rows: label, teacher logits. Mis-instructed: row 1 (teacher says 2), row 3 (tie 0/1 with label 0 → counts,
# best other class 1), row 4 (teacher says 3). Correct: rows 0, 2, 5.
Z = np.array([[5, 1, 0, 0], [0, 1, 4, 0], [0, 0, 0, 3], [2, 2, 0, 0], [1, 0, 0, 6], [0, 7, 1, 0]], np.float32)
Y = np.array([0, 1, 3, 0, 2, 1], np.int64)


def _store(tmp_path, full: bool):
    info = StoreInfo(task="classification", num_samples=6, num_views=1, num_rows=6, num_classes=C, chunk_rows=4,
                     dataset={"name": "toy", "split": "train", "fingerprint": "fp", "view_seed": None})
    st = LogitStore.create_or_open(str(tmp_path / "s.zarr"), info)
    w = st.begin_teacher("t", {"checkpoint_sha256": "x"}, 2, (1.0,), logits_dtype="float32" if full else None)
    write_teacher(st, w, Z, Y, 2, (1.0,), full=full)
    return str(tmp_path / "s.zarr")


@pytest.mark.parametrize("full", [True, False])
def test_hand_count(tmp_path, full):
    t = teacher_mistakes(_store(tmp_path, full))
    assert t.mis.tolist() == [False, True, False, True, True, False]
    assert t.wrong[[1, 3, 4]].tolist() == [2, 1, 3]
    # student predictions per data-set index: row 1 → 2 (follows), row 3 → 0 (label), row 4 → 1 (neither)
    r = follow_rates(np.array([0, 2, 3, 0, 1, 1]), t)
    assert (r["mis_rows"], r["rows"]) == (3, 6)
    assert r["mis_ratio"] == pytest.approx(50.0)
    assert r["follow_teacher"] == pytest.approx(100 / 3, abs=1e-3)
    assert r["follow_label"] == pytest.approx(100 / 3, abs=1e-3)
    all_label = follow_rates(torch.from_numpy(Y), t)
    assert (all_label["follow_teacher"], all_label["follow_label"]) == (0.0, 100.0)


def test_no_mis_instructed_rows_is_said(tmp_path):
    t = teacher_mistakes(_store(tmp_path, True))
    t2 = type(t)(t.teacher, t.sample_id, t.label, np.zeros_like(t.mis), t.wrong)
    r = follow_rates(np.zeros(6, np.int64), t2)
    assert r["follow_teacher"] is None and "no mis-instructed" in r["note"]
