"""Aggregate statistics over runs with rliable (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice").

A *run* is one independent replicate (an evaluation seed in ``cmai benchmark``, a training seed in
``cmai sweep``) and a *task* is a scenario. For each policy, scenario and metric the scores form a
``(runs × tasks)`` matrix; from it:

* **IQM** (interquartile mean, the 25%-trimmed mean over all runs and tasks) and the **mean**,
  each with a 95% *stratified bootstrap* interval (runs resampled within each task,
  :class:`rliable.library.StratifiedBootstrap`, percentile method);
* the **probability of improvement** ``P(X > Y)`` of a learned policy ``X`` over a baseline ``Y``
  (the Mann–Whitney statistic per task, averaged over tasks;
  :func:`rliable.metrics.probability_of_improvement`) with its stratified independent bootstrap
  interval; for a metric where lower is better (ASR) "better" means lower;
* **performance profiles**: the fraction of runs whose score exceeds τ, for scores in ``[0, 1]``
  (robustness ``1 − ASR`` and clean accuracy), plotted with
  :func:`rliable.plot_utils.plot_performance_profiles`.

Intervals are clipped to each metric's range (:func:`agents.stats.bounds_for`); a percentile
bootstrap of a mean or IQM cannot leave the range of the data anyway, the clip makes it a
guarantee. Randomness comes from one ``numpy.random.Generator`` seeded by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rliable import library as rly_library
from rliable import metrics as rly_metrics

from agents.stats import Bounds, bounds_for

#: Metrics aggregated, and whether a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {"return": True, "asr": False, "clean_acc": True}
#: Metrics the probability of improvement is reported for.
POI_METRICS = ("return", "asr")
#: Profiles: (file stem, metric, score transform, x-axis label); scores in [0, 1].
PROFILES: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray], str], ...] = (
    ("profile_robustness", "asr", lambda x: 1.0 - x, r"robustness $1 - $ASR ($\tau$)"),
    ("profile_clean_acc", "clean_acc", lambda x: x, r"clean accuracy ($\tau$)"),
)
DEFAULT_REPS = 1000
DEFAULT_SEED = 0

#: ``scores[scenario][policy][metric]`` → per-run values (``None``/NaN = undefined, dropped).
Scores = Mapping[str, Mapping[str, Mapping[str, Sequence["float | None"]]]]


# rliable's bootstrap classes draw their indices from NumPy's *global* generator
# (``np.random.choice``), so their ``random_state`` has no effect. These subclasses draw from the
# bootstrap's own generator instead: seeded, no global state. Everything else is rliable's.
class _SeededStratifiedBootstrap(rly_library.StratifiedBootstrap):
    def update_indices(self) -> tuple[np.ndarray, ...]:
        indices = self.generator.integers(0, self._num_items, self._args_shape)
        return (indices, *self._strata_indices)


class _SeededStratifiedIndependentBootstrap(rly_library.StratifiedIndependentBootstrap):
    def _get_indices(self, num_runs: int, array_shape: tuple[int, ...], strata_indices: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        return (self.generator.integers(0, num_runs, array_shape), *strata_indices)


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its 95% bootstrap interval, clipped to ``bounds``."""

    point: float
    low: float
    high: float
    bounds: Bounds

    def as_dict(self) -> dict[str, Any]:
        return {"point": self.point, "ci95": [self.low, self.high], "bounds": list(self.bounds)}

    def format(self, digits: int = 3) -> str:
        """``0.512 [0.480, 0.540]``."""
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _clip(value: float, bounds: Bounds) -> float:
    low, high = bounds
    value = value if low is None else max(low, value)
    return value if high is None else min(high, value)


def _estimate(point: float, low: float, high: float, bounds: Bounds) -> Estimate:
    return Estimate(_clip(float(point), bounds), _clip(float(low), bounds), _clip(float(high), bounds), bounds)


def _iqm_and_mean(scores: np.ndarray) -> np.ndarray:
    return np.array([rly_metrics.aggregate_iqm(scores), rly_metrics.aggregate_mean(scores)])


def iqm_and_mean(scores: np.ndarray, metric: str, reps: int = DEFAULT_REPS, rng: np.random.Generator | None = None) -> dict[str, Estimate]:
    """IQM and mean of a ``(runs × tasks)`` score matrix with stratified-bootstrap 95% intervals.

    :param metric: names the range the intervals are clipped to (:func:`agents.stats.bounds_for`).
    :param reps: bootstrap resamples.
    :param rng: the generator the resamples are drawn from (default: seeded with 0).
    """
    scores = _matrix(scores)
    bounds = bounds_for(metric)
    point = _iqm_and_mean(scores)
    if scores.shape[0] < 2:  # one run: no spread to resample
        return {name: _estimate(point[i], point[i], point[i], bounds) for i, name in enumerate(("iqm", "mean"))}
    boot = _SeededStratifiedBootstrap(scores, seed=rng if rng is not None else np.random.default_rng(DEFAULT_SEED))
    ci = boot.conf_int(_iqm_and_mean, reps=reps, size=0.95, method="percentile")
    return {name: _estimate(point[i], ci[0, i], ci[1, i], bounds) for i, name in enumerate(("iqm", "mean"))}


