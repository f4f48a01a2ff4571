"""lm_base.device and the models' dtype: one resolution for every LM stage (pipeline/lm/device.py)."""

import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.lm import device as dev


def test_auto_is_the_cpu_in_fp32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = dev.resolve_device("auto")
    assert d == torch.device("cpu")
    assert dev.resolve_dtype("auto", d) is torch.float32


def test_auto_dtype_is_bf16_on_a_gpu_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.resolve_dtype("auto", torch.device("cuda")) is torch.float32
    with pytest.raises(ConfigError, match="does not support it"):
        dev.resolve_dtype("bfloat16", torch.device("cuda"))


def test_cuda_without_a_gpu_names_the_devices_that_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA GPU \(devices here: cpu\)"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        dev.resolve_device("cuda:1")


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:2' does not exist \(devices here: cpu, cuda:0, cuda:1\)"):
        dev.resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "mps", "tpu:0"])
def test_unknown_devices_are_refused(spec):
    with pytest.raises(ConfigError, match="expected one of auto, cpu, cuda, cuda:N"):
        dev.resolve_device(spec)


def test_dtypes_on_the_cpu():
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert dev.resolve_dtype("float32", cpu) is torch.float32
    with pytest.raises(ConfigError, match="float16 is not supported on the CPU"):
        dev.resolve_dtype("float16", cpu)
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        dev.resolve_dtype("fp8", cpu)
    assert dev.dtype_name(torch.bfloat16) == "bfloat16"


def test_the_cli_choices_are_the_library_lists():
    """cli/lm.py builds --dtype / --attn-implementation / --device-map from the torch-free pipeline/names.py."""
    from loca_pipe.pipeline import names
    from loca_pipe.pipeline.lm import models

    assert tuple(dev.DTYPES) == names.LM_DTYPES
    assert models.ATTN_IMPLEMENTATIONS == names.LM_ATTN_IMPLEMENTATIONS
    assert models.DEVICE_MAPS == names.LM_DEVICE_MAPS


def test_the_cli_method_choices_are_the_lm_registry():
    from loca_pipe.pipeline import names
    from loca_pipe.pipeline.lm import students

    assert tuple(students.METHODS) == names.LM_METHODS


def test_the_cli_codec_choices_are_the_codecs_the_library_builds():
    from loca_pipe.pipeline import codecs, names

    assert codecs.CHOICES == names.LM_CODECS
    assert all(codecs.get_codec(n).name == n for n in names.LM_CODECS)
