"""How a teacher's top-k values and ids are stored: the codecs of the logit store (docs/store-format.md).

Every codec keeps ``lse`` (logsumexp(z/τ) per declared τ) and ``label_logit`` exact — they are written
beside it, untouched — so p_label and every τ change stay exact; a codec only decides how the K top-k
logits and their ids are kept. ``lossless`` (the default) stores them as they are (fp32 logits, the
narrowest integer ids).

A codec is: ``arrays(C, K, T)`` — the stored arrays {name: (width, dtype, fill)}; ``encode(topk_logits,
topk_ids, lse, temperatures, C)`` — arrays to write for a chunk; ``decode(arrays, lse, temperatures, C, K)`` —
(topk_logits (n, K) float32 descending, topk_ids (n, K) int64); ``check(C, K)`` — refuses a vocabulary
or k it cannot hold. The teacher's attributes record ``codec: {name, version, …}``; a reader older than
the codec's version refuses instead of misreading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, StoreError


def id_dtype(num_classes: int) -> np.dtype:
    """Smallest signed integer dtype that holds every class id in [0, C). (fp16 ids are a known bug.)"""
    for dt in (np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


class _Codec:
    """What every codec shares: its identity in the teacher's attrs and, by default, no limit on C or K."""

    name: str
    version: int

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def check(self, C: int, K: int) -> None:
        return None


