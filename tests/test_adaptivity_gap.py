"""benchmarks/adaptivity_gap.py on a tiny quickstart: the search never loses to its start, metrics stay in range."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptivity_gap.py"
TINY = {"episode_rounds": 6, "phases.0.rounds": 3, "phases.1.rounds": 3, "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("adaptivity_gap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_and_report_on_a_tiny_scenario():
    gap = load_benchmark()
    best_fixed, schedule, played = gap.search("quickstart", [0, 1], TINY, passes=1)
    scores = gap.play("quickstart", [best_fixed, schedule], [0, 1], gap.SEARCH_SEED_OFFSET, TINY)
    assert scores.returns[1].mean() >= scores.returns[0].mean() - 1e-9  # coordinate ascent only accepts improvements
    assert played >= 10 * 2
    assert np.all((scores.system_asr >= 0) & (scores.system_asr <= scores.asr + 1e-12))
    result = gap.report("quickstart", [0], [0, 1], TINY)
    assert set(result["rows"]) == {"task-only", "best fixed", "best schedule"}
    for row in result["rows"].values():
        assert 0.0 <= row["system_asr"].mean <= 1.0 and 0.0 <= row["clean_acc"].mean <= 1.0
