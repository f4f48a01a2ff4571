"""A user's own data set and teachers, given to loca-pipe as ``toy_cache_module:callable`` (cache tests).

40 deterministic 1×8×8 images, 5 classes. Samples 11 and 17 carry a marker pixel (value 50) that the
``nan_teacher`` / ``huge_teacher`` turn into NaN / fp16-overflowing logits. ``LOCA_TEST_SLEEP`` (seconds)
slows every forward pass so a test can kill a caching subprocess mid-run.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

N, CLASSES, SIDE = 40, 5, 8
MARKED = (11, 17)


class ToyImages(torch.utils.data.Dataset):
    num_classes = CLASSES
    transform_description = "none (synthetic)"

    def __init__(self, seed: int = 0, labels_offset: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(N, 1, SIDE, SIDE, generator=g)
        for i in MARKED:
            self.images[i, 0, 0, 0] = 50.0
        self.targets = [(i * 7 + labels_offset) % CLASSES for i in range(N)]

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.images[i].clone(), int(self.targets[i])


def dataset(split: str = "train", root=None) -> ToyImages:
    return ToyImages(seed=0 if split == "train" else 1)


def other_dataset(split: str = "train", root=None) -> ToyImages:
    return ToyImages(seed=123)


class BadLabels(ToyImages):
    def __init__(self):
        super().__init__()
        self.targets[5] = 7  # outside [0, 5)


def bad_label_dataset(split: str = "train", root=None) -> BadLabels:
    return BadLabels()


class Linear(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, seed: int, extra: int = 0,
                 poison: str | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes + extra)
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("LOCA_TEST_SLEEP", "0") or 0)
        if delay:
            time.sleep(delay)
        z = self.fc(x.flatten(1))
        if self.poison:
            marked = x[:, 0, 0, 0] > 40
            z = torch.where(marked[:, None], torch.full_like(z, float("nan") if self.poison == "nan" else 1e6), z)
        return z


def teacher(num_classes: int, in_channels: int = 1, image_size: int = SIDE) -> nn.Module:
    return Linear(num_classes, in_channels, image_size, seed=1)


def teacher_b(num_classes: int, in_channels: int = 1, image_size: int = SIDE) -> nn.Module:
    return Linear(num_classes, in_channels, image_size, seed=2)


def wrong_shape_teacher(num_classes: int, in_channels: int = 1, image_size: int = SIDE) -> nn.Module:
    return Linear(num_classes, in_channels, image_size, seed=1, extra=1)


def nan_teacher(num_classes: int, in_channels: int = 1, image_size: int = SIDE) -> nn.Module:
    return Linear(num_classes, in_channels, image_size, seed=1, poison="nan")


def huge_teacher(num_classes: int, in_channels: int = 1, image_size: int = SIDE) -> nn.Module:
    return Linear(num_classes, in_channels, image_size, seed=1, poison="huge")
