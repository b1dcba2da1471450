"""The frozen evaluation protocol: environment IDs, evaluation seeds and their offset.

One definition each: training's periodic evaluation, ``cmai evaluate``, ``cmai benchmark``,
``cmai tune`` and the benchmarks import them from here. Evaluation seed ``s`` plays environment
seed ``EVAL_SEED_OFFSET + s``; training environments use ``seed + rank`` with ranks far below the
offset, so an evaluation episode never replays a training one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from cmai_env import CONTINUOUS_ENV_ID, DISCRETE_ENV_ID, EVAL_ENV_ID

__all__ = [
    "CONTINUOUS_ENV_ID",
    "DEFAULT_PROTOCOL",
    "DISCRETE_ENV_ID",
    "EVAL_ENV_ID",
    "EVAL_SEED_OFFSET",
    "PROTOCOLS",
    "DistinctSeeds",
    "EvalProtocol",
    "distinct_seeds",
    "protocol_for",
]

#: Environment seed of evaluation seed ``s`` is ``EVAL_SEED_OFFSET + s``.
EVAL_SEED_OFFSET = 100_000


@dataclass(frozen=True)
class EvalProtocol:
    """Seeds and episodes of a scenario's frozen evaluation.

    :param seeds: evaluation seeds (environment seed = ``EVAL_SEED_OFFSET + seed``).
    :param episodes_per_seed: episodes played per seed.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    episodes_per_seed: int = 1


DEFAULT_PROTOCOL = EvalProtocol()
#: Per-scenario protocols; scenarios not listed use :data:`DEFAULT_PROTOCOL`. Shipped scenarios
#: are listed explicitly so that changing the default never silently changes their protocol.
PROTOCOLS: dict[str, EvalProtocol] = {
    **{
        name: EvalProtocol((0, 1, 2, 3, 4), 1)
        for name in (
            "quickstart",
            "abrupt_shift",
            "gradual_drift",
            "mixed_modalities",
            "periodic",
            "stationary_pgd",
            "unseen_attacks",
        )
    },
    "randomized_training": EvalProtocol(tuple(range(10)), 1),
}


def protocol_for(scenario_name: str) -> EvalProtocol:
    """The frozen protocol of a scenario (the default for unlisted ones)."""
    return PROTOCOLS.get(scenario_name, DEFAULT_PROTOCOL)


def distinct_seeds(seeds: "Sequence[int]", what: str = "evaluation seeds") -> list[int]:
    """``seeds`` as a list, refusing a repeated one: it would replay the same episodes and count
    them as independent runs in every interval over seeds.

    :raises ValueError: a seed given twice (the message names ``what`` and the seeds).
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{what} must be distinct, got {seeds}")
    return seeds


class DistinctSeeds(argparse.Action):
    """``add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds)``: a repeated seed is a
    usage error naming the option (:func:`distinct_seeds`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, distinct_seeds(values, option_string or self.dest))
        except ValueError as error:
            parser.error(str(error))
