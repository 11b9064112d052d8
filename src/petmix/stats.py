"""Summaries over seeds: mean, sample standard deviation, and when two methods' difference is noise.

A comparison table over a few seeds (typically 3) needs a rule a reader can check by hand. petmix uses
one: two means differ *within noise* when ``|mean_a - mean_b| < std_a + std_b`` (sample standard
deviations, n - 1). With three seeds a Welch t-test has so few degrees of freedom that it rarely
rejects anything, and its p-value suggests a precision the data lack; the sum of standard deviations
is cruder but reads off the table. It needs a spread on both sides: with one seed nothing is marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

NOISE_RULE = "|difference of means| < sum of the two sample standard deviations (n - 1)"


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (None below two values) and how many values, None ignored."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Summary:
        xs = [float(v) for v in values if v is not None]
        n = len(xs)
        if not n:
            return cls(None, None, 0)
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
        return cls(mean, std, n)

    def cell(self, digits: int = 2) -> str:
        if self.mean is None:
            return "-"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def within_noise(a: Summary, b: Summary) -> bool | None:
    """True if the difference of the means is smaller than the sum of the standard deviations; None
    where either side has no spread (fewer than two seeds) or no value."""
    if a.mean is None or b.mean is None or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) < a.std + b.std
