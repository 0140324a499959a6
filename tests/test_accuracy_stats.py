"""The intervals of ``benchmarks/accuracy_stats.py`` on fresh random counts: each agrees with a
40-digit decimal evaluation of its formula computed from per-item outcomes, contains its point
estimate, stays within [-100, 100] points where it bounds a difference of two proportions, and
narrows as the same proportions are observed on more items."""

from __future__ import annotations

import importlib
import os
from decimal import Decimal, localcontext

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Z95 = Decimal("1.959963984540054")


@pytest.fixture(scope="module")
def stats():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(os.path.join(ROOT, "benchmarks"))
        yield importlib.import_module("accuracy_stats")


@st.composite
def paired_outcomes(draw, max_n: int = 1500):
    """(n, misses of a, misses of b): the items each of two models got wrong out of n, drawn as the
    four cells of the paired 2x2 table and placed at random items."""
    n = draw(st.integers(1, max_n))
    only_a = draw(st.integers(0, n))
    only_b = draw(st.integers(0, n - only_a))
    both = draw(st.integers(0, n - only_a - only_b))
    order = draw(st.permutations(range(n))) if n <= 50 else list(range(n))
    a = order[:only_a] + order[only_a + only_b:only_a + only_b + both]
    b = order[only_a:only_a + only_b] + order[only_a + only_b:only_a + only_b + both]
    return n, a, b


def _clip(x: Decimal) -> float:
    return float(min(Decimal(100), max(Decimal(-100), x)))


def agresti_min_reference(n: int, misses_a: list[int], misses_b: list[int]) -> tuple[float, float, float]:
    """(estimate, low, high) in points, from per-item correctness, in 40-digit decimals."""
    with localcontext() as ctx:
        ctx.prec = 40
        right_a = [i not in set(misses_a) for i in range(n)]
        right_b = [i not in set(misses_b) for i in range(n)]
        a_only_right = Decimal(sum(ra and not rb for ra, rb in zip(right_a, right_b)))
        b_only_right = Decimal(sum(rb and not ra for ra, rb in zip(right_a, right_b)))
        estimate = 100 * (a_only_right - b_only_right) / n
        p, q, total = a_only_right + Decimal("0.5"), b_only_right + Decimal("0.5"), Decimal(n + 2)
        centre = (p - q) / total
        half = Z95 * ((p + q) - (p - q) ** 2 / total).sqrt() / total
        return float(estimate), _clip(100 * (centre - half)), _clip(100 * (centre + half))


def agresti_caffo_reference(x_a: int, n_a: int, x_b: int, n_b: int) -> tuple[float, float]:
    """(low, high) in points, in 40-digit decimals."""
    with localcontext() as ctx:
        ctx.prec = 40
        pa, pb = Decimal(x_a + 1) / (n_a + 2), Decimal(x_b + 1) / (n_b + 2)
        half = Z95 * (pa * (1 - pa) / (n_a + 2) + pb * (1 - pb) / (n_b + 2)).sqrt()
        return _clip(100 * (pa - pb - half)), _clip(100 * (pa - pb + half))


def mean_difference_reference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the per-item differences, sample standard deviation, in 40-digit decimals."""
    with localcontext() as ctx:
        ctx.prec = 40
        d = [Decimal(x) - Decimal(y) for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)).sqrt()
        half = Z95 * sd / Decimal(len(d)).sqrt()
        return float(mean), float(mean - half), float(mean + half)


# ------------------------------------------------------------------ paired proportions (Agresti-Min)


@settings(max_examples=150, deadline=None)
@given(paired_outcomes())
def test_paired_proportion_interval_matches_the_reference(stats, outcomes):
    n, a, b = outcomes
    d = stats.paired_proportion_difference(a, b, n)
    assert (d.estimate, d.low, d.high) == pytest.approx(agresti_min_reference(n, a, b), abs=1e-9)
    assert d.kind == "paired"


@settings(max_examples=150, deadline=None)
@given(paired_outcomes())
def test_paired_proportion_interval_holds_its_estimate_within_the_range(stats, outcomes):
    n, a, b = outcomes
    d = stats.paired_proportion_difference(a, b, n)
    assert -100.0 <= d.low <= d.estimate <= d.high <= 100.0
    assert d.significant == (d.sign != 0) and d.sign * d.estimate >= 0


@settings(max_examples=100, deadline=None)
@given(paired_outcomes(max_n=400), st.integers(2, 5))
def test_paired_proportion_interval_narrows_on_more_items(stats, outcomes, k):
    n, a, b = outcomes
    wide = stats.paired_proportion_difference(a, b, n)
    # the same four cell proportions on k times as many items: each item repeated k times
    narrow = stats.paired_proportion_difference([i + n * j for i in a for j in range(k)],
                                                [i + n * j for i in b for j in range(k)], n * k)
    assert narrow.estimate == pytest.approx(wide.estimate)
    assert narrow.high - narrow.low < wide.high - wide.low


# -------------------------------------------------------------- independent proportions (Agresti-Caffo)


counts = st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@settings(max_examples=200, deadline=None)
@given(counts, counts)
def test_unpaired_proportion_interval_matches_the_reference_and_holds_its_estimate(stats, sample_a, sample_b):
    (x_a, n_a), (x_b, n_b) = sample_a, sample_b
    d = stats.unpaired_proportion_difference(100.0 * x_a / n_a, n_a, 100.0 * x_b / n_b, n_b)
    assert (d.low, d.high) == pytest.approx(agresti_caffo_reference(x_a, n_a, x_b, n_b), abs=1e-9)
    assert d.estimate == pytest.approx(100.0 * (x_a / n_a - x_b / n_b))
    assert -100.0 <= d.low <= d.estimate + 1e-9 and d.estimate - 1e-9 <= d.high <= 100.0
    assert d.kind == "unpaired"


@settings(max_examples=100, deadline=None)
@given(counts, counts, st.integers(2, 5))
def test_unpaired_proportion_interval_narrows_on_more_items(stats, sample_a, sample_b, k):
    (x_a, n_a), (x_b, n_b) = sample_a, sample_b
    pa, pb = 100.0 * x_a / n_a, 100.0 * x_b / n_b
    wide = stats.unpaired_proportion_difference(pa, n_a, pb, n_b)
    narrow = stats.unpaired_proportion_difference(pa, n_a * k, pb, n_b * k)
    assert narrow.high - narrow.low < wide.high - wide.low


# ------------------------------------------------------------------------ paired mean (normal interval)


values = st.floats(0.0, 10.0, allow_nan=False, allow_subnormal=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=2, max_size=300))
def test_paired_mean_interval_matches_the_reference_and_holds_its_estimate(stats, pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    d = stats.paired_mean_difference(a, b)
    assert (d.estimate, d.low, d.high) == pytest.approx(mean_difference_reference(a, b), rel=1e-9, abs=1e-12)
    assert d.low <= d.estimate <= d.high and d.kind == "paired"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=2, max_size=100), st.integers(2, 5))
def test_paired_mean_interval_narrows_on_more_items(stats, pairs, k):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    assume(len({x - y for x, y in pairs}) > 1)  # all differences equal: a zero-width interval at any n
    wide = stats.paired_mean_difference(a, b)
    narrow = stats.paired_mean_difference(a * k, b * k)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_one_item_gives_no_interval(stats):
    d = stats.paired_mean_difference([0.5], [0.25])
    assert d.estimate == 0.25 and d.low is None and not d.significant and d.sign == 0