@dataclass(frozen=True)
class Lossless(_Codec):
    """fp32 top-k logits and integer ids, bit-exact (what every store before codecs holds)."""

    name: str = "lossless"
    version: int = 1
    compress: bool = False

    def arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_logits": (K, np.float32, 0), "topk_ids": (K, id_dtype(C), -1)}

    def encode(self, topk_logits: np.ndarray, topk_ids: np.ndarray, lse: np.ndarray,
               temperatures: Sequence[float], C: int) -> dict[str, np.ndarray]:
        return {"topk_logits": topk_logits, "topk_ids": topk_ids}

    def decode(self, a: dict[str, np.ndarray], lse: np.ndarray, temperatures: Sequence[float], C: int,
               K: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(a["topk_logits"], np.float32), np.asarray(a["topk_ids"]).astype(np.int64)


def _lp(topk_logits: np.ndarray, lse: np.ndarray, temperatures: Sequence[float]) -> tuple[np.ndarray, float]:
    """Log-probs at the first declared τ (τ0): lp = z/τ0 − lse_τ0 (exact lse, so z = τ0·(lp + lse_τ0))."""
    t0 = float(temperatures[0])
    return topk_logits.astype(np.float64) / t0 - lse[:, :1].astype(np.float64), t0


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """(n, K) non-negative ints < 2**bits → (n, ⌈K·bits/8⌉) uint8, big-endian bit order within each value."""
    n, K = x.shape
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    b = ((x.astype(np.uint64)[:, :, None] >> shifts) & 1).astype(np.uint8)     # (n, K, bits)
    return np.packbits(b.reshape(n, K * bits), axis=1)


def unpack_bits(packed: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (n, K) int64."""
    n = packed.shape[0]
    b = np.unpackbits(np.asarray(packed, np.uint8), axis=1)[:, :K * bits].reshape(n, K, bits).astype(np.int64)
    return b @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))


def id_bits(C: int) -> int:
    """⌈log₂ C⌉ (at least 1): the bits every id in [0, C) needs."""
    return max(1, int(C - 1).bit_length())


class _IdsPacked(_Codec):
    """Ids bit-packed to ⌈log₂ C⌉ bits in the array ``topk_idbits``."""

    def _id_arrays(self, C: int, K: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_idbits": (-(-K * id_bits(C) // 8), np.uint8, 0)}

    def _enc_ids(self, ids: np.ndarray, C: int) -> dict[str, np.ndarray]:
        return {"topk_idbits": pack_bits(ids, id_bits(C))}

    def _dec_ids(self, a: dict[str, np.ndarray], C: int, K: int) -> np.ndarray:
        return unpack_bits(a["topk_idbits"], K, id_bits(C))


@dataclass(frozen=True)
class HalfLogprob(_Codec):
    """Log-probs at τ0 in fp16 (or bf16, kept as the top 16 bits of the fp32, round-to-nearest-even);
    ids as in lossless. Error ≤ 2^-11 (fp16) / 2^-8 (bf16) relative, per value."""

    name: str = "fp16"
    bf16: bool = False
    version: int = 1
    compress: bool = False

    def arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_lp16": (K, np.uint16 if self.bf16 else np.float16, 0), "topk_ids": (K, id_dtype(C), -1)}

    def encode(self, topk_logits, topk_ids, lse, temperatures, C):
        lp, _ = _lp(topk_logits, lse, temperatures)
        if self.bf16:
            u = lp.astype(np.float32).view(np.uint32).astype(np.uint64)
            half = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
        else:
            half = lp.astype(np.float16)
        return {"topk_lp16": half, "topk_ids": topk_ids}

    def decode(self, a, lse, temperatures, C, K):
        t0 = float(temperatures[0])
        h = np.asarray(a["topk_lp16"])
        lp = (h.astype(np.uint32) << 16).view(np.float32) if self.bf16 else h.astype(np.float32)
        z = (t0 * (lp.astype(np.float64) + lse[:, :1])).astype(np.float32)
        return z, np.asarray(a["topk_ids"]).astype(np.int64)


@dataclass(frozen=True)
class Q8(_IdsPacked):
    """The first ``m`` logits exact (fp32); the rest as 8-bit offsets below the row maximum, uniform on
    [0, span] with span = z_0 − z_{K−1} (fp32 per row); ids bit-packed. Error ≤ span/510 per value."""

    name: str = "q8"
    m: int = 4
    version: int = 1
    compress: bool = True

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "m": self.m}

    def arrays(self, C, K, T):
        m = min(self.m, K)
        return {"topk_head": (m, np.float32, 0), "topk_span": (1, np.float32, 0), "topk_q8": (K - m, np.uint8, 0),
                **self._id_arrays(C, K)}

    def encode(self, topk_logits, topk_ids, lse, temperatures, C):
        m = min(self.m, topk_logits.shape[1])
        z = topk_logits.astype(np.float64)
        span = z[:, :1] - z[:, -1:]
        d = (z[:, :1] - z[:, m:]) / np.where(span > 0, span, 1.0)
        return {"topk_head": topk_logits[:, :m], "topk_span": span.astype(np.float32),
                "topk_q8": np.clip(np.rint(d * 255), 0, 255).astype(np.uint8), **self._enc_ids(topk_ids, C)}

    def decode(self, a, lse, temperatures, C, K):
        head = np.asarray(a["topk_head"], np.float64)
        q = np.asarray(a["topk_q8"], np.float64)
        tail = head[:, :1] - q / 255 * np.asarray(a["topk_span"], np.float64)
        z = np.concatenate([head, np.minimum(tail, head[:, -1:])], axis=1)  # z_m ≤ z_{m−1}: never less exact
        return z.astype(np.float32), self._dec_ids(a, C, K)


@dataclass(frozen=True)
class PolyTail(_IdsPacked):
    """DistillKit's published scheme, re-implemented from its description (the anchor): the first
    ``exact`` log-probs at τ0 in fp16, the remaining K − exact fitted by one least-squares polynomial of
    degree ``degree`` in the normalised rank (coefficients fp32 per row), ids bit-packed."""

    name: str = "polytail"
    exact: int = 16
    degree: int = 8
    version: int = 1
    compress: bool = True

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "exact": self.exact, "degree": self.degree}

    def check(self, C: int, K: int) -> None:
        if K <= self.exact + self.degree:
            raise ConfigError(f"codec {self.name!r} fits a degree-{self.degree} polynomial to the top-k after the "
                              f"first {self.exact}; it needs top-k > {self.exact + self.degree}, got {K}")

    def _basis(self, n: int) -> np.ndarray:
        t = np.linspace(0.0, 1.0, n)
        return t[:, None] ** np.arange(self.degree + 1)                          # (n, degree+1)

    def arrays(self, C, K, T):
        return {"topk_head16": (self.exact, np.float16, 0), "topk_poly": (self.degree + 1, np.float32, 0),
                **self._id_arrays(C, K)}

    def encode(self, topk_logits, topk_ids, lse, temperatures, C):
        lp, _ = _lp(topk_logits, lse, temperatures)
        A = self._basis(lp.shape[1] - self.exact)
        coef = np.linalg.lstsq(A, lp[:, self.exact:].T, rcond=None)[0].T          # (n, degree+1)
        return {"topk_head16": lp[:, :self.exact].astype(np.float16), "topk_poly": coef.astype(np.float32),
                **self._enc_ids(topk_ids, C)}

    def decode(self, a, lse, temperatures, C, K):
        t0 = float(temperatures[0])
        tail = np.asarray(a["topk_poly"], np.float64) @ self._basis(K - self.exact).T
        lp = np.concatenate([np.asarray(a["topk_head16"], np.float64), tail], axis=1)
        lp[:, self.exact:] = np.minimum.accumulate(lp[:, self.exact - 1:], axis=1)[:, 1:]  # keep it descending
        return (t0 * (lp + lse[:, :1])).astype(np.float32), self._dec_ids(a, C, K)


@dataclass(frozen=True)
class Compact(_Codec):
    """The project's compact codec: ids sorted ascending and delta-coded as two byte planes (zstd makes
    the small high bytes nearly free), their logits in the same order as ``bits``-bit codes c of the
    offset d = z_0 − z below the row maximum. The codes are companded for the KL they cause: a value's
    error costs ∝ p ∝ e^(−d/τ0), and the quantiser minimising that weighted squared error has step
    density ∝ e^(−d/3τ0) (Panter–Dite): c = M·G(d)/G(span), G(d) = 1 − e^(−d/3τ0), M = 2^bits − 1 —
    uniform on flat rows, fine at the head of peaked ones. The row maximum and the span stay fp32;
    readers get the top-k re-sorted by value. Error ≤ 3τ0·(e^(span/3τ0) − 1)/(2M) per value (≈ span/(2M)
    when span ≪ 3τ0; large only where p is tiny). Holds vocabularies up to 65,536 ids (16-bit deltas)."""

    name: str = "compact"
    bits: int = 8
    version: int = 1
    compress: bool = True

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "bits": self.bits}

    def check(self, C: int, K: int) -> None:
        if C > 1 << 16:
            raise ConfigError(f"codec {self.name!r} delta-codes ids in 16 bits, so it holds vocabularies of at most "
                              f"65536 ids; this teacher has {C}; use codec q8 or lossless")

    def arrays(self, C, K, T):
        return {"topk_idlo": (K, np.uint8, 0), "topk_idhi": (K, np.uint8, 0), "topk_max": (1, np.float32, 0),
                "topk_span": (1, np.float32, 0), "topk_code": (-(-K * self.bits // 8), np.uint8, 0)}

    def encode(self, topk_logits, topk_ids, lse, temperatures, C):
        order = np.argsort(topk_ids, axis=1, kind="stable")
        ids = np.take_along_axis(np.asarray(topk_ids, np.int64), order, 1)
        gaps = np.diff(ids, axis=1, prepend=0).astype(np.uint16)
        z = np.take_along_axis(topk_logits.astype(np.float64), order, 1)
        t0 = float(temperatures[0])
        zmax = topk_logits[:, :1].astype(np.float64)
        span = zmax - topk_logits[:, -1:].astype(np.float64)
        top = (1 << self.bits) - 1
        g_span = -np.expm1(-span / (3 * t0))                                   # G(span), G(d) = 1 − e^(−d/3τ0)
        c = np.rint(top * np.clip(-np.expm1(-(zmax - z) / (3 * t0)) / np.where(g_span > 0, g_span, 1.0), 0, 1))
        return {"topk_idlo": (gaps & 0xFF).astype(np.uint8), "topk_idhi": (gaps >> 8).astype(np.uint8),
                "topk_max": zmax.astype(np.float32), "topk_span": span.astype(np.float32),
                "topk_code": pack_bits(c.astype(np.int64), self.bits)}

    def decode(self, a, lse, temperatures, C, K):
        gaps = np.asarray(a["topk_idlo"], np.int64) | (np.asarray(a["topk_idhi"], np.int64) << 8)
        ids = np.cumsum(gaps, axis=1)
        top, t0 = (1 << self.bits) - 1, float(temperatures[0])
        c = unpack_bits(a["topk_code"], ids.shape[1], self.bits).astype(np.float64)
        span = np.asarray(a["topk_span"], np.float64)
        d = -3 * t0 * np.log1p((c / top) * np.expm1(-span / (3 * t0)))          # G⁻¹(c/M · G(span))
        z = np.asarray(a["topk_max"], np.float64) - d
        order = np.argsort(-z, axis=1, kind="stable")
        return np.take_along_axis(z, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


CODECS: dict[str, Any] = {c.name: c for c in (
    Lossless(), HalfLogprob("fp16"), HalfLogprob("bf16", bf16=True), Q8(), Compact(), Compact("compact7", 7), Compact("compact6", 6),
    PolyTail())}
# what `--codec` offers; polytail is the benchmark's anchor (DistillKit's scheme), readable but not offered
CHOICES = ("lossless", "fp16", "bf16", "q8", "compact", "compact7")


def reconstruction_error(z: Any, labels: Any, topk_logits: Any, topk_ids: Any, tau: float) -> dict[str, float]:
    """What a reader reconstructs from a top-k cache vs the full teacher, per row then averaged (fp64).

    q: the decoded top-k at τ, q_i = exp(ẑ_i/τ − lse_τ) (lse exact), the label's exact p_y when it lies
    outside the top-k, and the rest of the mass r = max(0, 1 − Σq) spread evenly over the other ids
    (the sparse distribution's tail bucket). Returns mean KL(p ‖ q), max KL and mean |q_y − p_y|.
    """
    import torch

    z = torch.as_tensor(z, dtype=torch.float64)
    n, V = z.shape
    y = torch.as_tensor(labels, dtype=torch.long).view(-1, 1)
    ids = torch.as_tensor(np.asarray(topk_ids), dtype=torch.long)
    zk = torch.as_tensor(np.asarray(topk_logits), dtype=torch.float64)
    logp = torch.log_softmax(z / tau, dim=1)                                      # (n, V)
    lse = torch.logsumexp(z / tau, dim=1, keepdim=True)
    p = logp.exp()
    logq_k = zk / tau - lse                                                       # (n, K)
    in_top = (ids == y).any(1, keepdim=True)
    logp_k, logp_y = logp.gather(1, ids), logp.gather(1, y)
    q_sum = logq_k.exp().sum(1, keepdim=True) + torch.where(in_top, 0.0, logp_y.exp())
    p_kept = logp_k.exp().sum(1, keepdim=True) + torch.where(in_top, 0.0, logp_y.exp())
    n_rest = V - ids.shape[1] - (~in_top).double()
    r = (1.0 - q_sum).clamp_min(1e-300)
    kl = (logp_k.exp() * (logp_k - logq_k)).sum(1, keepdim=True)                 # the kept ids (label: exact, 0)
    ent_all = (p * logp).sum(1, keepdim=True)
    ent_kept = (logp_k.exp() * logp_k).sum(1, keepdim=True) + torch.where(in_top, 0.0, logp_y.exp() * logp_y)
    p_rest = (1.0 - p_kept).clamp_min(0.0)
    kl = kl + (ent_all - ent_kept) - torch.where(n_rest > 0, p_rest * torch.log(r / n_rest.clamp_min(1)), 0.0)
    pos = (ids == y).double().argmax(1, keepdim=True)
    q_y = torch.where(in_top, logq_k.gather(1, pos).exp(), logp_y.exp())
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "dp_label": float((q_y - logp_y.exp()).abs().mean())}


def get_codec(name: str) -> Any:
    """The codec registered as ``name``; an unknown name lists the valid ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


def encode_checked(codec: Any, topk_logits: np.ndarray, topk_ids: np.ndarray, lse: np.ndarray,
                   temperatures: Sequence[float], C: int) -> dict[str, np.ndarray]:
    """``codec.encode`` after refusing NaN/inf rows (a quantiser would turn them into plausible numbers)."""
    bad = ~(np.isfinite(topk_logits).all(1) & np.isfinite(lse).all(1))
    if bad.any():
        from loca_pipe.pipeline.errors import NumericsError

        raise NumericsError(f"rows {np.flatnonzero(bad)[:20].tolist()} of the chunk hold NaN or inf top-k logits or "
                            f"lse; codec {codec.name!r} cannot store them — fix the teacher's outputs")
    return codec.encode(topk_logits, topk_ids, lse, temperatures, C)


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


__all__ = ["CODECS", "CHOICES", "get_codec", "codec_of", "pack_bits", "unpack_bits", "id_bits", "reconstruction_error", "encode_checked"]
