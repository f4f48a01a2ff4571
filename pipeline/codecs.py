"""How a teacher's top-k values and ids are stored: the codecs of the logit store (docs/store-format.md).

Every codec keeps ``lse`` (logsumexp(z/τ) per declared τ) and ``label_logit`` exact — they are written
beside it, untouched — so p_label and every τ change stay exact; a codec only decides how the K top-k
logits and their ids are kept. ``lossless`` (the default) stores them as they are (fp32 logits, the
narrowest integer ids).

A codec is: ``arrays(C, K, T)`` — the stored arrays {name: (width, dtype, fill)}; ``encode(topk_logits,
topk_ids, lse, temperatures)`` — arrays to write for a chunk; ``decode(arrays, lse, temperatures)`` —
(topk_logits (n, K) float32 descending, topk_ids (n, K) int64); ``check(C, K)`` — refuses a vocabulary
or k it cannot hold. The teacher's attributes record ``codec: {name, version, …}``; a reader older than
the codec's version refuses instead of misreading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, StoreError
from loca_pipe.pipeline.store import id_dtype




@dataclass(frozen=True)
class Lossless:
    """fp32 top-k logits and integer ids, bit-exact (what every store before codecs holds)."""

    name: str = "lossless"
    version: int = 1
    compress: bool = False

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def check(self, C: int, K: int) -> None:
        return None

    def arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_logits": (K, np.float32, 0), "topk_ids": (K, id_dtype(C), -1)}

    def encode(self, topk_logits: np.ndarray, topk_ids: np.ndarray, lse: np.ndarray,
               temperatures: Sequence[float]) -> dict[str, np.ndarray]:
        return {"topk_logits": topk_logits, "topk_ids": topk_ids}

    def decode(self, a: dict[str, np.ndarray], lse: np.ndarray, temperatures: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(a["topk_logits"], np.float32), np.asarray(a["topk_ids"]).astype(np.int64)


CODECS: dict[str, Any] = {"lossless": Lossless()}


def get_codec(name: str) -> Any:
    """The codec registered as ``name``; an unknown name lists the valid ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


def codec_of(teacher_attrs: dict[str, Any]) -> Any:
    """The codec a teacher was written with (no ``codec`` attribute: lossless); refuses a newer version."""
    a = teacher_attrs.get("codec") or {"name": "lossless", "version": 1}
    name, version = a.get("name"), int(a.get("version", 1))
    if name not in CODECS:
        raise StoreError(f"the teacher was written with codec {name!r} (version {version}), which this loca-pipe "
                         f"does not know (it reads {sorted(CODECS)}); upgrade loca-pipe to read it")
    codec = CODECS[name]
    if version > codec.version:
        raise StoreError(f"the teacher was written with codec {name!r} version {version}; this loca-pipe reads "
                         f"that codec up to version {codec.version}; upgrade loca-pipe to read it")
    return codec


__all__ = ["CODECS", "get_codec", "codec_of", "Lossless"]
