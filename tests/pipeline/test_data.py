"""Data sets, fingerprints and replayable augmentation (pipeline/data.py, pipeline/augment.py)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loca_pipe.pipeline import data as D
from loca_pipe.pipeline.augment import CropFlip, make_augmenter
from loca_pipe.pipeline.data import get_batch, open_dataset, prepare_fashion_mnist
from loca_pipe.pipeline.errors import ConfigError, DataError

needs_debian = pytest.mark.skipif(not (D.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    prepare_fashion_mnist(root)
    return root


# --------------------------------------------------------------------------- Fashion-MNIST

@needs_debian
def test_fashion_mnist_reads_the_real_files(fmnist_root):
    train = open_dataset("fashion-mnist", "train", str(fmnist_root))
    test = open_dataset("fashion-mnist", "test", str(fmnist_root))
    assert (len(train), len(test)) == (60000, 10000)
    assert (train.num_classes, train.in_channels, train.image_size) == (10, 1, 28)
    # first labels of the published files (ankle boot, t-shirt, t-shirt, dress, ...)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert train.labels.dtype == np.int64
    assert (fmnist_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47040016
    assert "Normalize" in train.transform and "0.286" in train.transform
    assert train.fingerprint != test.fingerprint and len(train.fingerprint) == 64


@needs_debian
def test_items_equal_torchvision_own_pipeline_and_batch_path(fmnist_root):
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    mean, std = D.NORMALIZATION["fashion-mnist"]
    ref = FashionMNIST(str(fmnist_root), train=False,
                       transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)]))
    spec = open_dataset("fashion-mnist", "test", str(fmnist_root))
    idx = [0, 1, 4242, 9999]
    for i in idx:
        x, y = spec.dataset[i]
        xr, yr = ref[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(x, xr) and y == yr
    xb, yb = get_batch(spec.dataset, idx)
    assert torch.equal(xb, torch.stack([ref[i][0] for i in idx]))
    assert yb.tolist() == [ref[i][1] for i in idx]


@needs_debian
def test_own_idx_reader_equals_torchvision_on_the_real_files(fmnist_root):
    """Fashion-MNIST is read without torchvision; the tensors, labels and class names equal torchvision's."""
    from torchvision.datasets import FashionMNIST

    for split in ("train", "test"):
        ref = FashionMNIST(str(fmnist_root), train=split == "train", download=False)
        spec = open_dataset("fashion-mnist", split, str(fmnist_root))
        assert torch.equal(spec.dataset.images[:, 0], ref.data) and spec.dataset.images.dtype == torch.uint8
        assert torch.equal(spec.dataset.targets, ref.targets) and spec.dataset.targets.dtype == torch.int64
        assert spec.class_names == tuple(ref.classes)


def test_idx_reader_equals_torchvision_and_refuses_damaged_files(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    lab = rng.integers(0, 10, 7, dtype=np.uint8)
    (tmp_path / "i").write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in img.shape) + img.tobytes())
    (tmp_path / "l").write_bytes(bytes([0, 0, 8, 1]) + (7).to_bytes(4, "big") + lab.tobytes())
    got = D.read_idx_ubyte(tmp_path / "i", 3)
    assert torch.equal(got, read_image_file(str(tmp_path / "i"))) and torch.equal(got, torch.from_numpy(img))
    assert torch.equal(D.read_idx_ubyte(tmp_path / "l", 1).long(), read_label_file(str(tmp_path / "l")))
    (tmp_path / "short").write_bytes((tmp_path / "i").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"declares shape \(7, 5, 3\) \(105 bytes\) but holds 104 bytes"):
        D.read_idx_ubyte(tmp_path / "short", 3)
    with pytest.raises(DataError, match="not an IDX file of 1-dimensional unsigned bytes"):
        D.read_idx_ubyte(tmp_path / "i", 1)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="header empty"):
        D.read_idx_ubyte(tmp_path / "empty", 3)


def test_damaged_fashion_mnist_file_is_one_clear_error(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in D.FASHION_MNIST_FILES["test"]:
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match=r"could not read Fashion-MNIST from .*prepare-data"):
        open_dataset("fashion-mnist", "test", str(tmp_path))


