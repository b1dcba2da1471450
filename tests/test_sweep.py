"""cmai sweep: the grid, the manifest that makes it resumable, and a 2 × 1 × 2 grid on a local Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agents.sweep import MANIFEST, RESULT_FILE, SweepArgs, plan_trials, run_trial, sweep

TINY = ["batch_size:8", "dataset.train_n:64", "dataset.probe_n:16", "episode_rounds:6"]


def test_plan_fixes_run_folders_and_samples_in_the_manifest(tmp_path: Path) -> None:
    args = SweepArgs(algos=["ppo", "a2c"], scenarios=["quickstart"], seeds=[0, 1], out=tmp_path, samples=2, baselines=["uniform"])
    manifest: dict = {}
    specs = plan_trials(args, manifest)
    train = [s for s in specs if s.kind == "train"]
    assert len(train) == 2 * 2 * 2 and len(specs) == 8 + 2  # algos × samples × seeds, + baseline × seeds
    assert sorted({s.policy for s in train}) == ["a2c#0", "a2c#1", "ppo#0", "ppo#1"]
    # The usual layout, one folder per trial, reserved once.
    folders = [Path(s.folder) for s in train]
    assert len(set(folders)) == 8 and all(f.parent.parent == tmp_path.resolve() and f.name.startswith("quickstart_") for f in folders)
    assert all(s.overrides["learning_rate"] > 0 for s in train)
    again = plan_trials(args, json.loads(json.dumps(manifest)))  # as read back from sweep_manifest.json
    assert [(s.key, s.folder, s.overrides) for s in again] == [(s.key, s.folder, s.overrides) for s in specs]
    # A larger grid keeps the earlier trials' folders and samples.
    bigger = plan_trials(SweepArgs(**{**args.__dict__, "seeds": [0, 1, 2]}), manifest)
    old = {s.key: s for s in specs}
    assert all(old[s.key].folder == s.folder and old[s.key].overrides == s.overrides for s in bigger if s.key in old)
    assert len(bigger) == 15


@pytest.mark.parametrize(
    "change, message",
    [({"algos": ["nope"]}, "nope"), ({"seeds": [0, 0]}, "distinct"), ({"baselines": ["magic"]}, "magic"), ({"cpus_per_trial": 0}, "cpus_per_trial")],
)
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweep(SweepArgs(out=tmp_path, **change), log=lambda _: None)
    assert not (tmp_path / MANIFEST).exists()


def test_a_sweep_over_two_scenarios_of_one_name_is_refused(tmp_path: Path) -> None:
    """Trials are keyed by scenario name: a copied file that kept ``name: quickstart`` would be
    taken for quickstart's finished trials."""
    from cmai_env.scenario import scenario_bytes

    copy = tmp_path / "my_variant.yaml"
    copy.write_bytes(scenario_bytes("quickstart"))
    with pytest.raises(ValueError, match="both named 'quickstart'"):
        sweep(SweepArgs(out=tmp_path / "sweep", scenarios=["quickstart", str(copy)]), log=lambda _: None)
    assert not (tmp_path / "sweep" / MANIFEST).exists()


@pytest.mark.slow
@pytest.mark.ci_slow
@pytest.mark.timeout(1500)
def test_two_algos_one_scenario_two_seeds_on_local_ray_resumes(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = SweepArgs(
        algos=["ppo", "a2c"], scenarios=["quickstart"], seeds=[0, 1], timesteps=32, out=out, env_kwargs=TINY,
        set=["n_steps=16"], baselines=["uniform"], num_cpus=2, bootstrap_reps=200, verbose=0,
    )
    lines: list[str] = []
    report = sweep(args, log=lines.append)
    assert "4 to run" in lines[0] or "6 to run" in lines[0]
    trials = {t["key"]: t for t in report["trials"]}
    assert len(trials) == 6 and not report["missing"]
    for algo in ("ppo", "a2c"):
        runs = sorted((out / algo).glob("quickstart_*"))
        assert [r.name for r in runs] == ["quickstart_1", "quickstart_2"]
        for run in runs:
            record = json.loads((run / "run.json").read_text())
            assert record["status"] == "finished" and record["timesteps_done"] >= 32 and record["algo"] == algo
            assert (run / "quickstart.zip").is_file() and (run / "sweep_eval" / "summary.json").is_file()
    seeds = {t["seed"] for t in trials.values() if t["policy"] == "ppo"}
    assert seeds == {0, 1}
    for t in trials.values():
        assert 0.0 <= t["metrics"]["asr"] <= 1.0 and 0.0 <= t["metrics"]["clean_acc"] <= 1.0
    agg = report["aggregate"]
    assert set(agg["per_scenario"]["quickstart"]) == {"ppo", "a2c", "uniform"}
    assert {(r["policy"], r["baseline"]) for r in agg["probability_of_improvement"]} == {("ppo", "uniform"), ("a2c", "uniform")}
    for entry in agg["per_scenario"]["quickstart"].values():
        low, high = entry["asr"]["iqm"]["ci95"]
        assert 0.0 <= low <= high <= 1.0
    assert (out / "profile_robustness.png").is_file() and "rliable" in (out / "sweep.md").read_text()

    # Running it again reruns nothing (and starts no Ray).
    stamps = {k: Path(t["folder"], RESULT_FILE).stat().st_mtime_ns for k, t in trials.items()}
    start = time.perf_counter()
    again = sweep(args, log=lines.append)
    assert "0 to run" in lines[-1] and time.perf_counter() - start < 30
    assert {k: Path(t["folder"], RESULT_FILE).stat().st_mtime_ns for k, t in trials.items()} == stamps
    assert again["aggregate"]["per_scenario"] == report["aggregate"]["per_scenario"]

    # A trial killed after its last checkpoint is resumed (cmai train --resume), not retrained.
    spec = next(s for s in plan_trials(args, json.loads((out / MANIFEST).read_text())) if s.policy == "ppo" and s.seed == 1)
    run = Path(spec.folder)
    record = json.loads((run / "run.json").read_text())
    record["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(record))
    (run / RESULT_FILE).unlink()
    entry = run_trial(spec, args)
    assert entry["resumed"] is True
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 1
