"""Paired comparisons over seeds: mean difference, 95 % t-interval, paired t-test and exact sign-flip test.

Two methods trained with the same seed share the initial weights and the data order
(:mod:`loca_pipe.pipeline.training`), so the per-seed differences d_s = a_s − b_s remove most of the
run-to-run variance that both methods share. For n paired seeds:

    mean d̄ = Σ d_s / n,   sd = sqrt(Σ (d_s − d̄)² / (n − 1)),   se = sd / √n,
    95 % interval  d̄ ± t_{0.975, n−1} · se,   t = d̄ / se,   p = P(|T_{n−1}| ≥ |t|)   (two-sided).

The exact sign-flip permutation test (under H0 each d_s is as likely +|d_s| as −|d_s|) enumerates all 2^n
sign vectors: p = #{signs : |Σ ± d_s| ≥ |Σ d_s|} / 2^n. It assumes no normality but can never go below
2 / 2^n (0.0625 with 5 seeds), so with few seeds it cannot reach 0.05 at all; the paired t-test is the
primary test here and the permutation p is reported beside it as a check that does not rest on normality.

Student's t distribution is computed from the regularised incomplete beta function (Lentz's continued
fraction, no scipy): P(|T_ν| ≥ t) = I_{ν/(ν+t²)}(ν/2, 1/2); quantiles by bisection on that.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from loca_pipe.pipeline.errors import ConfigError

__all__ = ["Paired", "paired", "sign_flip_p", "t_quantile", "t_two_sided_p"]

MAX_EXACT_SEEDS = 20  # 2^20 sign vectors; above that the permutation p is not computed


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta I_x(a, b) for 0 ≤ x ≤ 1, with y = 1 − x passed in (computed without
    cancellation by the caller)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T_df| ≥ |t|) for Student's t with df > 0 degrees of freedom."""
    if not df > 0:
        raise ConfigError(f"degrees of freedom must be > 0; got {df}")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (0.5 < q < 1), by bisection on :func:`t_two_sided_p`."""
    if not 0.5 < q < 1.0:
        raise ConfigError(f"quantile level must be in (0.5, 1); got {q}")
    target = 2.0 * (1.0 - q)  # two-sided tail mass beyond the quantile
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def sign_flip_p(diffs: Sequence[float]) -> float | None:
    """Exact two-sided sign-flip permutation p-value of the mean of ``diffs`` (None above 20 values)."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0 or n > MAX_EXACT_SEEDS:
        return None
    obs = abs(sum(d))
    tol = 1e-9 * max(1.0, sum(abs(x) for x in d))
    hits = sum(1 for signs in itertools.product((1.0, -1.0), repeat=n)
               if abs(sum(s * x for s, x in zip(signs, d))) >= obs - tol)
    return hits / 2 ** n


@dataclass(frozen=True)
class Paired:
    """A paired comparison a − b over n seeds. ``low``/``high``/``p_t`` are None below 2 seeds, and
    ``note`` then says why in words."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    p_t: float | None
    p_perm: float | None
    note: str

    @property
    def distinguishable(self) -> bool:
        """True when the 95 % interval excludes 0."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def words(self, what: str = "the difference") -> str:
        """One sentence: is the difference distinguishable from run-to-run noise?"""
        if self.low is None:
            return f"{what}: {self.note}"
        if self.distinguishable:
            side = "above" if self.mean > 0 else "below"
            return (f"{what} is {side} zero beyond run-to-run noise (95 % interval excludes 0, "
                    f"paired t-test p = {self.p_t:.3g})")
        return (f"{what} is within run-to-run noise (95 % interval includes 0, paired t-test p = {self.p_t:.3g})")

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """The paired comparison of equal-length sequences ``a`` and ``b`` (same seeds, same order)."""
    if len(a) != len(b):
        raise ConfigError(f"paired comparison needs the same seeds on both sides; got {len(a)} and {len(b)} values")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return Paired(0, None, None, None, None, None, None, "no paired seeds: nothing to compare")
    mean = sum(d) / n
    if n < 2:
        return Paired(1, mean, None, None, None, None, sign_flip_p(d),
                      "only 1 paired seed: no interval or p-value (needs at least 2 seeds)")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return Paired(n, mean, 0.0, mean, mean, p, sign_flip_p(d),
                      f"the difference is exactly {mean:+.4g} in all {n} seeds (no spread)")
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Paired(n, mean, sd, mean - half, mean + half, t_two_sided_p(mean / se, n - 1), sign_flip_p(d),
                  f"{n} paired seeds, paired t-test (two-sided), {100 * level:g} % t-interval")
