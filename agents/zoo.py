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
* Runs made by ``rl_zoo3.train`` are rl-zoo3 runs (``vecnormalize.pkl``, a model that loads by
  unpickling), not ``cmai evaluate`` run folders.

``cmai train`` and ``cmai tune`` run on rl-zoo3 too: :class:`CMAIExperimentManager` is its
``ExperimentManager`` (hyperparameter preprocessing, envs, model, Optuna sampler, pruner and
objective), with the few overrides CMAI needs, each saying why: CMAI's hyperparameter entry
handed over as data, the evaluation env's seed offset, the batched vector env, no pickle read or
written, CMAI's run-folder files and callbacks, and a ``learn`` that reports Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from rl_zoo3.exp_manager import ExperimentManager
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from agents.policies import ENV_ID_FOR_ALGO, resolve_policy_kwargs
from agents.protocol import EVAL_SEED_OFFSET
from agents.safe_load import NORMALIZATION_FILE, UnsafeFileError, load_model, load_normalization, save_normalization

#: CMAI hyperparameter keys rl-zoo3 reads the same way (the rest are constructor arguments).
ZOO_RUN_KEYS = ("policy", "n_timesteps", "n_envs", "normalize", "noise_type", "noise_std")
#: rl-zoo3's names for CMAI's algorithms where they differ (``rl_zoo3.utils.ALGOS``).
ZOO_ALGO = {"recurrent_ppo": "ppo_lstm"}
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
        f"# python -m rl_zoo3.train --algo {ZOO_ALGO.get(algo, algo)} --env {next(iter(table))} --gym-packages cmai_env "
        f"--env-kwargs scenario:\"'{scenario}'\" fidelity:\"'embedding'\" --conf-file {out}\n"
    )
    out.write_text(header + yaml.safe_dump(table, sort_keys=False, default_flow_style=None))
    return out


# ---------------------------------------------------------------------------------- ExperimentManager


