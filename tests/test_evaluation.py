"""Evaluation protocol, CLI (`cmai evaluate`, `cmai benchmark`, `cmai quickstart`) and CI helpers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cmai_env
from agents.evaluation import (
    CONTINUOUS_ENV_ID,
    DISCRETE_ENV_ID,
    EVAL_ENV_ID,
    EVAL_SEED_OFFSET,
    ROUND_COLUMNS,
    env_spec,
    evaluate_policy,
    protocol_for,
)
from agents.env_pool import EnvPool
from agents.stats import paired_difference, t_interval
from cmai_env.cli.main import main
from cmai_env.keyvalue import parse_assignments
from cmai_env.scenario import scenario_hash

TINY = ["batch_size:8", "dataset.train_n:64", "dataset.probe_n:16", "episode_rounds:6"]
TINY_KWARGS = parse_assignments(TINY, ":", "--env-kwargs")


#: the no_defense reference cache inside each test's folder (conftest.own_cache)
pytestmark = pytest.mark.usefixtures("own_cache")


# ------------------------------------------------------------------------------ units
def test_t_interval_by_hand():
    interval = t_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.302653
    assert interval.mean == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert t_interval([0.5]).half_width is None and t_interval([None]).mean is None
    diff = paired_difference([3.0, 5.0], [1.0, 2.0])  # d = (2, 3): s = √0.5, s/√2 = 0.5
    assert diff.mean == pytest.approx(2.5) and diff.half_width == pytest.approx(12.706205 * 0.5, rel=1e-6)


def test_intervals_never_leave_a_metrics_range():
    from agents.stats import Interval, bounds_for

    accuracy = t_interval([1.0, 1.0, 0.99], bounds=bounds_for("clean_acc"))
    assert accuracy.mean + accuracy.half_width > 1.0  # the symmetric t-interval would exceed 1
    assert accuracy.high == 1.0 and accuracy.low == pytest.approx(accuracy.mean - accuracy.half_width)
    assert accuracy.as_dict()["ci95"][1] == 1.0 and accuracy.format() == f"{accuracy.mean:.3f} [{accuracy.low:.3f}, 1.000]"
    assert Interval.from_dict(accuracy.as_dict()) == accuracy
    latency = t_interval([0.0, 0.0, 3.0], bounds=bounds_for("recovery_rounds"))
    assert latency.low == 0.0 and latency.high > 3.0
    assert bounds_for("asr:pgd_linf") == (0.0, 1.0) and bounds_for("return") == (None, None)
    drop = paired_difference([1.0, 0.0], [0.0, 1.0], bounds=bounds_for("asr"))  # ASR differences lie in [-1, 1]
    assert (drop.low, drop.high) == (-1.0, 1.0)
    assert "±" in t_interval([1.0, 2.0, 4.0]).format()  # unbounded: mean ± half-width


def test_one_key_value_parser_types_and_errors():
    parse = lambda items, sep=":", option="--env-kwargs": parse_assignments(items, sep, option)  # noqa: E731
    assert parse(["episode_rounds:8", "defense.lr:1e-3", "fidelity:embedding", "x:true", "y:null"]) == {
        "episode_rounds": 8,
        "defense.lr": 1e-3,
        "fidelity": "embedding",
        "x": True,
        "y": None,
    }
    assert parse(["eps=8/255", "components=apgd_ce,square", "net=[32, 32]"], "=", "--param") == {
        "eps": 8 / 255, "components": "apgd_ce,square", "net": [32, 32],
    }
    with pytest.raises(ValueError, match="key:value"):
        parse(["episode_rounds=8"])
    with pytest.raises(ValueError, match="--set 'a=\\[1, 2'"):
        parse(["a=[1, 2"], "=", "--set")


def test_env_ids_and_seed_offset_have_one_definition():
    import agents.policies
    import agents.train
    from agents import protocol

    assert agents.train.EVAL_SEED_OFFSET is protocol.EVAL_SEED_OFFSET == EVAL_SEED_OFFSET == 100_000
    assert agents.policies.CONTINUOUS_ENV_ID is cmai_env.CONTINUOUS_ENV_ID == CONTINUOUS_ENV_ID
    assert set(cmai_env.ENV_IDS) == {CONTINUOUS_ENV_ID, DISCRETE_ENV_ID, EVAL_ENV_ID}


def test_protocol_table_and_env_ids():
    assert protocol_for("quickstart").seeds == (0, 1, 2, 3, 4) and protocol_for("quickstart").episodes_per_seed == 1
    assert protocol_for("my_own_file").seeds == (0, 1, 2, 3, 4)
    assert len(protocol_for("randomized_training").seeds) == 10
    assert env_spec("unseen_attacks").env_id == EVAL_ENV_ID
    assert env_spec("quickstart").env_id == CONTINUOUS_ENV_ID
    assert env_spec("quickstart", action_mode="discrete").env_id == DISCRETE_ENV_ID
    spec = env_spec("unseen_attacks", action_mode="discrete")
    assert spec.env_id == EVAL_ENV_ID and spec.env_kwargs["action_mode"] == "discrete"


# ------------------------------------------------------------------------------ evaluate
def test_cli_evaluate_writes_rounds_summary_and_plots(tmp_path):
    out = tmp_path / "eval"
    code = main(["evaluate", "--policy", "baseline:uniform", "--scenario", "quickstart", "--seeds", "0", "1", "--episodes", "1",
                 "--fidelity", "embedding", "--out", str(out), "--env-kwargs", *TINY, "--quiet",
                 "--tensorboard", str(tmp_path / "tb")])
    assert code == 0
    with (out / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 6 and list(rows[0]) == list(ROUND_COLUMNS)
    assert {r["seed"] for r in rows} == {"0", "1"} and rows[0]["env_seed"] == str(EVAL_SEED_OFFSET)
    np.testing.assert_allclose(float(rows[0]["beta_task"]), 1 / 3, atol=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    meta = summary["metadata"]
    assert meta["env_id"] == CONTINUOUS_ENV_ID
    assert meta["scenario_hash"] == scenario_hash("quickstart")
    assert meta["cmai_version"] == cmai_env.__version__
    assert meta["seeds"] == [0, 1] and meta["fidelity"] == "embedding" and meta["env_kwargs"]["episode_rounds"] == 6
    assert "git_commit" in meta
    for name in ("return", "asr", "clean_acc", "clean_acc_drop", "consistency_score", "prediction_entropy", "detector_tpr", "detector_fpr"):
        entry = summary["metrics"][name]
        assert entry["n"] == 2 and math.isfinite(entry["mean"]) and math.isfinite(entry["half_width"]), name
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    assert 0.0 <= summary["metrics"]["prediction_entropy"]["mean"] <= 1.0
    for name in ("detection_rounds", "detection_ms", "weight_response_rounds", "weight_response_ms", "recovery_rounds", "recovery_ms"):
        assert {"mean", "ci95", "measured", "shifts"} <= set(summary["latency"][name])
    assert set(summary["reference"]["clean_acc_per_seed"]) == {"0", "1"}
    # the return in summary.json is the sum of the per-round rewards of rounds.csv
    per_seed = [sum(float(r["reward"]) for r in rows if r["seed"] == s) for s in ("0", "1")]
    assert summary["metrics"]["return"]["values"] == pytest.approx(per_seed)
    assert (out / "episode_seed0.png").stat().st_size > 0 and (out / "mean_over_seeds.png").is_file()
    # One episode: its mean would be the same figure again, so only episode_seed0.png is drawn.
    single = tmp_path / "eval-one"
    assert main(["evaluate", "--policy", "baseline:uniform", "--scenario", "quickstart", "--seeds", "0", "--fidelity", "embedding",
                 "--out", str(single), "--env-kwargs", *TINY, "--quiet"]) == 0
    assert sorted(p.name for p in single.glob("*.png")) == ["episode_seed0.png"]
    # TensorBoard: one event folder per seed/episode with the documented cmai/... tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "quickstart_uniform" / "seed1_ep0"))
    events.Reload()
    assert {"cmai/asr", "cmai/beta_adv", "cmai/episode/return"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("cmai/asr")] == list(range(6))


def _numbers(summary: dict) -> dict:
    """Every summary number except wall-clock (``*_ms``) fields."""
    out = {k: v for k, v in summary["metrics"].items()}
    out.update({k: v for k, v in summary["latency"].items() if not k.endswith("_ms")})
    out["asr_per_attack"] = summary["asr_per_attack"]
    out["mean_betas"] = summary["mean_betas"]
    return out


def test_same_evaluation_twice_gives_identical_numbers():
    kwargs = dict(seeds=[0], episodes=2, fidelity="embedding", env_kwargs=TINY_KWARGS)
    with EnvPool() as pool:
        first = evaluate_policy("baseline:proeat_dynamic", "quickstart", pool=pool, **kwargs)
        second = evaluate_policy("baseline:proeat_dynamic", "quickstart", pool=pool, **kwargs)  # the pooled env, reset
        # no_defense's own drop is exactly 0
        reference = evaluate_policy("baseline:no_defense", "quickstart", pool=pool, **kwargs)
        # one environment played the six episodes and the reference's two
        assert pool.built == 1 and len(pool) == 1
    assert len(pool) == 0
    assert _numbers(first.summary()) == _numbers(second.summary())
    assert len(first.episodes) == 2 and first.episodes[0].metrics != first.episodes[1].metrics
    assert reference.interval("clean_acc_drop").mean == 0.0
    assert first.reference_clean_acc == reference.reference_clean_acc


def test_a_pooled_batched_env_plays_what_a_fresh_one_plays():
    kwargs = dict(seeds=[0, 1], episodes=1, fidelity="embedding", env_kwargs=TINY_KWARGS, reference=False)
    fresh = evaluate_policy("baseline:proeat_dynamic", "quickstart", **kwargs)
    with EnvPool(size=1) as pool:
        evaluate_policy("baseline:uniform", "quickstart", pool=pool, **kwargs)
        reused = evaluate_policy("baseline:proeat_dynamic", "quickstart", pool=pool, **kwargs)
        assert pool.built == 1
        evaluate_policy("baseline:uniform", "quickstart", pool=pool, **{**kwargs, "seeds": [0]})  # another env evicts it
        assert pool.built == 2 and len(pool) == 1
    assert _numbers(reused.summary()) == _numbers(fresh.summary())
    with pytest.raises(ValueError, match="at least one"):
        EnvPool(size=0)


def test_one_evaluation_validates_the_scenario_once(monkeypatch):
    import gymnasium as gym

    import cmai_env.scenario as scenario_module

    calls: list[str] = []
    validate = scenario_module.validate_scenario

    def counting(raw, source="<scenario>", lines=None):
        calls.append(source)
        return validate(raw, source, lines)

    monkeypatch.setattr(scenario_module, "validate_scenario", counting)
    # uniform (batched env) plus the no_defense reference (its own single env): the file once, the
    # overrides once; both environments receive the validated Scenario object
    evaluate_policy("baseline:uniform", "quickstart", seeds=[0, 1], episodes=1, fidelity="embedding",
                    env_kwargs=TINY_KWARGS, use_disk_cache=False)
    assert len(calls) == 2 and "overrides" in calls[1], calls
    calls.clear()
    env_spec("quickstart", env_kwargs={"device": "cpu"})
    assert len(calls) == 1  # no scenario overrides (device is the env's argument): nothing to re-validate
    spec = env_spec("quickstart", "embedding", TINY_KWARGS)
    calls.clear()
    env = spec.make()
    vec = gym.make_vec(CONTINUOUS_ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", scenario=spec.resolved)
    try:
        assert env.unwrapped.scenario is spec.resolved and vec.scenario is spec.resolved
        assert spec.resolved.episode_rounds == 6 and spec.resolved.fidelity == "embedding"
    finally:
        env.close()
        vec.close()
    assert calls == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "baseline:nope"], "unknown baseline 'nope'"),
        (["--policy", "no/such/run"], "policy folder 'no/such/run' not found"),
        (["--policy", "baseline:uniform", "--env-kwargs", "episode_rounds"], "key:value"),
        (["--policy", "baseline:uniform", "--seeds", "0", "1", "0"], "evaluation seeds must be distinct, got [0, 1, 0]"),
    ],
)
def test_bad_inputs_exit_1_with_a_message(tmp_path, capsys, argv, message):
    code = main(["evaluate", "--scenario", "quickstart", "--out", str(tmp_path / "x"), *argv])
    assert code == 1
    assert message in capsys.readouterr().err


def test_bad_benchmark_policy_exits_1(tmp_path, capsys):
    code = main(["benchmark", "--scenarios", "quickstart", "--out", str(tmp_path), "--policies", str(tmp_path / "missing")])
    assert code == 1 and "not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ benchmark
def test_cli_benchmark_writes_comparison_and_ablation(tmp_path):
    out = tmp_path / "bench"
    torch.set_num_threads(2)  # --threads 1 below must set it back to the suite's one thread
    code = main(["benchmark", "--scenarios", "quickstart", "--seeds", "0", "1", "--fidelity", "embedding", "--out", str(out),
                 "--baselines", "no_defense", "uniform", "--policies", "baseline:detector_switch", "--env-kwargs", *TINY,
                 "--no-plots", "--quiet", "--threads", "1"])
    assert code == 0 and torch.get_num_threads() == 1
    report = json.loads((out / "results.json").read_text())
    block = report["scenarios"]["quickstart"]
    names = [row["policy"] for row in block["comparison"]]
    # the ASR references are always run, whatever --baselines says
    assert set(names) == {"no_defense", "uniform", "static_adversarial", "proeat_dynamic", "static_consistency", "detector_switch"}
    rows = {row["policy"]: row for row in block["comparison"]}
    assert rows["static_adversarial"]["asr_reduction_vs_static_adversarial"]["mean"] == 0.0
    assert rows["no_defense"]["clean_acc_drop"]["mean"] == 0.0
    for row in rows.values():
        assert math.isfinite(row["asr"]["half_width"]) and math.isfinite(row["return"]["half_width"])
        # the system's ASR (what the reward scores) beside the model's: never above it (flagged flips are stopped)
        assert row["system_asr"]["mean"] <= row["asr"]["mean"] + 1e-9
    assert rows["no_defense"]["system_asr"]["mean"] < rows["no_defense"]["asr"]["mean"]  # the detector catches some flips
    ablation = block["ablation"][0]
    assert ablation["policy"] == "detector_switch"
    assert [v["variant"] for v in ablation["variants"]] == ["full", "no_consist", "no_adv", "fixed_mean"]
    variants = {v["variant"]: v for v in ablation["variants"]}
    assert variants["no_consist"]["mean_betas"][1] < 0.01 and variants["no_adv"]["mean_betas"][2] < 0.01
    np.testing.assert_allclose(variants["fixed_mean"]["mean_betas"], variants["full"]["mean_betas"], atol=2e-3)
    assert variants["full"]["delta_return_vs_full"]["mean"] == 0.0
    markdown = (out / "results.md").read_text()
    assert "### Comparison" in markdown and "### Ablation" in markdown and "detector_switch/no_adv" in json.dumps(report)
    assert "| policy | ASR | system ASR |" in markdown and "| ASR | system ASR | clean acc |" in markdown
    assert (out / "quickstart" / "uniform" / "summary.json").is_file()


def test_cli_benchmark_fixed_grid_finds_the_best_fixed_beta_and_pairs_the_given_policy_with_it(tmp_path):
    out = tmp_path / "grid"
    code = main(["benchmark", "--scenarios", "quickstart", "--seeds", "0", "1", "--fidelity", "embedding", "--out", str(out),
                 "--baselines", "no_defense", "--policies", "baseline:uniform", "--fixed-grid", "--env-kwargs", *TINY,
                 "--no-plots", "--quiet", "--bootstrap-reps", "100"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    block = report["scenarios"]["quickstart"]
    grid = {row["policy"]: row for row in block["comparison"] if row["kind"] == "fixed_grid"}
    assert len(grid) == 10 and "fixed(0.00,1.00,0.00)" in grid
    versus = block["versus_best_fixed"]
    assert versus["best_fixed"] == max(grid, key=lambda name: grid[name]["return"]["mean"])
    rows = {row["policy"]: row for row in block["comparison"]}
    [row] = versus["rows"]
    # uniform is the grid's (1/3, 1/3, 1/3): its gap to that grid point is 0 on every seed
    assert row["policy"] == "uniform"
    expected = rows["uniform"]["return"]["mean"] - rows[versus["best_fixed"]]["return"]["mean"]
    assert row["delta_return_vs_best_fixed"]["mean"] == pytest.approx(expected)
    assert row["delta_return_vs_best_fixed"]["mean"] <= 1e-9  # the best of the grid includes uniform's β
    assert row["delta_return_vs_proeat_dynamic"]["mean"] == pytest.approx(rows["uniform"]["return"]["mean"] - rows["proeat_dynamic"]["return"]["mean"])
    assert rows["fixed(0.33,0.33,0.33)"]["return"]["mean"] == pytest.approx(rows["uniform"]["return"]["mean"])
    assert "### Against the best fixed β" in (out / "results.md").read_text()
    assert not any(name.startswith("fixed(") for name in report["aggregate"]["per_scenario"]["quickstart"])  # grid: own table only


def test_benchmark_labels_a_baseline_given_with_policies_as_a_baseline(tmp_path):
    """``--policies baseline:dwa`` without dwa among ``--baselines``: still a baseline, never "trained"."""
    out = tmp_path / "bench"
    assert main(["benchmark", "--scenarios", "quickstart", "--seeds", "0", "1", "--fidelity", "embedding", "--out", str(out),
                 "--baselines", "no_defense", "--policies", "baseline:dwa", "--bootstrap-reps", "100", "--no-plots", "--quiet",
                 "--env-kwargs", *TINY]) == 0
    report = json.loads((out / "results.json").read_text())
    kinds = {row["policy"]: row["kind"] for row in report["scenarios"]["quickstart"]["comparison"]}
    assert kinds["dwa"] == "baseline"
    assert report["scenarios"]["quickstart"]["ablation"][0]["note"] == "baseline given with --policies"
    assert not any(row["policy"] == "dwa" for row in report["aggregate"]["probability_of_improvement"])
    assert "dwa *(trained)*" not in (out / "results.md").read_text()


def test_detector_rates_over_no_pairs_are_left_out(tmp_path):
    """A phase of adversarial traffic only has no clean pair to measure FPR on (and one whose share rounds to
    no adversarial pair has no TPR): those rounds are left out of the mean instead of counting as 0."""
    scenario = tmp_path / "rates.yaml"
    scenario.write_text(
        "name: rates\ndescription: all-adversarial rounds, then rounds with no adversarial pair\nbatch_size: 8\n"
        "dataset: {train_n: 64, probe_n: 16}\nfidelity: embedding\nphases:\n"
        "  - {name: all_adv, rounds: 3, adversarial_share: 1.0, attacks: [{name: pgd_linf, params: {eps: 8/255, steps: 2, step_size: 4/255}}]}\n"
        "  - {name: few, rounds: 3, adversarial_share: 0.05, attacks: [{name: pgd_linf, params: {eps: 8/255, steps: 2, step_size: 4/255}}]}\n"
    )
    for seeds in (["0"], ["0", "1"]):  # the sequential and the batched loop
        out = tmp_path / f"eval{len(seeds)}"
        assert main(["evaluate", "--policy", "baseline:uniform", "--scenario", str(scenario), "--seeds", *seeds, "--out", str(out),
                     "--no-plots", "--quiet", "--no-cache"]) == 0
        rows = list(csv.DictReader((out / "rounds.csv").open()))
        assert [r["detector_fpr"] for r in rows[:3]] == ["", "", ""] and [r["detector_tpr"] for r in rows[3:6]] == ["", "", ""]
        summary = json.loads((out / "summary.json").read_text())
        fprs = [float(r["detector_fpr"]) for r in rows[3:6]]
        assert summary["metrics"]["detector_fpr"]["values"][0] == pytest.approx(sum(fprs) / 3)
        tprs = [float(r["detector_tpr"]) for r in rows[:3]]
        assert summary["metrics"]["detector_tpr"]["values"][0] == pytest.approx(sum(tprs) / 3)


# ------------------------------------------------------------------------------ quickstart
def test_cli_quickstart_trains_evaluates_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "qs"
    # Not --quiet: the progress log names the steps trained (it used to read them before they were known).
    code = main(["quickstart", "--timesteps", "64", "--seeds", "0", "1", "--n-envs", "4", "--out", str(out), "--env-kwargs", *TINY])
    assert code == 0
    report = json.loads((out / "quickstart.json").read_text())
    assert [row["policy"] for row in report["rows"]] == ["ppo", "uniform", "no_defense"]
    trained = yaml.safe_load((Path(report["run_dir"]) / "quickstart" / "config.yml").read_text())
    assert trained["use_sde"] is True and trained["n_envs"] == 4  # abrupt_shift's recipe, on --n-envs envs
    uniform = next(row for row in report["rows"] if row["policy"] == "uniform")
    assert uniform["return_minus_uniform"]["mean"] == 0.0
    for row in report["rows"]:
        assert math.isfinite(row["return"]["half_width"])
        assert 0.0 <= row["system_asr"]["mean"] <= 1.0  # the reward's ASR, beside the model's
    assert "return − uniform" in (out / "quickstart.md").read_text() and "| system ASR |" in (out / "quickstart.md").read_text()
    captured = capsys.readouterr()
    assert "ppo" in captured.out
    assert "trained PPO for 256 steps" in captured.err
    # One rollout is 4 envs x 64 rounds, more than --timesteps 64: the report says what was trained.
    record = json.loads((Path(report["run_dir"]) / "run.json").read_text())
    assert report["timesteps_requested"] == 64 and report["timesteps"] == record["timesteps_done"] == 256
    assert "256" in (out / "quickstart.md").read_text()


def test_evaluate_overwrite_leaves_no_figures_of_the_run_it_replaced(tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--scenario", "quickstart", "--out", str(out), "--quiet", "--env-kwargs", *TINY]
    assert main([*argv, "--policy", "baseline:uniform", "--seeds", "0", "1"]) == 0
    assert (out / "episode_seed1.png").exists() and (out / "mean_over_seeds.png").exists()
    assert main([*argv, "--policy", "baseline:no_defense", "--seeds", "0", "--overwrite", "--no-plots"]) == 0
    assert not list(out.glob("*.png"))


def test_benchmark_refuses_two_scenarios_of_one_name_before_running_any(tmp_path, capsys):
    """A copied scenario file that kept ``name: quickstart`` would overwrite quickstart's results;
    it is refused (both files named) before anything is evaluated, as is a scenario that does not load."""
    from cmai_env.scenario import scenario_bytes

    copy = tmp_path / "my_variant.yaml"
    copy.write_bytes(scenario_bytes("quickstart"))
    out = tmp_path / "bench"
    code = main(["benchmark", "--scenarios", "quickstart", str(copy), "--seeds", "0", "--fidelity", "embedding", "--out", str(out),
                 "--baselines", "no_defense", "--no-plots", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "both named 'quickstart'" in err and "my_variant.yaml" in err
    assert not (out / "quickstart").exists() and not (out / "results.json").exists()
    code = main(["benchmark", "--scenarios", "quickstart", str(tmp_path / "missing.yaml"), "--seeds", "0", "--fidelity", "embedding",
                 "--out", str(out), "--baselines", "no_defense", "--no-plots", "--quiet"])
    assert code == 1 and "missing.yaml" in capsys.readouterr().err and not (out / "quickstart").exists()


def test_repeated_seeds_are_a_usage_error_in_the_benchmarks(capsys, monkeypatch):
    """``DistinctSeeds`` (every benchmark's seed options): a repeated seed exits 2 naming the option."""
    import argparse

    from agents.protocol import DistinctSeeds, distinct_seeds
    from benchmark_scripts import usage_error

    assert distinct_seeds((3, 1)) == [3, 1]
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-seeds", type=int, nargs="+", action=DistinctSeeds)
    assert parser.parse_args(["--eval-seeds", "0", "2"]).eval_seeds == [0, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["--eval-seeds", "0", "2", "0"])
    assert "--eval-seeds must be distinct, got [0, 2, 0]" in capsys.readouterr().err
    assert "--seeds must be distinct" in usage_error("defence_per_phase.py", ["--seeds", "1", "1"], monkeypatch, capsys)
