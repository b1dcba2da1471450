"""The frozen evaluation protocol and :func:`evaluate_policy`, which composes its parts.

Protocol
--------
In the manner of the CAGE challenges, an evaluation is fully determined by a small table that
is part of the code, and everything needed to reproduce or compare a number travels with it:

* **Seeds and episodes** per scenario (:data:`PROTOCOLS`; any scenario not in the table,
  including user scenario files, uses :data:`DEFAULT_PROTOCOL`):

  =======================  ==============  ===============  ===================================
  scenario                 seeds           episodes / seed  why
  =======================  ==============  ===============  ===================================
  (default), every shipped 0, 1, 2, 3, 4   1                five replicates for a t-interval;
  fixed-schedule scenario                                   the schedule is fixed, so seeds
                                                            vary traffic, probes and attacks
  ``randomized_training``  0, 1, …, 9      1                the schedule itself is drawn per
                                                            seed: more seeds for the same CI
  =======================  ==============  ===============  ===================================

  Episode ``e`` of seed ``s`` is played on an environment reset with
  ``seed = EVAL_SEED_OFFSET + s`` for ``e = 0`` and continued without a new seed for ``e > 0``
  (gymnasium's convention), with ``EVAL_SEED_OFFSET = 100 000``: evaluation episodes replay
  neither the first episode of a training run seeded with a small integer nor the validation
  episodes ``cmai train`` uses to pick ``best_model.zip`` (seeded ``seed + 10 000``). Policies
  act deterministically.
* **Environment**: training scenarios run in ``cmai_env/CMAI-v0`` (``CMAI-Discrete-v0`` for
  policies with a discrete action space, e.g. DQN), evaluation-only scenarios in
  ``cmai_env/CMAI-Eval-v0``. The env ID, the scenario name, file and hash
  (:func:`cmai_env.scenario.scenario_hash`), the fidelity, any ``env_kwargs`` overrides, the
  package version and the git commit are recorded in every result.
* **Metrics** per round and per episode: :mod:`agents.records`; per seed (mean over its
  episodes) and over seeds (mean and 95% t-interval), with the clean-accuracy drop paired per
  seed against ``no_defense`` on the same seeds: :mod:`agents.results`, :mod:`agents.reference`.

The parts, one job each (SB3's ``common/`` layout):

===============================  ======================================================================
:mod:`agents.protocol`           env IDs, seeds per scenario, the evaluation seed offset
:mod:`agents.policy_resolution`  ``baseline:NAME`` or run folder → policy; its action space, fidelity
:mod:`agents.env_spec`           the scenario validated once, the env ID, the fingerprint
:mod:`agents.env_pool`           environments reused across evaluations (an object the caller owns)
:mod:`agents.runner`             the episode loop (:mod:`agents.batched_evaluation`: all seeds at once)
:mod:`agents.records`            round rows and episode metrics
:mod:`agents.results`            the summary over seeds, ``rounds.csv`` and ``summary.json``
:mod:`agents.reference`          ``no_defense``'s clean accuracy for the drop, cached on disk
:mod:`agents.provenance`         versions, git commit, code fingerprint
:mod:`agents.eval_tensorboard`   ``--tensorboard``'s per-episode event folders
===============================  ======================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from agents.env_pool import EnvPool
from agents.env_spec import EnvSpec, env_spec
from agents.policy_resolution import policy_action_mode, policy_env_kwargs, resolve_policy
from agents.protocol import (
    CONTINUOUS_ENV_ID,
    DEFAULT_PROTOCOL,
    DISCRETE_ENV_ID,
    EVAL_ENV_ID,
    EVAL_SEED_OFFSET,
    PROTOCOLS,
    EvalProtocol,
    distinct_seeds,
    protocol_for,
)
from agents.provenance import code_fingerprint, git_commit, metadata
from agents.records import EPISODE_METRICS, ROUND_COLUMNS, EpisodeRecord, mean_defined
from agents.reference import ReferenceCache, reference_clean_acc
from agents.results import EvaluationResult
from agents.runner import run_episodes

if TYPE_CHECKING:
    from agents.policies import GatingPolicy

__all__ = [
    "CONTINUOUS_ENV_ID",
    "DEFAULT_PROTOCOL",
    "DISCRETE_ENV_ID",
    "EPISODE_METRICS",
    "EVAL_ENV_ID",
    "EVAL_SEED_OFFSET",
    "PROTOCOLS",
    "ROUND_COLUMNS",
    "EnvPool",
    "EnvSpec",
    "EpisodeRecord",
    "EvalProtocol",
    "EvaluationResult",
    "ReferenceCache",
    "code_fingerprint",
    "env_spec",
    "evaluate_policy",
    "git_commit",
    "metadata",
    "policy_action_mode",
    "policy_env_kwargs",
    "protocol_for",
    "reference_clean_acc",
    "resolve_policy",
    "run_episodes",
]


def evaluate_policy(
    policy: "GatingPolicy | str",
    scenario: str | Path,
    seeds: Sequence[int] | None = None,
    episodes: int | None = None,
    fidelity: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    reference: dict[int, float] | bool = True,
    use_disk_cache: bool = True,
    tensorboard: str | Path | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
    pool: EnvPool | None = None,
) -> EvaluationResult:
    """Evaluate a gating policy under the frozen protocol.

    :param policy: a :class:`GatingPolicy`, or a spec string (``baseline:NAME`` or a run folder).
    :param scenario: a shipped scenario name or a scenario YAML path.
    :param seeds: evaluation seeds (default: the scenario's protocol).
    :param episodes: episodes per seed (default: the scenario's protocol).
    :param fidelity: ``pixel`` or ``embedding``; default: the trained policy's training fidelity,
        else the scenario's.
    :param env_kwargs: scenario overrides (``{"episode_rounds": 8}``); a trained policy's own
        training overrides are *not* applied (the protocol's scenario is the scenario).
    :param reference: ``True`` evaluates (or reuses the cached) ``no_defense`` on the same
        seeds for the clean-accuracy drop, ``False`` skips it, a dict gives per-seed values.
    :param use_disk_cache: allow the on-disk ``no_defense`` cache (:class:`ReferenceCache`).
    :param tensorboard: log every round's ``cmai/...`` scalars under this folder.
    :param out: if given, write ``rounds.csv``, ``summary.json`` and plots there.
    :param plots: write PNGs with ``out``.
    :param log: progress callback (one line per episode).
    :param pool: reuse (and leave) environments in this pool; without one they are built for
        this evaluation and closed.
    :raises ValueError: no seeds, a repeated seed, fewer than one episode, or an invalid scenario override.
    """
    from agents.batched_evaluation import run_episodes_batched
    from agents.eval_tensorboard import EpisodeTensorBoard

    if isinstance(policy, (str, Path)):
        policy = resolve_policy(policy)
    if fidelity is None and not (env_kwargs or {}).get("fidelity"):
        fidelity = policy_env_kwargs(policy).get("fidelity")
    spec = env_spec(scenario, fidelity, env_kwargs, policy_action_mode(policy))
    protocol = protocol_for(spec.scenario_name)
    seeds = list(protocol.seeds if seeds is None else seeds)
    episodes = protocol.episodes_per_seed if episodes is None else int(episodes)
    if not seeds:
        raise ValueError("at least one evaluation seed is needed")
    distinct_seeds(seeds)
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")

    recorder = EpisodeTensorBoard(tensorboard, policy.name, spec.scenario_name) if tensorboard is not None else None
    try:
        rows, records = run_episodes_batched(policy, spec, seeds, episodes, on_step=recorder, log=log, pool=pool)
    finally:
        if recorder is not None:
            recorder.close()
    result = EvaluationResult(
        policy=policy.name,
        metadata=metadata(spec, policy.name, seeds, episodes),
        rows=rows,
        episodes=records,
        reference_clean_acc=_reference(policy, spec, seeds, episodes, records, reference, use_disk_cache, pool, log),
    )
    if out is not None:
        result.save(out, plots=plots)
    return result


def _reference(
    policy: Any,
    spec: EnvSpec,
    seeds: list[int],
    episodes: int,
    records: list[EpisodeRecord],
    reference: dict[int, float] | bool,
    use_disk_cache: bool,
    pool: EnvPool | None,
    log: Callable[[str], None] | None,
) -> dict[int, float] | None:
    """``no_defense``'s clean accuracy per seed as :func:`evaluate_policy`'s ``reference`` asks."""
    if reference is False:
        return None
    if reference is not True:
        return {int(k): float(v) for k, v in reference.items()}
    if getattr(policy, "name", None) == "no_defense" and spec.env_id in (CONTINUOUS_ENV_ID, EVAL_ENV_ID):
        return {s: float(mean_defined(r.metrics["clean_acc"] for r in records if r.seed == s)) for s in seeds}
    cache = ReferenceCache() if use_disk_cache else None
    return reference_clean_acc(spec, seeds, episodes, cache=cache, pool=pool, log=log)
