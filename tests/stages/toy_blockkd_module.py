"""A teacher without declared blocks, for the Block-KD refusal test (module:callable model)."""

import torch


def flat(num_classes=10, in_channels=1, image_size=8):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size * image_size, num_classes))
