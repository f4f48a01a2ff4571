"""How a teacher's top-k values and ids are stored: the codecs of the logit store (docs/store-format.md).

Every codec keeps ``lse`` (logsumexp(z/τ) per declared τ) and ``label_logit`` exact — they are written
beside it, untouched — so p_label and every τ change stay exact; a codec only decides how the K top-k
logits and their ids are kept. ``lossless`` (the default) stores them as they are (fp32 logits, the
narrowest integer ids).

A codec is: ``arrays(C, K, T)`` — the stored arrays {name: (width, dtype, fill)}; ``encode(topk_logits,
topk_ids, lse, temperatures, C)`` — arrays to write for a chunk; ``decode(arrays, lse, temperatures, C, K)`` —
(topk_logits (n, K) float32 descending, topk_ids (n, K) int64); ``check(C, K)`` — refuses a vocabulary
or k it cannot hold. The teacher's attributes record ``codec: {name, version, …}``; a reader older than
the codec's version refuses instead of misreading; an older version is read as it was written.

The mass guard (every lossy codec from version 2): the exact top-k log-mass log Σ_topk e^(z/τ − lse_τ) at
each declared τ is stored beside the codes (``topk_mass``, T fp32, rounded down), and the decoder shifts
the values it did not keep exactly by one constant so that, at every declared τ, the decoded top-k mass
never exceeds the exact one (it equals it at the binding τ). So the tail a reader derives from the exact
lse, 1 − Σ top-k, is never below the true tail: a codec can no longer push the decoded top-k mass to ≥ 1
and leave the tail with nothing (what compact7 v1 did on heavy-tailed rows). The shift moves each value
by at most the codec's own largest error, so every per-value bound below at most doubles.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from loca_pipe.pipeline.errors import ConfigError, StoreError
from loca_pipe.pipeline import names


def id_dtype(num_classes: int) -> np.dtype:
    """Smallest signed integer dtype that holds every class id in [0, C). (fp16 ids are a known bug.)"""
    for dt in (np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


class _Codec:
    """What every codec shares: its identity in the teacher's attrs, by default no limit on C or K, and
    (lossy codecs from version 2, ``guarded``) the mass guard around the codec's own ``_arrays``,
    ``_encode``, ``_decode``. ``exact_head``: how many leading (largest) decoded values the codec keeps
    exactly; the guard never moves them."""

    name: str
    version: int
    exact_head: int = 0

    @property
    def guarded(self) -> bool:
        return self.version >= 2

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    def check(self, C: int, K: int) -> None:
        return None

    def arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {**self._arrays(C, K, T), **({"topk_mass": (T, np.float32, 0)} if self.guarded else {})}

    def encode(self, topk_logits: np.ndarray, topk_ids: np.ndarray, lse: np.ndarray,
               temperatures: Sequence[float], C: int) -> dict[str, np.ndarray]:
        out = self._encode(topk_logits, topk_ids, lse, temperatures, C)
        if self.guarded:
            out["topk_mass"] = _down32(topk_log_mass(topk_logits, lse, temperatures))
        return out

    def decode(self, a: dict[str, np.ndarray], lse: np.ndarray, temperatures: Sequence[float], C: int,
               K: int) -> tuple[np.ndarray, np.ndarray]:
        z, ids = self._decode(a, lse, temperatures, C, K)
        if self.guarded:
            z = mass_guard(z, np.asarray(a["topk_mass"], np.float64), lse, temperatures, self.exact_head)
        return z, ids


def topk_log_mass(topk_logits: np.ndarray, lse: np.ndarray, temperatures: Sequence[float]) -> np.ndarray:
    """(n, T) fp64: log Σ_topk exp(z/τ − lse_τ) for each declared τ (≤ 0: the top-k's share of the mass)."""
    z = np.asarray(topk_logits, np.float64)
    lse = np.asarray(lse, np.float64)
    cols = []
    for j, t in enumerate(temperatures):
        x = z / float(t) - lse[:, j:j + 1]
        m = x.max(1, keepdims=True)
        cols.append((m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0])
    return np.stack(cols, 1)


def _down32(x: np.ndarray) -> np.ndarray:
    """fp64 → fp32 rounded toward −∞ (a stored mass never exceeds the exact one)."""
    y = x.astype(np.float32)
    return np.where(y.astype(np.float64) > x, np.nextafter(y, np.float32(-np.inf)), y).astype(np.float32)


def mass_guard(z: np.ndarray, log_mass: np.ndarray, lse: np.ndarray, temperatures: Sequence[float],
               head: int = 0) -> np.ndarray:
    """Decoded top-k (n, K, descending) → fp32 values whose top-k mass at every declared τ is at most the
    exact one (``log_mass``, (n, T)): values from rank ``head`` on shift by one constant per row (the
    largest that keeps every τ within its exact mass), then stay ≤ the last exact one; fp32 rounding is
    checked after the cast and corrected downward."""
    z = np.asarray(z, np.float64).copy()
    lse = np.asarray(lse, np.float64)
    n, K = z.shape
    if head >= K:
        return z.astype(np.float32)

    def shift_needed(zz: np.ndarray) -> np.ndarray:
        """Per row, the largest s (in logits) with mass(head exact, rest + s) ≤ exact mass at every τ."""
        s = np.full(n, np.inf)
        for j, t in enumerate(temperatures):
            t = float(t)
            x = zz / t - lse[:, j:j + 1]
            lm_rest = _lse_rows(x[:, head:])
            room = log_mass[:, j] + (np.log(-np.expm1(np.minimum(_lse_rows(x[:, :head]) - log_mass[:, j], -1e-300)))
                                     if head else 0.0)  # log(exact mass − the exact head's mass)
            s = np.minimum(s, t * (room - lm_rest))
        return np.where(np.isfinite(s), s, -1e4)

    z[:, head:] += shift_needed(z)[:, None]
    if head:
        z[:, head:] = np.minimum(z[:, head:], z[:, head - 1:head])
    out = np.maximum(z, -3e38).astype(np.float32)
    for _ in range(4):  # fp32 rounding may add a few ulps of mass: lower the rest until it does not
        s = shift_needed(out.astype(np.float64))
        over = s < 0
        if not over.any():
            break
        lowered = out[over, head:].astype(np.float64) + s[over, None] - 4 * np.spacing(np.abs(out[over, head:]))
        out[over, head:] = lowered.astype(np.float32)
    return out


def _lse_rows(x: np.ndarray) -> np.ndarray:
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf)
    m = x.max(1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]


