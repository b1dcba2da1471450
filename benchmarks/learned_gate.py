"""Does a learned gate beat every fixed weighting? Train the shipped PPO entries, then compare.

Issue 10's point 6, reproduced by one command. For each scenario (default: those with their own
entry in ``agents/hyperparams/ppo.yml``), in parallel over ``--jobs`` processes of one torch
thread each:

1. ``cmai train --algo ppo --scenario S --seed K --threads 1`` with the shipped hyperparameters
   (what a user types), for each training seed K;
2. ``cmai benchmark --scenarios S --policies RUN --fixed-grid`` on the evaluation seeds: every
   baseline, every β of the simplex grid (step 1/3) held fixed, and the gating ablation;
3. with ``--schedule-gap``, ``benchmarks/adaptivity_gap.py``'s best per-phase schedule on the
   same evaluation seeds, to say what share of the schedule's gap the gate captures:
   (gate − the search's best fixed β) / (schedule − that β), both replayed on those seeds.

Printed per scenario and training seed: the learning's CPU minutes, the gate's return, the best
fixed β of the grid (picked on the evaluation seeds themselves, which favours it) and the
paired 95% CIs of gate − best fixed β and gate − ``proeat_dynamic``, the gate's and task-only's
system ASR, its clean-accuracy drop against ``no_defense``, what its own mean β held fixed
loses (whether the *adapting* pays, not a better constant), and whether point 6 holds: both CIs
above 0 within 20 CPU-minutes of training (and ≥ 50% of the schedule gap when it is measured).

Then point 6's held-out clause: every trained gate is evaluated on ``unseen_attacks`` (attacks no
training scenario contains; ``--held-out``, run as shipped unless ``--held-out-env-kwargs``) in one
``cmai benchmark --fixed-grid`` beside every baseline. Printed per gate: its system ASR against the
best *static* weighting's (the lowest system ASR among the baselines that hold one β, and every β
of the grid), its clean-accuracy drop against ``no_defense``, its weight-response latency, and
whether the clause holds: system ASR ≤ 0.7× the best static one's, clean drop ≤ 0.02, latency
under 100 ms. The gates run at their training fidelity (embedding) unless ``--held-out-fidelity
pixel``: ``unseen_attacks``' Co-Attack phase, on noisy images, is where the embedding fidelity
fits the pixel one worst (``fidelity_calibration.py --corruption gaussian_noise:2``), so the pixel
run (about 25 CPU-minutes for the baselines and the grid) is the check that matters.

    python benchmarks/learned_gate.py [--scenarios periodic abrupt_shift] [--train-seeds 0 1] [--eval-seeds 0 1 2 3 4]
        [--held-out none] [--held-out-fidelity pixel]

A full run trains ~15 CPU-minutes per scenario and seed; ``--timesteps`` and ``--env-kwargs``
shrink it (the test suite does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents.protocol import DistinctSeeds  # noqa: E402
from cmai_env.scenario import scenario_option  # noqa: E402

#: Point 6's thresholds: training budget, share of the schedule gap.
CPU_MINUTES_BUDGET = 20.0
SCHEDULE_SHARE = 0.5
#: Point 6's held-out clause: system ASR at most this multiple of the best static weighting's, at
#: most this clean-accuracy drop against ``no_defense``, weight response under this many ms.
HELD_OUT_SYSTEM_ASR_RATIO = 0.7
HELD_OUT_CLEAN_DROP = 0.02
HELD_OUT_LATENCY_MS = 100.0


def scenarios_with_entries() -> list[str]:
    """Scenarios that have their own entry in the shipped ``ppo.yml`` (not ``default``, not ``quickstart``)."""
    from agents.train import HYPERPARAMS_DIR
    from cmai_env.keyvalue import load_yaml

    return [name for name in load_yaml(HYPERPARAMS_DIR / "ppo.yml") if name not in ("default", "quickstart")]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one gate and benchmark it (one process, one thread); the summary row for the table."""
    from agents.benchmark import BenchmarkArgs, run_benchmark
    from agents.policies import read_run
    from agents.train import train
    from agents.train_args import TrainArgs

    scenario, seed, out = job["scenario"], job["seed"], Path(job["out"])
    # threads=1 pins this process to one torch thread for the training and everything after it
    run_dir = train(TrainArgs(algo="ppo", scenario=scenario, seed=seed, timesteps=job["timesteps"], out=out / "runs",
                              env_kwargs=dict(job["env_kwargs"]), threads=1, progress=False, verbose=0))
    record = read_run(run_dir).record
    report = run_benchmark(BenchmarkArgs(scenarios=[scenario], out=out / f"benchmark_{scenario}_seed{seed}", seeds=job["eval_seeds"],
                                         policies=[str(run_dir)], env_kwargs=dict(job["env_kwargs"]), plots=False, fixed_grid=True))
    block = report["scenarios"][scenario]
    rows = {row["policy"]: row for row in block["comparison"]}
    versus = block["versus_best_fixed"]
    gate_row = versus["rows"][0]
    gate = rows[gate_row["policy"]]
    variants = {v["variant"]: v for v in block["ablation"][0]["variants"]}
    row = {
        "scenario": scenario, "seed": seed, "run": str(run_dir), "cpu_minutes": record["cpu_time_s"] / 60,
        "return": gate["return"], "best_fixed": versus["best_fixed"], "best_fixed_return": versus["best_fixed_return"],
        "vs_best_fixed": gate_row["delta_return_vs_best_fixed"], "vs_proeat_dynamic": gate_row["delta_return_vs_proeat_dynamic"],
        "system_asr": gate["system_asr"], "task_only_system_asr": rows["no_defense"]["system_asr"],
        "clean_acc_drop": gate["clean_acc_drop"], "mean_betas": gate["mean_betas"],
        "fixed_mean_delta": variants["fixed_mean"]["delta_return_vs_full"],
    }
    if job["schedule_gap"]:
        import adaptivity_gap

        gap = adaptivity_gap.report(scenario, job["search_seeds"], job["eval_seeds"], dict(job["env_kwargs"]))
        row["schedule_gap"] = gap["gap"].mean
        row["schedule_best_fixed_return"] = gap["rows"]["best fixed"]["return"].mean
    return row


