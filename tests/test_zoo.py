"""rl-zoo3 on CMAI: the converted hyperparameter file, and rl_zoo3.train training cmai_env/CMAI-v0."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from torch import nn

from agents.zoo import main, policy_kwargs_expression, zoo_hyperparams

REPO = Path(__file__).resolve().parents[1]


def _eval_like_zoo(expression: str) -> dict:
    # rl-zoo3 evaluates policy_kwargs in rl_zoo3.exp_manager, where `nn` is torch.nn.
    return eval(expression, {"nn": nn, "dict": dict})  # noqa: S307  (our own generated string)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac", "td3", "dqn", "recurrent_ppo"])
def test_every_algorithm_converts_to_an_env_id_keyed_table(algo: str) -> None:
    table = zoo_hyperparams(algo, "abrupt_shift")
    (env_id, hyperparams), = table.items()
    assert env_id == ("cmai_env/CMAI-Discrete-v0" if algo == "dqn" else "cmai_env/CMAI-v0")
    kwargs = _eval_like_zoo(hyperparams["policy_kwargs"])
    assert "gating" not in kwargs and issubclass(kwargs["activation_fn"], nn.Module)
    # the gating network's hidden layers lead the policy branch (DQN: the Q-network)
    pi = kwargs["net_arch"] if algo == "dqn" else kwargs["net_arch"]["pi"]
    assert pi[:1] in ([64], [32])


def test_scenario_entry_and_gating_translation() -> None:
    ppo = zoo_hyperparams("ppo", "abrupt_shift")["cmai_env/CMAI-v0"]
    # abrupt_shift's entry over default, its policy_kwargs merged over default's gating network
    assert (ppo["n_steps"], ppo["n_timesteps"], ppo["n_envs"], ppo["gamma"], ppo["use_sde"]) == (64, 150000, 32, 0.95, True)
    assert zoo_hyperparams("ppo", "quickstart")["cmai_env/CMAI-v0"]["n_steps"] == 128
    kwargs = _eval_like_zoo(ppo["policy_kwargs"])
    assert kwargs == {"net_arch": {"pi": [64, 64], "vf": [64]}, "log_std_init": -2.5, "activation_fn": nn.Tanh}
    with pytest.raises(ValueError, match="softsign"):
        policy_kwargs_expression({"gating": {"hidden_sizes": [8], "activation": "softsign"}})


def test_cli_writes_a_safe_yaml_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "zoo" / "a2c.yml"
    assert main(["--algo", "a2c", "--scenario", "quickstart", "--out", str(out)]) == 0
    assert set(yaml.safe_load(out.read_text())) == {"cmai_env/CMAI-v0"}
    assert main(["--algo", "a2c", "--hyperparams", str(tmp_path / "missing.yml"), "--out", str(out)]) == 1
    assert "missing.yml" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ci_slow
def test_rl_zoo3_train_runs_on_cmai_with_the_converted_file(tmp_path: Path) -> None:
    conf = tmp_path / "ppo.yml"
    assert main(["--algo", "ppo", "--scenario", "quickstart", "--out", str(conf)]) == 0
    command = [
        sys.executable, "-m", "rl_zoo3.train", "--algo", "ppo", "--env", "cmai_env/CMAI-v0", "--gym-packages", "cmai_env",
        "--env-kwargs", "scenario:'quickstart'", "fidelity:'embedding'", "episode_rounds:6", "batch_size:8",
        "dataset.train_n:64", "dataset.probe_n:16",
        "-n", "64", "-params", "n_steps:32", "batch_size:32", "--conf-file", str(conf), "-f", str(tmp_path / "logs"),
        "--seed", "0", "--eval-freq", "-1", "--n-eval-envs", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    model = tmp_path / "logs" / "ppo" / "cmai_env-CMAI-v0_1" / "cmai_env-CMAI-v0.zip"
    assert model.is_file()
    with zipfile.ZipFile(model) as archive:
        assert "policy.pth" in archive.namelist()
    config = (tmp_path / "logs" / "ppo" / "cmai_env-CMAI-v0_1" / "cmai_env-CMAI-v0" / "config.yml").read_text()
    assert "- - n_steps\n    - 32" in config and "activation_fn=nn.Tanh" in config  # our file, then -params
