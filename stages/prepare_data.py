"""Stage `prepare-data`: put a data set where the readers expect it and record its fingerprints.

For ``fashion-mnist`` the four IDX files of the Debian package ``dataset-fashion-mnist`` are copied and
gunzipped into ``<root>/FashionMNIST/raw/`` (torchvision's layout). For every data set both splits are then
opened once (which checks the files) and ``<root>/fingerprints.json`` (or ``record``) records name, size, classes and the
content fingerprint of each split — a small DVC output that changes exactly when the data does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loca_pipe.pipeline.data import DEBIAN_FASHION_MNIST, DEFAULT_FASHION_MNIST_ROOT, SPLITS, open_dataset, \
    prepare_fashion_mnist
from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.io import write_json
from loca_pipe.stages import Report

SECTION = "prepare_data"


@dataclass(frozen=True)
class PrepareDataParams:
    dataset: str = "fashion-mnist"
    root: str | None = None  # fashion-mnist default: data/fashion-mnist
    source: str = str(DEBIAN_FASHION_MNIST)  # where the Debian package puts the Fashion-MNIST .gz files
    record: str | None = None  # where to write the fingerprint record; default <root>/fingerprints.json


def fingerprints_path(root: str | Path) -> Path:
    return Path(root) / "fingerprints.json"


def run(p: PrepareDataParams) -> Report:
    """Prepare the files (Fashion-MNIST) and write ``<root>/fingerprints.json``; its content is the report."""
    root = p.root or (DEFAULT_FASHION_MNIST_ROOT if p.dataset == "fashion-mnist" else None)
    if root is None:
        raise ConfigError(f"{SECTION}: data set {p.dataset!r} needs a root folder (--root PATH)")
    if p.dataset == "fashion-mnist":
        prepare_fashion_mnist(root, p.source)
    out: dict[str, Any] = {"dataset": p.dataset, "splits": {}}
    for split in SPLITS:
        spec = open_dataset(p.dataset, split, root)
        out["splits"][split] = {"num_samples": len(spec), "num_classes": spec.num_classes,
                                "in_channels": spec.in_channels, "image_size": spec.image_size,
                                "fingerprint": spec.fingerprint, "transform": spec.transform}
    path = Path(p.record) if p.record else fingerprints_path(root)
    write_json(path, out)
    text = "\n".join(f"{p.dataset} {split}: {s['num_samples']} samples, {s['num_classes']} classes, "
                     f"{s['in_channels']}x{s['image_size']}x{s['image_size']}, fingerprint {s['fingerprint'][:16]}"
                     for split, s in out["splits"].items())
    return Report(SECTION, out, {"record": str(path)}, text)
