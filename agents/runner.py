"""The evaluation's episode loop: a policy plays the protocol's episodes in one environment.

Episode ``e`` of seed ``s`` is played on an environment reset with
``seed = EVAL_SEED_OFFSET + s`` for ``e = 0`` and continued without a new seed for ``e > 0``
(gymnasium's convention); policies act deterministically. :mod:`agents.batched_evaluation`
plays all seeds at once on the batched environment and falls back to :func:`run_episodes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from agents.protocol import EVAL_SEED_OFFSET
from agents.records import EpisodeRecord, episode_line, episode_record, round_row

if TYPE_CHECKING:
    from agents.env_pool import EnvPool
    from agents.env_spec import EnvSpec
    from agents.policies import GatingPolicy

__all__ = ["OnStep", "run_episodes"]

#: Per-step callback: ``(info, reward, done, seed, episode)``.
OnStep = Callable[[dict, float, bool, int, int], None]


def run_episodes(
    policy: "GatingPolicy",
    spec: "EnvSpec",
    seeds: Sequence[int],
    episodes: int,
    on_step: OnStep | None = None,
    log: Callable[[str], None] | None = None,
    pool: "EnvPool | None" = None,
) -> tuple[list[dict], list[EpisodeRecord]]:
    """Play ``episodes`` episodes per seed; return the round rows and per-episode records.

    :param policy: the gating policy (``bind``-ed to the environment if it has ``bind``).
    :param spec: the evaluation environment.
    :param seeds: evaluation seeds.
    :param episodes: episodes per seed.
    :param on_step: called after every step with ``(info, reward, done, seed, episode)``
        (TensorBoard).
    :param log: called with one progress line per episode.
    :param pool: take the environment from (and leave it in) this pool; without one, a new
        environment is built and closed.
    """
    env = pool.env(spec) if pool is not None else spec.make()
    try:
        if hasattr(policy, "bind"):
            policy.bind(env)
        rows: list[dict] = []
        records: list[EpisodeRecord] = []
        for seed in seeds:
            for episode in range(episodes):
                episode_rows = _play(policy, env, seed, episode, on_step)
                base = env.unwrapped
                shifts = [record.as_dict() for record in base.latency.records]
                records.append(episode_record(seed, episode, episode_rows, shifts, list(base.stream.timeline)))
                rows.extend(episode_rows)
                if log is not None:
                    log(episode_line(policy.name, records[-1]))
        for row in rows:
            row.pop("_asr_per_attack", None)
        return rows, records
    finally:
        if pool is None:
            env.close()


def _play(policy: "GatingPolicy", env, seed: int, episode: int, on_step: OnStep | None) -> list[dict]:
    """One episode's round rows."""
    policy.reset()
    obs, _ = env.reset(seed=EVAL_SEED_OFFSET + seed if episode == 0 else None)
    state, start, done = None, True, False
    rows: list[dict] = []
    while not done:
        action, state = policy.predict(obs, state=state, episode_start=np.array([start]), deterministic=True)
        obs, reward, terminated, truncated, info = env.step(action)
        policy.observe(info)
        timing = getattr(env.unwrapped, "last_timing", None)
        rows.append(round_row(policy.name, seed, episode, reward, info, timing.round_ms if timing else None))
        start, done = False, bool(terminated or truncated)
        if on_step is not None:
            on_step(info, float(reward), done, seed, episode)
    return rows
