"""``cmai train`` and ``cmai tune``: the command-line faces of :mod:`agents.train` and :mod:`agents.tune`.

Their options are the fields of :class:`agents.train_args.TrainArgs` and
:class:`agents.train_args.TuneArgs`, declared once there.
"""

from __future__ import annotations

import argparse
import sys

from agents.train_args import TrainArgs, TuneArgs, add_dataclass_options, from_namespace

TRAIN_DESCRIPTION = (
    "Train a gating policy (the SB3 policy is the gating network g: beta = softmax(g(h_t))) on a scenario, "
    "through rl-zoo3's ExperimentManager. Writes <out>/<algo>/<scenario>_<n>/ (model, best model, evaluations, "
    "checkpoints, config, run.json)."
)
TUNE_DESCRIPTION = (
    "rl-zoo3's Optuna study (TPE + median pruning) over learning rate, gamma, gating-network width and "
    "n_steps/batch size; writes best_hyperparams.yml (usable with cmai train --hyperparams), trials.csv and study.json."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train", help="train a gating policy with Stable-Baselines3 (through rl-zoo3)", description=TRAIN_DESCRIPTION)
    add_dataclass_options(tr, TrainArgs)
    tr.set_defaults(func=run_train)
    tu = subparsers.add_parser("tune", help="search hyperparameters with rl-zoo3's Optuna study", description=TUNE_DESCRIPTION)
    add_dataclass_options(tu, TuneArgs)
    tu.set_defaults(func=run_tune)


#: Exit status of a run stopped by Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130


def run_train(args: argparse.Namespace) -> int:
    from agents.train import TrainingInterrupted, train

    try:
        run_dir = train(from_namespace(TrainArgs, args))
    except TrainingInterrupted as stop:
        print(f"cmai train: interrupted after {stop.timesteps} steps; the model so far is in {stop.run_dir} "
              f"(cmai evaluate works on it); continue with: cmai train --resume {stop.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"run folder: {run_dir}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from agents.tune import tune

    tune(from_namespace(TuneArgs, args))
    return 0
