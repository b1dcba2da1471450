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
from typing import TYPE_CHECKING, Any, Sequence

from agents.protocol import DISCRETE_ENV_ID

if TYPE_CHECKING:
    from agents.policies import GatingPolicy

__all__ = ["policy_action_mode", "policy_env_kwargs", "resolve_policies", "resolve_policy"]


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


def resolve_policies(specs: "Sequence[str | Path]", device: str = "cpu") -> "list[GatingPolicy]":
    """:func:`resolve_policy` for each spec, with one report label per policy.

    A trained policy is labelled ``<algo>:<run folder name>``, so two run folders of the same name
    under different roots (``runs_a/ppo/periodic_1``, ``runs_b/ppo/periodic_1``) would share a
    label and one's results would overwrite the other's in a report. Those policies are labelled
    with the path as given instead (``ppo:runs_a/ppo/periodic_1``).

    :raises ValueError: the same policy given twice (its label could not tell the two apart).
    """
    policies = [resolve_policy(spec, device=device) for spec in specs]
    by_label: dict[str, list[int]] = {}
    for index, policy in enumerate(policies):
        by_label.setdefault(policy.name, []).append(index)
    for label, indices in by_label.items():
        if len(indices) < 2:
            continue
        given = [str(specs[i]) for i in indices]
        sources = {str(Path(text).resolve()) if Path(text).exists() else text for text in given}
        if len(sources) < len(given):
            raise ValueError(f"policy {label!r} is given more than once ({', '.join(given)}); give each policy once")
        algo, _, rest = label.partition(":")
        suffix = rest[rest.index(" ("):] if " (" in rest else ""  # e.g. " (interrupted)"
        for i, text in zip(indices, given):
            policies[i].name = f"{algo}:{Path(text).as_posix()}{suffix}"
    return policies


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
