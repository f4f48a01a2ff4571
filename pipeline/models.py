"""Classifier architectures by name, checkpoints, devices.

:func:`build_model` knows four families, all taking ``(num_classes, in_channels, image_size)``:

* small fast models for the Fashion-MNIST default, of clearly different strength: ``mlp_small``,
  ``mlp``, ``cnn_small``, ``cnn``;
* the CIFAR-style zoo of the paper, with mdistiller's layer names (so its state dicts load):
  ``resnet20/32/56/110`` (6n+2 layers of BasicBlocks, widths 16/32/64), ``resnet8x4`` and ``resnet32x4``
  (stem 32, stages 64/128/256) and wide ResNets ``wrn_D_W`` (e.g. ``wrn_16_2``, ``wrn_40_2``);
* every torchvision classification model (``resnet18``, ``mobilenet_v3_small``, …) with random weights;
  for ``in_channels != 3`` the first convolution is replaced by one with ``in_channels`` inputs;
* a user's ``module:callable``, called with ``num_classes=`` (and ``in_channels=``, ``image_size=`` if
  it accepts them), returning an ``nn.Module``.

Every model maps images (B, in_channels, H, W) to logits (B, num_classes). The CIFAR zoo and the CNNs use
adaptive average pooling, so any image size ≥ 8 works.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from loca_pipe.pipeline.data import call_with_supported, load_callable
from loca_pipe.pipeline.errors import ConfigError, ModelError

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model


# --------------------------------------------------------------------------- small models (Fashion-MNIST)

def mlp_small(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """One hidden layer of 32 units."""
    d = in_channels * image_size * image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, num_classes))


def mlp(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Two hidden layers (256, 128)."""
    d = in_channels * image_size * image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, num_classes))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# The CNNs downsample with stride-2 convolutions rather than full-resolution convs + max-pooling: on a
# 2-core CPU that is 3-4x faster per step for the same accuracy class (measured here), which keeps the
# default teachers under a minute each.

