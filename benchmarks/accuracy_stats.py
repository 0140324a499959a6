"""The differences ``benchmarks/accuracy.py`` states between two records, each with a 95 % interval.

  * two accuracies (top-1, or agreement) of records on the same test images: Agresti-Min interval
    for paired proportions, from the per-image correctness (discordant counts);
  * the same where a record lacks per-image data: Agresti-Caffo interval for two independent
    proportions (conservative for models evaluated on the same images), marked ``u``;
  * two mean KLs: normal interval of the mean per-image difference (paired).

A difference is *significant* (marked ``*``) when its interval excludes 0. Nothing here imports
torch or vmfx.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

from accuracy_records import test_images

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Difference:
    """``a - b`` with a 95 % interval (``low``, ``high``), in the unit of the compared quantity.

    ``kind`` is "paired", "unpaired" or None (no interval could be computed)."""

    estimate: float
    low: float | None = None
    high: float | None = None
    kind: str | None = None

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (False without an interval)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    @property
    def sign(self) -> int:
        """+1 or -1 where the interval lies above or below 0, else 0 (a tie, or no interval)."""
        if not self.significant:
            return 0
        return 1 if self.low > 0 else -1

    def format(self, digits: int = 1, scientific: bool = False) -> str:
        """``+e [+low, +high]`` then ``*`` if significant and `` u`` if unpaired; ``+e`` alone without an interval."""
        f = (lambda x: f"{x:+.2e}") if scientific else (lambda x: f"{x:+.{digits}f}")
        if self.low is None:
            return f(self.estimate)
        mark = ("*" if self.significant else "") + (" u" if self.kind == "unpaired" else "")
        return f"{f(self.estimate)} [{f(self.low)}, {f(self.high)}]{mark}"


def _points(low: float, high: float) -> tuple[float, float]:
    """An interval of a difference of two proportions, in points and clipped to [-100, 100] (the Wald
    intervals below can reach past the range of such a difference when n is small or a count is 0)."""
    return max(-100.0, 100.0 * low), min(100.0, 100.0 * high)


def paired_proportion_difference(misses_a: Iterable[int], misses_b: Iterable[int], n: int) -> Difference:
    """Difference of two success rates measured on the same ``n`` items, in percentage points.

    ``misses_a`` / ``misses_b``: the items each failed (e.g. the test images a model got wrong).
    Estimate: ``(n_ab - n_ba) / n`` with ``n_ab`` the items only b missed, ``n_ba`` the items only
    a missed. Interval: Agresti and Min (2005): add 0.5 to each of the four cells of the paired
    2x2 table (n + 2 in all), then the Wald interval ``d' +- z sqrt((n_ab' + n_ba') - (n_ab' - n_ba')^2 / n') / n'``
    with ``d' = (n_ab' - n_ba') / n'``, clipped to [-100, 100] points.
    """
    a, b = set(misses_a), set(misses_b)
    only_b = len(b - a)  # a right, b wrong
    only_a = len(a - b)  # a wrong, b right
    estimate = 100.0 * (only_b - only_a) / n
    n01, n10, nn = only_b + 0.5, only_a + 0.5, n + 2.0
    d = (n01 - n10) / nn
    se = math.sqrt(max((n01 + n10) - (n01 - n10) ** 2 / nn, 0.0)) / nn
    return Difference(estimate, *_points(d - Z95 * se, d + Z95 * se), "paired")


def unpaired_proportion_difference(pct_a: float, n_a: int, pct_b: float, n_b: int) -> Difference:
    """Difference of two success rates (percent) from independent samples, in points.

    Interval: Agresti and Caffo (2000): add one success and one failure to each sample, then
    the Wald interval, clipped to [-100, 100] points. Used only where a record lacks per-image data."""
    x_a, x_b = pct_a / 100.0 * n_a, pct_b / 100.0 * n_b
    pa, pb = (x_a + 1) / (n_a + 2), (x_b + 1) / (n_b + 2)
    d = pa - pb
    se = math.sqrt(pa * (1 - pa) / (n_a + 2) + pb * (1 - pb) / (n_b + 2))
    return Difference(pct_a - pct_b, *_points(d - Z95 * se, d + Z95 * se), "unpaired")


def paired_mean_difference(values_a: list[float], values_b: list[float]) -> Difference:
    """Mean of ``a_i - b_i`` over the same items, with the normal 95 % interval of that mean."""
    diffs = [x - y for x, y in zip(values_a, values_b)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return Difference(mean)
    se = statistics.stdev(diffs) / math.sqrt(n)
    return Difference(mean, mean - Z95 * se, mean + Z95 * se, "paired")


def _same_test_set(a: dict, b: dict) -> bool:
    return test_images(a) == test_images(b)


def accuracy_difference(a: dict, b: dict, field: str = "top1") -> Difference | None:
    """``a[field] - b[field]`` in points (field "top1" or "agree") with its interval, or None when
    either record lacks the field or they were evaluated on different test sets."""
    misses = {"top1": "wrong", "agree": "disagree"}[field]
    if a.get(field) is None or b.get(field) is None or not _same_test_set(a, b):
        return None
    if misses in a and misses in b:
        return paired_proportion_difference(a[misses], b[misses], test_images(a))
    return unpaired_proportion_difference(a[field], test_images(a), b[field], test_images(b))


def kl_difference(a: dict, b: dict) -> Difference | None:
    """``a["kl"] - b["kl"]`` with a paired interval where both records carry per-image KL."""
    if a.get("kl") is None or b.get("kl") is None or not _same_test_set(a, b):
        return None
    if "kl_images" in a and "kl_images" in b:
        return paired_mean_difference(a["kl_images"], b["kl_images"])
    return Difference(a["kl"] - b["kl"])


def record_differences(a: dict, b: dict) -> dict[str, Difference | None]:
    """Record ``a`` minus record ``b`` in top-1, agree and KL (None where not comparable)."""
    return {"top1": accuracy_difference(a, b, "top1"), "agree": accuracy_difference(a, b, "agree"),
            "kl": kl_difference(a, b)}