@needs_debian
def test_fingerprint_is_content_derived(fmnist_root, tmp_path):
    fp = open_dataset("fashion-mnist", "test", str(fmnist_root)).fingerprint
    copy = tmp_path / "elsewhere"
    shutil.copytree(fmnist_root / "FashionMNIST", copy / "FashionMNIST")
    assert open_dataset("fashion-mnist", "test", str(copy)).fingerprint == fp
    labels = copy / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8] = (raw[8] + 1) % 10  # first label: 9 -> 0
    labels.write_bytes(bytes(raw))
    changed = open_dataset("fashion-mnist", "test", str(copy))
    assert changed.labels[0] == 0
    assert changed.fingerprint != fp


@needs_debian
def test_lazy_preparation_from_debian_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = open_dataset("fashion-mnist", "test")  # default root data/fashion-mnist
    assert spec.root == "data/fashion-mnist"
    assert (tmp_path / "data/fashion-mnist/FashionMNIST/raw/t10k-images-idx3-ubyte").is_file()
    assert not list((tmp_path / "data/fashion-mnist/FashionMNIST/raw").glob(".*tmp*"))


def test_missing_debian_files_tell_the_user_what_to_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "root", source=tmp_path / "no-such-dir")


@pytest.mark.parametrize("name, split, root, match", [
    ("mnist-fashion", "train", None, r"unknown data set 'mnist-fashion'; (did you mean '[a-z0-9-]+'\? )?valid names are .*fashion-mnist.*cifar10"),
    ("fashion-mnist", "valid", None, r"unknown split 'valid'; valid splits are \['train', 'test'\]"),
    ("cifar10", "train", None, r"cifar10 needs a root folder: pass --root"),
    ("cifar100", "test", "EMPTY", r"cifar100 files not found or corrupted under .*cifar-100-python"),
    ("imagefolder", "train", None, r"imagefolder needs a root folder"),
    ("no_such_module_xyz:build", "train", None, r"cannot import module 'no_such_module_xyz'"),
    ("os:nothing_here", "train", None, r"module 'os' has no attribute 'nothing_here'"),
])
def test_bad_data_set_requests(name, split, root, match, tmp_path):
    with pytest.raises(DataError, match=match):
        open_dataset(name, split, str(tmp_path) if root == "EMPTY" else root)


# --------------------------------------------------------------------------- CIFAR (layout of the python version)

def _write_cifar10(base: Path, seed: int = 0) -> np.ndarray:
    """Fake CIFAR-10 python batches (2 images each); returns the test batch's raw rows (n, 3072)."""
    import pickle

    rng = np.random.default_rng(seed)
    base.mkdir(parents=True)
    rows = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [3, 7]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return rows


