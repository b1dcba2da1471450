"""Does the defence act within an episode? Per phase, task-only against every fixed β.

Issue 10's point 4: in at least one phase of every shipped non-stationary scenario, some fixed β
(held for the whole episode) should lower the end-to-end ``system_asr`` by ≥ 0.3 absolute against
task-only β = (1, 0, 0), at a clean-accuracy cost ≤ 0.05 in that phase. For each scenario this
plays every β of the grid (``DISCRETE_BETAS``, the simplex with step 1/3) for one episode per
evaluation seed (environment seeds ``EVAL_SEED_OFFSET + s``) on the embedding fidelity's batched
environment and prints, per phase: task-only's system ASR (attacked rounds) and clean accuracy,
then the β with the largest system-ASR drop among those within the clean-accuracy allowance, the
drop with its paired 95% t-interval over seeds, and whether it reaches 0.3. A β is held for the
whole episode, so a phase sees the defence that earlier phases built.

    python benchmarks/defence_per_phase.py [--scenarios shift_evasion detector_evasion] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptivity_gap import ENV_ID, MAX_BATCH, load_spec, phase_names  # noqa: E402

import cmai_env  # noqa: E402,F401  (registers the environments)
from agents.protocol import EVAL_SEED_OFFSET, DistinctSeeds  # noqa: E402
from agents.stats import bounds_for, paired_difference, t_interval  # noqa: E402
from cmai_env.cli.common import assignments_option, positive_int  # noqa: E402
from cmai_env.env import DISCRETE_BETAS, action_from_betas  # noqa: E402
from cmai_env.scenario import load_scenario, scenario_option, scenarios_available  # noqa: E402

#: Point 4's thresholds: system-ASR drop to reach, clean-accuracy cost allowed.
TARGET_DROP = 0.3
CLEAN_ALLOWANCE = 0.05
TASK_ONLY = 0  # DISCRETE_BETAS[0] == (1, 0, 0)


def play_fixed(scenario: str, seeds: list[int], overrides: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(phase names, system ASR, clean accuracy)``; arrays ``(β, seed, phase)``, NaN where a phase had no attacked round."""
    spec = load_spec(scenario, overrides)
    names = phase_names(spec)  # each round's phase is read from its info
    jobs = [(b, s) for b in range(len(DISCRETE_BETAS)) for s in seeds]
    system = np.full((len(jobs), len(names)), np.nan)
    clean = np.zeros((len(jobs), len(names)))
    for start in range(0, len(jobs), MAX_BATCH):
        batch = jobs[start : start + MAX_BATCH]
        envs = gym.make_vec(ENV_ID, num_envs=len(batch), vectorization_mode="vector_entry_point", scenario=scenario,
                            fidelity="embedding", **overrides)
        envs.reset(seed=[EVAL_SEED_OFFSET + s for _, s in batch])
        actions = np.stack([action_from_betas(DISCRETE_BETAS[b]) for b, _ in batch]).astype(np.float32)
        attacked = [[[] for _ in names] for _ in batch]
        accs = [[[] for _ in names] for _ in batch]
        for _ in range(spec.episode_length()):
            _, _, _, _, infos = envs.step(actions)
            for i in range(len(batch)):
                k = names.index(str(infos["phase"][i]))
                accs[i][k].append(float(infos["clean_acc"][i]))
                if infos["attacks"][i]:
                    attacked[i][k].append(float(infos["system_asr"][i]))
        envs.close()
        for i in range(len(batch)):
            for k in range(len(names)):
                clean[start + i, k] = np.mean(accs[i][k]) if accs[i][k] else np.nan
                if attacked[i][k]:
                    system[start + i, k] = np.mean(attacked[i][k])
    shape = (len(DISCRETE_BETAS), len(seeds), len(names))
    return names, system.reshape(shape), clean.reshape(shape)


def report(scenario: str, seeds: list[int], overrides: dict) -> dict:
    """Per phase: task-only's figures and the best admissible fixed β's drop (see the module docstring)."""
    started = time.perf_counter()
    names, system, clean = play_fixed(scenario, seeds, overrides)
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # a phase the episode never reached
    phases = []
    for k, name in enumerate(names):
        base_system, base_clean = system[TASK_ONLY, :, k], clean[TASK_ONLY, :, k]
        row = {"phase": name, "task_system_asr": t_interval(base_system.tolist(), bounds=bounds_for("system_asr")),
               "task_clean_acc": float(np.nanmean(base_clean)), "best": None}
        if not np.isnan(base_system).all():
            mean = lambda a: float(np.nanmean(a))  # noqa: E731  (random schedules may skip a phase in some seeds)
            admissible = [b for b in range(len(DISCRETE_BETAS)) if mean(clean[b, :, k]) >= mean(base_clean) - CLEAN_ALLOWANCE]
            best = max(admissible, key=lambda b: mean(base_system) - mean(system[b, :, k]))
            drop = paired_difference(base_system.tolist(), system[best, :, k].tolist(), bounds=bounds_for("system_asr"))
            row["best"] = {"betas": DISCRETE_BETAS[best], "system_asr": mean(system[best, :, k]),
                           "clean_cost": mean(base_clean) - mean(clean[best, :, k]), "drop": drop}
        phases.append(row)
    met = any(p["best"] is not None and (p["best"]["drop"].mean or 0.0) >= TARGET_DROP for p in phases)
    return {"scenario": scenario, "phases": phases, "met": met, "seconds": time.perf_counter() - started}


def print_report(result: dict) -> None:
    verdict = "met" if result["met"] else "not met"
    print(f"\n== {result['scenario']} (point 4 {verdict}; {result['seconds']:.0f} s)")
    print(f"{'phase':14} {'task-only system ASR':>22} {'clean':>6}   {'best fixed β (clean cost ≤ 0.05)':34} {'system ASR':>10} {'clean cost':>10} {'drop (95% CI)':>22}")
    for p in result["phases"]:
        head = f"{p['phase']:14} {p['task_system_asr'].format(3):>22} {p['task_clean_acc']:6.3f}"
        best = p["best"]
        if best is None:
            print(f"{head}   (no attacked round)")
            continue
        betas = "(" + ", ".join(f"{b:.2f}" for b in best["betas"]) + ")"
        mark = " ✓" if (best["drop"].mean or 0.0) >= TARGET_DROP else ""
        print(f"{head}   {betas:34} {best['system_asr']:10.3f} {best['clean_cost']:10.3f} {best['drop'].format(3):>22}{mark}")


def main() -> None:
    shipped = [n for n in scenarios_available(include_evaluation_only=False, fidelity="embedding") if len({p.name for p in load_scenario(n).phases}) > 1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=shipped, help=f"default (the non-stationary ones): {' '.join(shipped)}")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides, e.g. episode_rounds:40")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    scenario_option(parser, args.scenarios, overrides=overrides)  # every file and override checked before any runs
    print(f"defence within an episode: per phase, task-only vs the fixed β (grid step 1/3) that lowers system ASR most "
          f"at ≤ {CLEAN_ALLOWANCE} clean-accuracy cost; embedding fidelity, evaluation seeds {args.seeds}; target drop ≥ {TARGET_DROP}")
    results = [report(scenario, args.seeds, overrides) for scenario in args.scenarios]
    for result in results:
        print_report(result)
    met = [r["scenario"] for r in results if r["met"]]
    print(f"\npoint 4 met on {len(met)}/{len(results)} scenarios: {', '.join(met) or 'none'}")


if __name__ == "__main__":
    main()
