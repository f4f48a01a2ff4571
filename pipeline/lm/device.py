"""One device and one dtype for every language-model stage.

``lm_base.device`` is ``auto | cpu | cuda | cuda:N`` and each model's ``dtype`` is
``auto | bfloat16 | float16 | float32``; ``auto`` means bf16 on a CUDA device that supports it and fp32
everywhere else (the CPU). Every LM stage resolves both here, so a bad value gets the same one-line error
whichever command reads it.
"""

from __future__ import annotations

import torch

from loca_pipe.pipeline.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def available_devices() -> list[str]:
    """The devices this machine has, as a user would type them."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(n)]


def resolve_device(spec: str) -> torch.device:
    """``auto`` → ``cuda`` where a GPU exists, else ``cpu``; ``cuda`` / ``cuda:N`` only where it exists."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; expected one of {', '.join(DEVICES)} "
                          f"(this machine has: {', '.join(available_devices())})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {spec!r} is not supported; expected one of {', '.join(DEVICES)} "
                          f"(this machine has: {', '.join(available_devices())})")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but this machine has no CUDA GPU "
                          f"(devices here: {', '.join(available_devices())}); use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} does not exist (devices here: {', '.join(available_devices())})")
    return device


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a CUDA device that supports it, fp32 otherwise. bf16 asked for on a GPU without
    it is refused; on the CPU bf16 runs (slowly) and fp16 is refused (CPU matmuls in fp16 are not a
    supported training or inference path)."""
    key = (spec or "auto").strip().lower()
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {spec!r}; expected one of {', '.join(DTYPES)}")
    if key == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    dtype = DTYPES[key]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype bfloat16 asked for, but {device} does not support it; use --dtype float16 or auto")
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("dtype float16 is not supported on the CPU; use bfloat16 or float32 (or auto)")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
