"""Block-wise logit distillation (arXiv 2411.01547): block declarations, connectors, stepping-stone hybrids.

A model is split once into n blocks and a head (classifier) such that ``head(block_n(…block_1(x)))`` is
the model's own forward (:func:`declare_blocks`; tests check the identity for every declared family).
Stepping-stone model i (1 ≤ i ≤ n) runs the student's first i blocks, a connector C_i into the teacher's
channel space, then the teacher's blocks i+1…n and its head:

    N_i = T_c ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1        (N_n = T_c ∘ C_n ∘ S_n ∘ … ∘ S_1).

The teacher is frozen (eval mode, ``requires_grad`` False, not a registered sub-module, so it is in neither
the optimizer nor the state dict); the gradient of every hybrid reaches the student's blocks and the
connectors through it. Connectors are 1×1 conv + BatchNorm for convolutional blocks, Linear + BatchNorm1d
for MLP blocks. The loss that uses the hybrids is :func:`loca_pipe.pipeline.losses.compute_loss` with
``hybrids=`` (methods ``blockkd*``); docs/students.md and docs/maths.md give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from loca_pipe.pipeline.errors import ConfigError, ModelError

__all__ = ["BLOCK_FAMILIES", "BlockKD", "Blocks", "block_shapes", "declare_blocks", "make_connectors",
           "matched_teacher"]


@dataclass
class Blocks:
    """A model as n blocks and a head: ``head(blocks[n-1](…blocks[0](x)))`` is the model's forward."""

    blocks: list[nn.Module]
    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _Fn(nn.Module):
    """A parameter-free step of a forward written functionally (ReLU after the stem's BN, global pooling)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _pool_flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _sequential(model: nn.Module, cuts: list[int]) -> Blocks:
    """Blocks of an ``nn.Sequential`` cut after the given layer counts; the rest is the head."""
    layers = list(model.children())
    bounds = [0, *cuts]
    return Blocks([nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])], nn.Sequential(*layers[cuts[-1]:]))


def _cifar_resnet(m: nn.Module) -> Blocks:
    stem = nn.Sequential(m.conv1, m.bn1, _Fn(F.relu), m.layer1)
    return Blocks([stem, m.layer2, m.layer3], nn.Sequential(_Fn(_pool_flatten), m.fc))


def _wrn(m: nn.Module) -> Blocks:
    return Blocks([nn.Sequential(m.conv1, m.block1), m.block2, m.block3],
                  nn.Sequential(m.bn1, m.relu, _Fn(_pool_flatten), m.fc))


def _tv_resnet(m: nn.Module) -> Blocks:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1)
    return Blocks([stem, m.layer2, m.layer3, m.layer4], nn.Sequential(m.avgpool, nn.Flatten(1), m.fc))


#: The families whose blocks are declared, by architecture name (the stages' ``student`` / sidecar ``arch``).
#: The default's small models: an MLP block is Linear + ReLU, a CNN block conv + BN + ReLU; the CIFAR zoo's
#: ResNets and WRNs: stem + stage 1, stage 2, stage 3; torchvision ResNets: stem + layer1, layer2..4.
BLOCK_FAMILIES: dict[str, Callable[[nn.Module], Blocks]] = {
    "mlp_small": lambda m: _sequential(m, [3]),
    "mlp": lambda m: _sequential(m, [3, 5]),
    "cnn_small": lambda m: _sequential(m, [3, 6]),
    "cnn": lambda m: _sequential(m, [3, 6]),
    "resnet": _cifar_resnet,  # resnet20/32/56/110, resnet8x4, resnet32x4
    "wrn": _wrn,              # wrn_D_W
    "torchvision_resnet": _tv_resnet,  # resnet18/34/50/101/152, resnext*, wide_resnet*
}


def declare_blocks(arch: str, model: nn.Module) -> Blocks:
    """The declared blocks of ``model`` (built as architecture ``arch``); ModelError if it has none.

    A ``module:callable`` model declares its own by a method ``kd_blocks()`` returning :class:`Blocks`."""
    from loca_pipe.pipeline.models import CifarResNet, WideResNet

    if hasattr(model, "kd_blocks"):
        b = model.kd_blocks()
        if not isinstance(b, Blocks):
            raise ModelError(f"model {arch!r}: kd_blocks() must return a loca_pipe.pipeline.blockkd.Blocks; got "
                             f"{type(b).__name__}")
        return b
    if arch in ("mlp_small", "mlp", "cnn_small", "cnn") and isinstance(model, nn.Sequential):
        return BLOCK_FAMILIES[arch](model)
    if isinstance(model, CifarResNet):
        return BLOCK_FAMILIES["resnet"](model)
    if isinstance(model, WideResNet):
        return BLOCK_FAMILIES["wrn"](model)
    try:
        import torchvision

        if isinstance(model, torchvision.models.ResNet):
            return BLOCK_FAMILIES["torchvision_resnet"](model)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    raise ModelError(f"architecture {arch!r} declares no blocks, so Block-KD cannot split it; declared: the "
                     f"default's mlp_small, mlp, cnn_small, cnn, the CIFAR zoo's resnet*/wrn_*, torchvision "
                     f"ResNets, or a module:callable model with a kd_blocks() method (pipeline/blockkd.py)")


def block_shapes(blocks: Blocks, in_channels: int, image_size: int) -> list[tuple[int, ...]]:
    """Per block, the output shape of one sample (C, H, W) or (D,), from a probe forward in eval mode."""
    mods = [*blocks.blocks, blocks.head]
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    x = torch.zeros(2, in_channels, image_size, image_size,
                    device=next((p.device for m in mods for p in m.parameters()), torch.device("cpu")))
    out = []
    with torch.no_grad():
        for b in blocks.blocks:
            x = b(x)
            out.append(tuple(x.shape[1:]))
    for m, w in zip(mods, was):
        m.train(w)
    return out


def make_connectors(s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]], *, student: str = "student",
                    teacher: str = "teacher", identity: bool = False) -> nn.ModuleList:
    """C_i for every block: 1×1 conv (no bias) + BatchNorm2d for (C, H, W) features, Linear (no bias) +
    BatchNorm1d for (D,) features. ``identity``: nn.Identity (equal shapes only; for tests). A pair that
    cannot be connected is refused with the reason."""
    if len(s_shapes) != len(t_shapes):
        raise ConfigError(f"Block-KD needs the same number of blocks in student and teacher; student {student!r} "
                          f"declares {len(s_shapes)}, teacher {teacher!r} declares {len(t_shapes)}: pick a pair of "
                          f"the same family depth (e.g. cnn_small → cnn, resnet8x4 → resnet32x4)")
    out = nn.ModuleList()
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes), 1):
        if len(s) != len(t) or s[1:] != t[1:]:
            raise ConfigError(f"Block-KD cannot connect block {i}: student {student!r} gives features {s}, teacher "
                              f"{teacher!r} expects {t}; the spatial size (and kind: conv vs linear) must match")
        if identity:
            if s != t:
                raise ConfigError(f"identity connectors need equal shapes; block {i} has {s} vs {t}")
            out.append(nn.Identity())
        elif len(s) == 3:
            out.append(nn.Sequential(nn.Conv2d(s[0], t[0], 1, bias=False), nn.BatchNorm2d(t[0])))
        elif len(s) == 1:
            out.append(nn.Sequential(nn.Linear(s[0], t[0], bias=False), nn.BatchNorm1d(t[0])))
        else:
            raise ConfigError(f"Block-KD block {i} gives features of shape {s}; only (C, H, W) and (D,) are connected")
    return out


class BlockKD(nn.Module):
    """The student, its connectors and the frozen teacher's blocks: ``forward(x)`` → (student logits,
    [N_1(x), …, N_n(x)]). Its parameters (optimizer, state dict) are the student's and the connectors'; the
    teacher is held outside the module tree, in eval mode, with ``requires_grad`` False."""

    def __init__(self, student: nn.Module, teacher: nn.Module, s_blocks: Blocks, t_blocks: Blocks,
                 connectors: nn.ModuleList):
        super().__init__()
        if len(s_blocks.blocks) != len(t_blocks.blocks) or len(connectors) != len(s_blocks.blocks):
            raise ConfigError(f"Block-KD: {len(s_blocks.blocks)} student blocks, {len(t_blocks.blocks)} teacher "
                              f"blocks and {len(connectors)} connectors; all three must be equal")
        self.student = student
        self.connectors = connectors
        self._s = s_blocks
        teacher.eval()
        teacher.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # not a sub-module: never trained, saved or put in train mode
        object.__setattr__(self, "_t", t_blocks)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def n(self) -> int:
        return len(self._s.blocks)

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .double() move the teacher with the student
        self._teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "BlockKD":
        super().train(mode)
        self._teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hybrids = []
        f = x
        t = self._t.blocks
        for i, block in enumerate(self._s.blocks):
            f = block(f)
            h = self.connectors[i](f)
            for tb in t[i + 1:]:
                h = tb(h)
            hybrids.append(self._t.head(h))
        return self._s.head(f), hybrids


def build_blockkd(student: nn.Module, student_arch: str, teacher: nn.Module, teacher_arch: str, in_channels: int,
                  image_size: int, identity: bool = False) -> BlockKD:
    """:class:`BlockKD` for a (student, teacher) pair: both declared, same block count, connectable shapes."""
    t_blocks = declare_blocks(teacher_arch, teacher)
    s_blocks = declare_blocks(student_arch, student)
    conn = make_connectors(block_shapes(s_blocks, in_channels, image_size),
                           block_shapes(t_blocks, in_channels, image_size), student=student_arch,
                           teacher=teacher_arch, identity=identity)
    dev = next(student.parameters()).device
    return BlockKD(student, teacher, s_blocks, t_blocks, conn.to(dev))


def matched_teacher(checkpoint: str, store_teacher: dict, num_classes: int, in_channels: int, image_size: int,
                    teacher: nn.Module | None = None, check: bool = True) -> tuple[nn.Module, str]:
    """(teacher model, its arch) for Block-KD's hybrids, from ``checkpoint`` and its .json sidecar (or the
    given live ``teacher``), refused unless its weights are the ones the store's teacher was cached from
    (``store_teacher``: that teacher's store attributes, with ``provenance.weights_sha256``): the KL targets
    and the hybrids must be one teacher. ``check=False`` (online mode: the targets come from this very
    teacher) skips the comparison."""
    # deferred on purpose: caching imports the store (zarr), which the Block-KD maths does not need
    from loca_pipe.pipeline.caching import weights_sha256
    from loca_pipe.pipeline.models import build_model, load_checkpoint, read_sidecar

    side = read_sidecar(checkpoint)
    if teacher is None:
        teacher = build_model(side["arch"], int(side.get("num_classes", num_classes)), in_channels, image_size)
        load_checkpoint(teacher, checkpoint)
    if check:
        name = store_teacher.get("teacher")
        want, have = (store_teacher.get("provenance") or {}).get("weights_sha256"), weights_sha256(teacher)
        if want is None:
            raise ConfigError(f"the store's teacher {name!r} records no weights hash, so it cannot be matched to "
                              f"checkpoint {checkpoint!r}; re-cache it with `loca-pipe cache-logits --checkpoint "
                              f"{checkpoint}` (Block-KD's targets and hybrids must be one teacher)")
        if want != have:
            raise ConfigError(f"the store's teacher {name!r} was cached from other weights (sha256 {str(want)[:12]}…) "
                              f"than checkpoint {checkpoint!r} (sha256 {have[:12]}…): Block-KD's KL targets and its "
                              f"hybrids must come from one teacher; pass the checkpoint that teacher was cached from, "
                              f"or pick the matching --teacher")
    return teacher, str(side["arch"])
