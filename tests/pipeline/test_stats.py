"""Paired statistics against closed forms, published t-table values and hand-worked examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.pipeline.stats import paired, sign_flip_p, t_quantile, t_two_sided_p


def _p_closed_form(t: float, df: int) -> float:
    """Two-sided tail of Student's t in closed form: Cauchy (1), and the even-df series (2, 4)."""
    t = abs(t)
    if df == 1:
        return 1.0 - 2.0 / math.pi * math.atan(t)
    x = t / math.sqrt(df + t * t)
    series = sum(math.comb(2 * j, j) / 4 ** j * (1 - x * x) ** j for j in range(df // 2))
    return 1.0 - x * series


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 60.0), st.sampled_from([1, 2, 4, 6]))
def test_t_tail_matches_closed_forms(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(_p_closed_form(t, df), abs=1e-10)


@pytest.mark.parametrize("df, q975", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272)])
def test_t_quantile_matches_published_table(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=2e-6)


def test_paired_hand_worked_example():
    # d = 1, 2, 3, 4, 5: mean 3, sd √2.5, se √0.5, t = 3/√0.5 = 4.2426, df 4
    r = paired([11, 12, 13, 14, 15], [10] * 5)
    assert (r.n, r.mean) == (5, 3.0)
    assert r.sd == pytest.approx(math.sqrt(2.5))
    half = 2.776445 * math.sqrt(0.5)
    assert (r.low, r.high) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert r.p_t == pytest.approx(0.013236, abs=2e-6)  # 2·(1 − F_4(4.2426)) by the df-4 closed form
    assert r.p_perm == 2 / 32  # only all-plus and all-minus reach |Σ| = 15
    assert r.distinguishable and "above zero beyond run-to-run noise" in r.words()


def test_sign_flip_hand_count():
    # sums of ±1 ±1 ±2: 4, 0, 2, -2, 2, -2, 0, -4 → |·| ≥ 2 in 6 of 8
    assert sign_flip_p([1.0, -1.0, 2.0]) == 6 / 8
    assert sign_flip_p([0.5] * 5) == 2 / 32  # with 5 seeds never below 1/16


def test_noise_said_in_words():
    r = paired([1.0, 2.0, 0.5, 1.5], [1.2, 1.5, 0.9, 1.4])
    assert r.low < 0 < r.high and not r.distinguishable
    assert "within run-to-run noise" in r.words("LoCa − KD")


def test_one_seed_is_said_not_nan():
    r = paired([85.0], [84.0])
    assert r.n == 1 and r.mean == 1.0 and r.low is None and r.p_t is None
    assert "only 1 paired seed" in r.words() and "nan" not in r.words().lower()
    assert paired([], []).note.startswith("no paired seeds")


def test_identical_differences():
    r = paired([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert r.low == r.high == 1.0 and r.p_t == 0.0 and "no spread" in r.note


def test_unequal_lengths_refused():
    with pytest.raises(ConfigError, match="same seeds on both sides"):
        paired([1.0, 2.0], [1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=8), st.floats(-3, 3))
def test_interval_is_shift_equivariant(d, shift):
    a = paired([x + shift for x in d], [0.0] * len(d))
    b = paired(d, [0.0] * len(d))
    if b.sd and b.sd > 1e-6:
        assert a.low == pytest.approx(b.low + shift, abs=1e-6) and a.high == pytest.approx(b.high + shift, abs=1e-6)
