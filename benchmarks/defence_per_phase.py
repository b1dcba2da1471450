"""Does the defence act within an episode? Per phase, task-only against every fixed β.

Issue 10's point 4: in at least one phase of every shipped non-stationary scenario, some fixed β
(held for the whole episode) should lower the end-to-end ``system_asr`` by ≥ 0.3 absolute against
task-only β = (1, 0, 0), at a clean-accuracy cost ≤ 0.05 in that phase. For each scenario this
plays every β of the grid (``DISCRETE_BETAS``, the simplex with step 1/3) for one episode per
evaluation seed (environment seeds ``EVAL_SEED_OFFSET + s``) on the embedding fidelity's batched
environment and prints, per phase: task-only's system ASR (attacked rounds) and clean accuracy,
then the β with the largest system-ASR drop among those within the clean-accuracy allowance, the
drop with its paired 95% t-interval over seeds, and whether it reaches 0.3. Beside each system
ASR stand the model's own ASR on the probe and the detector's TPR on the round's attacked traffic,
so a row says whether a β acts through robustness (model ASR falls) or through detection (TPR
rises), or defeats itself by blinding the detector. A β is held for the whole episode, so a phase
sees the defence that earlier phases built.

``--fidelity pixel`` plays the same grid at pixel fidelity instead, one environment per (β, seed)
over ``--jobs`` processes of one torch thread (about 30 CPU-s an episode of ``periodic``), to check
a phase's verdict against the fidelity the embedding one stands in for.

An evaluation-only scenario (``--scenarios unseen_attacks``) plays through the evaluation ID: the
same table then says which fixed β lowers each held-out attack's system ASR, and through what
(point 4 itself is asked of the training scenarios).

    python benchmarks/defence_per_phase.py [--scenarios shift_evasion detector_evasion] [--seeds 0 1 2 3 4]
    python benchmarks/defence_per_phase.py --fidelity pixel --scenarios periodic [--seeds 0 1 2] [--jobs 2]
    python benchmarks/defence_per_phase.py --scenarios unseen_attacks --every-beta

``--every-beta`` also prints the whole grid per phase (system ASR, model ASR, TPR, clean accuracy
of every β), for a scenario writer asking which β each phase wants and what a compromise costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptivity_gap import MAX_BATCH, env_id, load_spec, phase_names  # noqa: E402

import cmai_env  # noqa: E402,F401  (registers the environments)
from agents.protocol import EVAL_SEED_OFFSET, DistinctSeeds  # noqa: E402
from agents.stats import bounds_for, paired_difference, t_interval  # noqa: E402
from cmai_env.cli.common import assignments_option, positive_int  # noqa: E402
from cmai_env.env import DISCRETE_BETAS, action_from_betas  # noqa: E402
from cmai_env.scenario import Scenario, load_scenario, scenario_option, scenarios_available  # noqa: E402

#: Point 4's thresholds: system-ASR drop to reach, clean-accuracy cost allowed.
TARGET_DROP = 0.3
CLEAN_ALLOWANCE = 0.05
TASK_ONLY = 0  # DISCRETE_BETAS[0] == (1, 0, 0)


#: Per-round ``info`` figures averaged over a phase's attacked rounds: the end-to-end system ASR,
#: the model's own ASR on the probe (``asr``) and the detector's TPR on the round's attacked
#: traffic. Side by side they say whether a defence acts through robustness or through detection.
ATTACKED_FIELDS = ("system_asr", "asr", "detector_tpr")
#: The per-round ``info`` fields a :class:`PhaseTally` reads.
TALLIED_FIELDS = ("phase", "attacks", "clean_acc", *ATTACKED_FIELDS)


class PhaseTally:
    """One episode's per-phase means: :data:`ATTACKED_FIELDS` over attacked rounds, clean accuracy over all rounds."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.attacked: dict[str, list[list[float]]] = {field: [[] for _ in names] for field in ATTACKED_FIELDS}
        self.clean: list[list[float]] = [[] for _ in names]

    def add(self, info: Mapping[str, Any]) -> None:
        """Tally one round's ``info`` (its ``phase``, ``attacks``, ``clean_acc`` and :data:`ATTACKED_FIELDS`)."""
        k = self.names.index(str(info["phase"]))
        self.clean[k].append(float(info["clean_acc"]))
        if bool(info["attacks"]):
            for field in ATTACKED_FIELDS:
                self.attacked[field][k].append(float(info[field]))

    def means(self) -> dict[str, list[float]]:
        """Per phase, each of :data:`ATTACKED_FIELDS` and ``clean_acc``; NaN where the episode had no such round."""
        mean = lambda values: float(np.mean(values)) if values else np.nan  # noqa: E731
        figures = {field: [mean(v) for v in per_phase] for field, per_phase in self.attacked.items()}
        figures["clean_acc"] = [mean(v) for v in self.clean]
        return figures


