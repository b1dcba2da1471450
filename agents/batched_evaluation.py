"""The evaluation protocol's episodes for all seeds at once, on the batched vector environment.

:func:`run_episodes_batched` returns what :func:`agents.runner.run_episodes` returns (the
same rows and episode records, in the same order, and the same numbers up to floating-point
rounding: environment ``i`` of a :class:`cmai_env.vector_env.CMAIVectorEnv` is seeded
``EVAL_SEED_OFFSET + seeds[i]`` exactly as the sequential loop seeds its one environment, and
every seed gets its own copy of the policy), but steps the seeds' episodes together. Two
differences: the losses can differ in their last digits (stacked matmuls sum in another order),
and a row's ``round_ms`` is the batched step's wall time divided by the number of seeds (the
amortised cost of one round).

It falls back to the sequential loop where batching does not apply: pixel fidelity, a single
seed, a per-step callback (TensorBoard logging writes one episode at a time), or schedules
whose episodes differ in length between seeds.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from agents.protocol import EVAL_SEED_OFFSET
from agents.records import EpisodeRecord, episode_line, episode_record, round_row
from agents.runner import OnStep, run_episodes

if TYPE_CHECKING:
    from agents.env_pool import EnvPool
    from agents.env_spec import EnvSpec


def run_episodes_batched(
    policy: Any,
    spec: "EnvSpec",
    seeds: Sequence[int],
    episodes: int,
    on_step: OnStep | None = None,
    log: Callable[[str], None] | None = None,
    pool: "EnvPool | None" = None,
) -> tuple[list[dict], list[EpisodeRecord]]:
    """:func:`agents.runner.run_episodes` with one batched environment for all seeds (module docstring).

    :param pool: take the batched environment (or, falling back, the single one) from this pool;
        without one, it is built and closed.
    """
    from agents.vec_adapter import batched_supported

    if len(seeds) < 2 or on_step is not None or not batched_supported(spec.env_id, {"scenario": spec.resolved}):
        return run_episodes(policy, spec, seeds, episodes, on_step=on_step, log=log, pool=pool)
    vec = pool.vector_env(spec, len(seeds)) if pool is not None else spec.make_vector(len(seeds))
    try:
        return _run(policy, vec, list(seeds), episodes, log)
    except _UnequalEpisodes:
        return run_episodes(policy, spec, seeds, episodes, on_step=on_step, log=log, pool=pool)
    finally:
        if pool is None:
            vec.close()


class _UnequalEpisodes(Exception):
    """The seeds' episodes differ in length (a random schedule): run them one by one instead."""


def _run(policy: Any, vec, seeds: list[int], episodes: int, log: Callable[[str], None] | None):
    n = len(seeds)
    policies = [copy.deepcopy(policy) for _ in seeds]
    # Policies bind to one environment: its action space and the detector's flag-rate threshold.
    view = SimpleNamespace(action_space=vec.single_action_space, flag_rate_threshold=vec.flag_rate_threshold)
    view.unwrapped = view
    for p in policies:
        if hasattr(p, "bind"):
            p.bind(view)
    rows: list[list[dict]] = [[] for _ in seeds]
    records: list[list[EpisodeRecord]] = [[] for _ in seeds]
    for episode in range(episodes):
        obs, _ = vec.reset(seed=[EVAL_SEED_OFFSET + s for s in seeds] if episode == 0 else None)
        lengths = {len(slot.stream) for slot in vec.slots}
        if len(lengths) != 1:
            raise _UnequalEpisodes
        for p in policies:
            p.reset()
        states: list[Any] = [None] * n
        start = True
        episode_rows: list[list[dict]] = [[] for _ in seeds]
        for _ in range(lengths.pop()):
            actions = []
            for i, p in enumerate(policies):
                action, states[i] = p.predict(obs[i], state=states[i], episode_start=np.array([start]), deterministic=True)
                actions.append(np.asarray(action).reshape(vec.single_action_space.shape or ()))
            obs, rewards, terminated, truncated, infos = vec.step_list(np.stack(actions))
            round_ms = vec.last_timing["round_ms"] / n
            for i, p in enumerate(policies):
                p.observe(infos[i])
                episode_rows[i].append(round_row(p.name, seeds[i], episode, float(rewards[i]), infos[i], round_ms))
            start = False
        for i, slot in enumerate(vec.slots):
            shifts = [record.as_dict() for record in slot.latency.records]
            records[i].append(episode_record(seeds[i], episode, episode_rows[i], shifts, list(slot.stream.timeline)))
            rows[i].extend(episode_rows[i])
    if log is not None:
        for per_seed in records:
            for record in per_seed:
                log(episode_line(policy.name, record))
    flat_rows = [row for per_seed in rows for row in per_seed]
    for row in flat_rows:
        row.pop("_asr_per_attack", None)
    return flat_rows, [record for per_seed in records for record in per_seed]


__all__ = ["run_episodes_batched"]