def schedule_share(row: dict[str, Any]) -> float | None:
    """(gate − the schedule search's best fixed β) / (schedule − that β), on the evaluation seeds; ``None``: not measured."""
    if row.get("schedule_gap") is None or row["schedule_gap"] <= 0:
        return None
    return (row["return"]["mean"] - row["schedule_best_fixed_return"]) / row["schedule_gap"]


def point6_holds(row: dict[str, Any]) -> bool:
    """Both paired CIs above 0 within the CPU budget (and ≥ half the schedule gap when measured)."""
    above = all(row[key]["ci95"][0] > 0 for key in ("vs_best_fixed", "vs_proeat_dynamic"))
    share = schedule_share(row)
    captured = "schedule_gap" not in row or (share is not None and share >= SCHEDULE_SHARE)
    return above and captured and row["cpu_minutes"] <= CPU_MINUTES_BUDGET


def _ci(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:+.3f} ± {entry['half_width']:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'scenario':18} {'seed':>4} {'CPU-min':>7} {'gate return':>17} {'best fixed β':24} {'gate − best fixed':>18} "
              f"{'gate − proeat_dyn':>18} {'system ASR gate / task-only':>27} {'clean drop':>10} {'own mean β fixed':>17} {'share':>6}  point 6")
    print(header)
    for row in rows:
        share = "—" if schedule_share(row) is None else f"{schedule_share(row):.0%}"
        best = f"{row['best_fixed']} {row['best_fixed_return']['mean']:.3f}"
        print(f"{row['scenario']:18} {row['seed']:>4} {row['cpu_minutes']:7.1f} {row['return']['mean']:9.3f} ± {row['return']['half_width']:5.3f} "
              f"{best:24} {_ci(row['vs_best_fixed']):>18} {_ci(row['vs_proeat_dynamic']):>18} "
              f"{row['system_asr']['mean']:12.3f} / {row['task_only_system_asr']['mean']:.3f}{'':7} {row['clean_acc_drop']['mean']:10.3f} "
              f"{_ci(row['fixed_mean_delta']):>17} {share:>6}  {'holds' if point6_holds(row) else 'no'}")


