"""Students through transformers.Trainer (pipeline/lm/trainer.py): 2-rank DDP equals one rank with the doubled
batch, gradient accumulation equals the whole batch, a SIGKILLed run resumed from its last checkpoint ends with
the uninterrupted run's weights, and a checkpoint written under other settings is not resumed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.lm import streaming, students, trainer
from tests.helpers import kill_after_done_chunks
from tests.lm import trainer_run

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
# DDP: the ranks' gradients are averaged in another order than one process sums them (fp32 rounding only)
DDP_ATOL = 1e-5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return trainer_run.write_store(str(tmp_path_factory.mktemp("trainer") / "s.zarr"))


def _run(args, tmp_path, torchrun=False, **kw):
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "tests.lm.trainer_run"]
    else:
        cmd = [sys.executable, "-m", "tests.lm.trainer_run"]
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_two_rank_ddp_matches_one_rank_with_the_doubled_batch(store, tmp_path):
    # 2 ranks × 4 sequences vs 1 process × 8: the same sequences per step (the sampler's order is one per seed),
    # the loss normalised by the step's tokens over both ranks, so the gradients are the same up to rounding
    _finish(_run([store, tmp_path / "one.pt", tmp_path / "ck1", "--batch", 8], tmp_path))
    _finish(_run([store, tmp_path / "two.pt", tmp_path / "ck2", "--batch", 8], tmp_path, torchrun=True))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    init = trainer_run.student().state_dict()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # it trained (the test can fail)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=DDP_ATOL, rtol=0, msg=k)


@pytest.mark.slow
def test_a_run_killed_and_resumed_ends_with_the_uninterrupted_weights(store, tmp_path):
    args = ["--steps", 8, "--save-steps", 2, "--memory-limit-mb", 0.004]  # a streamed teacher
    _finish(_run([store, tmp_path / "full.pt", tmp_path / "ck-full"] + args, tmp_path))
    proc = _run([store, tmp_path / "killed.pt", tmp_path / "ck"] + args + ["--sleep", 1.0], tmp_path)
    kill_after_done_chunks(proc, tmp_path / "ck", n=3, timeout=240)  # run.json + two checkpoints: SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    done = trainer.last_checkpoint(tmp_path / "ck")
    assert done is not None and int(done.rsplit("-", 1)[1]) < 8
    _finish(_run([store, tmp_path / "killed.pt", tmp_path / "ck"] + args, tmp_path))
    full, resumed = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "killed.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not (tmp_path / "ck").exists()  # a finished run drops its checkpoints


def _train(store, out, **kw):
    src = streaming.open_teacher(store, "t", memory_limit_mb=64, keys=students.arrays_for("kd"))
    model = trainer_run.student()
    loss = students.make_loss("kd", src, students.KDSettings(), fused=True)
    keep = kw.pop("keep_checkpoints", False)
    s = trainer.TrainSettings(**{"batch_size": 8, "steps": 2, "lr": 1e-2, "warmup": 1, **kw})
    trainer.train(model, trainer_run.data(), loss, s, pad_id=0, out_dir=out, teacher=src, keep_checkpoints=keep)
    return model.state_dict()


def test_gradient_accumulation_equals_the_whole_batch(store, tmp_path):
    a = _train(store, tmp_path / "a")
    b = _train(store, tmp_path / "b", grad_accum=4)
    init = trainer_run.student().state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=DDP_ATOL, rtol=0, msg=k)


def test_checkpoints_of_other_settings_are_not_resumed_and_the_batch_must_divide(store, tmp_path):
    _train(store, tmp_path / "ck", save_steps=1, keep_checkpoints=True)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.01 → 0.02\)"):
        _train(store, tmp_path / "ck", lr=2e-2)
    with pytest.raises(ConfigError, match="batch_size 8 is not divisible by grad_accum 3"):
        _train(store, tmp_path / "x", grad_accum=3)


def test_bf16_autocast_trains_on_the_cpu_near_the_fp32_loss(store, tmp_path):
    """--dtype bfloat16: Trainer's autocast (weights stay fp32) through the fused loss; the logged loss of the
    same two steps is within bf16 rounding (2 %) of the fp32 run's."""
    def loss_of(dtype):
        src = streaming.open_teacher(store, "t", memory_limit_mb=64, keys=students.arrays_for("loca"))
        model = trainer_run.student()
        s = trainer.TrainSettings(batch_size=8, steps=2, lr=1e-2, warmup=1, dtype=dtype, log_every=1)
        hist = trainer.train(model, trainer_run.data(), students.make_loss("loca", src, students.KDSettings(), fused=True),
                             s, pad_id=0, out_dir=tmp_path / dtype, teacher=src)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return [h["loss"] for h in hist if "loss" in h]

    bf, fp = loss_of("bfloat16"), loss_of("float32")
    assert len(bf) == len(fp) == 2
    for a, b in zip(bf, fp):
        assert abs(a - b) <= 0.02 * abs(b), (bf, fp)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    from loca_pipe.pipeline.errors import NumericsError

    def nan_loss(h, y, rows, head):
        return (h.sum() + head.weight.sum()) * float("nan")

    nan_loss.wants_hidden = True
    with pytest.raises(NumericsError, match="the training loss is nan at step 0; lower lr"):
        trainer.train(trainer_run.student(), trainer_run.data(), nan_loss,
                      trainer.TrainSettings(batch_size=8, steps=2), pad_id=0, out_dir=tmp_path / "ck")


def test_the_progress_bar_off_a_terminal_is_short_lines_on_stderr(store, tmp_path, capfd):
    """progress=True draws the project's bar (pipeline/progress.py), not Trainer's tqdm: off a terminal each
    update is its own short line (Trainer's bar wrote one carriage-return line of ~30 kB per run into logs)."""
    _train(store, tmp_path / "p", steps=3, progress=True)
    out, err = capfd.readouterr()
    assert out == ""  # stdout is the CLI's JSON
    lines = [ln for ln in err.splitlines() if "train" in ln]
    assert lines and "100%" in lines[-1] and "3.00/3.00" in lines[-1]
    assert max(len(ln) for ln in err.splitlines()) <= 200 and "\r" not in err
