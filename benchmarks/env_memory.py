"""Peak memory of environments, measured beside the estimates :mod:`cmai_env.resources` checks.

    python benchmarks/env_memory.py [--scenario quickstart] [--counts 256 1024] [--rounds 6] [--no-pixel]

Each measurement runs in a fresh process (``ru_maxrss`` is a process's peak). For the batched
embedding environment it builds ``CMAIVectorEnv`` with each of ``--counts`` environments, resets
it and steps ``--rounds`` rounds of fixed β, and prints the peak RSS above the process's own
before construction, per environment, and the marginal cost per environment between the counts,
beside :func:`cmai_env.resources.embedding_bytes_per_env`. With pixel fidelity it prints the
peak RSS of a process holding one pixel environment after two rounds, beside
``PIXEL_PROCESS_BYTES``. The checks multiply the estimates by ``SAFETY`` before comparing them
with free memory, so an estimate within that factor of the measurement is what they need.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

from cmai_env.cli.common import positive_int  # noqa: E402
from cmai_env.resources import MIB, PIXEL_PROCESS_BYTES, SAFETY, embedding_bytes_per_env  # noqa: E402
from cmai_env.scenario import load_scenario, scenario_option  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(scenario: str, fidelity: str, count: int, rounds: int) -> dict[str, float]:
    """In this process: peak RSS before and after building ``count`` environments and playing ``rounds``."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    before = _peak_mib()
    if fidelity == "pixel":
        from cmai_env.env import CMAIEnv

        env = CMAIEnv(scenario=scenario, fidelity="pixel")
        env.reset(seed=0)
        for _ in range(rounds):
            env.step(np.zeros(3, dtype=np.float32))
    else:
        from cmai_env.vector_env import CMAIVectorEnv

        env = CMAIVectorEnv(count, scenario, fidelity="embedding")
        env.reset(seed=0)
        for _ in range(rounds):
            env.step(np.zeros((count, 3), dtype=np.float32))
    return {"before_mib": before, "after_mib": _peak_mib()}


def in_fresh_process(scenario: str, fidelity: str, count: int, rounds: int) -> dict[str, float]:
    code = ("import json, sys; sys.path.insert(0, %r); from env_memory import measure; "
            "print(json.dumps(measure(%r, %r, %d, %d)))") % (str(Path(__file__).parent), scenario, fidelity, count, rounds)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--counts", type=int, nargs=2, default=[256, 1024], help="two environment counts, smaller first")
    parser.add_argument("--rounds", type=positive_int, default=6)
    parser.add_argument("--no-pixel", action="store_true", help="skip the pixel process")
    args = parser.parse_args()
    scenario_option(parser, [args.scenario], "--scenario")
    small, large = args.counts
    if not 1 <= small < large:
        parser.error(f"--counts {small} {large}: two counts with 1 ≤ the first < the second")
    spec = load_scenario(args.scenario)
    estimate = embedding_bytes_per_env(spec) / MIB
    print(f"{args.scenario}: batch_size {spec.batch_size}, probe_n {spec.dataset.probe_n}; {args.rounds} rounds; peak RSS, fresh process each")
    peaks = {}
    for count in (small, large):
        result = in_fresh_process(args.scenario, "embedding", count, args.rounds)
        peaks[count] = result["after_mib"] - result["before_mib"]
        print(f"  embedding, N = {count:>5}: +{peaks[count]:8.1f} MiB ({peaks[count] / count:.2f} MiB per environment)")
    marginal = (peaks[large] - peaks[small]) / (large - small)
    print(f"  marginal per environment (N {small} → {large}): {marginal:.2f} MiB; estimate {estimate:.2f} MiB "
          f"(ratio {estimate / marginal:.2f}; the check uses {SAFETY}× the estimate)")
    if not args.no_pixel:
        result = in_fresh_process(args.scenario, "pixel", 1, 2)
        print(f"  pixel, one environment: process peak {result['after_mib']:.0f} MiB; estimate {PIXEL_PROCESS_BYTES / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