@dataclass(frozen=True)
class Lossless(_Codec):
    """fp32 top-k logits and integer ids, bit-exact (what every store before codecs holds)."""

    name: str = "lossless"
    version: int = 1
    compress: bool = False

    def _arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_logits": (K, np.float32, 0), "topk_ids": (K, id_dtype(C), -1)}

    def _encode(self, topk_logits, topk_ids, lse, temperatures, C):
        return {"topk_logits": topk_logits, "topk_ids": topk_ids}

    def _decode(self, a, lse, temperatures, C, K):
        return np.asarray(a["topk_logits"], np.float32), np.asarray(a["topk_ids"]).astype(np.int64)


def _lp(topk_logits: np.ndarray, lse: np.ndarray, temperatures: Sequence[float]) -> tuple[np.ndarray, float]:
    """Log-probs at the first declared τ (τ0): lp = z/τ0 − lse_τ0 (exact lse, so z = τ0·(lp + lse_τ0))."""
    t0 = float(temperatures[0])
    return topk_logits.astype(np.float64) / t0 - lse[:, :1].astype(np.float64), t0


def to_half(x: np.ndarray, bf16: bool) -> np.ndarray:
    """fp16, or bf16 kept as the top 16 bits of the fp32 (uint16, round to nearest even)."""
    if not bf16:
        return np.asarray(x).astype(np.float16)
    u = np.asarray(x).astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_half(h: np.ndarray, bf16: bool) -> np.ndarray:
    """Inverse of :func:`to_half`: fp32."""
    h = np.asarray(h)
    return (h.astype(np.uint32) << 16).view(np.float32) if bf16 else h.astype(np.float32)


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
    ids as in lossless. Error ≤ 2^-11 (fp16) / 2^-8 (bf16) relative, per value (twice that with the guard)."""

    name: str = "fp16"
    bf16: bool = False
    version: int = 2
    compress: bool = False

    def _arrays(self, C: int, K: int, T: int) -> dict[str, tuple[int, Any, Any]]:
        return {"topk_lp16": (K, np.uint16 if self.bf16 else np.float16, 0), "topk_ids": (K, id_dtype(C), -1)}

    def _encode(self, topk_logits, topk_ids, lse, temperatures, C):
        lp, _ = _lp(topk_logits, lse, temperatures)
        return {"topk_lp16": to_half(lp, self.bf16), "topk_ids": topk_ids}

    def _decode(self, a, lse, temperatures, C, K):
        t0 = float(temperatures[0])
        h = np.asarray(a["topk_lp16"])
        lp = from_half(h, self.bf16)
        z = (t0 * (lp.astype(np.float64) + lse[:, :1])).astype(np.float32)
        return z, np.asarray(a["topk_ids"]).astype(np.int64)


@dataclass(frozen=True)
class Q8(_IdsPacked):
    """The first ``m`` logits exact (fp32); the rest as 8-bit offsets below the row maximum, uniform on
    [0, span] with span = z_0 − z_{K−1} (fp32 per row); ids bit-packed. Error ≤ span/510 per value
    (span/255 with the guard, which never moves the first m)."""

    name: str = "q8"
    m: int = 4
    version: int = 2
    compress: bool = True

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "m": self.m}

    @property
    def exact_head(self) -> int:  # type: ignore[override]
        return self.m

    def _arrays(self, C, K, T):
        m = min(self.m, K)
        return {"topk_head": (m, np.float32, 0), "topk_span": (1, np.float32, 0), "topk_q8": (K - m, np.uint8, 0),
                **self._id_arrays(C, K)}

    def _encode(self, topk_logits, topk_ids, lse, temperatures, C):
        m = min(self.m, topk_logits.shape[1])
        z = topk_logits.astype(np.float64)
        span = z[:, :1] - z[:, -1:]
        d = (z[:, :1] - z[:, m:]) / np.where(span > 0, span, 1.0)
        return {"topk_head": topk_logits[:, :m], "topk_span": span.astype(np.float32),
                "topk_q8": np.clip(np.rint(d * 255), 0, 255).astype(np.uint8), **self._enc_ids(topk_ids, C)}

    def _decode(self, a, lse, temperatures, C, K):
        head = np.asarray(a["topk_head"], np.float64)
        q = np.asarray(a["topk_q8"], np.float64)
        tail = head[:, :1] - q / 255 * np.asarray(a["topk_span"], np.float64)
        z = np.concatenate([head, np.minimum(tail, head[:, -1:])], axis=1)  # z_m ≤ z_{m−1}: never less exact
        return z.astype(np.float32), self._dec_ids(a, C, K)


@dataclass(frozen=True)
class PolyTail(_IdsPacked):
    """DistillKit's published scheme, re-implemented from its description: the first ``exact`` log-probs
    at τ0 as 16-bit floats (fp16, or bf16 with ``bf16``), the remaining K − exact fitted by one
    least-squares fit in the rank normalised to t ∈ [0, 1] over the terms 1, t, …, t^degree (and √t with
    ``sqrt``), coefficients fp32 per row, ids bit-packed. ``polytail`` (degree 8, fp16 head, the mass
    guard) is the project's stronger variant; DistillKit's README configuration (bf16 head, terms
    [0, 1, 2, 3, 4, √t], no guard) is the benchmark's anchor (benchmarks/bench_codecs.py)."""

    name: str = "polytail"
    exact: int = 16
    degree: int = 8
    version: int = 2
    compress: bool = True
    bf16: bool = False
    sqrt: bool = False

    @property
    def terms(self) -> int:
        return self.degree + 1 + int(self.sqrt)

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "exact": self.exact, "degree": self.degree,
                **({"bf16": True} if self.bf16 else {}), **({"sqrt": True} if self.sqrt else {})}

    def check(self, C: int, K: int) -> None:
        if K < self.exact + self.terms:
            raise ConfigError(f"codec {self.name!r} fits {self.terms} terms to the top-k after the "
                              f"first {self.exact}; it needs top-k > {self.exact + self.terms - 1}, got {K}")

    def _basis(self, n: int) -> np.ndarray:
        t = np.linspace(0.0, 1.0, n)
        cols = [t[:, None] ** np.arange(self.degree + 1)] + ([np.sqrt(t)[:, None]] if self.sqrt else [])
        return np.concatenate(cols, axis=1)                                       # (n, terms)

    def _arrays(self, C, K, T):
        return {"topk_head16": (self.exact, np.uint16 if self.bf16 else np.float16, 0),
                "topk_poly": (self.terms, np.float32, 0), **self._id_arrays(C, K)}

    def _encode(self, topk_logits, topk_ids, lse, temperatures, C):
        lp, _ = _lp(topk_logits, lse, temperatures)
        A = self._basis(lp.shape[1] - self.exact)
        coef = np.linalg.lstsq(A, lp[:, self.exact:].T, rcond=None)[0].T          # (n, terms)
        return {"topk_head16": to_half(lp[:, :self.exact], self.bf16), "topk_poly": coef.astype(np.float32),
                **self._enc_ids(topk_ids, C)}

    def _decode(self, a, lse, temperatures, C, K):
        t0 = float(temperatures[0])
        tail = np.asarray(a["topk_poly"], np.float64) @ self._basis(K - self.exact).T
        lp = np.concatenate([from_half(a["topk_head16"], self.bf16).astype(np.float64), tail], axis=1)
        lp[:, self.exact:] = np.minimum.accumulate(lp[:, self.exact - 1:], axis=1)[:, 1:]  # keep it descending
        return (t0 * (lp + lse[:, :1])).astype(np.float32), self._dec_ids(a, C, K)


