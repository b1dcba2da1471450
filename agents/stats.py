"""Confidence intervals over seeds.

Evaluation runs are summarised per seed first (one number per seed: the mean over that seed's
episodes), and the seeds are the independent replicates: the 95% interval of a metric is the
Student-t interval over the per-seed means,

    x̄ ± t_{0.975, n−1} · s / √n,   s² = Σ (x_k − x̄)² / (n − 1),

and a difference between two policies evaluated on the same seeds is the *paired* interval of
the per-seed differences ``d_k = a_k − b_k`` (the seeds share their attack schedules, so pairing
removes the between-seed variance). With one seed the half-width is undefined and reported as
``None``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Interval:
    """Mean and 95% t-interval of a sample of per-seed values.

    :param mean: x̄ (``None`` when there are no values).
    :param half_width: t_{0.975, n−1}·s/√n (``None`` when n < 2).
    :param n: number of values (seeds).
    :param values: the values themselves.
    """

    mean: float | None
    half_width: float | None
    n: int
    values: tuple[float, ...]

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width

    def as_dict(self) -> dict:
        out = asdict(self)
        out["values"] = list(self.values)
        out["ci95"] = [self.low, self.high]
        return out

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.512 ± 0.034"`` (``"—"`` with no values; no ``±`` part with one)."""
        if self.mean is None:
            return "—"
        text = f"{self.mean * scale:.{digits}f}"
        return text if self.half_width is None else f"{text} ± {self.half_width * scale:.{digits}f}"


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of ``values`` (``None`` and NaN entries are dropped)."""
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(clean)
    if n == 0:
        return Interval(None, None, 0, ())
    mean = float(np.mean(clean))
    if n < 2:
        return Interval(mean, None, 1, tuple(clean))
    sem = float(np.std(clean, ddof=1)) / math.sqrt(n)
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    return Interval(mean, t * sem, n, tuple(clean))


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Interval of the mean of ``a_k − b_k`` over positions where both are defined."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    return t_interval(diffs, confidence)
