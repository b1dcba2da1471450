"""From what a user names to a policy object, and what the policy implies for its environment.

``cmai evaluate --policy`` and ``cmai benchmark --policies`` accept ``baseline:NAME``, a run folder
written by ``cmai train`` or a model file; :func:`resolve_policy` turns that into a
:class:`agents.policies.GatingPolicy`. A policy then decides two things about the environment it
is evaluated in: the action space (:func:`policy_action_mode`: DQN acts on the discrete weight
grid) and, unless the caller says otherwise, the fidelity it was trained at
(:func:`policy_env_kwargs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.protocol import DISCRETE_ENV_ID

if TYPE_CHECKING:
    from agents.policies import GatingPolicy

__all__ = ["policy_action_mode", "policy_env_kwargs", "resolve_policy"]


def resolve_policy(spec: str | Path, device: str = "cpu") -> "GatingPolicy":
    """``baseline:NAME`` → a fresh baseline; a run folder or model file → the trained policy.

    :param spec: ``baseline:NAME``, a run folder from ``cmai train`` or a model ``.zip``.
    :param device: torch device of a trained policy.
    :raises ValueError: unknown baseline name.
    :raises FileNotFoundError: the path does not exist.
    """
    from agents.baselines import available_baselines, make_baseline

    text = str(spec)
    if text.startswith("baseline:"):
        return make_baseline(text.split(":", 1)[1])
    path = Path(text)
    if not path.exists() and not path.with_suffix(".zip").exists():
        raise FileNotFoundError(
            f"policy folder {text!r} not found; pass a run folder written by `cmai train` "
            f"or baseline:NAME (baselines: {', '.join(available_baselines())})"
        )
    from agents.policies import load_policy

    return load_policy(path, device=device)


def policy_action_mode(policy: Any) -> str:
    """``"discrete"`` for policies that act on the Discrete weight grid (e.g. DQN), else ``"continuous"``.

    Ablation wrappers (anything with an ``inner`` policy) report their inner policy's mode.
    """
    if getattr(policy, "discrete", False) or getattr(policy, "env_id", None) == DISCRETE_ENV_ID:
        return "discrete"
    inner = getattr(policy, "inner", None)
    return policy_action_mode(inner) if inner is not None else "continuous"


def policy_env_kwargs(policy: Any) -> dict[str, Any]:
    """The env kwargs a trained policy's run was made with (empty for baselines).

    Evaluation reads only its ``fidelity`` from them: the protocol's scenario is the scenario, so
    a run's other training overrides are not applied.
    """
    run = getattr(policy, "run", None)
    if run is None:
        inner = getattr(policy, "inner", None)
        return policy_env_kwargs(inner) if inner is not None else {}
    try:
        return dict(run.env_kwargs)
    except (OSError, KeyError, TypeError):
        return {}