class CMAIExperimentManager(ExperimentManager):
    """rl-zoo3's ``ExperimentManager`` for one ``cmai train`` run or ``cmai tune`` study.

    rl-zoo3 does the work: ``setup_experiment`` preprocesses the hyperparameters (``lin_``
    schedules, ``train_freq`` lists, ``normalize``, action noise), creates the monitored training
    envs (env ``i`` seeded ``seed + i``, ``DummyVecEnv`` or ``SubprocVecEnv``) and the model;
    ``_create_sampler``, ``_create_pruner`` and ``objective`` run ``cmai tune``'s Optuna trials.
    Each override below is a point rl-zoo3 cannot express for CMAI, and its comment says which.

    :param algo: CMAI's algorithm name (``recurrent_ppo`` is rl-zoo3's ``ppo_lstm``).
    :param env_id: the CMAI env ID.
    :param hyperparams: the validated YAML-form hyperparameters (``agents.train.load_hyperparams``
        + ``--set``), with ``n_timesteps`` and ``n_envs``.
    :param run_dir: the run folder (``save_path``); ``params_dir`` its ``<scenario>/`` folder.
    :param model_name: file stem of the final model (the scenario's name).
    :param params_files: files written into ``params_dir`` once the model exists (``config.yml``, ...).
    :param callbacks: builds CMAI's callbacks from the evaluation env (``None`` when not evaluating).
    :param resume_from: model file to continue from (loaded without unpickling).
    :param resume_normalization: its ``vecnormalize.npz``, when the run normalises.
    :param append_monitor: append to the run folder's Monitor logs (a resumed run).
    :param kwargs: ``ExperimentManager``'s own arguments (``seed``, ``n_timesteps``, ``eval_freq``, ...).
    """

    def __init__(
        self,
        algo: str,
        env_id: str,
        hyperparams: Mapping[str, Any],
        run_dir: Path,
        params_dir: Path,
        model_name: str,
        params_files: Mapping[str, bytes] | None = None,
        callbacks: Callable[[VecEnv | None], list[BaseCallback]] | None = None,
        resume_from: Path | None = None,
        resume_normalization: Path | None = None,
        append_monitor: bool = False,
        tensorboard_log: Path | None = None,
        **kwargs: Any,
    ) -> None:
        import cmai_env  # noqa: F401  (registers the env IDs rl-zoo3 looks up)

        kwargs.setdefault("args", argparse.Namespace())
        super().__init__(algo=ZOO_ALGO.get(algo, algo), env_id=env_id, log_folder=str(run_dir.parent),
                         trained_agent="" if resume_from is None else str(resume_from), **kwargs)
        self.cmai_algo = algo
        self.env_id = env_id
        self.cmai_hyperparams = copy.deepcopy(dict(hyperparams))
        # rl-zoo3 names run folders <log>/<algo>/<env ID>_<n> and TensorBoard folders by env ID;
        # CMAI's documented layout is by scenario (<out>/<algo>/<scenario>_<n>, reserved atomically).
        self.save_path, self.params_path = str(run_dir), str(params_dir)
        self.tensorboard_log = None if tensorboard_log is None else str(tensorboard_log)
        self.model_name = model_name
        self.params_files = dict(params_files or {})
        self.make_callbacks = callbacks
        self.resume_normalization = resume_normalization
        self.monitor_kwargs = {"override_existing": not append_monitor}
        self.envs: list[VecEnv] = []

    def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # rl-zoo3 takes one entry per env ID from its file; CMAI's files hold one per scenario
        # merged over `default` (one env ID serves every scenario), validated before anything
        # is written. rl-zoo3 `eval`s a policy_kwargs string in its own namespace, where the
        # gating network's classes do not exist (agents.zoo's module docstring): the resolved dict
        # passes through its preprocessing as it is.
        hyperparams = copy.deepcopy(self.cmai_hyperparams)
        if "policy_kwargs" in hyperparams:
            hyperparams["policy_kwargs"] = resolve_policy_kwargs(hyperparams["policy_kwargs"])
        if hyperparams.get("noise_type") is not None:
            hyperparams.setdefault("noise_std", 0.1)  # rl-zoo3 requires it beside noise_type
        return hyperparams, OrderedDict(sorted(self.cmai_hyperparams.items()))

    def create_envs(self, n_envs: int, eval_env: bool = False, no_log: bool = False) -> VecEnv:
        from agents.vec_adapter import batched_supported, make_batched_vec_env

        no_log = no_log or self.optimize_hyperparameters  # a study's trials share no run folder
        seed = self.seed + EVAL_SEED_OFFSET if eval_env else self.seed
        kwargs = self.eval_env_kwargs if eval_env else self.env_kwargs
        if self.n_envs > 1 and self.vec_env_class is DummyVecEnv and batched_supported(self.env_id, kwargs):
            # rl-zoo3 steps n_envs separate envs; at embedding fidelity CMAI steps them as one
            # batched computation (agents.vec_adapter; 3.2x SyncVectorEnv at N=64 on 2026-12-06, docs/measurements.md). The
            # evaluation env is built the same way: VecNormalize statistics are copied between
            # envs wrapped alike (sync_envs_normalization).
            append = not self.monitor_kwargs.get("override_existing", True)
            env = make_batched_vec_env(self.env_id, kwargs, n_envs, seed, None if eval_env or no_log else self.save_path, append)
            env = self._maybe_normalize(env, eval_env)
        else:
            # rl-zoo3 seeds the evaluation env with the training seed; CMAI's protocol evaluates
            # on seed + EVAL_SEED_OFFSET, episodes no training env sees.
            training_seed, self.seed = self.seed, seed
            try:
                env = super().create_envs(n_envs, eval_env, no_log)
            finally:
                self.seed = training_seed
        if not self.optimize_hyperparameters:  # rl-zoo3's objective closes each trial's envs itself
            self.envs.append(env)
        return env

    def _maybe_normalize(self, env: VecEnv, eval_env: bool) -> VecEnv:
        # rl-zoo3 unpickles <trained agent's folder>/<env ID>/vecnormalize.pkl when it exists
        # (VecNormalize.load); CMAI never unpickles a file. A resumed run's statistics come from
        # its .npz (_load_pretrained_agent).
        pickled = Path(os.path.dirname(self.trained_agent), str(self.env_name), "vecnormalize.pkl")
        if pickled.exists():
            raise UnsafeFileError(f"{pickled}: rl-zoo3 would unpickle this file (loading a pickle can run code); CMAI refuses it")
        return super()._maybe_normalize(env, eval_env)

    def create_callbacks(self) -> None:
        # rl-zoo3's EvalCallback pickles vecnormalize.pkl at every new best model and its
        # checkpoints carry no normalisation statistics; CMAI's callbacks (agents.train._callbacks)
        # store them as .npz, log the cmai/* TensorBoard tags and evaluate once more at the end.
        if self.optimize_hyperparameters or self.make_callbacks is None:
            return
        eval_env = self.create_envs(self.n_eval_envs, eval_env=True) if self.eval_freq > 0 else None
        self.callbacks.extend(self.make_callbacks(eval_env))

    def _load_pretrained_agent(self, hyperparams: dict[str, Any], env: VecEnv) -> BaseAlgorithm:
        # rl-zoo3 continues a run with ALGOS[algo].load, which unpickles the archive's data
        # entry (a crafted file runs code), and reloads replay_buffer.pkl; CMAI rebuilds every
        # pickled entry instead (agents.safe_load.load_model) and applies the .npz statistics.
        model = load_model(Path(self.trained_agent), self.cmai_algo, self.env_id, self.cmai_hyperparams, device=str(self.device), env=env)
        model.tensorboard_log = self.tensorboard_log
        if isinstance(env, VecNormalize):
            if self.resume_normalization is None:
                raise FileNotFoundError(f"{self.save_path}: the run normalises observations but has no saved statistics for {self.trained_agent}")
            load_normalization(self.resume_normalization).apply_to(env)
        return model

    def _save_config(self, saved_hyperparams: dict[str, Any]) -> None:
        # rl-zoo3 yaml.dump-s OrderedDicts (python/object tags that yaml.safe_load refuses) and
        # argparse arguments; CMAI's config.yml, args.yml, env_kwargs.yml and scenario copy are
        # plain YAML, written only for a new run.
        if not self.continue_training:
            for name, data in self.params_files.items():
                (Path(self.params_path) / name).write_bytes(data)

    def learn(self, model: BaseAlgorithm) -> None:
        # rl-zoo3's learn() swallows Ctrl-C (an interrupted run would look finished), closes the
        # training env that run_training hands back, and restarts the step count of a continued
        # run (checkpoints named from 0 again, the whole budget trained again).
        remaining = self.n_timesteps - (int(model.num_timesteps) if self.continue_training else 0)
        if self.tensorboard_log is None:
            # Without TensorBoard, SB3's default logger still creates an empty folder per run in
            # the temp dir (tempdir/SB3-<time>); this one prints what it printed and writes nothing.
            from stable_baselines3.common.logger import configure

            model.set_logger(configure(self.save_path, ["stdout"] if self.verbose >= 1 else []))
        if remaining > 0:
            model.learn(remaining, callback=self.callbacks, progress_bar=self.show_progress,
                        tb_log_name=self.cmai_algo, reset_num_timesteps=not self.continue_training)

    def save_trained_model(self, model: BaseAlgorithm) -> None:
        # rl-zoo3 names the model after the env ID and pickles vecnormalize.pkl; CMAI names it
        # after the scenario and stores the statistics as .npz (agents.safe_load).
        model.save(Path(self.save_path) / f"{self.model_name}.zip")
        normalizer = model.get_vec_normalize_env()
        if normalizer is not None:
            save_normalization(normalizer, Path(self.params_path) / NORMALIZATION_FILE)

    def close_envs(self, keep: VecEnv | None = None) -> None:
        """Close every env this manager created but ``keep``."""
        for env in self.envs:
            if env is not keep:
                env.close()
        self.envs = [env for env in self.envs if env is keep]


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
