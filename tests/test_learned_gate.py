"""benchmarks/learned_gate.py: trains a shipped entry, benchmarks it against the fixed grid, judges point 6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

#: periodic shrunk to one 6-round cycle on small batches (its entry's 32 envs × 64 steps still make one rollout).
TINY = {"episode_rounds": 6, "repeat": 1, "phases.0.rounds": 2, "phases.1.rounds": 2, "phases.2.rounds": 2,
        "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}
#: unseen_attacks shrunk the same way: its four phases of 2 rounds on small batches.
UNSEEN_TINY = {"phases.0.rounds": 2, "phases.1.rounds": 2, "phases.2.rounds": 2, "phases.3.rounds": 2,
               "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}


@pytest.fixture(scope="module")
def learned_gate():
    return load_benchmark("learned_gate")  # it imports adaptivity_gap beside it


def _interval(mean: float, low: float) -> dict:
    return {"mean": mean, "half_width": mean - low, "ci95": [low, 2 * mean - low]}


def test_default_scenarios_are_the_shipped_entries(learned_gate):
    names = learned_gate.scenarios_with_entries()
    assert {"shift_evasion", "abrupt_shift", "detector_evasion", "periodic"} <= set(names)
    assert "default" not in names and "quickstart" not in names


def test_point6_needs_both_cis_above_zero_the_budget_and_half_the_schedule_gap(learned_gate):
    row = {"vs_best_fixed": _interval(3.0, 1.0), "vs_proeat_dynamic": _interval(9.0, 7.0), "cpu_minutes": 15.0,
           "return": {"mean": 50.0}}
    assert learned_gate.point6_holds(row)  # no schedule gap measured: the CIs and budget decide
    assert not learned_gate.point6_holds({**row, "vs_best_fixed": _interval(3.0, -0.5)})
    assert not learned_gate.point6_holds({**row, "cpu_minutes": 21.0})
    measured = {**row, "schedule_gap": 4.0, "schedule_best_fixed_return": 47.5}
    assert learned_gate.schedule_share(measured) == pytest.approx(0.625) and learned_gate.point6_holds(measured)
    assert not learned_gate.point6_holds({**measured, "schedule_best_fixed_return": 49.0})  # 25% of the gap
    assert learned_gate.schedule_share({**measured, "schedule_gap": 0.0}) is None
    assert not learned_gate.point6_holds({**measured, "schedule_gap": 0.0})


def test_run_one_trains_the_shipped_entry_and_reads_the_benchmark(learned_gate, tmp_path, capsys):
    job = {"scenario": "periodic", "seed": 0, "out": str(tmp_path), "timesteps": 64, "env_kwargs": TINY,
           "eval_seeds": [0, 1], "search_seeds": [0], "schedule_gap": False}
    row = learned_gate.run_one(job)
    record = json.loads((Path(row["run"]) / "run.json").read_text())
    assert record["threads"] == 1 and record["n_envs"] == 32  # the shipped periodic entry, one thread
    assert row["cpu_minutes"] == pytest.approx(record["cpu_time_s"] / 60) and row["cpu_minutes"] > 0
    assert row["best_fixed"].startswith("fixed(")
    assert row["return"]["mean"] - row["best_fixed_return"]["mean"] == pytest.approx(row["vs_best_fixed"]["mean"])
    for key in ("system_asr", "task_only_system_asr"):
        assert 0.0 <= row[key]["mean"] <= 1.0
    assert len(row["mean_betas"]) == 3 and "fixed_mean_delta" in row
    learned_gate.print_table([row])
    printed = capsys.readouterr().out
    assert "periodic" in printed and row["best_fixed"] in printed
    # point 6's held-out clause: the same gate on unseen_attacks against every static weighting
    held_out = learned_gate.held_out_rows([row["run"]], "unseen_attacks", [0, 1], UNSEEN_TINY, tmp_path)
    (gate,) = held_out
    assert gate["policy"].startswith("ppo:periodic")
    static = {"no_defense", "static_adversarial", "static_consistency", "uniform"}
    assert gate["best_static"] in static or gate["best_static"].startswith("fixed(")
    assert gate["best_static_system_asr"]["mean"] <= gate["no_defense_system_asr"]["mean"]  # no_defense is static too
    assert 0.0 <= gate["system_asr"]["mean"] <= 1.0
    report = json.loads((tmp_path / "held_out_unseen_attacks" / "results.json").read_text())
    (block,) = report["scenarios"].values()
    rows = {r["policy"]: r for r in block["comparison"]}
    assert gate["best_static_system_asr"]["mean"] == min(r["system_asr"]["mean"] for r in rows.values() if learned_gate.is_static(r))
    assert not learned_gate.is_static(rows["proeat_dynamic"]) and not learned_gate.is_static(rows[gate["policy"]])
    learned_gate.print_held_out(held_out)
    assert gate["policy"] in capsys.readouterr().out


def test_held_out_clause_needs_the_ratio_the_clean_drop_and_a_measured_latency(learned_gate):
    row = {"ratio": 0.6, "clean_acc_drop": {"mean": 0.01}, "weight_response_ms": {"mean": 12.0}}
    assert learned_gate.held_out_holds(row)
    assert not learned_gate.held_out_holds({**row, "ratio": 0.75})
    assert not learned_gate.held_out_holds({**row, "clean_acc_drop": {"mean": 0.03}})
    assert not learned_gate.held_out_holds({**row, "weight_response_ms": {"mean": 150.0}})
    assert not learned_gate.held_out_holds({**row, "weight_response_ms": {"mean": None}})  # never measured


def test_held_out_fidelity_reaches_the_benchmark(learned_gate, monkeypatch, tmp_path):
    """``--held-out-fidelity pixel`` evaluates every gate and baseline at pixel fidelity."""
    import agents.benchmark

    seen = []
    row = lambda policy, kind, asr: {"policy": policy, "kind": kind, "system_asr": {"mean": asr}, "clean_acc_drop": {"mean": 0.0},  # noqa: E731
                                     "weight_response_ms": {"mean": 5.0}}
    comparison = [row("no_defense", "baseline", 0.066), row("fixed(0.67,0.33,0.00)", "fixed_grid", 0.073), row("ppo:periodic_1", "trained", 0.115)]

    def fake_benchmark(args):
        seen.append(args)
        return {"scenarios": {"unseen_attacks": {"comparison": comparison}}}

    monkeypatch.setattr(agents.benchmark, "run_benchmark", fake_benchmark)
    (gate,) = learned_gate.held_out_rows(["runs/ppo/periodic_1"], "unseen_attacks", [0], {}, tmp_path, "pixel")
    assert seen[0].fidelity == "pixel" and seen[0].fixed_grid and list(seen[0].policies) == ["runs/ppo/periodic_1"]
    assert gate["best_static"] == "no_defense" and gate["ratio"] == pytest.approx(0.115 / 0.066)
    assert not learned_gate.held_out_holds(gate)
    learned_gate.held_out_rows(["runs/ppo/periodic_1"], "unseen_attacks", [0], {}, tmp_path)
    assert seen[1].fidelity is None  # default: the gates' training fidelity