def _poi_fast(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rliable's ``probability_of_improvement`` as one array expression, for the bootstrap loop.

    The Mann–Whitney U statistic over ``n_x·n_y`` is ``P(X > Y) + ½·P(X = Y)``; scipy's
    ``mannwhitneyu`` computes the same number but costs ~1 ms a call, i.e. seconds per interval.
    (Tested equal to rliable's in tests/test_aggregate.py.)
    """
    greater = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    ties = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return np.array([float(np.mean(greater + 0.5 * ties))])


def probability_of_improvement(
    x: np.ndarray, y: np.ndarray, metric: str, reps: int = DEFAULT_REPS, rng: np.random.Generator | None = None
) -> Estimate:
    """``P(X better than Y)`` averaged over tasks, with a stratified independent bootstrap 95% interval.

    :param x: ``(runs_x × tasks)`` scores of X; ``y``: ``(runs_y × tasks)`` of Y (same tasks).
    :param metric: ``"asr"`` counts lower values as better (:data:`HIGHER_IS_BETTER`).
    """
    x, y = _matrix(x), _matrix(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"probability of improvement needs the same tasks for both policies, got {x.shape[1]} and {y.shape[1]}")
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
    x, y = sign * x, sign * y
    point = float(rly_metrics.probability_of_improvement(x, y))
    if min(x.shape[0], y.shape[0]) < 2:
        return _estimate(point, point, point, (0.0, 1.0))
    boot = _SeededStratifiedIndependentBootstrap(x, y, seed=rng if rng is not None else np.random.default_rng(DEFAULT_SEED))
    ci = boot.conf_int(_poi_fast, reps=reps, size=0.95, method="percentile")
    return _estimate(point, ci[0, 0], ci[1, 0], (0.0, 1.0))


def performance_profile(
    scores: np.ndarray, taus: np.ndarray, reps: int = DEFAULT_REPS, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of runs (over all tasks) with score > τ at each τ, and its ``(2 × len(taus))`` 95% band.

    (rliable's ``create_performance_profile`` with its score distribution, drawn from ``rng``.)
    """
    scores = _matrix(scores)
    taus = np.asarray(taus, dtype=np.float64)

    def profile(s: np.ndarray) -> np.ndarray:
        return np.array([rly_library.run_score_deviation(s, t) for t in taus])

    point = profile(scores)
    if scores.shape[0] < 2:
        return point, np.stack([point, point])
    boot = _SeededStratifiedBootstrap(scores, seed=rng if rng is not None else np.random.default_rng(DEFAULT_SEED))
    return point, np.clip(boot.conf_int(profile, reps=reps, size=0.95, method="percentile"), 0.0, 1.0)


def _matrix(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty (runs × tasks) matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("scores must be finite (drop undefined runs first)")
    return array


def _runs(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _task_matrix(scores: Scores, policy: str, metric: str, scenarios: Sequence[str]) -> np.ndarray | None:
    """``(runs × scenarios)`` for ``policy``, or ``None`` when a scenario lacks it or run counts differ."""
    columns = []
    for scenario in scenarios:
        runs = _runs(scores.get(scenario, {}).get(policy, {}).get(metric, ()))
        if not runs:
            return None
        columns.append(runs)
    if len({len(c) for c in columns}) != 1:
        return None
    return np.array(columns, dtype=np.float64).T


#: fewest stratified-bootstrap resamples :func:`aggregate` accepts
MIN_BOOTSTRAP_REPS = 100


def check_reps(reps: int, option: str = "bootstrap reps") -> int:
    """``reps`` if :func:`aggregate` accepts it; for commands to check before they run anything."""
    if reps < MIN_BOOTSTRAP_REPS:
        raise ValueError(f"{option} must be at least {MIN_BOOTSTRAP_REPS}, got {reps}")
    return reps


def aggregate(
    scores: Scores,
    learned: Sequence[str],
    baselines: Sequence[str],
    metrics: Sequence[str] = tuple(HIGHER_IS_BETTER),
    reps: int = DEFAULT_REPS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """The rliable report: estimates per scenario and policy, over all scenarios, and P(improvement).

    :param scores: ``scores[scenario][policy][metric]`` per-run values.
    :param learned: the policies compared against each baseline.
    :param baselines: the baselines they are compared against.
    :param reps: bootstrap resamples.
    :param seed: seeds the one generator every bootstrap draws from.
    :returns: ``{"settings", "per_scenario": {scenario: {policy: {metric: {"iqm", "mean", "runs"}}}},
        "all_scenarios": {policy: {metric: ...}}, "probability_of_improvement": [...]}``; the
        all-scenario IQM/mean only for metrics in a common range (rates), where every scenario has
        the same number of runs.
    """
    check_reps(reps)
    rng = np.random.default_rng(seed)
    scenarios = list(scores)
    policies = list(dict.fromkeys(p for s in scenarios for p in scores[s]))
    report: dict[str, Any] = {
        "settings": {"reps": reps, "seed": seed, "confidence": 0.95, "method": "stratified bootstrap, percentile", "metrics": list(metrics)},
        "per_scenario": {},
        "all_scenarios": {},
        "probability_of_improvement": [],
    }
    for scenario in scenarios:
        block: dict[str, Any] = {}
        for policy in scores[scenario]:
            block[policy] = {}
            for metric in metrics:
                runs = _runs(scores[scenario][policy].get(metric, ()))
                if runs:
                    est = iqm_and_mean(np.array(runs), metric, reps, rng)
                    block[policy][metric] = {"iqm": est["iqm"].as_dict(), "mean": est["mean"].as_dict(), "runs": len(runs)}
        report["per_scenario"][scenario] = block
    if len(scenarios) > 1:
        for policy in policies:
            entry = {}
            for metric in metrics:
                bounds = bounds_for(metric)
                if bounds[0] is None or bounds[1] is None:
                    continue  # returns of different scenarios are on different scales
                matrix = _task_matrix(scores, policy, metric, scenarios)
                if matrix is not None:
                    est = iqm_and_mean(matrix, metric, reps, rng)
                    entry[metric] = {"iqm": est["iqm"].as_dict(), "mean": est["mean"].as_dict(), "runs": int(matrix.shape[0])}
            if entry:
                report["all_scenarios"][policy] = entry
    groups = [(s, [s]) for s in scenarios] + ([("all", scenarios)] if len(scenarios) > 1 else [])
    for x in learned:
        for y in baselines:
            for metric in (m for m in metrics if m in POI_METRICS):
                for label, tasks in groups:
                    xs, ys = _task_matrix(scores, x, metric, tasks), _task_matrix(scores, y, metric, tasks)
                    if xs is None or ys is None:
                        continue
                    est = probability_of_improvement(xs, ys, metric, reps, rng)
                    report["probability_of_improvement"].append(
                        {"policy": x, "baseline": y, "metric": metric, "scenario": label, **est.as_dict()}
                    )
    return report


def render_markdown(report: Mapping[str, Any], digits: int = 3) -> str:
    """The report's tables (IQM and mean with 95% CIs; P(improvement)) as Markdown."""

    def cell(entry: Mapping[str, Any] | None, key: str) -> str:
        if not entry:
            return "—"
        value = entry[key]
        low, high = value["ci95"]
        return f"{value['point']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    settings = report["settings"]
    metrics = settings["metrics"]
    lines = [
        "## Aggregate statistics (rliable)",
        "",
        f"IQM and mean with 95% stratified-bootstrap intervals ({settings['reps']} resamples, seed {settings['seed']}, "
        "percentile method), clipped to each metric's range; runs are seeds.",
        "",
    ]
    header = "| scenario | policy | " + " | ".join(f"{m} IQM | {m} mean" for m in metrics) + " | runs |"
    rule = "|---|---|" + "---|---|" * len(metrics) + "---|"
    lines += [header, rule]
    blocks = [*report["per_scenario"].items(), *([("all scenarios", report["all_scenarios"])] if report["all_scenarios"] else [])]
    for scenario, block in blocks:
        for policy, entry in block.items():
            runs = max((e["runs"] for e in entry.values()), default=0)
            cells = [c for m in metrics for c in (cell(entry.get(m), "iqm"), cell(entry.get(m), "mean"))]
            lines.append(f"| {scenario} | {policy} | " + " | ".join(cells) + f" | {runs} |")
    if report["probability_of_improvement"]:
        lines += [
            "",
            "Probability of improvement P(policy better than baseline) (lower ASR is better), 95% CI:",
            "",
            "| policy | baseline | metric | scenario | P(improvement) |",
            "|---|---|---|---|---|",
        ]
        for row in report["probability_of_improvement"]:
            lines.append(
                f"| {row['policy']} | {row['baseline']} | {row['metric']} | {row['scenario']} | "
                f"{row['point']:.{digits}f} [{row['ci95'][0]:.{digits}f}, {row['ci95'][1]:.{digits}f}] |"
            )
    return "\n".join(lines) + "\n"


def plot_profiles(scores: Scores, out: str | Path, reps: int = DEFAULT_REPS, seed: int = DEFAULT_SEED) -> list[Path]:
    """Performance-profile PNGs (``profile_robustness.png``, ``profile_clean_acc.png``) over all scenarios.

    Every policy with runs on every scenario (same number of runs) gets a curve with its 95% band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenarios = list(scores)
    policies = list(dict.fromkeys(p for s in scenarios for p in scores[s]))
    taus = np.linspace(0.0, 1.0, 41)
    written = []
    for stem, metric, transform, label in PROFILES:
        profiles, bands = {}, {}
        for policy in policies:
            matrix = _task_matrix(scores, policy, metric, scenarios)
            if matrix is not None:
                profiles[policy], bands[policy] = performance_profile(transform(matrix), taus, reps, rng)
        if not profiles:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = dict(zip(profiles, plt.get_cmap("tab10").colors * 3))
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=bands, colors=colors, xlabel=label, ax=ax)
        ax.legend(list(profiles), fontsize="small", loc="lower left")
        ax.set_title(f"performance profile over {', '.join(scenarios)}", fontsize="medium")
        path = out / f"{stem}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
