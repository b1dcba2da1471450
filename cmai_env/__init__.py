"""CMAI: Cross-Modal Adversarial Immunization.

Library (backbones, data, consistency verification, attacks, adversarial training) and the
Gymnasium environment that composes them. Importing the package registers the environments:

* ``cmai_env/CMAI-v0``: continuous loss-weight actions, training scenarios;
* ``cmai_env/CMAI-Discrete-v0``: the same with a ``Discrete`` grid of weight vectors (for DQN);
* ``cmai_env/CMAI-Eval-v0``: evaluation-only scenarios (held-out attacks), never for training.

    import gymnasium, cmai_env
    env = gymnasium.make("cmai_env/CMAI-v0", scenario="abrupt_shift", fidelity="embedding")
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

#: The registered environment IDs (the one definition every module imports).
CONTINUOUS_ENV_ID = "cmai_env/CMAI-v0"
DISCRETE_ENV_ID = "cmai_env/CMAI-Discrete-v0"
EVAL_ENV_ID = "cmai_env/CMAI-Eval-v0"
#: ``gymnasium.make`` keyword defaults of each ID.
ENV_IDS = {
    CONTINUOUS_ENV_ID: {"scenario": "quickstart"},
    DISCRETE_ENV_ID: {"scenario": "quickstart", "action_mode": "discrete"},
    EVAL_ENV_ID: {"scenario": "unseen_attacks", "allow_evaluation_only": True},
}
for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:  # re-imports (e.g. in subprocess workers) must not warn
        # make_vec(..., vectorization_mode="vector_entry_point") (make_vec's default once one is
        # registered): N embedding envs batched in one process (cmai_env.vector_env), pixel async.
        register(
            id=_env_id,
            entry_point="cmai_env.env:CMAIEnv",
            vector_entry_point="cmai_env.vector_env:make_vector_env",
            kwargs=_kwargs,
        )


def scenarios_available(include_evaluation_only: bool = True, fidelity: str | None = None) -> list[str]:
    """Names of the scenario files shipped with the package (``fidelity``: only those that run at it)."""
    from cmai_env.scenario import scenarios_available as _available

    return _available(include_evaluation_only=include_evaluation_only, fidelity=fidelity)


__all__ = ["CONTINUOUS_ENV_ID", "DISCRETE_ENV_ID", "ENV_IDS", "EVAL_ENV_ID", "__version__", "scenarios_available"]
