"""The statistics of the reproduction tables: mean and spread over training seeds, the binomial 95 %
interval of every evaluation, and when two figures (or a figure and a tolerance) are told apart.

A figure of a table is a metric of one model on one data set under one attack, measured once per
training seed on the same test images. Two sources of noise: which seed trained the model (the spread
over seeds) and which test images happened to be drawn (the binomial interval of each evaluation).
A claim counts as settled only when **both** are accounted for: we use the *span* of the seeds'
intervals — from the lowest lower bound to the highest upper bound over the seeds — and call two figures
different only when their spans do not overlap. That is conservative (it needs no assumption about how
seeds are distributed, which three seeds could not check) and it is what "the intervals say so" means in
``docs/REPRODUCTION.md``.

The interval is Wilson's score interval (Wilson 1927): unlike the normal approximation p ± 1.96·√(p(1−p)/n)
it stays inside [0, 1] and keeps close to its nominal 95 % coverage at the small and extreme
proportions robust accuracy often is (Brown, Cai & DasGupta, Statistical Science 2001).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile

# metrics that are a proportion of test samples (a binomial count); CIDEr, BLEU and ROUGE are not
PROPORTIONS = frozenset({"top1", "exact_match"})


def mean_interval(samples: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """The normal 95 % interval of a mean over test samples, ``m ± z·s/√n``: for a metric that is the mean
    of per-sample scores but no proportion (corpus CIDEr is the mean of the per-image CIDEr)."""
    n = len(samples)
    if n < 2:
        raise ValueError("an interval of a mean needs at least two samples")
    m = sum(samples) / n
    s = math.sqrt(sum((x - m) ** 2 for x in samples) / (n - 1))
    return m - z * s / math.sqrt(n), m + z * s / math.sqrt(n)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``successes / n`` (95 % by default)."""
    if n <= 0:
        raise ValueError("an interval needs at least one sample")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes of {n} samples is not a proportion")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)  # exact at the ends, not 0.9999…


@dataclass(frozen=True)
class Figure:
    """One cell of a table: a metric measured once per seed (``values``), each on ``n`` test samples."""

    values: tuple[float, ...]
    n: int
    proportion: bool = True
    samples: tuple[tuple[float, ...], ...] = ()  # per seed, the per-sample scores of a mean metric (CIDEr)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over seeds (n − 1 in the denominator); None for one seed."""
        k = len(self.values)
        if k < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (k - 1))

    def intervals(self) -> list[tuple[float, float]]:
        """The 95 % interval of each seed's evaluation: binomial (Wilson) for a proportion, the normal
        interval of the mean for a mean of per-sample scores, none when neither applies (BLEU-4)."""
        if self.proportion:
            return [wilson(round(v * self.n), self.n) for v in self.values]
        if self.samples and all(len(s) > 1 for s in self.samples):
            return [mean_interval(s) for s in self.samples]
        return []

    @property
    def span(self) -> tuple[float, float]:
        """From the lowest to the highest bound of the seeds' intervals (without intervals: the range of the
        seeds' values, which says nothing about the test images)."""
        ivs = self.intervals()
        if not ivs:
            return min(self.values), max(self.values)
        return min(lo for lo, _ in ivs), max(hi for _, hi in ivs)

    def text(self, digits: int = 3) -> str:
        """``mean ± sd [lo, hi]`` as the tables show it (``± sd`` only with two or more seeds)."""
        out = f"{self.mean:.{digits}f}"
        if self.sd is not None:
            out += f" ± {self.sd:.{digits}f}"
        if self.intervals():
            lo, hi = self.span
            out += f" [{lo:.{min(digits, 2) if self.proportion else digits}f}, {hi:.{min(digits, 2) if self.proportion else digits}f}]"
        return out


def figure(values: Sequence[float], n: int, metric: str, samples: Sequence[Sequence[float]] | None = None) -> Figure:
    if not values:
        raise ValueError("a figure needs at least one value")
    kept = tuple(tuple(float(x) for x in s) for s in samples) if samples and all(samples) else ()
    return Figure(tuple(float(v) for v in values), int(n), metric in PROPORTIONS, kept)


AGREES, DISAGREES, UNRESOLVED = "agrees", "disagrees", "not resolved at this size"
NO_INTERVAL = "not resolved: no interval for this metric"


def verdict(relation: str, a: Figure, b: Figure, margin: float = 0.0) -> tuple[str, tuple[float, float]]:
    """Does ``a relation b`` hold, by the spans? (A figure without intervals, BLEU-4 say, settles nothing.) Returns the verdict and the interval of ``a − b`` that the
    spans allow (``[lo_a − hi_b, hi_a − lo_b]``).

    ``>``: agrees when the difference's interval lies above ``margin`` (default 0), disagrees when it lies
    at or below 0 (b is at least as good, clearly), else not resolved.
    ``≈`` (``~``): agrees when the whole interval lies within ±``margin``, disagrees when it lies entirely
    outside it, else not resolved - a tie cannot be shown by overlapping intervals alone, so ``≈`` needs a
    margin.
    """
    (lo_a, hi_a), (lo_b, hi_b) = a.span, b.span
    lo, hi = lo_a - hi_b, hi_a - lo_b
    if relation in (">", "≈", "~") and not (a.intervals() and b.intervals()):
        if relation != ">" and margin <= 0:
            raise ValueError("a '≈' claim needs a margin > 0 (how close counts as the same)")
        return NO_INTERVAL, (lo, hi)  # the seeds' range says nothing about the test images: never settled
    if relation == ">":
        return (AGREES if lo > margin else DISAGREES if hi <= 0 else UNRESOLVED), (lo, hi)
    if relation in ("≈", "~"):
        if margin <= 0:
            raise ValueError("a '≈' claim needs a margin > 0 (how close counts as the same)")
        if -margin <= lo and hi <= margin:
            return AGREES, (lo, hi)
        return (DISAGREES if lo > margin or hi < -margin else UNRESOLVED), (lo, hi)
    raise ValueError(f"unknown relation {relation!r}; valid: >, ≈")
