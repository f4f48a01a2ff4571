"""Model zoo, checkpoints and devices (pipeline/models.py)."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
import torch

from loca_pipe.pipeline.errors import ConfigError, ModelError
from loca_pipe.pipeline.models import (
    MODELS, SMALL_MODELS, ZOO_MODELS, build_model, file_sha256, load_checkpoint, read_sidecar, resolve_device,
)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", SMALL_MODELS + ZOO_MODELS + ("wrn_22_1", "resnet18", "mobilenet_v3_small"))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_maps_images_to_logits(name, shape):
    torch.manual_seed(0)
    c, h, w = shape
    model = build_model(name, num_classes=7, in_channels=c, image_size=h).eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


# Parameter counts published for the CIFAR-100 versions (CRD / mdistiller tables, in millions).
@pytest.mark.parametrize("name, millions", [
    ("resnet20", 0.28), ("resnet32", 0.47), ("resnet56", 0.86), ("resnet110", 1.74),
    ("resnet8x4", 1.23), ("resnet32x4", 7.43), ("wrn_16_2", 0.70), ("wrn_40_1", 0.57), ("wrn_40_2", 2.26),
])
def test_cifar_zoo_matches_published_sizes(name, millions):
    assert n_params(build_model(name, num_classes=100)) / 1e6 == pytest.approx(millions, abs=0.011)


def test_small_models_differ_in_capacity():
    sizes = [n_params(build_model(n, 10, 1, 28)) for n in ("mlp_small", "mlp")]
    assert sizes == [784 * 32 + 32 + 32 * 10 + 10, 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10]


def test_torchvision_first_conv_adapted_to_one_channel():
    m = build_model("resnet18", num_classes=10, in_channels=1)
    assert m.conv1.weight.shape == (64, 1, 7, 7)
    assert m.fc.out_features == 10
    assert build_model("resnet18", 10, 3).conv1.weight.shape == (64, 3, 7, 7)
    assert "resnet18" in MODELS and "vit_b_16" in MODELS


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet21'\. Did you mean .*'resnet20'.*Valid names: small "
                                         r"\['mlp_small', 'mlp', 'cnn_small', 'cnn'\]; CIFAR zoo .*'resnet8x4'"):
        build_model("resnet21", 10)


def test_module_callable_model(tmp_path, monkeypatch):
    (tmp_path / "user_models_h2.py").write_text(textwrap.dedent('''
        import torch.nn as nn
        def linear(num_classes):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        def sized(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))
        def broken(num_classes):
            return "not a model"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("user_models_h2:linear", 4)(torch.zeros(2, 1, 5, 5)).shape == (2, 4)
    assert build_model("user_models_h2:sized", 3, in_channels=2, image_size=6)(torch.zeros(2, 2, 6, 6)).shape == (2, 3)
    with pytest.raises(ModelError, match=r"returned a str; expected a torch.nn.Module"):
        build_model("user_models_h2:broken", 4)
    with pytest.raises(ModelError, match=r"has no attribute 'nope'"):
        build_model("user_models_h2:nope", 4)


# --------------------------------------------------------------------------- checkpoints

def _mlp_sd(num_classes=10):
    torch.manual_seed(0)
    return build_model("mlp_small", num_classes, 1, 28).state_dict()


def _bad_checkpoints(tmp_path):
    sd = _mlp_sd()
    cases = {}
    p = tmp_path / "missing_key.pt"
    torch.save({k: v for k, v in sd.items() if k != "3.bias"}, p)
    cases["missing"] = (p, r"missing keys: 3\.bias \(10,\)")
    p = tmp_path / "extra_key.pt"
    torch.save({**sd, "head.weight": torch.zeros(2, 2)}, p)
    cases["unexpected"] = (p, r"unexpected keys: head\.weight \(2, 2\)")
    p = tmp_path / "five_classes.pt"
    torch.save(_mlp_sd(num_classes=5), p)
    cases["shape"] = (p, r"shape mismatches: 3\.weight: checkpoint \(5, 32\) vs model \(10, 32\), "
                         r"3\.bias: checkpoint \(5,\) vs model \(10,\)")
    p = tmp_path / "a_list.pt"
    torch.save([1, 2, 3], p)
    cases["list"] = (p, r"is not a state dict \(got list\)")
    p = tmp_path / "mixed.pt"
    torch.save({"epoch": 3, "acc": 0.5}, p)
    cases["non-tensor"] = (p, r"is not a state dict \(got a mapping with non-tensor values \['epoch', 'acc'\]\)")
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a torch file")
    cases["garbage"] = (p, r"is not a readable torch state-dict file")
    cases["absent"] = (tmp_path / "nope.pt", r"checkpoint '.*nope\.pt' not found")
    return cases


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "list", "non-tensor", "garbage", "absent"])
def test_checkpoint_errors(case, tmp_path):
    path, match = _bad_checkpoints(tmp_path)[case]
    model = build_model("mlp_small", 10, 1, 28)
    with pytest.raises(ModelError, match=match):
        load_checkpoint(model, path)


def test_checkpoint_loads_and_returns_sha256(tmp_path):
    sd = _mlp_sd()
    p = tmp_path / "ok.pt"
    torch.save(sd, p)
    model = build_model("mlp_small", 10, 1, 28)
    digest = load_checkpoint(model, p)
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest() == file_sha256(p)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # mdistiller-style wrapper with a DDP prefix
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240}, wrapped)
    other = build_model("mlp_small", 10, 1, 28)
    load_checkpoint(other, wrapped)
    assert torch.equal(other.state_dict()["3.bias"], sd["3.bias"])


def test_read_sidecar(tmp_path):
    ckpt = tmp_path / "t.pt"
    with pytest.raises(ModelError, match=r"has no sidecar '.*t\.pt\.json'"):
        read_sidecar(ckpt)
    (tmp_path / "t.pt.json").write_text('{"arch": "cnn", "num_classes": 10}')
    assert read_sidecar(ckpt) == {"arch": "cnn", "num_classes": 10}


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'; valid values are 'auto', 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"CUDA is not available here"):
            resolve_device("cuda")
