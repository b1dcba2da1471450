"""rliable aggregates: IQM/mean intervals, probability of improvement, profiles, metric ranges."""

from __future__ import annotations

import numpy as np
import pytest
from rliable import metrics as rly_metrics

from agents.aggregate import _poi_fast, aggregate, iqm_and_mean, performance_profile, plot_profiles, probability_of_improvement, render_markdown


def test_iqm_and_mean_match_rliable_and_cover_the_point() -> None:
    x = np.array([0.1, 0.2, 0.15, 0.3, 0.12, 0.5, 0.05, 0.4])
    est = iqm_and_mean(x, "asr", reps=500, rng=np.random.default_rng(0))
    assert est["iqm"].point == pytest.approx(rly_metrics.aggregate_iqm(x[:, None]))
    assert est["mean"].point == pytest.approx(x.mean())
    for e in est.values():
        assert e.low <= e.point <= e.high
        assert e.high - e.low > 0.02  # eight spread-out runs: a real interval
    # Same generator seed, same interval (rliable's own classes would draw from the global RNG).
    again = iqm_and_mean(x, "asr", reps=500, rng=np.random.default_rng(0))
    assert again["iqm"] == est["iqm"]


def test_intervals_stay_inside_the_metric_range() -> None:
    # Rates at the edge of [0, 1] and latencies at 0: the interval may touch the bound, never cross it.
    for metric, values in [("asr", [1.0, 1.0, 0.99, 1.0, 0.97]), ("clean_acc", [0.0, 0.01, 0.0, 0.0]), ("detection_rounds", [0.0, 0.0, 1.0, 0.0])]:
        est = iqm_and_mean(np.array(values), metric, reps=300)
        low, high = {"asr": (0, 1), "clean_acc": (0, 1), "detection_rounds": (0, None)}[metric]
        for e in est.values():
            assert e.low >= low and (high is None or e.high <= high)


def test_probability_of_improvement_direction_and_fast_path() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 4, (5, 2)).astype(float), rng.integers(0, 4, (6, 2)).astype(float)
        assert _poi_fast(x, y)[0] == pytest.approx(rly_metrics.probability_of_improvement(x, y))
    low_asr, high_asr = np.array([0.1, 0.12, 0.09, 0.11]), np.array([0.5, 0.6, 0.55, 0.52])
    assert probability_of_improvement(low_asr, high_asr, "asr", reps=200).point == 1.0  # lower ASR is better
    assert probability_of_improvement(low_asr, high_asr, "return", reps=200).point == 0.0
    mixed = probability_of_improvement(np.array([1.0, 3.0, 5.0]), np.array([2.0, 4.0]), "return", reps=200)
    assert mixed.point == pytest.approx(0.5) and 0.0 <= mixed.low < 0.5 < mixed.high <= 1.0


def test_performance_profile_counts_runs_above_tau() -> None:
    taus = np.array([0.0, 0.25, 0.5, 0.75])
    point, band = performance_profile(np.array([[0.1, 0.6], [0.3, 0.9]]), taus, reps=200)
    assert point.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert band.shape == (2, 4) and np.all(band[0] <= point + 1e-12) and np.all(point <= band[1] + 1e-12)


def test_aggregate_report_tables_and_plots(tmp_path) -> None:
    scores = {
        "s1": {"ppo": {"asr": [0.1, 0.2, 0.15], "return": [3, 4, 5], "clean_acc": [1, 1, 0.99]},
               "uniform": {"asr": [0.5, 0.6, None], "return": [0, 1, 1], "clean_acc": [1, 1, 1]}},
        "s2": {"ppo": {"asr": [0.0, 0.01, 0.0], "return": [1, 2, 3], "clean_acc": [1, 1, 1]},
               "uniform": {"asr": [0.9, 0.99, 1.0], "return": [0, 1, 2], "clean_acc": [1, 1, 1]}},
    }
    report = aggregate(scores, learned=["ppo"], baselines=["uniform"], reps=200, seed=1)
    assert report["per_scenario"]["s1"]["uniform"]["asr"]["runs"] == 2  # the undefined run is dropped
    # uniform has 2 ASR runs on s1 and 3 on s2: no all-scenario ASR for it; ppo has one.
    assert "asr" not in report["all_scenarios"].get("uniform", {})
    assert report["all_scenarios"]["ppo"]["asr"]["mean"]["point"] == pytest.approx(np.mean([0.1, 0.2, 0.15, 0.0, 0.01, 0.0]))
    assert "return" not in report["all_scenarios"]["ppo"]  # returns of different scenarios do not pool
    poi = {(r["metric"], r["scenario"]): r for r in report["probability_of_improvement"]}
    assert poi[("asr", "s2")]["point"] == 1.0 and poi[("return", "all")]["point"] > 0.5
    text = render_markdown(report)
    assert "| s1 | ppo |" in text and "P(improvement)" in text
    paths = plot_profiles(scores, tmp_path, reps=100)
    assert [p.name for p in paths] == ["profile_robustness.png", "profile_clean_acc.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    with pytest.raises(ValueError, match="reps"):
        aggregate(scores, ["ppo"], ["uniform"], reps=10)
