"""The frozen evaluation protocol: environment IDs, evaluation seeds and their offset.

One definition each: training's periodic evaluation, ``cmai evaluate``, ``cmai benchmark``,
``cmai tune`` and the benchmarks import them from here. Evaluation seed ``s`` plays environment
seed ``EVAL_SEED_OFFSET + s``; training environments use ``seed + rank`` with ranks far below the
offset, so an evaluation episode never replays a training one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmai_env import CONTINUOUS_ENV_ID, DISCRETE_ENV_ID, EVAL_ENV_ID

__all__ = [
    "CONTINUOUS_ENV_ID",
    "DEFAULT_PROTOCOL",
    "DISCRETE_ENV_ID",
    "EVAL_ENV_ID",
    "EVAL_SEED_OFFSET",
    "PROTOCOLS",
    "EvalProtocol",
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


