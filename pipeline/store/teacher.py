"""One teacher of a logit store: :class:`TeacherWriter` (chunk by chunk, each chunk whole before its done flag) and
:class:`TeacherView` (CRC32C-checked reads and exact probabilities at any declared τ).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from loca_pipe.pipeline import layout
from loca_pipe.pipeline.codecs import codec_of, encode_checked
from loca_pipe.pipeline.errors import NumericsError, StoreError
from loca_pipe.pipeline.store.checked import CheckedArray, read_checked
from loca_pipe.pipeline.store.format import ATTR, find_tau, now

if TYPE_CHECKING:  # the store opens its teachers; a teacher only names its store
    from loca_pipe.pipeline.store.logit_store import LogitStore


class TeacherWriter:
    """Writes one teacher chunk by chunk; each chunk is whole before its done flag is set."""

    def __init__(self, store: "LogitStore", name: str, group: zarr.Group):
        self.store, self.name, self.group = store, name, group
        a = dict(group.attrs[ATTR])
        self.top_k, self.temperatures, self.logits_dtype = a["top_k"], a["temperatures"], a["logits_dtype"]
        self.codec = codec_of(a)
        R = store.info.num_rows
        summary = layout.arrays(layout.TEACHER, writer=layout.SUMMARY)
        # what write_chunk needs (the codec's inputs, then the other summaries this teacher stores) and writes as is
        self.plain = [a.name for a in summary if not a.codec and (a.name in group or a.name != "logits")]
        self.need = [a.name for a in summary if a.codec] + [k for k in self.plain if k != "logits"] + \
            (["logits"] if "logits" in self.plain else [])
        standard = {*(a.name for a in layout.arrays(layout.TEACHER) if a.writer != layout.JOB),
                    *self.codec.arrays(store.info.num_classes, 1, 1)}
        # the job's own row arrays (e.g. sampled ids): written with each chunk, before its done flag
        self.extra_rows = list(a["row_arrays"]) if "row_arrays" in a else \
            [k for k in group.array_keys() if k not in standard and group[k].shape[:1] == (R,)]

    def pending_chunks(self) -> list[int]:
        return self.store.pending_chunks(self.name)

    def write_chunk(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk ``c``: ``arrays`` holds topk_logits, topk_ids, lse, label_logit (and logits if stored,
        and the teacher's extra row arrays); the codec turns the top-k into what is stored, then the flag."""
        sl = self.store.info.chunk_slice(c)
        n = sl.stop - sl.start
        for k in self.need + self.extra_rows:
            if k not in arrays:
                raise StoreError(f"chunk {c}: missing array {k!r}")
            if arrays[k].shape[0] != n:
                raise StoreError(f"chunk {c}: {k} has {arrays[k].shape[0]} rows, the chunk has {n}")
        if self.logits_dtype:
            with np.errstate(over="ignore"):  # overflow is detected just below, with the row numbers
                z = np.asarray(arrays["logits"]).astype(self.logits_dtype)
            if not np.isfinite(z).all():
                bad = np.flatnonzero(~np.isfinite(z).all(axis=1)) + sl.start
                raise NumericsError(f"logits of rows {bad[:20].tolist()} overflow {self.logits_dtype}; "
                                    f"cache with --logits-dtype float32")
            self.group["logits"][sl] = z
        coded = encode_checked(self.codec, np.asarray(arrays["topk_logits"], np.float32), np.asarray(arrays["topk_ids"]),
                               np.asarray(arrays["lse"], np.float32), self.temperatures, self.store.info.num_classes)
        for k in self.extra_rows:
            self.group[k][sl] = np.asarray(arrays[k]).astype(self.group[k].dtype)
        for k, v in {**coded, **{k: arrays[k] for k in self.plain if k != "logits"}}.items():
            self.group[k][sl] = np.asarray(v).astype(self.group[k].dtype)
        self.group["done"][c] = 1

    def finalize(self) -> bool:
        """Mark the teacher complete if every chunk is done; returns whether it is."""
        if self.pending_chunks():
            return False
        a = dict(self.group.attrs[ATTR])
        if a.get("complete"):
            return True  # already finalised: keep its record untouched
        a.update(complete=True, finished=now())
        self.group.attrs[ATTR] = a
        return True