def is_static(row: dict[str, Any]) -> bool:
    """Whether a ``cmai benchmark`` comparison row holds one β all episode: a grid β or a fixed-weights baseline."""
    from agents.baselines import FixedWeightsPolicy, available_baselines, make_baseline

    if row["kind"] == "fixed_grid":
        return True
    return row["kind"] == "baseline" and row["policy"] in available_baselines() and isinstance(make_baseline(row["policy"]), FixedWeightsPolicy)


def held_out_rows(
    runs: list[str], scenario: str, eval_seeds: list[int], env_kwargs: dict[str, Any], out: Path, fidelity: str | None = None
) -> list[dict[str, Any]]:
    """Point 6's held-out clause: every gate in ``runs`` against the best static weighting on ``scenario``.

    One ``cmai benchmark --fixed-grid`` with every gate beside every baseline, all at ``fidelity``
    (``None``: the gates' training fidelity); the best static weighting is the one with the lowest
    mean system ASR (:func:`is_static`).
    """
    from agents.benchmark import BenchmarkArgs, run_benchmark

    report = run_benchmark(BenchmarkArgs(scenarios=[scenario], out=out / f"held_out_{Path(scenario).stem}", seeds=eval_seeds,
                                         policies=list(runs), env_kwargs=dict(env_kwargs), plots=False, fixed_grid=True,
                                         fidelity=fidelity))
    (block,) = report["scenarios"].values()
    comparison = block["comparison"]
    best = min((row for row in comparison if is_static(row)), key=lambda row: row["system_asr"]["mean"])
    no_defense = next(row for row in comparison if row["policy"] == "no_defense")
    return [{"policy": row["policy"], "system_asr": row["system_asr"], "best_static": best["policy"],
             "best_static_system_asr": best["system_asr"], "no_defense_system_asr": no_defense["system_asr"],
             "ratio": row["system_asr"]["mean"] / best["system_asr"]["mean"] if best["system_asr"]["mean"] > 0 else float("inf"),
             "clean_acc_drop": row["clean_acc_drop"], "weight_response_ms": row["weight_response_ms"]}
            for row in comparison if row["kind"] == "trained"]


def held_out_holds(row: dict[str, Any]) -> bool:
    """System ASR ≤ 0.7× the best static weighting's, clean drop ≤ 0.02, weight response measured and < 100 ms."""
    latency = row["weight_response_ms"]["mean"]
    return (row["ratio"] <= HELD_OUT_SYSTEM_ASR_RATIO and row["clean_acc_drop"]["mean"] <= HELD_OUT_CLEAN_DROP
            and latency is not None and latency < HELD_OUT_LATENCY_MS)


def print_held_out(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'gate':28} {'system ASR':>16} {'best static (system ASR)':>36} {'ratio':>6} {'no_defense':>10} {'clean drop':>10} "
          f"{'weight response':>15}  held-out clause")
    for row in rows:
        best = f"{row['best_static']} {row['best_static_system_asr']['mean']:.3f}"
        latency = row["weight_response_ms"]["mean"]
        shown = "—" if latency is None else f"{latency:.1f} ms"
        spread = row["system_asr"]["half_width"]
        spread = "—" if spread is None else f"{spread:.3f}"  # one evaluation seed: no interval
        print(f"{row['policy']:28} {row['system_asr']['mean']:8.3f} ± {spread:>5} {best:>36} {row['ratio']:6.2f} "
              f"{row['no_defense_system_asr']['mean']:10.3f} {row['clean_acc_drop']['mean']:10.3f} {shown:>15}  "
              f"{'holds' if held_out_holds(row) else 'no'}")


