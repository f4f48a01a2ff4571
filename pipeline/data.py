"""Labelled image data sets behind one small interface, with content-derived fingerprints.

:func:`open_dataset` turns a name (``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` or a user's
``module:callable``) into a :class:`DatasetSpec`: a deterministic torch ``Dataset`` of
(float image tensor (C, H, W), int label) with the transform already applied, plus what downstream stages
need to know about it — number of classes, channels, image size, all labels, a description of the
transform, and a fingerprint derived from the *content* (file bytes), never from the path, so a store built
from one copy of the data is accepted for any other copy and refused for different data.

File-backed sets (Fashion-MNIST, CIFAR) keep the decoded uint8 images in memory and normalise per item;
their dataset also has ``get_batch(indices)`` that normalises a whole batch at once — see
:func:`get_batch` — because the cache and student stages walk 60k images many times on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from loca_pipe.pipeline.errors import ConfigError, DataError, LocaError, did_you_mean

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_FASHION_MNIST_ROOT = "data/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-channel statistics of the *training* split of each set, in [0, 1] pixel units.
# Fashion-MNIST: measured here over all 60000×28×28 training pixels (0.28604, 0.35302).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the ImageNet statistics
}
SPLITS = ("train", "test")
from loca_pipe.pipeline.names import DATASETS  # defined in the torch-free leaf, for the CLI
# module:callable fingerprints hash this many evenly spaced items (plus the length and all labels).
FINGERPRINT_SAMPLE_ITEMS = 64
_FINGERPRINT_VERSION = b"loca-pipe-fingerprint-v1"


@dataclass
class DatasetSpec:
    """An opened data set and what stages need to know about it."""

    name: str
    split: str
    root: str | None
    dataset: Dataset  # items: (float32 image (C, H, W), int label); transform applied; deterministic
    num_classes: int
    in_channels: int
    image_size: int
    fingerprint: str  # sha256 hex of the content (see module docstring / docs/data-and-models.md)
    transform: str  # human-readable description of the transform applied to every item
    labels: np.ndarray = field(repr=False)  # (N,) int64, every label in item order
    class_names: tuple[str, ...] = ()  # one name per class when the data set has them (figures, tables)

    def __len__(self) -> int:
        return len(self.labels)


class TensorImageDataset(Dataset):
    """Decoded uint8 images (N, C, H, W) kept in memory, normalised on the fly.

    ``self[i]`` equals torchvision's ``Normalize(mean, std)(ToTensor()(image))`` bit for bit (same
    operations in the same order); :meth:`get_batch` does the same for a whole batch in three tensor ops.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.targets = labels.to(torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std), int(self.targets[index])

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float32 and labels (B,) int64 for ``indices``, normalised as ``self[i]``."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        x = self.images[idx].to(torch.float32).div_(255)
        return x.sub_(self.mean).div_(self.std), self.targets[idx]