class PhaseFigures(NamedTuple):
    """Fixed-β play of one scenario: arrays ``(β, seed, phase)``, NaN where a phase had no (attacked) round."""

    names: list[str]
    system: np.ndarray  #: end-to-end system ASR, attacked rounds
    clean: np.ndarray  #: clean accuracy, all rounds
    model: np.ndarray  #: the model's own ASR on the probe, attacked rounds
    tpr: np.ndarray  #: detector TPR on the round's attacked traffic, attacked rounds


def _play_batched(spec: Scenario, names: list[str], jobs: list[tuple[int, int]]) -> list[PhaseTally]:
    """Embedding fidelity: every (β, seed) episode in batches of the vector environment
    (``spec``: the scenario with its overrides applied, as :func:`play_fixed` loaded it once)."""
    tallies, rounds = [], spec.episode_length()
    registered = env_id(spec)
    for start in range(0, len(jobs), MAX_BATCH):
        batch = jobs[start : start + MAX_BATCH]
        envs = gym.make_vec(registered, num_envs=len(batch), vectorization_mode="vector_entry_point", scenario=spec, fidelity="embedding")
        envs.reset(seed=[EVAL_SEED_OFFSET + s for _, s in batch])
        actions = np.stack([action_from_betas(DISCRETE_BETAS[b]) for b, _ in batch]).astype(np.float32)
        batch_tallies = [PhaseTally(names) for _ in batch]
        for _ in range(rounds):
            _, _, _, _, infos = envs.step(actions)
            for i, tally in enumerate(batch_tallies):
                tally.add({key: infos[key][i] for key in TALLIED_FIELDS})
        envs.close()
        tallies += batch_tallies
    return tallies


#: The per-round ``info`` fields :func:`episode_infos` keeps.
ROUND_FIELDS = (*TALLIED_FIELDS, "asr_per_attack", "system_asr_per_attack", "detector_threshold", "prediction_entropy")


def episode_infos(scenario: str, fidelity: str, betas: tuple[float, float, float], seed: int, overrides: dict) -> list[dict]:
    """One episode on a single environment with ``betas`` held fixed, environment seed
    ``EVAL_SEED_OFFSET + seed``: each round's :data:`ROUND_FIELDS` (one torch thread)."""
    torch.set_num_threads(1)
    env = gym.make(env_id(load_spec(scenario, overrides)), scenario=scenario, fidelity=fidelity, **overrides)
    env.reset(seed=EVAL_SEED_OFFSET + seed)
    action = action_from_betas(np.asarray(betas)).astype(np.float32)
    rounds, done = [], False
    while not done:
        _, _, terminated, truncated, info = env.step(action)
        rounds.append({key: info[key] for key in ROUND_FIELDS})
        done = terminated or truncated
    env.close()
    return rounds


