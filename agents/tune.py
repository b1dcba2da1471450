"""Hyperparameter search for the gating policy with rl-zoo3's Optuna study (TPE sampler, median pruning).

    from agents.tune import TuneArgs, tune
    best_file = tune(TuneArgs(algo="ppo", scenario="quickstart", trials=8, timesteps=2000))

is ``cmai tune --algo ppo --scenario quickstart --trials 8 --timesteps 2000``. The study is
rl-zoo3's (:class:`agents.zoo.CMAIExperimentManager`): its sampler (TPE, ``n_startup_trials``
random trials first), its median pruner, and its ``objective``, which builds each trial's envs and
model from the algorithm's hyperparameters for the scenario (``agents/hyperparams/<algo>.yml``)
with a few key ones sampled (:func:`sample_hyperparams`, CMAI's space), trains for
``timesteps`` environment steps and evaluates ``n_evaluations`` times on an env seeded
``seed + EVAL_SEED_OFFSET`` (rl-zoo3's ``TrialEvalCallback``); each evaluation's mean return is
reported to Optuna, so the pruner stops trials that fall behind the median of earlier trials
at the same point. The objective is the last evaluation's mean return.

Outputs in ``--out`` (default ``runs/tune/<algo>_<scenario>``):

* ``best_hyperparams.yml``: the best trial's full hyperparameters in the hyperparameter-file
  format (``<scenario>: {...}``), ready for ``cmai train --hyperparams best_hyperparams.yml``;
* ``trials.csv``: one row per trial (number, state, value, duration, sampled parameters);
* ``study.json``: the study's summary (best value and parameters, trial counts, settings).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import optuna
import yaml
from stable_baselines3.common.utils import set_random_seed

from agents.train_args import TuneArgs
from agents.policies import ENV_ID_FOR_ALGO, algo_class, resolve_policy_kwargs
from agents.train import check_run_memory, load_hyperparams, parse_assignments, resolve_scenario, set_dotted, validate_hyperparams
from cmai_env.cli.common import set_torch_threads, validate_device


def sample_hyperparams(trial: optuna.Trial, algo: str, n_envs: int = 1) -> dict[str, Any]:
    """Sample the key hyperparameters, as dotted ``--set`` keys.

    CMAI's own space rather than rl-zoo3's ``HYPERPARAMS_SAMPLER``: rl-zoo3's samplers replace
    ``policy_kwargs`` with an ``MlpPolicy`` ``net_arch``/``activation_fn`` (dropping the gating
    network ``g`` and its YAML form) and draw ``n_steps`` up to 4096, longer than a short trial.

    Every algorithm: ``learning_rate`` (log-uniform 1e-5…3e-3), ``gamma`` (0.8…0.99) and the
    gating network's width (``policy_kwargs.gating.hidden_sizes``: two layers of 32/64/128, one
    layer before the LSTM for RecurrentPPO). On-policy: ``n_steps`` (and ``batch_size`` for
    PPO, never above the rollout size). Off-policy: ``batch_size``.
    """
    params: dict[str, Any] = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True),
        "gamma": trial.suggest_categorical("gamma", [0.8, 0.9, 0.95, 0.99]),
    }
    width = trial.suggest_categorical("width", [32, 64, 128])
    params["policy_kwargs.gating.hidden_sizes"] = [width] if algo == "recurrent_ppo" else [width, width]
    if algo in ("ppo", "recurrent_ppo"):
        n_steps = trial.suggest_categorical("n_steps", [32, 64, 128, 256])
        batch_size = trial.suggest_categorical("batch_size", [16, 32, 64, 128])
        params["n_steps"] = n_steps
        params["batch_size"] = min(batch_size, n_steps * n_envs)
    elif algo == "a2c":
        params["n_steps"] = trial.suggest_categorical("n_steps", [4, 8, 16, 32])
    else:
        params["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128])
    return params


def zoo_sampler(args: TuneArgs, base: Mapping[str, Any]) -> Callable[[optuna.Trial, int, int, dict], dict[str, Any]]:
    """CMAI's sampler in rl-zoo3's form (``HYPERPARAMS_SAMPLER``: trial, n_actions, n_envs, extra → kwargs).

    The trial's YAML-form hyperparameters (``base`` + :func:`sample_hyperparams`) are validated and
    kept in the trial's ``hyperparams`` user attribute (``best_hyperparams.yml`` comes from it);
    rl-zoo3 gets the constructor values, ``policy_kwargs`` resolved to the gating network.
    rl-zoo3's objective builds each trial's model with ``seed=None``; CMAI's trial ``k`` is
    reproducible, so this function, which the objective calls first, seeds it ``seed + k`` as
    SB3's ``seed=`` would (``set_random_seed``).
    """

    def sample(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
        set_random_seed(args.seed + trial.number)
        hyperparams = copy.deepcopy(dict(base))
        sampled = sample_hyperparams(trial, args.algo, n_envs)
        for key, value in sampled.items():
            set_dotted(hyperparams, key, value)
        validate_hyperparams(args.algo, hyperparams)
        trial.set_user_attr("hyperparams", hyperparams)
        changed = {key.split(".")[0] for key in sampled}
        return {key: resolve_policy_kwargs(hyperparams[key]) if key == "policy_kwargs" else hyperparams[key] for key in changed}

    return sample


def _write_trials_csv(study: optuna.Study, path: Path) -> None:
    names = sorted({name for t in study.trials for name in t.params})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", "duration_s", *names, "last_step"])
        for t in study.trials:
            duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
            writer.writerow(
                [t.number, t.state.name, t.value, None if duration is None else round(duration, 3), *(t.params.get(n) for n in names), t.last_step]
            )


def tune(args: TuneArgs) -> Path:
    """Run the search; returns the path of ``best_hyperparams.yml``.

    :raises ValueError: bad algorithm, scenario, override or settings; or no trial finished.
    """
    from rl_zoo3 import exp_manager

    from agents.zoo import ZOO_ALGO, CMAIExperimentManager

    algo_class(args.algo)
    for name in ("trials", "timesteps", "n_evaluations", "eval_episodes", "n_envs"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}")
    if args.n_startup_trials < 0:
        raise ValueError(f"n_startup_trials must be >= 0, got {args.n_startup_trials}")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {args.timeout}")
    validate_device(args.device)
    set_torch_threads(args.threads)
    env_kwargs = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    env_kwargs.setdefault("fidelity", args.fidelity)
    scenario = resolve_scenario(args.scenario, env_kwargs)
    if scenario.evaluation_only:
        raise ValueError(f"scenario {scenario.name!r} is evaluation-only (held-out attacks); tune on a training scenario")
    base = load_hyperparams(args.algo, scenario.name, args.hyperparams)
    base.update(n_timesteps=args.timesteps, n_envs=args.n_envs)
    base.setdefault("policy", "MlpPolicy")  # as cmai train does: a --hyperparams file may leave it out
    validate_hyperparams(args.algo, base)
    check_run_memory(scenario.resolved, base, args.n_envs, env_kwargs["fidelity"], args.device, "--n-envs")
    env_kwargs = {"scenario": scenario.argument, "device": args.device, **env_kwargs}
    out = Path(args.out) if args.out is not None else Path("runs/tune") / f"{args.algo}_{scenario.name}"
    out.mkdir(parents=True, exist_ok=True)

    if args.verbose < 2:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    manager = CMAIExperimentManager(
        args.algo, ENV_ID_FOR_ALGO[args.algo], base, out, out, scenario.name,
        optimize_hyperparameters=True, n_trials=args.trials, n_startup_trials=args.n_startup_trials,
        n_evaluations=args.n_evaluations, n_eval_episodes=args.eval_episodes, n_timesteps=args.timesteps,
        sampler="tpe", pruner="median", seed=args.seed, env_kwargs=env_kwargs, device=args.device,
        verbose=args.verbose, no_optim_plots=True,
    )
    with contextlib.redirect_stdout(io.StringIO()) if args.verbose == 0 else contextlib.nullcontext():
        manager.setup_experiment()  # rl-zoo3's preprocessing of the base hyperparameters
    # rl-zoo3's hyperparameters_optimization() would lose an in-memory study when it returns
    # (it returns nothing), has no timeout, pickles the study (report_*.pkl) and prints the
    # report; the study is therefore created here from its sampler and pruner and runs its objective.
    study = optuna.create_study(
        study_name=args.study_name or f"{args.algo}_{scenario.name}",
        storage=args.storage,
        load_if_exists=args.storage is not None,
        direction="maximize",
        sampler=manager._create_sampler(manager.sampler),
        pruner=manager._create_pruner(manager.pruner),
    )

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if args.verbose >= 1:
            value = "" if trial.value is None else f" return {trial.value:.4f}"
            print(f"trial {trial.number}: {trial.state.name.lower()}{value} {trial.params}")

    start = time.perf_counter()
    # rl-zoo3's objective builds each trial's training and evaluation envs anew: gym.make + reset of
    # quickstart costs 1.5-2.0 CPU-s after the first in a process (8.6 s with the imports), against
    # 45-75 CPU-s for the default 2,000-step trial (0.55-0.88 CPU-s per 24 rounds), measured on the
    # shared 2-core machine (2026-11-26); the previous loop shared two envs across trials.
    # rl-zoo3's objective looks its sampler up in rl_zoo3's HYPERPARAMS_SAMPLER table, its one
    # extension point for samplers; CMAI's (the gating network's width instead of an MlpPolicy
    # net_arch, rollouts short enough for a short trial) is entered there for this study only.
    with mock.patch.dict(exp_manager.HYPERPARAMS_SAMPLER, {ZOO_ALGO.get(args.algo, args.algo): zoo_sampler(args, base)}):
        study.optimize(manager.objective, n_trials=args.trials, timeout=args.timeout, callbacks=[report], gc_after_trial=True)
    _write_trials_csv(study, out / "trials.csv")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and np.isfinite(t.value)]
    if not complete:
        raise ValueError(f"no trial completed ({len(study.trials)} pruned or failed); see {out / 'trials.csv'}")
    best = max(complete, key=lambda t: t.value)
    best_hp = {k: v for k, v in best.user_attrs["hyperparams"].items() if k != "n_timesteps"}
    overrides = {k: v for k, v in env_kwargs.items() if k not in ("scenario", "device")}
    header = (
        f"# cmai tune --algo {args.algo} --scenario {scenario.name}: best of {len(study.trials)} trials "
        f"x {args.timesteps} timesteps (trial {best.number}, mean eval return {best.value:.4f}).\n"
        f"# Env settings: {overrides}\n"
        f"# Use with: cmai train --algo {args.algo} --scenario {scenario.argument} --hyperparams {out / 'best_hyperparams.yml'}\n"
    )
    best_file = out / "best_hyperparams.yml"
    best_file.write_text(header + yaml.safe_dump({scenario.name: best_hp}, sort_keys=True, default_flow_style=None))
    states = [t.state.name for t in study.trials]
    summary = {
        "algo": args.algo,
        "scenario": scenario.name,
        "scenario_sha256": scenario.sha256,
        "env_kwargs": overrides,
        "timesteps_per_trial": args.timesteps,
        "seed": args.seed,
        "n_trials": len(study.trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "eval_returns_median": float(np.median([t.value for t in complete])),
    }
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    if args.verbose >= 1:
        print(f"best trial {best.number}: return {best.value:.4f}; wrote {best_file}")
    return best_file