def get_batch(dataset: Dataset, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, C, H, W), labels (B,) int64) for ``indices``: the fast path when the data set has one."""
    fast = getattr(dataset, "get_batch", None)
    if callable(fast):
        return fast(indices)
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
    return images, labels


# --------------------------------------------------------------------------- fingerprints

_FINGERPRINTS: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def fingerprint_files(kind: str, files: Sequence[tuple[str, Path]]) -> str:
    """sha256 over ``kind`` and, per file in the given order, its logical name, length and bytes.

    The logical name is a path *relative to the data set root* (or a fixed file name), so the same files
    at another location give the same fingerprint. Cached per process by (path, size, mtime, inode).
    """
    key = (kind, tuple((name, _file_key(p)) for name, p in files))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    h.update(_FINGERPRINT_VERSION + b"\0" + kind.encode() + b"\0")
    for name, path in files:
        h.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def fingerprint_samples(dataset: Dataset, labels: np.ndarray, n_items: int = FINGERPRINT_SAMPLE_ITEMS) -> str:
    """sha256 over the length, all labels and ``n_items`` evenly spaced items (float32 bytes + shape).

    For data sets that are not backed by files we know (``module:callable``). Limitation: a change in an
    item that is not sampled is not seen (labels are always fully hashed).
    """
    n = len(labels)
    h = hashlib.sha256()
    h.update(_FINGERPRINT_VERSION + b"\0module:callable\0" + n.to_bytes(8, "little"))
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    for i in sorted(set(np.linspace(0, n - 1, num=min(n, n_items)).round().astype(np.int64).tolist())) if n else []:
        x, y = dataset[i]
        x = torch.as_tensor(x).detach().to(torch.float32).contiguous().cpu()
        h.update(str((i, tuple(x.shape), int(y))).encode())
        h.update(x.numpy().astype("<f4").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- Fashion-MNIST

def _fmnist_raw(root: str | Path) -> Path:
    return Path(root) / "FashionMNIST" / "raw"


def prepare_fashion_mnist(root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
                          source: str | Path = DEBIAN_FASHION_MNIST) -> Path:
    """Copy + gunzip the four IDX files from ``source`` into ``<root>/FashionMNIST/raw/`` (where torchvision
    looks). Files already there are kept. Each file is written to a temporary name, then renamed, so a
    concurrent reader never sees half a file. Returns the raw folder.
    """
    raw = _fmnist_raw(root)
    wanted = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in wanted if not (raw / name).is_file()]
    if not missing:
        return raw
    source = Path(source)
    absent = [name for name in missing if not (source / f"{name}.gz").is_file() and not (source / name).is_file()]
    if absent:
        raise DataError(
            f"Fashion-MNIST files {absent} are neither in {str(raw)!r} nor in {str(source)!r}; install the "
            f"Debian package with `sudo apt-get install dataset-fashion-mnist` (or `make setup`), or put the "
            f"IDX files into {str(raw)!r}")
    raw.mkdir(parents=True, exist_ok=True)
    from loca_pipe.pipeline.io import atomic_write

    for name in missing:
        gz = source / f"{name}.gz"

        def copy(dst, gz=gz, name=name):
            with (gzip.open(gz, "rb") if gz.is_file() else open(source / name, "rb")) as src:
                shutil.copyfileobj(src, dst, 1 << 22)

        try:
            atomic_write(raw / name, copy)  # a crash or a bad archive leaves no partial file
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"could not prepare Fashion-MNIST file {name!r} from {str(source)!r} "
                            f"into {str(raw)!r}: {exc}") from exc
    return raw


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx_ubyte(path: str | Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (the MNIST format: 2 zero bytes, type 0x08, the number of dimensions, each
    dimension as a big-endian uint32, then the bytes) as a uint8 tensor of that shape: what torchvision's
    ``read_image_file`` / ``read_label_file`` return (tested), without importing torchvision (~2 s here, in every
    process that opens the data). Anything else is a DataError naming the file."""
    data = Path(path).read_bytes()
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{str(path)!r} is not an IDX file of {ndim}-dimensional unsigned bytes (header "
                        f"{data[:4].hex() or 'empty'}, expected 000008{ndim:02x})")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = len(data) - 4 - 4 * ndim
    if body != int(np.prod(shape)):
        raise DataError(f"{str(path)!r} declares shape {tuple(shape)} ({int(np.prod(shape))} bytes) but holds "
                        f"{body} bytes after its header: a truncated or damaged file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(*shape)


def _open_fashion_mnist(split: str, root: str | None) -> DatasetSpec:
    root = root or DEFAULT_FASHION_MNIST_ROOT
    raw = prepare_fashion_mnist(root)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    try:
        images, labels = read_idx_ubyte(raw / images_file, 3), read_idx_ubyte(raw / labels_file, 1).long()
    except (OSError, DataError) as exc:
        raise DataError(f"could not read Fashion-MNIST from {str(raw)!r}: {exc}; delete that "
                        f"folder and run `loca-pipe prepare-data` again") from exc
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {str(raw)!r} has {len(images)} images but {len(labels)} labels; delete "
                        f"that folder and run `loca-pipe prepare-data` again")
    mean, std = NORMALIZATION["fashion-mnist"]
    ds = TensorImageDataset(images.unsqueeze(1), labels, mean, std)  # (N, 1, 28, 28)
    files = [(name, raw / name) for name in FASHION_MNIST_FILES[split]]
    return DatasetSpec(
        name="fashion-mnist", split=split, root=str(root), dataset=ds, num_classes=len(FASHION_MNIST_CLASSES),
        class_names=FASHION_MNIST_CLASSES,
        in_channels=1, image_size=28, fingerprint=fingerprint_files(f"fashion-mnist/{split}", files),
        transform=f"ToTensor; Normalize(mean={mean}, std={std})", labels=ds.targets.numpy().copy())


# --------------------------------------------------------------------------- CIFAR

def _open_cifar(name: str, split: str, root: str | None) -> DatasetSpec:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    if not root:
        raise DataError(f"{name} needs a root folder: pass --root PATH (the folder that holds "
                        f"{cls.base_folder!r}); loca-pipe never downloads data")
    try:
        tv = cls(root, train=(split == "train"), download=False)
    except RuntimeError as exc:
        raise DataError(f"{name} files not found or corrupted under {str(Path(root) / cls.base_folder)!r} "
                        f"({exc}); download the python version of {name} "
                        f"({cls.url}) and unpack it into {root!r}") from exc
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    mean, std = NORMALIZATION[name]
    ds = TensorImageDataset(images, torch.as_tensor(tv.targets), mean, std)
    base = Path(root) / cls.base_folder
    names = [n for n, _ in (cls.train_list if split == "train" else cls.test_list)] + [cls.meta["filename"]]
    return DatasetSpec(
        name=name, split=split, root=str(root), dataset=ds, num_classes=len(tv.classes), in_channels=3,
        class_names=tuple(str(c) for c in tv.classes),
        image_size=32, fingerprint=fingerprint_files(f"{name}/{split}", [(n, base / n) for n in names]),
        transform=f"ToTensor; Normalize(mean={mean}, std={std})", labels=ds.targets.numpy().copy())