def main() -> None:
    from cmai_env.cli.common import assignments_option, positive_int
    from defence_per_phase import in_processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=None, help="default: every scenario with its own ppo.yml entry")
    parser.add_argument("--train-seeds", type=int, nargs="+", action=DistinctSeeds, default=[0])
    parser.add_argument("--eval-seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--search-seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4], help="the schedule search's seeds (--schedule-gap)")
    parser.add_argument("--schedule-gap", action="store_true", help="also search the best per-phase schedule (~4 CPU-min per scenario)")
    parser.add_argument("--timesteps", type=positive_int, default=None, help="training steps (default: each entry's n_timesteps)")
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides for training and evaluation")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="parallel processes, one torch thread each (default: one per core)")
    parser.add_argument("--out", default="runs/learned_gate", help="run folders and benchmark reports (default: runs/learned_gate)")
    parser.add_argument("--held-out", default="unseen_attacks",
                        help="evaluation-only scenario for point 6's held-out clause, or 'none' (default: unseen_attacks)")
    parser.add_argument("--held-out-env-kwargs", nargs="*", default=[], metavar="KEY:VALUE",
                        help="scenario overrides for the held-out evaluation (default: none, the scenario as shipped)")
    parser.add_argument("--held-out-fidelity", choices=["embedding", "pixel"], default=None,
                        help="fidelity of the held-out evaluation (default: the gates' training fidelity)")
    args = parser.parse_args()
    env_kwargs = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    held_out_kwargs = assignments_option(parser, args.held_out_env_kwargs, ":", "--held-out-env-kwargs")
    scenarios = args.scenarios or scenarios_with_entries()
    # every file and override checked before the first training, not after it
    scenario_option(parser, scenarios, overrides=env_kwargs)
    if args.held_out != "none":
        scenario_option(parser, [args.held_out], "--held-out", held_out_kwargs)
    jobs = [{"scenario": s, "seed": k, "out": str(Path(args.out)), "timesteps": args.timesteps, "env_kwargs": env_kwargs,
             "eval_seeds": list(args.eval_seeds), "search_seeds": list(args.search_seeds), "schedule_gap": args.schedule_gap}
            for s in scenarios for k in args.train_seeds]
    print(f"learned gate vs fixed β: {len(jobs)} training(s) ({', '.join(scenarios)}; seeds {args.train_seeds}), "
          f"evaluation seeds {args.eval_seeds}, {args.jobs} process(es) of one thread", flush=True)
    started = time.perf_counter()
    rows = in_processes(run_one, jobs, args.jobs)
    print_table(rows)
    held = sorted({r["scenario"] for r in rows if point6_holds(r)})
    print(f"\npoint 6 holds for {sum(point6_holds(r) for r in rows)}/{len(rows)} trainings; scenarios: {', '.join(held) or 'none'} "
          f"({time.perf_counter() - started:.0f} s wall)", flush=True)
    if args.held_out != "none":
        held_out = held_out_rows([r["run"] for r in rows], args.held_out, list(args.eval_seeds), held_out_kwargs, Path(args.out),
                                 args.held_out_fidelity)
        print_held_out(held_out)
        passing = [r["policy"] for r in held_out if held_out_holds(r)]
        print(f"\npoint 6's held-out clause holds for {len(passing)}/{len(held_out)} gates on {args.held_out}"
              f"{': ' + ', '.join(passing) if passing else ''} ({time.perf_counter() - started:.0f} s wall)")


if __name__ == "__main__":
    main()
