"""The evaluation environment as data: which ID, which validated scenario, and its fingerprint.

:func:`env_spec` reads and validates the scenario file once, applies the fidelity and the
overrides once, and keeps the resulting :class:`cmai_env.scenario.Scenario` in the
:class:`EnvSpec`. Every environment of the evaluation (the policy's, the batched one, the
``no_defense`` reference's) is built from that object, so no later step re-reads or re-validates
the file. The spec's other fields are its fingerprint: they are recorded with every result
(:func:`agents.provenance.metadata`), and they alone decide equality and hashing, so a spec keys
an :class:`agents.env_pool.EnvPool` and the reference cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.protocol import CONTINUOUS_ENV_ID, DISCRETE_ENV_ID, EVAL_ENV_ID

if TYPE_CHECKING:
    import gymnasium as gym

    from cmai_env.scenario import Scenario
    from cmai_env.vector_env import CMAIVectorEnv

__all__ = ["ENV_ARGUMENTS", "EnvSpec", "env_spec"]

#: ``env_kwargs`` keys that are arguments of the environment itself, not scenario fields (the
#: rest are scenario overrides, applied once by :func:`env_spec`).
ENV_ARGUMENTS = ("action_mode", "allow_evaluation_only", "device", "render_mode")


@dataclass(frozen=True)
class EnvSpec:
    """Everything that determines the evaluation environment (hashable: a pool and cache key).

    :param env_id: the registered ID (:mod:`agents.protocol`).
    :param scenario: the name or path the user gave (recorded as ``scenario_source``).
    :param scenario_name: the scenario's ``name``.
    :param scenario_hash: sha256 of the scenario file's bytes.
    :param evaluation_only: whether the scenario holds out attacks (``CMAI-Eval-v0``).
    :param fidelity: the fidelity the environment runs at (resolved, never "scenario default").
    :param env_kwargs_json: canonical JSON of the overrides and environment arguments.
    :param resolved: the validated scenario with fidelity and overrides applied; not part of the
        fingerprint (the fields above determine it).
    """

    env_id: str
    scenario: str
    scenario_name: str
    scenario_hash: str
    evaluation_only: bool
    fidelity: str | None
    env_kwargs_json: str
    resolved: "Scenario" = field(compare=False, hash=False, repr=False)

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """The overrides and environment arguments, as given (a fresh dict)."""
        return json.loads(self.env_kwargs_json)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that identify the environment, as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def _env_arguments(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.env_kwargs.items() if k in ENV_ARGUMENTS}
        if self.env_id == EVAL_ENV_ID:
            kwargs["allow_evaluation_only"] = True
        return kwargs

    def make(self) -> "gym.Env":
        """A new environment (``gymnasium.make``) running :attr:`resolved`."""
        import gymnasium as gym

        return gym.make(self.env_id, scenario=self.resolved, **self._env_arguments())

    def make_vector(self, num_envs: int) -> "CMAIVectorEnv":
        """A batched embedding-fidelity environment of ``num_envs`` copies, without autoreset."""
        from cmai_env.vector_env import CMAIVectorEnv

        kwargs = self._env_arguments()
        if self.env_id == DISCRETE_ENV_ID:
            kwargs.setdefault("action_mode", "discrete")
        return CMAIVectorEnv(num_envs, self.resolved, autoreset_mode="disabled", **kwargs)

    def with_env_id(self, env_id: str, drop: tuple[str, ...] = ()) -> "EnvSpec":
        """The same scenario in another registered ID, without the ``drop`` env kwargs."""
        kwargs = {k: v for k, v in self.env_kwargs.items() if k not in drop}
        return replace(self, env_id=env_id, env_kwargs_json=json.dumps(kwargs, sort_keys=True, default=str))


def env_spec(
    scenario: str | Path,
    fidelity: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    action_mode: str = "continuous",
) -> EnvSpec:
    """Validate ``scenario`` with its overrides once, pick the env ID and fingerprint it.

    Evaluation-only scenarios run in ``CMAI-Eval-v0`` (with ``action_mode`` among its env kwargs
    for discrete policies), others in ``CMAI-v0`` or ``CMAI-Discrete-v0`` by ``action_mode``.

    :param scenario: a shipped scenario name or a scenario YAML path.
    :param fidelity: ``pixel`` or ``embedding``; default: ``env_kwargs["fidelity"]``, else the
        scenario's.
    :param env_kwargs: scenario overrides (dotted keys) and environment arguments
        (:data:`ENV_ARGUMENTS`).
    :param action_mode: ``continuous`` or ``discrete``.
    :raises FileNotFoundError: no such scenario.
    :raises cmai_env.scenario.ScenarioError: the file or an override is invalid.
    """
    from cmai_env.scenario import apply_overrides, load_scenario, scenario_hash

    kwargs = dict(env_kwargs or {})
    if "fidelity" in kwargs:
        fidelity = fidelity or kwargs.pop("fidelity")
        kwargs.pop("fidelity", None)
    base = load_scenario(str(scenario))
    overrides = {k: v for k, v in kwargs.items() if k not in ENV_ARGUMENTS}
    if fidelity is not None and fidelity != base.fidelity:
        overrides["fidelity"] = fidelity
    resolved = apply_overrides(base, overrides) if overrides else base
    if resolved.evaluation_only:
        env_id = EVAL_ENV_ID
        if action_mode == "discrete":
            kwargs["action_mode"] = "discrete"
    else:
        env_id = DISCRETE_ENV_ID if action_mode == "discrete" else CONTINUOUS_ENV_ID
    return EnvSpec(
        env_id=env_id,
        scenario=str(scenario),
        scenario_name=resolved.name,
        scenario_hash=scenario_hash(str(scenario)),
        evaluation_only=bool(resolved.evaluation_only),
        fidelity=resolved.fidelity,
        env_kwargs_json=json.dumps(kwargs, sort_keys=True, default=str),
        resolved=resolved,
    )