def cnn_small(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Two stride-2 3×3 conv layers (16, 32 channels), then a linear classifier."""
    return nn.Sequential(*_conv_bn(in_channels, 16, 2), *_conv_bn(16, 32, 2),
                         nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(32 * 49, num_classes))


def cnn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Two stride-2 3×3 conv layers (32, 64 channels), a 128-unit hidden layer, a linear classifier."""
    return nn.Sequential(*_conv_bn(in_channels, 32, 2), *_conv_bn(32, 64, 2),
                         nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(inplace=True),
                         nn.Linear(128, num_classes))


# --------------------------------------------------------------------------- CIFAR ResNets (mdistiller)

def _init_weights(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """He-normal convolutions, unit/zero BatchNorm (and zero Linear bias for WRN), as mdistiller initialises."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (He et al. 2016); 1×1 conv shortcut on shape change."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3×3 stem, three stages of n BasicBlocks, global pool, linear."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, 8, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        layers = []
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- Wide ResNets (mdistiller)

class WideBasic(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016), names as in mdistiller's wrn.py."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(act))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width: widths 16, 16w, 32w, 64w; (depth − 4)/6 blocks per stage; no dropout."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 or depth < 10 or width < 1:
            raise ModelError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...) and width ≥ 1, got {depth}, {width}")
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        _init_weights(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- torchvision

def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first ``Conv2d`` (3 inputs) for a fresh one with ``in_channels`` inputs, same geometry."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return model
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups if m.groups == 1 else in_channels, m.bias is not None, m.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return model
    raise ModelError(f"cannot adapt {type(model).__name__} to {in_channels} input channels: it has no Conv2d")


def _torchvision(name: str) -> Builder:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if name.startswith("vit_"):
            kwargs["image_size"] = image_size
        if name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(name, **kwargs)
        return _replace_first_conv(model, in_channels) if in_channels != 3 else model

    build.__doc__ = f"torchvision.models.{name} (random weights)"
    return build


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


# --------------------------------------------------------------------------- registry

def _resnet(depth: int, widths: tuple[int, int, int, int]) -> Builder:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, in_channels)

    build.__doc__ = f"CIFAR ResNet-{depth}, widths {widths}"
    return build


def _wrn(depth: int, width: int) -> Builder:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return WideResNet(depth, width, num_classes, in_channels)

    build.__doc__ = f"WRN-{depth}-{width}"
    return build


SMALL_MODELS = ("mlp_small", "mlp", "cnn_small", "cnn")
ZOO_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
              "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")
class _Registry(dict):
    """Name → builder. torchvision's classification models join on the first look-up of a name that is not
    built in, or on listing: importing torchvision imports torch._dynamo (~2 s here), which every process
    training a small or zoo model would otherwise pay."""

    _with_torchvision = False

    def _add_torchvision(self) -> None:
        if not self._with_torchvision:
            self._with_torchvision = True
            for n in _torchvision_names():
                self.setdefault(n, _torchvision(n))

    def __contains__(self, name: object) -> bool:
        if not dict.__contains__(self, name):
            self._add_torchvision()
        return dict.__contains__(self, name)

    def __getitem__(self, name: str) -> Builder:
        if not dict.__contains__(self, name):
            self._add_torchvision()
        return dict.__getitem__(self, name)

    def __iter__(self):
        self._add_torchvision()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._add_torchvision()
        return dict.__len__(self)

    def keys(self):
        self._add_torchvision()
        return dict.keys(self)

    def items(self):
        self._add_torchvision()
        return dict.items(self)

    def values(self):
        self._add_torchvision()
        return dict.values(self)


MODELS: dict[str, Builder] = _Registry({
    "mlp_small": mlp_small, "mlp": mlp, "cnn_small": cnn_small, "cnn": cnn,
    **{f"resnet{d}": _resnet(d, (16, 16, 32, 64)) for d in (20, 32, 56, 110)},
    "resnet8x4": _resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet(32, (32, 64, 128, 256)),
    **{f"wrn_{d}_{w}": _wrn(d, w) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
})
_WRN = re.compile(r"wrn_(\d+)_(\d+)$")


def check_model_name(name: str) -> None:
    """Raise ModelError (with close matches and the valid names) unless ``name`` can be built."""
    if ":" in name or name in MODELS or _WRN.match(name):
        return
    close = difflib.get_close_matches(name, list(MODELS), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}.{hint} Valid names: small {list(SMALL_MODELS)}; CIFAR zoo "
        f"{list(ZOO_MODELS)} and any wrn_DEPTH_WIDTH; torchvision "
        f"{[n for n in MODELS if n not in SMALL_MODELS and n not in ZOO_MODELS]}; or 'module:callable'")


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build architecture ``name`` with random weights: (B, in_channels, H, W) → logits (B, num_classes)."""
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ConfigError(f"num_classes, in_channels and image_size must be ≥ 1, got "
                          f"{num_classes}, {in_channels}, {image_size}")
    if ":" in name:
        fn = load_callable(name, "model", ModelError)
        model = call_with_supported(fn, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        if not isinstance(model, nn.Module):
            raise ModelError(f"model {name!r} returned a {type(model).__name__}; expected a torch.nn.Module")
        return model
    if name in MODELS:
        return MODELS[name](num_classes, in_channels, image_size)
    check_model_name(name)
    m = _WRN.match(name)
    return WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)


# --------------------------------------------------------------------------- checkpoints

def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(keys: list[str], shapes: Mapping[str, Any], limit: int = 8) -> str:
    items = [f"{k} {tuple(shapes[k].shape)}" if k in shapes else k for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(items) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (CPU). Wrappers ``{"state_dict": sd}`` / ``{"model": sd}`` (mdistiller)
    and a DDP ``module.`` prefix are unwrapped. Anything else raises ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} not found; train one with `loca-pipe train-teacher` or "
                         f"pass the path of a state-dict file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean the same to a user
        raise ModelError(f"checkpoint {str(path)!r} is not a readable torch state-dict file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with "
                         f"torch.save(model.state_dict(), path)") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        got = type(obj).__name__ if not isinstance(obj, Mapping) else \
            f"a mapping with non-tensor values {[k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]}" \
            if obj else "an empty mapping"
        raise ModelError(f"checkpoint {str(path)!r} is not a state dict (got {got}); expected a mapping "
                         f"name → tensor as written by torch.save(model.state_dict(), path)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load the state dict at ``path`` into ``model`` strictly; return the file's sha256.

    Missing keys, unexpected keys and shape mismatches raise ModelError naming the keys and shapes.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing, own)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected, sd)}")
    if mismatched:
        shown = ", ".join(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in mismatched[:8])
        problems.append(f"shape mismatches: {shown}" + (f" and {len(mismatched) - 8} more" if len(mismatched) > 8 else ""))
    if problems:
        raise ModelError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(problems)
                         + ". Check the architecture name, num_classes and in_channels the checkpoint was "
                           "trained with (see its .json sidecar)")
    model.load_state_dict(sd, strict=True)
    return file_sha256(path)


def sidecar_path(checkpoint: str | Path) -> Path:
    """The JSON sidecar of a checkpoint: ``<ckpt>.json``."""
    return Path(f"{checkpoint}.json")


def read_sidecar(checkpoint: str | Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The sidecar dict (arch, num_classes, dataset, fingerprint, test_top1 in %, ...) of a checkpoint.

    The one sidecar contract: the file is ``<ckpt>.json`` (:func:`sidecar_path`) and holds a JSON object.
    A missing sidecar raises :class:`ModelError` unless the caller asks for an optional one with
    ``missing_ok=True`` (then ``{}``); unreadable JSON or a non-object always raises.
    """
    p = sidecar_path(checkpoint)
    if not p.is_file():
        if missing_ok:
            return {}
        raise ModelError(f"checkpoint {str(checkpoint)!r} has no sidecar {str(p)!r}; pass the architecture "
                         f"and class count explicitly or retrain with `loca-pipe train-teacher`")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"sidecar {str(p)!r} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ModelError(f"sidecar {str(p)!r} must hold a JSON object; got {type(data).__name__}. Fix or delete it")
    return data


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (must be available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
        return torch.device(device)
    raise ConfigError(f"unknown device {device!r}; valid values are 'auto', 'cpu', 'cuda', 'cuda:N'")
