"""Confidence intervals over seeds.

Evaluation runs are summarised per seed first (one number per seed: the mean over that seed's
episodes), and the seeds are the independent replicates: the 95% interval of a metric is the
Student-t interval over the per-seed means,

    x̄ ± t_{0.975, n−1} · s / √n,   s² = Σ (x_k − x̄)² / (n − 1),

and a difference between two policies evaluated on the same seeds is the *paired* interval of
the per-seed differences ``d_k = a_k − b_k`` (the seeds share their attack schedules, so pairing
removes the between-seed variance). With one seed the half-width is undefined and reported as
``None``.

A metric with a range (a rate in [0, 1], a latency ≥ 0) has its interval clipped to that range
(:data:`METRIC_BOUNDS`): ``low``/``high`` and the reported ``ci95`` never leave it, and a clipped
interval is printed as ``mean [low, high]`` instead of ``mean ± half-width``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

Bounds = tuple["float | None", "float | None"]
UNBOUNDED: Bounds = (None, None)
_RATE: Bounds = (0.0, 1.0)
#: Range of each evaluated metric (metrics not listed, e.g. ``return``, are unbounded).
METRIC_BOUNDS: dict[str, Bounds] = {
    "asr": _RATE,
    "clean_acc": _RATE,
    "system_asr": _RATE,
    "false_rejection_rate": _RATE,
    "system_clean_acc": _RATE,
    "detector_tpr": _RATE,
    "detector_fpr": _RATE,
    "compute_cost": _RATE,
    "prediction_entropy": _RATE,  # an entropy over its maximum, ln K
    "consistency_score": (-1.0, 1.0),  # a mean cosine
    "clean_acc_drop": (-1.0, 1.0),  # a difference of two rates
    **{f"{name}_{unit}": (0.0, None) for name in ("detection", "weight_response", "recovery") for unit in ("rounds", "ms")},
}


def bounds_for(metric: str) -> Bounds:
    """The range of ``metric`` (per-attack ASRs ``asr:<name>`` are rates too)."""
    return _RATE if metric.startswith("asr:") else METRIC_BOUNDS.get(metric, UNBOUNDED)


def difference_bounds(bounds: Bounds) -> Bounds:
    """Range of a difference ``a − b`` of two values in ``bounds`` (unbounded if either end is open)."""
    low, high = bounds
    return UNBOUNDED if low is None or high is None else (low - high, high - low)


@dataclass(frozen=True)
class Interval:
    """Mean and 95% t-interval of a sample of per-seed values.

    :param mean: x̄ (``None`` when there are no values).
    :param half_width: t_{0.975, n−1}·s/√n (``None`` when n < 2).
    :param n: number of values (seeds).
    :param values: the values themselves.
    :param bounds: the metric's range; ``low`` and ``high`` are clipped to it.
    """

    mean: float | None
    half_width: float | None
    n: int
    values: tuple[float, ...]
    bounds: Bounds = UNBOUNDED

    def _clip(self, value: float) -> float:
        low, high = self.bounds
        value = value if low is None else max(low, value)
        return value if high is None else min(high, value)

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self._clip(self.mean - self.half_width)

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self._clip(self.mean + self.half_width)

    @property
    def clipped(self) -> bool:
        """Whether the metric's range cut the symmetric interval."""
        return self.half_width is not None and (self.low != self.mean - self.half_width or self.high != self.mean + self.half_width)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["values"] = list(self.values)
        out["bounds"] = list(self.bounds)
        out["ci95"] = [self.low, self.high]
        return out

    @classmethod
    def from_dict(cls, entry: dict) -> "Interval":
        """Inverse of :meth:`as_dict`."""
        bounds = tuple(entry.get("bounds") or UNBOUNDED)
        return cls(entry.get("mean"), entry.get("half_width"), int(entry.get("n", 0)), tuple(entry.get("values") or ()), bounds)  # type: ignore[arg-type]

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.512 ± 0.034"``; ``"0.998 [0.994, 1.000]"`` when clipped to the metric's range.

        ``"—"`` with no values; no interval part with one.
        """
        if self.mean is None:
            return "—"
        text = f"{self.mean * scale:.{digits}f}"
        if self.half_width is None:
            return text
        if self.clipped:
            return f"{text} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"
        return f"{text} ± {self.half_width * scale:.{digits}f}"


def t_interval(values: Sequence[float | None], confidence: float = 0.95, bounds: Bounds = UNBOUNDED) -> Interval:
    """Student-t interval of the mean of ``values`` (``None`` and NaN entries are dropped), clipped to ``bounds``."""
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(clean)
    if n == 0:
        return Interval(None, None, 0, (), bounds)
    mean = float(np.mean(clean))
    if n < 2:
        return Interval(mean, None, 1, tuple(clean), bounds)
    sem = float(np.std(clean, ddof=1)) / math.sqrt(n)
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    return Interval(mean, t * sem, n, tuple(clean), bounds)


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95, bounds: Bounds = UNBOUNDED
) -> Interval:
    """Interval of the mean of ``a_k − b_k`` over positions where both are defined.

    :param bounds: the range of ``a`` and ``b``; the difference is clipped to :func:`difference_bounds`.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    return t_interval(diffs, confidence, difference_bounds(bounds))
