"""What the loss weights do to the detector, and how far apart the classes' embeddings are.

Prints, per scenario (embedding fidelity, one episode per fixed β, environment seed 0): the
detector threshold τ at the first round and its mean over the last five, detector TPR over the
attacked rounds, the model's ASR, the system ASR and the false-rejection rate. Then, for the
scenario's data, the L2 distance from each probe image embedding to the nearest training image
embedding of another class (quantiles): an embedding attack whose radius exceeds about half of it
cannot be resisted by any defence of the embedding fidelity.

    python benchmarks/detector_weights.py [--scenarios quickstart abrupt_shift]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch

import cmai_env  # noqa: F401  (registers the environments)
from cmai_env.env import action_from_betas
from cmai_env.scenario import scenario_option

BETAS = {"task-only": (1.0, 0.0, 0.0), "consistency-only": (0.0, 1.0, 0.0), "(1/3, 2/3, 0)": (1 / 3, 2 / 3, 0.0), "adv-only": (0.0, 0.0, 1.0)}


def weights_row(scenario: str, betas: tuple[float, float, float]) -> dict[str, float]:
    env = gym.make("cmai_env/CMAI-v0", scenario=scenario, fidelity="embedding").unwrapped
    env.reset(seed=0)
    infos = [env.step(action_from_betas(np.array(betas)))[4] for _ in range(env.episode_rounds)]
    attacked = [i for i in infos if i["attacks"]]
    return {
        "tau_start": infos[0]["detector_threshold"],
        "tau_end": float(np.mean([i["detector_threshold"] for i in infos[-5:]])),
        "tpr": float(np.mean([i["detector_tpr"] for i in attacked])),
        "asr": float(np.mean([i["asr"] for i in attacked])),
        "system_asr": float(np.mean([i["system_asr"] for i in attacked])),
        "frr": float(np.mean([i["false_rejection_rate"] for i in infos])),
    }


def class_distances(scenario: str) -> np.ndarray:
    env = gym.make("cmai_env/CMAI-v0", scenario=scenario, fidelity="embedding").unwrapped
    world = env.world.world
    distances = torch.cdist(world.probe_v, world.pool_v)
    other = distances.masked_fill(world.probe_y[:, None] == world.pool_y[None], float("inf")).min(1).values
    return np.quantile(other.numpy(), [0.05, 0.25, 0.5, 0.75])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["quickstart", "abrupt_shift"])
    args = parser.parse_args()
    scenario_option(parser, args.scenarios)
    torch.set_num_threads(1)
    for scenario in args.scenarios:
        print(f"\n== {scenario} (embedding fidelity, seed 0)")
        print(f"{'β':18} {'τ start':>8} {'τ end':>8} {'TPR':>6} {'ASR':>6} {'system ASR':>11} {'FRR':>6}")
        for label, betas in BETAS.items():
            r = weights_row(scenario, betas)
            print(f"{label:18} {r['tau_start']:8.3f} {r['tau_end']:8.3f} {r['tpr']:6.2f} {r['asr']:6.2f} {r['system_asr']:11.2f} {r['frr']:6.3f}")
        q = class_distances(scenario)
        print("nearest other-class image embedding, L2 quantiles 5/25/50/75%: " + ", ".join(f"{v:.3f}" for v in q))


if __name__ == "__main__":
    main()
