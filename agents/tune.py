"""Hyperparameter search for the gating policy with Optuna (TPE sampler, median pruning).

    from agents.tune import TuneArgs, tune
    best_file = tune(TuneArgs(algo="ppo", scenario="quickstart", trials=8, timesteps=2000))

is ``cmai tune --algo ppo --scenario quickstart --trials 8 --timesteps 2000``. Each trial starts
from the algorithm's hyperparameters for the scenario (``agents/hyperparams/<algo>.yml``),
samples a few key ones (:func:`sample_hyperparams`), trains for ``timesteps`` environment steps
and evaluates ``n_evaluations`` times on a separately seeded env; each evaluation's mean return
is reported to Optuna so the ``MedianPruner`` stops trials that fall behind the median of
earlier trials at the same point. The objective is the last evaluation's mean return.

Outputs in ``--out`` (default ``runs/tune/<algo>_<scenario>``):

* ``best_hyperparams.yml``: the best trial's full hyperparameters in the hyperparameter-file
  format (``<scenario>: {...}``), ready for ``cmai train --hyperparams best_hyperparams.yml``;
* ``trials.csv``: one row per trial (number, state, value, duration, sampled parameters);
* ``study.json``: the study's summary (best value and parameters, trial counts, settings).
"""

from __future__ import annotations

import copy
import csv
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

# rl-zoo3's callback (evaluate, report to the trial, stop when pruned): the one copy of that logic.
from rl_zoo3.callbacks import TrialEvalCallback

from agents.policies import ENV_ID_FOR_ALGO, algo_class
from agents.train import (
    EVAL_SEED_OFFSET,
    build_model,
    load_hyperparams,
    make_envs,
    normalize_env,
    parse_assignments,
    resolve_scenario,
    set_dotted,
    validate_hyperparams,
)

ON_POLICY = ("ppo", "recurrent_ppo", "a2c")


@dataclass
class TuneArgs:
    """Everything ``cmai tune`` takes.

    :param algo: algorithm to tune (as for ``cmai train``).
    :param scenario: a shipped scenario name or a YAML file.
    :param trials: number of Optuna trials.
    :param timesteps: environment steps per trial.
    :param seed: seeds the sampler, each trial's model (``seed + trial number``) and envs.
    :param out: output folder; ``None``: ``runs/tune/<algo>_<scenario>``.
    :param storage: Optuna storage URL (``sqlite:///tune.db``) to persist or resume the study.
    :param study_name: name of the study in the storage (default ``<algo>_<scenario>``).
    :param n_evaluations: evaluations (and pruning checks) per trial.
    :param eval_episodes: episodes per evaluation.
    :param n_startup_trials: trials sampled at random and never pruned before TPE and the
        pruner take over.
    :param n_envs: parallel training envs per trial.
    :param hyperparams: a YAML file replacing ``agents/hyperparams/<algo>.yml`` as the base.
    :param env_kwargs: scenario overrides (``key:value`` strings or a mapping).
    :param fidelity: ``embedding`` (default) or ``pixel``.
    :param device: torch device.
    :param timeout: stop starting new trials after this many seconds (``None``: no limit).
    :param verbose: 0 quiet, 1 one line per trial.
    """

    algo: str = "ppo"
    scenario: str = "quickstart"
    trials: int = 8
    timesteps: int = 2000
    seed: int = 0
    out: Path | None = None
    storage: str | None = None
    study_name: str | None = None
    n_evaluations: int = 4
    eval_episodes: int = 1
    n_startup_trials: int = 3
    n_envs: int = 1
    hyperparams: Path | None = None
    env_kwargs: Sequence[str] | Mapping[str, Any] = field(default_factory=list)
    fidelity: str = "embedding"
    device: str = "cpu"
    timeout: float | None = None
    verbose: int = 1


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