# --------------------------------------------------------------------------- ImageFolder

def _open_imagefolder(split: str, root: str | None, image_size: int | None) -> DatasetSpec:
    from torchvision import datasets, transforms

    if not root:
        raise DataError("imagefolder needs a root folder: pass --root PATH (with class sub-folders, or "
                        "train/ and val/ folders that hold them)")
    base = Path(root)
    candidates = [base / split] + ([base / "val"] if split == "test" else []) + [base]
    folder = next((c for c in candidates if c.is_dir() and c != base), base)
    if not folder.is_dir():
        raise DataError(f"imagefolder root {str(base)!r} is not a folder")
    size = image_size or 224
    resize = int(round(size / 0.875))
    mean, std = NORMALIZATION["imagefolder"]
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    try:
        tv = datasets.ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: could not read {str(folder)!r}: {exc}; expected one sub-folder per "
                        f"class holding image files") from exc
    files = sorted((Path(p).relative_to(folder).as_posix(), Path(p)) for p, _ in tv.samples)
    return DatasetSpec(
        name="imagefolder", split=split, root=str(folder), dataset=tv, num_classes=len(tv.classes),
        class_names=tuple(str(c) for c in tv.classes),
        in_channels=3, image_size=size, fingerprint=fingerprint_files("imagefolder", files),
        transform=f"RGB; Resize({resize}); CenterCrop({size}); ToTensor; Normalize(mean={mean}, std={std})",
        labels=np.asarray(tv.targets, dtype=np.int64))


# --------------------------------------------------------------------------- module:callable

def load_callable(spec: str, what: str, error: type[LocaError] = ConfigError) -> Callable[..., Any]:
    """Import ``module:callable`` (the current folder is tried too); ``what`` names it in errors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r}: expected the form 'module:callable', e.g. 'mypkg.data:build'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if os.getcwd() in sys.path or exc.name != module_name.split(".")[0]:
            raise error(f"{what} {spec!r}: cannot import module {module_name!r} ({exc}); make it "
                              f"importable (install it or add its folder to PYTHONPATH)") from exc
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc2:
            raise error(f"{what} {spec!r}: cannot import module {module_name!r} ({exc2}); make it "
                              f"importable (install it or add its folder to PYTHONPATH)") from exc2
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise error(f"{what} {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def call_with_supported(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with those of ``kwargs`` its signature accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _open_callable(name: str, split: str, root: str | None) -> DatasetSpec:
    fn = load_callable(name, "data set", DataError)
    ds = call_with_supported(fn, split=split, root=root)
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise DataError(f"data set {name!r} returned a {type(ds).__name__}; expected a map-style torch "
                        f"Dataset of (image tensor, int label) with __len__ and __getitem__")
    n = len(ds)
    if n == 0:
        raise DataError(f"data set {name!r} ({split}) is empty")
    x0, _ = ds[0]
    if not isinstance(x0, torch.Tensor) or x0.ndim != 3:
        got = f"{type(x0).__name__} {tuple(x0.shape)}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise DataError(f"data set {name!r}: item 0 holds a {got}; expected an image tensor (C, H, W)")
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == n:
        labels = np.asarray(targets, dtype=np.int64)
    else:  # no cheap labels: read every item once
        labels = np.fromiter((int(ds[i][1]) for i in range(n)), dtype=np.int64, count=n)
    declared = getattr(ds, "num_classes", None)
    num_classes = int(declared) if declared is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"data set {name!r}: labels span [{labels.min()}, {labels.max()}] but num_classes is "
                        f"{num_classes}; labels must lie in [0, num_classes)")
    names = getattr(ds, "class_names", None) or getattr(ds, "classes", None)
    names = tuple(str(c) for c in names) if names is not None and len(names) == num_classes else ()
    return DatasetSpec(
        name=name, split=split, root=root, dataset=ds, num_classes=num_classes, in_channels=int(x0.shape[0]),
        class_names=names,
        image_size=int(x0.shape[-1]), fingerprint=fingerprint_samples(ds, labels),
        transform=str(getattr(ds, "transform_description", f"as returned by {name}")), labels=labels)


# --------------------------------------------------------------------------- entry point

def open_dataset(name: str, split: str = "train", root: str | None = None, *,
                 image_size: int | None = None) -> DatasetSpec:
    """Open data set ``name`` (``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` or
    ``module:callable``) at ``split`` (``train`` | ``test``). ``image_size`` applies to ``imagefolder`` only
    (centre crop side, default 224). Fashion-MNIST is prepared from the Debian files if ``root`` lacks it.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")
    if ":" in name:
        return _open_callable(name, split, root)
    if name == "fashion-mnist":
        return _open_fashion_mnist(split, root)
    if name in ("cifar10", "cifar100"):
        return _open_cifar(name, split, root)
    if name == "imagefolder":
        return _open_imagefolder(split, root, image_size)
    raise DataError(f"unknown data set {name!r}; {did_you_mean(name, DATASETS)}valid names are {list(DATASETS)} "
                    f"(module:callable = a function returning a torch Dataset of (image, label))")