def test_cifar10_reader_layout_and_fingerprint(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake files have other md5s
    rows = _write_cifar10(tmp_path / "a" / "cifar-10-batches-py")
    train = open_dataset("cifar10", "train", str(tmp_path / "a"))
    test = open_dataset("cifar10", "test", str(tmp_path / "a"))
    assert (len(train), len(test), test.num_classes, test.in_channels, test.image_size) == (10, 2, 10, 3, 32)
    assert test.labels.tolist() == [3, 7]
    # a row is channel-major: R plane, G plane, B plane, each 32×32 row by row
    mean, std = D.NORMALIZATION["cifar10"]
    x, _ = test.dataset[1]
    for c, r, w in ((0, 0, 0), (1, 5, 31), (2, 31, 7)):
        ref = (rows[1, c * 1024 + r * 32 + w] / 255 - mean[c]) / std[c]
        assert x[c, r, w].item() == pytest.approx(ref, abs=1e-5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert open_dataset("cifar10", "test", str(tmp_path / "b")).fingerprint == test.fingerprint
    _write_cifar10(tmp_path / "c" / "cifar-10-batches-py", seed=1)
    assert open_dataset("cifar10", "test", str(tmp_path / "c")).fingerprint != test.fingerprint


# --------------------------------------------------------------------------- ImageFolder

def _write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path / "a")
    spec = open_dataset("imagefolder", "train", str(tmp_path / "a"), image_size=8)
    assert (spec.num_classes, spec.in_channels, spec.image_size, len(spec)) == (2, 3, 8, 6)
    assert spec.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert spec.dataset[0][0].shape == (3, 8, 8)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert open_dataset("imagefolder", "train", str(tmp_path / "b"), image_size=8).fingerprint == spec.fingerprint
    (tmp_path / "b" / "train" / "dog" / "2.png").rename(tmp_path / "b" / "train" / "dog" / "3.png")
    assert open_dataset("imagefolder", "train", str(tmp_path / "b"), image_size=8).fingerprint != spec.fingerprint


# --------------------------------------------------------------------------- module:callable

USER_DATA = '''
import torch
from torch.utils.data import Dataset

class Blobs(Dataset):
    def __init__(self, n, shift, declare):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 8, 8, generator=g) + shift
        self.y = [i % 3 for i in range(n)]
        if declare:
            self.num_classes = 5
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def build(split="train"):
    return Blobs(30 if split == "train" else 12, 0.0, declare=True)

def shifted():
    return Blobs(30, 1.0, declare=False)

def not_a_dataset():
    return 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_data_h2.py").write_text(textwrap.dedent(USER_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_data_h2"


def test_module_callable_dataset(user_module):
    train = open_dataset(f"{user_module}:build", "train")
    test = open_dataset(f"{user_module}:build", "test")
    assert (len(train), len(test)) == (30, 12)
    assert (train.num_classes, train.in_channels, train.image_size) == (5, 3, 8)  # declared num_classes
    assert train.labels.tolist()[:4] == [0, 1, 2, 0]
    again = open_dataset(f"{user_module}:build", "train")
    assert again.fingerprint == train.fingerprint
    other = open_dataset(f"{user_module}:shifted", "train")  # same labels and shapes, other pixels
    assert other.num_classes == 3  # inferred from labels
    assert other.fingerprint != train.fingerprint
    xb, yb = get_batch(train.dataset, [2, 0])
    assert torch.equal(xb[1], train.dataset[0][0]) and yb.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"returned a int; expected a map-style torch Dataset"):
        open_dataset(f"{user_module}:not_a_dataset")


# --------------------------------------------------------------------------- augmentation

def test_augment_params_are_a_pure_function_of_seed_id_view():
    a = make_augmenter("crop-flip", seed=7, image_size=28)
    assert a.param_names == ("top", "left", "flip")
    ids = np.arange(1000)
    p = a.sample_params(ids, view=2)
    assert p.shape == (1000, 3) and p.dtype == np.float32
    # any subset, in any order, on a fresh object (another rank, a resumed run) gives the same rows
    sub = np.array([999, 3, 500])
    assert np.array_equal(CropFlip(7, 28).sample_params(sub, 2), p[sub])
    assert not np.array_equal(make_augmenter("crop-flip", 8, 28).sample_params(ids, 2), p)  # other seed
    assert not np.array_equal(a.sample_params(ids, 3), p)  # other view
    # every offset 0..8 and both flips occur
    assert set(p[:, 0].astype(int)) == set(range(9)) == set(p[:, 1].astype(int))
    assert set(p[:, 2].astype(int)) == {0, 1}


def test_augment_apply_matches_reference_and_replays_exactly():
    a = make_augmenter("crop-flip", seed=0, image_size=8)
    x = torch.randn(16, 2, 8, 8)
    p = a.sample_params(np.arange(16), view=0)
    out = a.apply(x, p)
    for i in range(16):  # independent reference: pad with zeros, slice, flip
        top, left, flip = (int(v) for v in p[i])
        ref = F.pad(x[i], (4, 4, 4, 4))[:, top:top + 8, left:left + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip else ref)
    assert torch.equal(a.apply(x, torch.from_numpy(p)), out)  # tensor params, same pixels
    assert torch.equal(a.apply(x, np.array([[4, 4, 0]] * 16, dtype=np.float32)), x)  # centre, no flip = identity


@pytest.mark.parametrize("params, match", [
    (np.zeros((3, 3), np.float32), r"must be \(B, 3\) = \(4, 3\)"),
    (np.full((4, 3), 9, np.float32), r"out of range: top/left must be integers in \[0, 8\]"),
    (np.array([[0, 0, 2]] * 4, np.float32), r"flip 0 or 1"),
    (np.full((4, 3), 0.5, np.float32), r"out of range"),
])
def test_augment_bad_params(params, match):
    with pytest.raises(DataError, match=match):
        CropFlip(0, 8).apply(torch.zeros(4, 1, 8, 8), params)


def test_make_augmenter_kinds():
    assert make_augmenter("none", 0, 28) is None
    with pytest.raises(ConfigError, match=r"unknown augmentation 'mixup'; valid kinds are \['none', 'crop-flip'\]"):
        make_augmenter("mixup", 0, 28)