def _objective(args: TuneArgs, base: dict[str, Any], env: VecEnv, eval_env: VecEnv):
    """The trial function: train on the shared ``env``, evaluate on the shared ``eval_env``.

    The environments are built once per study (building one caches the backbone's embeddings,
    which costs more than a short trial); every trial reseeds them, so all trials evaluate on
    the same episodes and trial ``k`` trains on seed ``seed + k``.
    """

    def objective(trial: optuna.Trial) -> float:
        hyperparams = copy.deepcopy(base)
        sampled = sample_hyperparams(trial, args.algo, args.n_envs)
        for key, value in sampled.items():
            set_dotted(hyperparams, key, value)
        hyperparams["n_timesteps"] = args.timesteps
        hyperparams["n_envs"] = args.n_envs
        validate_hyperparams(args.algo, hyperparams)
        trial.set_user_attr("hyperparams", hyperparams)
        normalize = hyperparams.get("normalize", False)
        eval_env.seed(args.seed + EVAL_SEED_OFFSET)
        trial_env = normalize_env(env, normalize)
        trial_eval_env = normalize_env(eval_env, normalize, training=False)
        callback = TrialEvalCallback(
            trial_eval_env,
            trial,
            n_eval_episodes=args.eval_episodes,
            eval_freq=max(args.timesteps // args.n_evaluations // args.n_envs, 1),
        )
        try:
            model = build_model(args.algo, hyperparams, trial_env, args.seed + trial.number, args.device)
            model.learn(total_timesteps=args.timesteps, callback=callback)
            if callback.eval_idx == 0:  # budget shorter than one evaluation period
                callback.last_mean_reward, _ = evaluate_policy(model, trial_eval_env, n_eval_episodes=args.eval_episodes, warn=False)
        except (AssertionError, ValueError, FloatingPointError) as exc:
            # A sampled combination the algorithm rejects, or a diverged run: not a result.
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(f"trial {trial.number} failed: {exc}") from exc
        if callback.is_pruned:
            raise optuna.TrialPruned(f"trial {trial.number} pruned at evaluation {callback.eval_idx}")
        return float(callback.last_mean_reward)

    return objective


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
    algo_class(args.algo)
    for name in ("trials", "timesteps", "n_evaluations", "eval_episodes", "n_envs"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}")
    env_kwargs = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    env_kwargs.setdefault("fidelity", args.fidelity)
    scenario = resolve_scenario(args.scenario, env_kwargs)
    if scenario.evaluation_only:
        raise ValueError(f"scenario {scenario.name!r} is evaluation-only (held-out attacks); tune on a training scenario")
    base = load_hyperparams(args.algo, scenario.name, args.hyperparams)
    validate_hyperparams(args.algo, base)
    env_kwargs = {"scenario": scenario.argument, "device": args.device, **env_kwargs}
    out = Path(args.out) if args.out is not None else Path("runs/tune") / f"{args.algo}_{scenario.name}"
    out.mkdir(parents=True, exist_ok=True)

    if args.verbose < 2:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=args.study_name or f"{args.algo}_{scenario.name}",
        storage=args.storage,
        load_if_exists=args.storage is not None,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(n_startup_trials=args.n_startup_trials, seed=args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_evaluations // 3),
    )

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if args.verbose >= 1:
            value = "" if trial.value is None else f" return {trial.value:.4f}"
            print(f"trial {trial.number}: {trial.state.name.lower()}{value} {trial.params}")

    start = time.perf_counter()
    env_id = ENV_ID_FOR_ALGO[args.algo]
    env = make_envs(env_id, env_kwargs, args.n_envs, args.seed)
    eval_env = make_envs(env_id, env_kwargs, 1, args.seed + EVAL_SEED_OFFSET)
    try:
        study.optimize(_objective(args, base, env, eval_env), n_trials=args.trials, timeout=args.timeout, callbacks=[report], gc_after_trial=True)
    finally:
        env.close()
        eval_env.close()
    _write_trials_csv(study, out / "trials.csv")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"no trial completed ({len(study.trials)} pruned or failed); see {out / 'trials.csv'}")
    best = study.best_trial
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
