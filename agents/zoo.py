"""rl-baselines3-zoo glue: CMAI's hyperparameters as an rl-zoo3 configuration file.

rl-zoo3 trains CMAI like any registered environment::

    python -m rl_zoo3.train --algo ppo --env cmai_env/CMAI-v0 --gym-packages cmai_env \\
        --env-kwargs scenario:"'abrupt_shift'" fidelity:"'embedding'" -n 2048

(with rl-zoo3's ``default`` entry: ``MlpPolicy`` and SB3's defaults). rl-zoo3 keys its
hyperparameter files by environment ID, CMAI's ``agents/hyperparams/<algo>.yml`` by scenario
name (one env ID serves every scenario). :func:`zoo_hyperparams` turns CMAI's entry for a scenario
into rl-zoo3's format, and ``python -m agents.zoo --algo ppo --scenario abrupt_shift --out FILE``
writes it for ``python -m rl_zoo3.train ... --conf-file FILE``.

What the conversion cannot carry, and why:

* ``policy_kwargs.gating`` (the gating network ``g`` as :class:`agents.policies.GatingExtractor`):
  rl-zoo3 reads ``policy_kwargs`` as a Python expression it ``eval``-s in its own module, where
  CMAI's classes are not defined (and CMAI's own files never carry code). The same network is
  written as the policy branch of ``MlpPolicy``: ``net_arch.pi`` = g's hidden sizes with g's
  activation, then SB3's linear layer to the 3 logits, whose softmax is β.
* ``cmai train``'s guarantees stay in :mod:`agents.train` (rl-zoo3's ``ExperimentManager`` saves
  ``vecnormalize.pkl`` and continues a run by unpickling its model; CMAI never unpickles): runs
  made by ``rl_zoo3.train`` are rl-zoo3 runs, not ``cmai evaluate`` run folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from agents.policies import ENV_ID_FOR_ALGO

#: CMAI hyperparameter keys rl-zoo3 reads the same way (the rest are constructor arguments).
ZOO_RUN_KEYS = ("policy", "n_timesteps", "n_envs", "normalize", "noise_type", "noise_std")
#: rl-zoo3 spells activations as torch.nn classes inside its policy_kwargs expression.
ACTIVATIONS = {"tanh": "nn.Tanh", "relu": "nn.ReLU", "elu": "nn.ELU", "leaky_relu": "nn.LeakyReLU", "gelu": "nn.GELU", "silu": "nn.SiLU"}


def _python(value: Any) -> str:
    """A YAML value as the Python literal rl-zoo3's ``eval`` reads (dicts as ``dict(...)``)."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_python(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    return repr(value)


def policy_kwargs_expression(policy_kwargs: dict[str, Any], algo: str = "ppo") -> str:
    """CMAI's YAML ``policy_kwargs`` as rl-zoo3's string, the gating trunk moved into ``net_arch.pi``.

    (DQN: into the Q-network's list. In CMAI the trunk is a features extractor the value/Q heads
    share, and comes before RecurrentPPO's LSTM; in the rl-zoo3 form it is the policy branch.)

    :raises ValueError: an activation rl-zoo3's namespace cannot name.
    """
    kwargs = dict(policy_kwargs)
    gating = kwargs.pop("gating", None)
    if gating is not None:
        hidden = list(gating.get("hidden_sizes", [64, 64]))
        activation = gating.get("activation", "tanh")
        if activation not in ACTIVATIONS:
            raise ValueError(f"policy_kwargs.gating.activation {activation!r} has no rl-zoo3 spelling; use one of {', '.join(ACTIVATIONS)}")
        net_arch = kwargs.get("net_arch")
        if algo == "dqn":
            kwargs["net_arch"] = hidden + list(net_arch or [])
        elif isinstance(net_arch, dict):
            kwargs["net_arch"] = {**net_arch, "pi": hidden + list(net_arch.get("pi", []))}
        else:
            critic = "qf" if algo in ("sac", "td3") else "vf"
            kwargs["net_arch"] = {"pi": hidden + list(net_arch or []), critic: list(net_arch or [64, 64])}
        text = _python(kwargs)
        return text[:-1] + (", " if kwargs else "") + f"activation_fn={ACTIVATIONS[activation]})"
    return _python(kwargs)


def zoo_hyperparams(algo: str, scenario: str = "quickstart", path: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{env_id: hyperparameters}`` in rl-zoo3's format from CMAI's entry for ``scenario``.

    :param path: a CMAI hyperparameter file replacing ``agents/hyperparams/<algo>.yml``.
    """
    from agents.train import load_hyperparams, validate_hyperparams

    hyperparams = load_hyperparams(algo, scenario, path)
    validate_hyperparams(algo, hyperparams)
    out: dict[str, Any] = {}
    for key, value in sorted(hyperparams.items()):
        if key == "policy_kwargs":
            out[key] = policy_kwargs_expression(value, algo)
        elif key == "normalize" and isinstance(value, dict):
            out[key] = _python(value)  # rl-zoo3 evals a normalize string too
        else:
            out[key] = value
    return {ENV_ID_FOR_ALGO[algo]: out}


def write_zoo_config(algo: str, scenario: str, out: Path, path: Path | None = None) -> Path:
    """Write :func:`zoo_hyperparams` as YAML to ``out`` (for ``rl_zoo3.train --conf-file``)."""
    table = zoo_hyperparams(algo, scenario, path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# rl-zoo3 hyperparameters for {algo} on CMAI, from CMAI's entry for scenario {scenario!r}.\n"
        f"# python -m rl_zoo3.train --algo {algo} --env {next(iter(table))} --gym-packages cmai_env "
        f"--env-kwargs scenario:\"'{scenario}'\" fidelity:\"'embedding'\" --conf-file {out}\n"
    )
    out.write_text(header + yaml.safe_dump(table, sort_keys=False, default_flow_style=None))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m agents.zoo --algo ppo --scenario abrupt_shift --out runs/zoo/ppo.yml``."""
    parser = argparse.ArgumentParser(prog="python -m agents.zoo", description="Write CMAI's hyperparameters as an rl-zoo3 --conf-file.")
    parser.add_argument("--algo", default="ppo", help="ppo, a2c, sac, td3, dqn or recurrent_ppo (default: ppo)")
    parser.add_argument("--scenario", default="quickstart", help="the scenario entry to use (default: quickstart)")
    parser.add_argument("--hyperparams", type=Path, default=None, help="CMAI hyperparameter file (default: agents/hyperparams/<algo>.yml)")
    parser.add_argument("--out", type=Path, required=True, help="YAML file to write")
    args = parser.parse_args(argv)
    try:
        path = write_zoo_config(args.algo, args.scenario, args.out, args.hyperparams)
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m agents.zoo: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
