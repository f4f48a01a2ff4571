"""A tiny learnable image set for the train-student stage tests (module:callable data set)."""

import torch
from torch.utils.data import Dataset


class ToyImages(Dataset):
    num_classes = 10

    def __init__(self, split: str = "train"):
        n, seed = (240, 0) if split == "train" else (120, 1)
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(n) % 10
        centers = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(42))
        self.x = centers[self.targets] + 1.5 * torch.randn(n, 1, 8, 8, generator=g)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def dataset(split="train"):
    return ToyImages(split)


def five_outputs(in_channels=1, image_size=8):
    """A student that ignores num_classes and always has 5 outputs (the wrong count for 10 classes)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size * image_size, 5))
