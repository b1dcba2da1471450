"""What an :class:`agents.env_pool.EnvPool` saves when many policies are evaluated on one scenario.

``cmai benchmark`` evaluates every baseline (and the ablation variants) on each scenario under
the same environment spec. This script times the construction of that scenario's environments
(a single env and the batched env of the seeds) and then the same sequence of evaluations
without a pool (every evaluation builds and closes its environment) and with one pool shared by
all of them, in process CPU seconds (torch on one thread), alternating the two orders so that
warm caches favour neither. The numbers of both runs are checked to be identical.

    python benchmarks/env_pool.py [--scenario quickstart] [--seeds 0 1] [--policies 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from agents.baselines import available_baselines
from agents.env_pool import EnvPool
from agents.env_spec import env_spec
from agents.evaluation import evaluate_policy
from agents.protocol import DistinctSeeds
from cmai_env.cli.common import positive_int

#: A small scenario size so that construction and play are both visible (the tiny test size).
SMALL = {"batch_size": 8, "dataset.train_n": 64, "dataset.probe_n": 16, "episode_rounds": 6}


def _cpu(fn) -> tuple[float, object]:
    tic = time.process_time()
    value = fn()
    return time.process_time() - tic, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1])
    parser.add_argument("--policies", type=positive_int, default=8, help="evaluations in the sequence (baselines, cycled)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = env_spec(args.scenario, "embedding", SMALL)
    first, env = _cpu(spec.make)  # the first one also pays for imports and loading the weights
    env.close()
    single, env = _cpu(spec.make)
    env.close()
    batched, vec = _cpu(lambda: spec.make_vector(len(args.seeds)))
    vec.close()
    print(f"{args.scenario} (embedding, {SMALL}): building a single env {single:.2f} CPU-s (the first {first:.2f}), "
          f"the batched env of {len(args.seeds)} seeds {batched:.2f} CPU-s")

    names = [available_baselines()[i % len(available_baselines())] for i in range(args.policies)]
    kwargs = dict(seeds=args.seeds, episodes=1, fidelity="embedding", env_kwargs=SMALL, reference=False)

    def sequence(pool: EnvPool | None) -> list:
        return [evaluate_policy(f"baseline:{name}", args.scenario, pool=pool, **kwargs).per_seed("return") for name in names]

    def pooled() -> tuple[list, int]:
        with EnvPool() as pool:
            return sequence(pool), pool.built

    times: dict[str, list[float]] = {"no pool": [], "one pool": []}
    for repeat in range(args.repeats):
        order = ("no pool", "one pool") if repeat % 2 == 0 else ("one pool", "no pool")
        for label in order:
            if label == "no pool":
                seconds, fresh = _cpu(lambda: sequence(None))
            else:
                seconds, (shared, built) = _cpu(pooled)
            times[label].append(seconds)
        assert fresh == shared, "a pooled environment played different episodes"
    for label, values in times.items():
        print(f"{len(names)} evaluations, {label:<8}: " + ", ".join(f"{v:.1f}" for v in values) + " CPU-s")
    saved = min(times["no pool"]) - min(times["one pool"])
    print(f"the pool built {built} environment(s) instead of {len(names)} and saved {saved:.1f} CPU-s "
          f"({saved / len(names):.2f} per evaluation; same returns per seed)")


if __name__ == "__main__":
    main()
