"""What ``embedding_attack_radius: pixel_travel`` costs beside ``law``: building the environment and stepping it.

    python benchmarks/attack_radius_cost.py [--scenarios abrupt_shift] [--envs 50] [--rounds 10]

Per scenario, on one thread, it builds ``CMAIVectorEnv`` with ``--envs`` environments at each
``embedding_attack_radius``, resets it and plays ``--rounds`` rounds of task-only β, and prints
the CPU seconds of building and of the rounds side by side. At ``pixel_travel`` building runs every
attack configuration of the scenario as a pixel attack over every pool and probe image of every
view (:mod:`cmai_env.fidelity.travel`); a second build of the same scenario is also timed, to show
that it reads the radii from the cache (:class:`~cmai_env.fidelity.travel.TravelCache`) instead of
running the pixel attacks again, as a build in any later process does. The run uses a cache folder
of its own, so the first build always computes. ``--set KEY=VALUE`` overrides scenario fields (e.g.
``dataset.train_n=128`` for a smoke run). An untimed build comes first, so imports and the
backbone's first load count for neither mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

from cmai_env.cli.common import assignments_option, non_negative_int, positive_int  # noqa: E402
from cmai_env.scenario import scenario_option  # noqa: E402

MODES = ("law", "pixel_travel")


def measure(scenario: str, mode: str, envs: int, rounds: int, overrides: dict[str, Any]) -> dict[str, float]:
    """CPU seconds of building (twice at ``pixel_travel``: the second reads the cached radii) and of ``rounds`` rounds."""
    import gymnasium as gym
    import numpy as np

    import cmai_env  # noqa: F401  (registers the env IDs)
    from cmai_env.env import action_from_betas

    def build():
        return gym.make_vec("cmai_env/CMAI-v0", num_envs=envs, vectorization_mode="vector_entry_point", scenario=scenario,
                            fidelity="embedding", embedding_attack_radius=mode, **overrides)

    tic = time.process_time()
    vec = build()
    built = time.process_time() - tic
    tic = time.process_time()
    again = build()
    rebuilt = time.process_time() - tic
    again.close()
    vec.reset(seed=list(range(envs)))
    actions = np.repeat(action_from_betas((1.0, 0.0, 0.0))[None], envs, axis=0).astype(np.float32)
    tic = time.process_time()
    for _ in range(rounds):
        vec.step(actions)
    stepped = time.process_time() - tic
    vec.close()
    return {"build": built, "rebuild": rebuilt, "rounds": stepped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["abrupt_shift"], help="default: abrupt_shift")
    parser.add_argument("--envs", type=positive_int, default=50, help="batched environments (default: 50)")
    parser.add_argument("--rounds", type=non_negative_int, default=10, help="rounds played after reset (default: 10)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="scenario overrides, e.g. dataset.train_n=128")
    args = parser.parse_args(argv)
    scenario_option(parser, args.scenarios, "--scenarios")
    overrides = assignments_option(parser, args.set, "=", "--set")

    import torch

    torch.set_num_threads(1)
    # A cache of this run's own (restored after): radii another run left must not make "build" cheap.
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"CMAI_CACHE_DIR": cache}):
        measure(args.scenarios[0], "law", 1, 0, overrides)  # warm-up: imports and the backbone's first load are not either mode's cost
        print(f"CPU seconds, one thread, {args.envs} environments, {args.rounds} rounds of task-only β")
        print(f"{'scenario':<20} {'radius':<13} {'build':>8} {'again':>8} {'rounds':>8}")
        for scenario in args.scenarios:
            for mode in MODES:
                m = measure(scenario, mode, args.envs, args.rounds, overrides)
                print(f"{scenario:<20} {mode:<13} {m['build']:>8.1f} {m['rebuild']:>8.1f} {m['rounds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
