"""``cmai train`` and ``cmai tune``: the command-line faces of :mod:`agents.train` and :mod:`agents.tune`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ALGO_NAMES = "ppo, a2c, sac, td3, dqn, recurrent_ppo"


def register(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser(
        "train",
        help="train a gating policy with Stable-Baselines3",
        description=(
            "Train a gating policy (the SB3 policy is the gating network g: beta = softmax(g(h_t))) on a "
            "scenario. Writes <out>/<algo>/<scenario>_<n>/ (model, best model, evaluations, checkpoints, "
            "config, run.json)."
        ),
    )
    tr.add_argument("--algo", default="ppo", help=f"{ALGO_NAMES} (default: ppo; dqn trains on CMAI-Discrete-v0)")
    tr.add_argument("--scenario", default="quickstart", help="shipped scenario name or YAML file (default: quickstart)")
    tr.add_argument("--timesteps", type=int, default=None, help="environment steps (default: n_timesteps of the hyperparameters)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the model and envs; the eval env gets seed+100000 (default: 0)")
    tr.add_argument("--n-envs", type=int, default=None, help="parallel training envs (default: n_envs of the hyperparameters, 1)")
    tr.add_argument("--out", type=Path, default=Path("runs"), help="root of the run folders (default: runs)")
    tr.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log root (default: off)")
    tr.add_argument("--hyperparams", type=Path, default=None, help="YAML file replacing agents/hyperparams/<algo>.yml")
    tr.add_argument(
        "--set", dest="set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="override hyperparameters, YAML values, dotted keys: --set learning_rate=3e-4 policy_kwargs.net_arch=[32,32]",
    )
    tr.add_argument(
        "--env-kwargs", dest="env_kwargs", action="extend", nargs="+", default=[], metavar="KEY:VALUE",
        help="override scenario fields: --env-kwargs episode_rounds:20 defense.lr:0.001",
    )
    tr.add_argument("--eval-freq", type=int, default=None, help="evaluate every N env steps; 0 disables (default: timesteps/10, at least one on-policy rollout)")
    tr.add_argument("--eval-episodes", type=int, default=2, help="episodes per evaluation (default: 2)")
    tr.add_argument("--checkpoint-freq", type=int, default=None, help="checkpoint every N env steps; 0 disables (default: timesteps/4, at least one on-policy rollout)")
    tr.add_argument("--fidelity", choices=["embedding", "pixel"], default="embedding", help="environment fidelity (default: embedding)")
    tr.add_argument("--device", default="cpu", help="cpu or cuda, for the policy and the env (default: cpu)")
    tr.add_argument("--subproc", action="store_true", help="SubprocVecEnv when --n-envs > 1")
    tr.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    tr.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 SB3 tables and evaluations (default: 1)")
    tr.add_argument(
        "--resume", type=Path, default=None, metavar="RUN_DIR",
        help="continue an interrupted or failed run from its latest model or checkpoint, with its own arguments "
        "(other options but --verbose/--no-progress are ignored)",
    )
    tr.set_defaults(func=run_train)

    tu = subparsers.add_parser(
        "tune",
        help="search hyperparameters with Optuna",
        description="Optuna (TPE + median pruning) over learning rate, gamma, network width and n_steps/batch size; "
        "writes best_hyperparams.yml (usable with cmai train --hyperparams), trials.csv and study.json.",
    )
    tu.add_argument("--algo", default="ppo", help=f"{ALGO_NAMES} (default: ppo)")
    tu.add_argument("--scenario", default="quickstart", help="shipped scenario name or YAML file (default: quickstart)")
    tu.add_argument("--trials", type=int, default=8, help="number of trials (default: 8)")
    tu.add_argument("--timesteps", type=int, default=2000, help="environment steps per trial (default: 2000)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the sampler, models and envs (default: 0)")
    tu.add_argument("--out", type=Path, default=None, help="output folder (default: runs/tune/<algo>_<scenario>)")
    tu.add_argument("--storage", default=None, help="Optuna storage URL, e.g. sqlite:///tune.db (default: in memory)")
    tu.add_argument("--study-name", default=None, help="study name in the storage (default: <algo>_<scenario>)")
    tu.add_argument("--n-evaluations", type=int, default=4, help="evaluations (pruning checks) per trial (default: 4)")
    tu.add_argument("--eval-episodes", type=int, default=1, help="episodes per evaluation (default: 1)")
    tu.add_argument("--n-startup-trials", type=int, default=3, help="random, unpruned trials first (default: 3)")
    tu.add_argument("--n-envs", type=int, default=1, help="parallel training envs per trial (default: 1)")
    tu.add_argument("--hyperparams", type=Path, default=None, help="YAML file replacing agents/hyperparams/<algo>.yml as the base")
    tu.add_argument("--env-kwargs", dest="env_kwargs", action="extend", nargs="+", default=[], metavar="KEY:VALUE", help="override scenario fields")
    tu.add_argument("--fidelity", choices=["embedding", "pixel"], default="embedding", help="environment fidelity (default: embedding)")
    tu.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    tu.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    tu.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 a line per trial (default: 1)")
    tu.set_defaults(func=run_tune)


#: Exit status of a run stopped by Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130


def run_train(args: argparse.Namespace) -> int:
    from agents.train import TrainArgs, TrainingInterrupted, train

    try:
        run_dir = train(
            TrainArgs(
                algo=args.algo, scenario=args.scenario, timesteps=args.timesteps, seed=args.seed, n_envs=args.n_envs,
                out=args.out, tensorboard=args.tensorboard, hyperparams=args.hyperparams, set=list(args.set),
                env_kwargs=list(args.env_kwargs), eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                checkpoint_freq=args.checkpoint_freq, fidelity=args.fidelity, device=args.device,
                progress=args.progress, subproc=args.subproc, verbose=args.verbose, resume=args.resume,
            )
        )
    except TrainingInterrupted as stop:
        print(f"cmai train: interrupted after {stop.timesteps} steps; the model so far is in {stop.run_dir} "
              f"(cmai evaluate works on it); continue with: cmai train --resume {stop.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"run folder: {run_dir}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from agents.tune import TuneArgs, tune

    tune(
        TuneArgs(
            algo=args.algo, scenario=args.scenario, trials=args.trials, timesteps=args.timesteps, seed=args.seed,
            out=args.out, storage=args.storage, study_name=args.study_name, n_evaluations=args.n_evaluations,
            eval_episodes=args.eval_episodes, n_startup_trials=args.n_startup_trials, n_envs=args.n_envs,
            hyperparams=args.hyperparams, env_kwargs=list(args.env_kwargs), fidelity=args.fidelity,
            device=args.device, timeout=args.timeout, verbose=args.verbose,
        )
    )
    return 0
