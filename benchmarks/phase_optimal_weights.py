"""Does the choice of loss weights matter, and differently per phase?

For each phase of a scenario the episode is played with uniform weights up to the phase's first
round, the environment is copied there, and every weight vector of the grid (the Discrete
action grid: the simplex with step 1/3) is played through the phase from that copy. The best
fixed β of a phase is the one with the highest mean reward in the phase (averaged over the
seeds); an adaptive gate can only beat fixed weights if the best β differs between phases.
With several seeds, the reward difference between the best β and the runner-up, paired per
seed, is printed with its standard deviation over seeds, so a "best" within noise shows as such.

    python benchmarks/phase_optimal_weights.py [--scenario abrupt_shift] [--fidelity pixel] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import gymnasium as gym
import numpy as np

import cmai_env  # noqa: F401  (registers the environments)
from agents.protocol import DistinctSeeds
from cmai_env.env import DISCRETE_BETAS, action_from_betas


def phase_optimal_weights(scenario: str, fidelity: str, seed: int = 0, **overrides) -> list[dict]:
    """Per phase: mean reward, ASR and clean accuracy of every grid β, and the best β."""
    env = gym.make("cmai_env/CMAI-v0", scenario=scenario, fidelity=fidelity, **overrides).unwrapped
    env.reset(seed=seed)
    uniform = action_from_betas(np.full(3, 1 / 3))
    results = []
    t = 0
    for start, end, phase in env.stream.timeline:
        while t < start:  # uniform prefix up to this phase
            env.step(uniform)
            t += 1
        rows = []
        for betas in DISCRETE_BETAS:
            branch = copy.deepcopy(env)
            rewards, asrs, accs = [], [], []
            for _ in range(start, min(end, branch.episode_rounds)):
                _, reward, _, _, info = branch.step(action_from_betas(betas))
                rewards.append(reward), asrs.append(info["asr"]), accs.append(info["clean_acc"])
            rows.append({"betas": betas.round(3).tolist(), "reward": float(np.mean(rewards)),
                         "asr": float(np.mean(asrs)), "clean_acc": float(np.mean(accs))})
        best = max(rows, key=lambda r: r["reward"])
        results.append({"phase": phase, "start": start, "end": end, "grid": rows, "best": best})
    return results


def over_seeds(scenario: str, fidelity: str, seeds: list[int]) -> list[dict]:
    """:func:`phase_optimal_weights` per seed, merged: grid rows hold means and the per-seed rewards."""
    runs = [phase_optimal_weights(scenario, fidelity, seed) for seed in seeds]
    merged = []
    for phases in zip(*runs):
        rows = []
        for cells in zip(*(p["grid"] for p in phases)):
            rewards = [c["reward"] for c in cells]
            rows.append({"betas": cells[0]["betas"], "reward": float(np.mean(rewards)), "rewards": rewards,
                         "asr": float(np.mean([c["asr"] for c in cells])), "clean_acc": float(np.mean([c["clean_acc"] for c in cells]))})
        best = max(rows, key=lambda r: r["reward"])
        merged.append({**{k: phases[0][k] for k in ("phase", "start", "end")}, "grid": rows, "best": best})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="abrupt_shift")
    parser.add_argument("--fidelity", default="pixel")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0])
    args = parser.parse_args()
    started = time.perf_counter()
    results = over_seeds(args.scenario, args.fidelity, args.seeds)
    for phase in results:
        print(f"\nphase {phase['phase']!r} rounds [{phase['start']}, {phase['end']})")
        print(f"  {'β_task β_cons β_adv':<22}{'reward':>9}{'ASR':>8}{'clean':>8}")
        for row in sorted(phase["grid"], key=lambda r: -r["reward"]):
            b = row["betas"]
            mark = "  <- best" if row is phase["best"] else ""
            print(f"  {b[0]:>6.2f}{b[1]:>7.2f}{b[2]:>7.2f}  {row['reward']:>9.3f}{row['asr']:>8.3f}{row['clean_acc']:>8.3f}{mark}")
        ranked = sorted(phase["grid"], key=lambda r: -r["reward"])
        paired = np.subtract(ranked[0]["rewards"], ranked[1]["rewards"])
        spread = float(np.std(paired, ddof=1)) if len(paired) > 1 else float("nan")
        print(f"  best − runner-up, paired per seed: {paired.mean():.3f} (std over seeds {spread:.3f})")
    distinct = {tuple(p["best"]["betas"]) for p in results}
    print(f"\nseeds {args.seeds}; best β per phase: {[p['best']['betas'] for p in results]}")
    print(f"distinct best β across {len(results)} phases: {len(distinct)}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
