"""Replayable augmentations: the student sees exactly the view the teacher's cached logits belong to.

An :class:`Augmenter` splits augmentation in two. :meth:`~CropFlip.sample_params` draws the parameters of
view ``v`` of sample ``i`` as a pure function of ``(seed, i, v)`` — a counter-based hash (splitmix64),
vectorised over ids, with no generator state — so any rank, any resume and any later stage get the same
numbers. :meth:`~CropFlip.apply` turns images plus parameters into pixels, deterministically, so the same
parameters (e.g. read back from the logit store's ``aug_params``) give the same pixels.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.errors import ConfigError, DataError

from loca_pipe.pipeline.names import AUGMENTATIONS  # defined in the torch-free leaf, for the CLI

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def hash_uniform_int(seed: int, sample_ids: np.ndarray, view: int, stream: int, high: int) -> np.ndarray:
    """Integers in [0, high) that depend only on (seed, sample id, view, stream): h = mix(mix(mix(mix(seed)
    ⊕ id) ⊕ view) ⊕ stream) mod high. The modulo bias is below 2⁻⁵⁰ for the small ``high`` used here."""
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(ids.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
        h = _splitmix64(h ^ ids)
        h = _splitmix64(h ^ np.uint64(view & 0xFFFFFFFFFFFFFFFF))
        h = _splitmix64(h ^ np.uint64(stream))
    return (h % np.uint64(high)).astype(np.int64)


class Augmenter(Protocol):
    """What the cache and student stages rely on."""

    kind: str
    seed: int
    param_names: tuple[str, ...]

    def sample_params(self, sample_ids: np.ndarray, view: int) -> np.ndarray: ...

    def apply(self, images: torch.Tensor, params: torch.Tensor | np.ndarray) -> torch.Tensor: ...


class CropFlip:
    """Random crop after zero padding, then horizontal flip — the CIFAR recipe (pad 4, crop back to size).

    Parameters per view (float32 columns, integers in value): ``top`` and ``left`` in [0, 2·pad], the
    offsets of the crop window in the padded image; ``flip`` in {0, 1}. Padding is with zeros *in the
    tensor given* — for normalised images that is the data set's mean colour.
    """

    kind = "crop-flip"
    param_names = ("top", "left", "flip")

    def __init__(self, seed: int, image_size: int, pad: int = 4):
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.pad = int(pad)

    def __repr__(self) -> str:
        return f"CropFlip(seed={self.seed}, image_size={self.image_size}, pad={self.pad})"

    def sample_params(self, sample_ids: np.ndarray, view: int) -> np.ndarray:
        """(n, 3) float32 [top, left, flip] for each id; a pure function of (seed, id, view)."""
        ids = np.asarray(sample_ids)
        if ids.ndim != 1:
            raise DataError(f"sample_ids must be 1-D, got shape {ids.shape}")
        span = 2 * self.pad + 1
        out = np.empty((len(ids), 3), dtype=np.float32)
        out[:, 0] = hash_uniform_int(self.seed, ids, view, 0, span)
        out[:, 1] = hash_uniform_int(self.seed, ids, view, 1, span)
        out[:, 2] = hash_uniform_int(self.seed, ids, view, 2, 2)
        return out

    def apply(self, images: torch.Tensor, params: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Crop + flip each image (B, C, H, W) as its row of ``params`` (B, 3) says; exact replay."""
        if images.ndim != 4:
            raise DataError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        if p.shape != (B, 3):
            raise DataError(f"crop-flip params must be (B, 3) = {(B, 3)} [top, left, flip], got {tuple(p.shape)}")
        p = p.to(device="cpu", dtype=torch.float64)
        if not torch.equal(p, p.round()) or p[:, :2].min() < 0 or p[:, :2].max() > 2 * self.pad \
                or not torch.isin(p[:, 2], torch.tensor([0.0, 1.0], dtype=torch.float64)).all():
            raise DataError(f"crop-flip params out of range: top/left must be integers in [0, {2 * self.pad}] "
                            f"and flip 0 or 1; were these params made with pad={self.pad}?")
        p = p.to(torch.int64).to(images.device)
        padded = F.pad(images, (self.pad, self.pad, self.pad, self.pad))  # zeros, (B, C, H+2p, W+2p)
        rows = p[:, 0, None] + torch.arange(H, device=images.device)  # (B, H)
        cols = p[:, 1, None] + torch.arange(W, device=images.device)  # (B, W)
        flip = p[:, 2].bool()
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
        b = torch.arange(B, device=images.device)[:, None, None]
        out = padded[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()


def make_augmenter(kind: str, seed: int, image_size: int) -> CropFlip | None:
    """``none`` → None; ``crop-flip`` → :class:`CropFlip` (pad 4). Unknown kinds list the valid ones."""
    if kind == "none":
        return None
    if kind == "crop-flip":
        return CropFlip(seed, image_size)
    raise ConfigError(f"unknown augmentation {kind!r}; valid kinds are {list(AUGMENTATIONS)}")