# the compander scales of compact v2: β (in units of τ0) indexes this grid, one byte per row
BETAS = np.geomspace(0.5, 500.0, 16)


@dataclass(frozen=True)
class Compact(_Codec):
    """The project's compact codec: ids sorted ascending and delta-coded as two byte planes (zstd makes
    the small high bytes nearly free), their logits in the same order as ``bits``-bit codes c of the
    offset d = (z_0 − z)/τ0 below the row maximum, companded: c = M·G(d)/G(span), G(d) = 1 − e^(−d/β),
    M = 2^bits − 1 — fine steps near the maximum where the mass is, coarse ones far below it.

    Version 2 (the mend): β is chosen per row from 16 scales (``BETAS``, 0.5 … 500 τ0; one byte,
    ``topk_beta``) as the one minimising the row's own Σ p_i·(decoded − true)² (the KL the codes cause,
    to second order) — small β on a peaked row, nearly uniform steps on a flat or heavy-tailed one — and
    the mass guard keeps the decoded top-k mass ≤ the exact one at every declared τ (the row maximum
    stays exact). Version 1 (read only) had β = 3 fixed and no guard: on heavy-tailed rows its steps far
    below the maximum were coarse enough to push the decoded top-k mass to ≥ 1.
    Error ≤ 2·τ0·β·(e^(span/β) − 1)/(2M) per value (span in units of τ0; ≈ span·τ0/M when span ≪ β).
    The row maximum and the span stay fp32; readers get the top-k re-sorted by value. Holds vocabularies
    up to 65,536 ids (16-bit deltas)."""

    name: str = "compact"
    bits: int = 8
    version: int = 2
    compress: bool = True
    exact_head: int = 1

    def attrs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "bits": self.bits}

    def check(self, C: int, K: int) -> None:
        if C > 1 << 16:
            raise ConfigError(f"codec {self.name!r} delta-codes ids in 16 bits, so it holds vocabularies of at most "
                              f"65536 ids; this teacher has {C}; use codec q8 or lossless")

    def _arrays(self, C, K, T):
        return {"topk_idlo": (K, np.uint8, 0), "topk_idhi": (K, np.uint8, 0), "topk_max": (1, np.float32, 0),
                "topk_span": (1, np.float32, 0), "topk_code": (-(-K * self.bits // 8), np.uint8, 0),
                **({"topk_beta": (1, np.uint8, 0)} if self.version >= 2 else {})}

    def _codes(self, d: np.ndarray, span: np.ndarray, beta: Any) -> np.ndarray:
        top = (1 << self.bits) - 1
        g_span = -np.expm1(-span / beta)
        return np.rint(top * np.clip(-np.expm1(-d / beta) / np.where(g_span > 0, g_span, 1.0), 0, 1))

    def _offsets(self, c: np.ndarray, span: np.ndarray, beta: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):  # G(span) = 1 to fp64 (span ≫ β): the last code is at infinity
            return -beta * np.log1p((c / ((1 << self.bits) - 1)) * np.expm1(-span / beta))  # G⁻¹(c/M · G(span))

    def _encode(self, topk_logits, topk_ids, lse, temperatures, C):
        order = np.argsort(topk_ids, axis=1, kind="stable")
        ids = np.take_along_axis(np.asarray(topk_ids, np.int64), order, 1)
        gaps = np.diff(ids, axis=1, prepend=0).astype(np.uint16)
        z = np.take_along_axis(topk_logits.astype(np.float64), order, 1)
        t0 = float(temperatures[0])
        zmax = topk_logits[:, :1].astype(np.float64)
        span32 = (zmax - topk_logits[:, -1:].astype(np.float64)).astype(np.float32)
        d, span = (zmax - z) / t0, span32.astype(np.float64) / t0           # as the decoder will see them
        p = np.exp(z / t0 - np.asarray(lse, np.float64)[:, :1])
        best_err = np.full(len(z), np.inf)
        best_c, best_b = np.zeros_like(d), np.zeros(len(z), np.uint8)
        for b, beta in enumerate(BETAS if self.version >= 2 else (3.0,)):
            c = self._codes(d, span, beta)
            err = (p * (self._offsets(c, span, beta) - d) ** 2).sum(1)
            take = err < best_err
            best_err, best_b[take], best_c[take] = np.where(take, err, best_err), b, c[take]
        return {"topk_idlo": (gaps & 0xFF).astype(np.uint8), "topk_idhi": (gaps >> 8).astype(np.uint8),
                "topk_max": zmax.astype(np.float32), "topk_span": span32,
                "topk_code": pack_bits(best_c.astype(np.int64), self.bits),
                **({"topk_beta": best_b[:, None]} if self.version >= 2 else {})}

    def _decode(self, a, lse, temperatures, C, K):
        gaps = np.asarray(a["topk_idlo"], np.int64) | (np.asarray(a["topk_idhi"], np.int64) << 8)
        ids = np.cumsum(gaps, axis=1)
        t0 = float(temperatures[0])
        c = unpack_bits(a["topk_code"], ids.shape[1], self.bits).astype(np.float64)
        span = np.asarray(a["topk_span"], np.float64)
        if self.version >= 2:
            beta = BETAS[np.minimum(np.asarray(a["topk_beta"], np.int64), len(BETAS) - 1)]
            z = np.asarray(a["topk_max"], np.float64) - t0 * self._offsets(c, span / t0, beta)
        else:  # v1: β = 3 in logit units of τ0, the span in logits
            z = np.asarray(a["topk_max"], np.float64) - self._offsets(c, span, 3 * t0)
        order = np.argsort(-z, axis=1, kind="stable")
        return np.take_along_axis(z, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


CODECS: dict[str, Any] = {c.name: c for c in (
    Lossless(), HalfLogprob("fp16"), HalfLogprob("bf16", bf16=True), Q8(), Compact(), Compact("compact7", 7), Compact("compact6", 6),
    PolyTail())}
# what `--codec` offers; polytail is the benchmark's anchor (DistillKit's scheme), readable but not offered
CHOICES = names.LM_CODECS  # the CLI offers these without importing numpy (pipeline/names.py)


def reconstruction_error(z: Any, labels: Any, topk_logits: Any, topk_ids: Any, tau: float) -> dict[str, float]:
    """What a reader reconstructs from a top-k cache vs the full teacher, per row then averaged (fp64).

    q: the decoded top-k at τ, q_i = exp(ẑ_i/τ − lse_τ) (lse exact), the label's exact p_y when it lies
    outside the top-k, and the rest of the mass r = max(0, 1 − Σq) spread evenly over the other ids
    (the sparse distribution's tail bucket). Returns mean KL(p ‖ q), max KL, mean |q_y − p_y| and the mean
    total variation ½Σ|p − q| over the whole vocabulary.
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
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, ids, False).scatter_(1, y, False)
    tv = 0.5 * ((logp_k.exp() - logq_k.exp()).abs().sum(1) +
                torch.where(rest, (p - r / n_rest.clamp_min(1)).abs(), torch.zeros_like(p)).sum(1))
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "dp_label": float((q_y - logp_y.exp()).abs().mean()),
            "tv": float(tv.mean())}


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
    return replace(codec, version=version) if version < codec.version else codec  # read as it was written


__all__ = ["CODECS", "CHOICES", "get_codec", "codec_of", "pack_bits", "unpack_bits", "id_bits", "reconstruction_error", "encode_checked"]
