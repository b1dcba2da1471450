"""Environment throughput: rounds/s, peak memory and the environment's overhead ratio.

For each scenario × fidelity it runs ``--rounds`` env steps with random actions, then the same
rounds "bare": the fidelity's own calls (craft the incoming traffic, forward it, trainer update,
probe) on the same plans, without the environment around them (observation building, detector,
change detector, latency tracking, info). The overhead ratio is env time ÷ bare time.

Goals on 2 CPU cores: embedding fidelity ≥ 500 rounds/s, pixel overhead ratio ≤ 1.15,
peak RSS ≤ 1.5 GB.

    python benchmarks/env_throughput.py [--rounds 40] [--scenarios quickstart abrupt_shift] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import time

import gymnasium as gym
import numpy as np
import torch

import cmai_env  # noqa: F401  (registers the environments)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_env(env, rounds: int, seed: int) -> tuple[float, list]:
    """Seconds for ``rounds`` env steps (resetting at episode ends), and the plans they used."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    plans, elapsed = [], 0.0
    for _ in range(rounds):
        plans.append(env._plan)
        action = rng.uniform(-1, 1, 3).astype(np.float32)
        start = time.perf_counter()
        _, _, _, truncated, _ = env.step(action)
        elapsed += time.perf_counter() - start
        if truncated:
            env.reset(seed=seed)
    return elapsed, plans


def run_bare(env, plans: list, seed: int) -> float:
    """Seconds for the same rounds as plain fidelity calls."""
    world = env.world
    world.reset()
    rng = np.random.default_rng(seed)
    action_rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for plan in plans:
        traffic = world.incoming(plan, rng)
        world.observe(traffic)
        betas = np.exp(3 * action_rng.uniform(-1, 1, 3))
        world.update(traffic, betas / betas.sum(), np.zeros(len(traffic.attack_index), dtype=bool), rng)
        world.probe(plan, rng)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["quickstart", "abrupt_shift"])
    parser.add_argument("--fidelities", nargs="+", default=["embedding", "pixel"])
    parser.add_argument("--rounds", type=int, default=40, help="pixel rounds (embedding runs 25× as many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for these small batches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'scenario':<16}{'fidelity':<11}{'rounds':>7}{'rounds/s':>10}{'ms/round':>10}{'bare ms':>9}{'overhead':>10}{'peak RSS MB':>13}")
    for scenario in args.scenarios:
        for fidelity in args.fidelities:
            env = gym.make("cmai_env/CMAI-v0", scenario=scenario, fidelity=fidelity).unwrapped
            rounds = args.rounds * (25 if fidelity == "embedding" else 1)
            run_env(env, min(rounds, 5), args.seed)  # warm-up (allocator, lazy init)
            env_s, plans = run_env(env, rounds, args.seed)
            bare_s = run_bare(env, plans, args.seed)
            print(
                f"{scenario:<16}{fidelity:<11}{rounds:>7}{rounds / env_s:>10.1f}{1000 * env_s / rounds:>10.2f}"
                f"{1000 * bare_s / rounds:>9.2f}{env_s / bare_s:>10.3f}{peak_rss_mb():>13.0f}"
            )
            env.close()


if __name__ == "__main__":
    main()