def in_processes(function, jobs: list, processes: int = 1) -> list:
    """``[function(job) for job in jobs]``, over ``processes`` spawned processes when more than one
    (``function`` must be importable: a module-level function of a script on the path)."""
    if processes == 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    with mp.get_context("spawn").Pool(min(processes, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def _play_one(job: tuple[str, list[str], int, int, dict, str]) -> PhaseTally:
    """One (β, seed) episode on a single environment (the pixel fidelity has no batched one)."""
    scenario, names, b, seed, overrides, fidelity = job
    tally = PhaseTally(names)
    for info in episode_infos(scenario, fidelity, DISCRETE_BETAS[b], seed, overrides):
        tally.add(info)
    return tally


def play_fixed(scenario: str, seeds: list[int], overrides: dict, fidelity: str = "embedding",
               processes: int = 1) -> PhaseFigures:
    """Every β of the grid held for one episode per seed; ``processes`` applies to ``fidelity="pixel"``,
    whose episodes run one per process."""
    spec = load_spec(scenario, overrides)
    names = phase_names(spec)  # each round's phase is read from its info
    jobs = [(b, s) for b in range(len(DISCRETE_BETAS)) for s in seeds]
    if fidelity == "embedding":
        tallies = _play_batched(spec, names, jobs)
    else:
        tallies = in_processes(_play_one, [(scenario, names, b, s, overrides, fidelity) for b, s in jobs], processes)
    means = [tally.means() for tally in tallies]
    shape = (len(DISCRETE_BETAS), len(seeds), len(names))
    array = lambda field: np.array([m[field] for m in means]).reshape(shape)  # noqa: E731
    return PhaseFigures(names, array("system_asr"), array("clean_acc"), array("asr"), array("detector_tpr"))


def report(scenario: str, seeds: list[int], overrides: dict, fidelity: str = "embedding", processes: int = 1) -> dict:
    """Per phase: task-only's figures and the best admissible fixed β's drop (see the module docstring)."""
    started = time.perf_counter()
    figures = play_fixed(scenario, seeds, overrides, fidelity, processes)
    names, system, clean = figures.names, figures.system, figures.clean
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # a phase the episode never reached
    phases = []
    for k, name in enumerate(names):
        base_system, base_clean = system[TASK_ONLY, :, k], clean[TASK_ONLY, :, k]
        mean = lambda a: float(np.nanmean(a))  # noqa: E731  (random schedules may skip a phase in some seeds)
        task_clean = mean(base_clean)
        # every β's means in this phase; admissible: within the clean-accuracy allowance of task-only
        grid = [{"betas": DISCRETE_BETAS[b], "system_asr": mean(system[b, :, k]), "model_asr": mean(figures.model[b, :, k]),
                 "detector_tpr": mean(figures.tpr[b, :, k]), "clean_acc": mean(clean[b, :, k]),
                 "admissible": mean(clean[b, :, k]) >= task_clean - CLEAN_ALLOWANCE} for b in range(len(DISCRETE_BETAS))]
        row = {"phase": name, "task_system_asr": t_interval(base_system.tolist(), bounds=bounds_for("system_asr")),
               "task_clean_acc": task_clean, "task_model_asr": grid[TASK_ONLY]["model_asr"],
               "task_detector_tpr": grid[TASK_ONLY]["detector_tpr"], "best": None, "every_beta": grid}
        if not np.isnan(base_system).all():
            best = min((b for b, cell in enumerate(grid) if cell["admissible"]), key=lambda b: grid[b]["system_asr"])
            drop = paired_difference(base_system.tolist(), system[best, :, k].tolist(), bounds=bounds_for("system_asr"))
            row["best"] = {**{key: grid[best][key] for key in ("betas", "system_asr", "model_asr", "detector_tpr")},
                           "clean_cost": task_clean - grid[best]["clean_acc"], "drop": drop}
        phases.append(row)
    met = any(p["best"] is not None and (p["best"]["drop"].mean or 0.0) >= TARGET_DROP for p in phases)
    return {"scenario": scenario, "phases": phases, "met": met, "evaluation_only": load_spec(scenario, overrides).evaluation_only,
            "seconds": time.perf_counter() - started}


def print_report(result: dict) -> None:
    """The per-phase table; ``model`` / ``TPR``: the model's own ASR and the detector's TPR behind each system ASR."""
    if result["evaluation_only"]:  # point 4 is asked of the training scenarios
        verdict = "evaluation-only: a ≥ 0.3 drop " + ("reached" if result["met"] else "not reached")
    else:
        verdict = "point 4 " + ("met" if result["met"] else "not met")
    print(f"\n== {result['scenario']} ({verdict}; {result['seconds']:.0f} s)")
    print(f"{'phase':14} {'task-only system ASR':>22} {'model':>6} {'TPR':>6} {'clean':>6}   {'best fixed β (clean cost ≤ 0.05)':34} "
          f"{'system ASR':>10} {'model':>6} {'TPR':>6} {'clean cost':>10} {'drop (95% CI)':>22}")
    for p in result["phases"]:
        best = p["best"]
        if best is None:
            print(f"{p['phase']:14} {'—':>22} {'':6} {'':6} {p['task_clean_acc']:6.3f}   (no attacked round)")
            continue
        head = f"{p['phase']:14} {p['task_system_asr'].format(3):>22} {p['task_model_asr']:6.3f} {p['task_detector_tpr']:6.3f} {p['task_clean_acc']:6.3f}"
        betas = "(" + ", ".join(f"{b:.2f}" for b in best["betas"]) + ")"
        mark = " ✓" if (best["drop"].mean or 0.0) >= TARGET_DROP else ""
        print(f"{head}   {betas:34} {best['system_asr']:10.3f} {best['model_asr']:6.3f} {best['detector_tpr']:6.3f} "
              f"{best['clean_cost']:10.3f} {best['drop'].format(3):>22}{mark}")


def print_every_beta(result: dict) -> None:
    """Every β of the grid, per phase: system ASR, the model's ASR, detector TPR and clean accuracy
    (means over seeds); ``×`` marks a β whose clean-accuracy cost against task-only exceeds the allowance."""
    phases = result["phases"]
    cell = lambda v, digits: "—" if np.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
    print(f"   every fixed β, each phase's system ASR / model ASR / TPR / clean accuracy (× clean cost > {CLEAN_ALLOWANCE}):")
    print(f"   {'β':20}" + "".join(f"{p['phase'][:26]:>28}" for p in phases))
    for b, betas in enumerate(DISCRETE_BETAS):
        cells = []
        for p in phases:
            f = p["every_beta"][b]
            costly = not f["admissible"] and not np.isnan(f["clean_acc"])
            cells.append(f"{cell(f['system_asr'], 3)} {cell(f['model_asr'], 2)} {cell(f['detector_tpr'], 2)} {cell(f['clean_acc'], 3)}{'×' if costly else ' '}")
        print(f"   {'(' + ', '.join(f'{x:.2f}' for x in betas) + ')':20}" + "".join(f"{c:>28}" for c in cells))


def main() -> None:
    shipped = [n for n in scenarios_available(include_evaluation_only=False, fidelity="embedding") if len({p.name for p in load_scenario(n).phases}) > 1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=shipped, help=f"default (the non-stationary ones): {' '.join(shipped)}")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides, e.g. episode_rounds:40")
    parser.add_argument("--fidelity", choices=["embedding", "pixel"], default="embedding",
                        help="embedding (default: batched) or pixel (one environment per episode, over --jobs processes)")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="--fidelity pixel: parallel processes, one torch thread each (default: one per core)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--every-beta", action="store_true",
                        help="also print every β's system ASR, model ASR, TPR and clean accuracy per phase (which β each phase wants)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    scenario_option(parser, args.scenarios, overrides=overrides)  # every file and override checked before any runs
    print(f"defence within an episode: per phase, task-only vs the fixed β (grid step 1/3) that lowers system ASR most "
          f"at ≤ {CLEAN_ALLOWANCE} clean-accuracy cost; {args.fidelity} fidelity, evaluation seeds {args.seeds}; target drop ≥ {TARGET_DROP}")
    results = [report(scenario, args.seeds, overrides, args.fidelity, args.jobs) for scenario in args.scenarios]
    for result in results:
        print_report(result)
        if args.every_beta:
            print_every_beta(result)
    training = [r for r in results if not r["evaluation_only"]]  # point 4 is asked of the training scenarios
    met = [r["scenario"] for r in training if r["met"]]
    if training:
        print(f"\npoint 4 met on {len(met)}/{len(training)} scenarios: {', '.join(met) or 'none'}")


if __name__ == "__main__":
    main()