class TeacherView:
    """Read access to one complete teacher: zarr arrays plus exact probabilities at any stored τ."""

    def __init__(self, store: "LogitStore", name: str, group: zarr.Group):
        self.store, self.name, self.group = store, name, group
        self.attrs = dict(group.attrs[ATTR])
        self.temperatures: list[float] = list(self.attrs["temperatures"])
        self.top_k: int = int(self.attrs["top_k"])
        self.has_full_logits: bool = "logits" in group

    def __getitem__(self, key: str) -> "CheckedArray":
        """Array ``key`` (a zarr array wrapper whose reads name a chunk that fails its CRC32C)."""
        if layout.spec(key) is not None and layout.spec(key).where == layout.ROOT and layout.spec(key).writer == layout.ROWS:
            return CheckedArray(self.store.group[key])
        if key not in self.group:
            raise StoreError(f"teacher {self.name!r} has no array {key!r}; it has {sorted(self.group.array_keys())}")
        return CheckedArray(self.group[key])

    def read(self, key: str, rows: Any = None) -> np.ndarray:
        """Rows of array ``key`` (all, a slice or indices); a chunk failing its CRC32C raises a StoreError naming it."""
        return read_checked(self[key].zarr, rows)

    def tau_index(self, tau: float) -> int:
        i = find_tau(self.temperatures, tau)
        if i is not None:
            return i
        if self.has_full_logits:
            return -1
        raise StoreError(f"temperature {tau} was not declared when teacher {self.name!r} was cached (it has "
                         f"{self.temperatures}) and the store keeps only top-k logits, so p at τ={tau} is unknowable; "
                         f"pass --tau as one of {self.temperatures}, or re-cache with --temperatures including {tau}")

    # -- exact probabilities ------------------------------------------------------------------------
    @staticmethod
    def _read(arr: zarr.Array, rows: Any) -> np.ndarray:
        return read_checked(arr, rows)

    def lse(self, tau: float, rows: Any = None) -> np.ndarray:
        """logsumexp(z/τ) per row (n,) float64: stored when τ was declared, else from the full logits."""
        i = self.tau_index(tau)
        if i >= 0:
            return self._read(self.group["lse"], rows)[:, i].astype(np.float64)
        z = self._read(self.group["logits"], rows).astype(np.float64) / tau
        m = z.max(axis=1, keepdims=True)
        return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]

    def probs(self, tau: float, rows: Any = None) -> np.ndarray:
        """Dense p = softmax(z/τ) (n, C) float32 from the full logits (any τ); needs full logits."""
        if not self.has_full_logits:
            raise StoreError(f"teacher {self.name!r} keeps only top-{self.top_k} logits; use .sparse(tau) "
                             f"(top-k + label probabilities) or re-cache with full logits")
        z = self._read(self.group["logits"], rows).astype(np.float64) / tau
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def sparse(self, tau: float, rows: Any = None) -> dict[str, np.ndarray]:
        """Exact top-k and label probabilities at τ: p_i = exp(z_i/τ − lse_τ) (docs/store-format.md).

        Returns ``topk_ids`` (n, K) int64, ``topk_probs`` (n, K) float32 (descending), ``label`` (n,) int64
        and ``label_prob`` (n,) float32 (p_y, exact even when y is outside the top-k).
        """
        lse = self.lse(tau, rows)[:, None]
        topv = self._read(self.group["topk_logits"], rows).astype(np.float64)
        return {"topk_ids": self._read(self.group["topk_ids"], rows).astype(np.int64),
                "topk_probs": np.exp(topv / tau - lse).astype(np.float32),
                "label": self._read(self.store.group["label"], rows).astype(np.int64),
                "label_prob": np.exp(self._read(self.group["label_logit"], rows).astype(np.float64) / tau
                                     - lse[:, 0]).astype(np.float32)}
