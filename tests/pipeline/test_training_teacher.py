"""Teachers train through the students' loop (``training.fit_teacher`` → ``train_student``, method ``ce``):
the weights are bit-identical to an independent reference of the loop ``train-teacher`` ran before (written
here, not imported), for both optimizers, both schedules, with and without augmentation, on data sets with and
without a batched ``get_batch``; and the teacher gains the loop's NaN guard and exact resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.augment import make_augmenter
from loca_pipe.pipeline.data import TensorImageDataset
from loca_pipe.pipeline.errors import NumericsError
from loca_pipe.pipeline.models import build_model
from loca_pipe.pipeline.training import Hooks, TrainConfig, fit_teacher, train_student  # noqa: F401

torch.set_num_threads(1)
C, H = 4, 12


class ItemsOnly(torch.utils.data.Dataset):
    """The same images without a batched path: read item by item."""

    def __init__(self, ds: TensorImageDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def spec(n: int, seed: int, batched: bool = True):
    g = torch.Generator().manual_seed(seed)
    ds = TensorImageDataset(torch.randint(0, 256, (n, 1, H, H), generator=g, dtype=torch.uint8),
                            torch.randint(0, C, (n,), generator=g), [0.5], [0.25])
    return SimpleNamespace(name="toy", split="train", dataset=ds if batched else ItemsOnly(ds), num_classes=C,
                           in_channels=1, image_size=H, labels=ds.targets.numpy().copy())


def reference_teacher(arch, train, test, *, epochs, batch_size, lr, optimizer, momentum, weight_decay, schedule,
                      augment, seed, max_samples, eval_batch_size):
    """The loop stages/train_teacher.py ran before it called the library (kept here as the reference)."""
    n_train = min(len(train.dataset), max_samples or len(train.dataset))
    n_test = min(len(test.dataset), max_samples or len(test.dataset))

    def batch(ds, ids):
        items = [ds[int(i)] for i in ids]
        return torch.stack([x for x, _ in items]).float(), torch.tensor([int(y) for _, y in items])

    torch.manual_seed(seed)
    model = build_model(arch, C, 1, H)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                              weight_decay=weight_decay)
    steps = epochs * math.ceil(n_train / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if schedule == "cosine" else (lambda s: 1.0))
    aug = make_augmenter(augment, seed, H)
    loss_sum = loss_n = 0
    for epoch in range(epochs):
        model.train()
        order = np.random.default_rng([seed, epoch]).permutation(n_train)
        loss_sum, loss_n = 0.0, 0
        for start in range(0, n_train, batch_size):
            ids = order[start:start + batch_size]
            x, y = batch(train.dataset, ids)
            if aug is not None:
                x = aug.apply(x, aug.sample_params(ids, view=epoch))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            loss_n += len(y)
    model.eval()
    with torch.inference_mode():
        accs = []
        for spec_, n in ((test, n_test), (train, n_train)):
            correct = 0
            for start in range(0, n, eval_batch_size):
                x, y = batch(spec_.dataset, range(start, min(n, start + eval_batch_size)))
                correct += int((model(x).argmax(1) == y).sum())
            accs.append(100.0 * correct / n)
    return model, {"test_top1": accs[0], "train_top1": accs[1], "final_train_loss": loss_sum / loss_n}


CASES = [  # (arch, optimizer, schedule, augment, momentum, weight_decay, batched)
    ("mlp_small", "adam", "cosine", "none", 0.9, 0.0, True),
    ("cnn_small", "sgd", "constant", "crop-flip", 0.9, 5e-4, True),
    ("mlp_small", "sgd", "cosine", "crop-flip", 0.0, 0.0, False),
]


@pytest.mark.parametrize("arch,optimizer,schedule,augment,momentum,wd,batched", CASES)
def test_teacher_weights_are_bit_identical_to_the_reference_loop(arch, optimizer, schedule, augment, momentum, wd,
                                                                 batched):
    train, test = spec(90, 0, batched), spec(40, 1, batched)
    kw = dict(epochs=2, batch_size=16, lr=0.01, seed=3, eval_batch_size=32)  # 80 = 5 batches of 16: last is full
    ref, ref_m = reference_teacher(arch, train, test, optimizer=optimizer, momentum=momentum, weight_decay=wd,
                                   schedule=schedule, augment=augment, max_samples=75, **kw)  # 75: last batch of 11
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, momentum=momentum, weight_decay=wd, milestones=(),
                      nesterov=momentum > 0, seed=3, amp=False, eval_batch_size=32)
    fit = fit_teacher(arch, train, test, cfg, optimizer=optimizer, schedule=schedule, augment=augment, max_samples=75)
    got, want = fit.model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert {k: fit.metrics[k] for k in ref_m} == ref_m  # the same accuracies and the same float64 loss sum
    assert (fit.metrics["num_train"], fit.metrics["num_test"], fit.metrics["epochs"]) == (75, 40, 2)


def test_teacher_seed_changes_the_weights():
    train, test = spec(40, 0), spec(20, 1)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, milestones=(), amp=False)
    a = fit_teacher("mlp_small", train, test, cfg).model.state_dict()
    b = fit_teacher("mlp_small", train, test, TrainConfig(**{**cfg.__dict__, "seed": 1})).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_teacher_gains_the_nan_guard():
    train, test = spec(40, 0), spec(20, 1)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e30, milestones=(), amp=False, momentum=0.0)
    with pytest.raises(NumericsError, match=r"loss is (nan|inf).* at epoch 1, step \d.*training stopped"):
        fit_teacher("mlp_small", train, test, cfg, optimizer="sgd", schedule="constant")


def test_teacher_resume_is_bit_identical(tmp_path):
    train, test = spec(48, 0), spec(20, 1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, milestones=(), amp=False)
    full = fit_teacher("mlp_small", train, test, cfg).model.state_dict()

    class Stop(Exception):
        pass

    import loca_pipe.pipeline.training as T

    def stop_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Stop

    real = T.Hooks
    try:  # interrupt the first run after its first checkpoint
        T.Hooks = lambda on_step=None, on_epoch_end=None: real(on_step=on_step, on_epoch_end=stop_after_first_epoch)
        with pytest.raises(Stop):
            fit_teacher("mlp_small", train, test, cfg, out_dir=tmp_path, identity={"teacher": "t"})
    finally:
        T.Hooks = real
    resumed = fit_teacher("mlp_small", train, test, cfg, out_dir=tmp_path, resume=True, identity={"teacher": "t"})
    assert len(resumed.history) == 3
    got = resumed.model.state_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)
