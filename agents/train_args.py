"""The arguments of ``cmai train`` and ``cmai tune``, each declared once.

:class:`TrainArgs` and :class:`TuneArgs` are the typed configurations :func:`agents.train.train`
and :func:`agents.tune.tune` take. Their command-line options are generated from them:
:func:`add_dataclass_options` turns every field into ``--field-name`` (type and default from the
field, help from the class docstring's ``:param:`` line, ``choices``/``metavar`` from the field's
metadata) and :func:`from_namespace` turns the parsed options back into the dataclass.
Hand-written rather than transformers' ``HfArgumentParser`` (installed): that would import
transformers (seconds) to build ``cmai``'s parser, spells flags with underscores and has no form
for the repeatable ``key=value`` lists of ``--set``/``--env-kwargs``. This module imports nothing
heavy: every ``cmai`` command builds these parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
FIDELITIES = ("embedding", "pixel")


@dataclass
class TrainArgs:
    """Everything ``cmai train`` takes: one field per command-line option, whose help is the
    ``:param:`` line below (:func:`agents.cli_train.add_dataclass_options` builds the parser).

    :param algo: ppo, a2c, sac, td3, dqn (trains on CMAI-Discrete-v0) or recurrent_ppo.
    :param scenario: a shipped scenario name or a YAML file.
    :param timesteps: environment steps (rounds, summed over envs); ``None``: ``n_timesteps``
        of the hyperparameters.
    :param seed: seeds the model, the training envs (``seed + rank``) and the evaluation env
        (``seed + 100000``).
    :param n_envs: parallel training envs; ``None``: ``n_envs`` of the hyperparameters, else 1.
    :param out: root of the run folders.
    :param tensorboard: TensorBoard log root (``<tensorboard>/<scenario>/<algo>_<k>``); ``None``: off.
    :param hyperparams: a YAML file replacing ``agents/hyperparams/<algo>.yml``.
    :param set: hyperparameter overrides, ``key=value`` strings (YAML values, dotted keys for
        nested ones: ``policy_kwargs.net_arch=[32,32]``) or a mapping.
    :param env_kwargs: scenario overrides, ``key:value`` strings (``episode_rounds:20``,
        ``defense.lr:0.001``) or a mapping.
    :param eval_freq: evaluate every this many environment steps; ``None``: a tenth of the
        budget, at least one on-policy rollout; ``0``: never (no ``best_model.zip``).
    :param eval_episodes: episodes per evaluation.
    :param checkpoint_freq: save a checkpoint every this many environment steps; ``None``: a
        quarter of the budget, at least one on-policy rollout; ``0``: never.
    :param fidelity: environment fidelity, ``embedding`` (fast, the default for training) or ``pixel``.
    :param device: torch device of the policy and of the environment's backbone (cpu, cuda).
    :param threads: torch CPU threads of this process; ``None``: torch's default (one per core).
        Pass 1 when several runs share the cores: two runs of two threads each on two cores
        stepped 13× slower (15 against 196 PPO steps/s) than with one thread each.
    :param progress: show SB3's progress bar (``--no-progress`` hides it).
    :param subproc: run the training envs in subprocesses (``SubprocVecEnv``) when ``n_envs > 1``.
    :param verbose: SB3 verbosity (0 silent, 1 tables and evaluation results).
    :param resume: a run folder to continue from its latest model or checkpoint (an interrupted
        or failed run): its own ``args.yml`` then replaces every other field but ``progress``,
        ``verbose`` and ``threads``.
    """

    algo: str = "ppo"
    scenario: str = "quickstart"
    timesteps: int | None = None
    seed: int = 0
    n_envs: int | None = None
    out: Path = Path("runs")
    tensorboard: Path | None = None
    hyperparams: Path | None = None
    set: Sequence[str] | Mapping[str, Any] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    env_kwargs: Sequence[str] | Mapping[str, Any] = field(default_factory=list, metadata={"metavar": "KEY:VALUE"})
    eval_freq: int | None = None
    eval_episodes: int = 2
    checkpoint_freq: int | None = None
    fidelity: str = field(default="embedding", metadata={"choices": FIDELITIES})
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    subproc: bool = False
    verbose: int = 1
    resume: Path | None = field(default=None, metadata={"metavar": "RUN_DIR"})

    def to_dict(self) -> dict[str, Any]:
        """YAML-safe form (paths as strings) for ``args.yml``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, (list, tuple)):
                value = list(value)
            out[f.name] = value
        return out


@dataclass
class TuneArgs:
    """Everything ``cmai tune`` takes: one field per command-line option, whose help is the
    ``:param:`` line below (:func:`agents.cli_train.add_dataclass_options` builds the parser).

    :param algo: algorithm to tune (as for cmai train: ppo, a2c, sac, td3, dqn, recurrent_ppo).
    :param scenario: a shipped scenario name or a YAML file.
    :param trials: number of Optuna trials.
    :param timesteps: environment steps per trial.
    :param seed: seeds the sampler, each trial's model (``seed + trial number``) and the envs.
    :param out: output folder; ``None``: ``runs/tune/<algo>_<scenario>``.
    :param storage: Optuna storage URL (``sqlite:///tune.db``) to persist or resume the study;
        ``None``: in memory.
    :param study_name: name of the study in the storage; ``None``: ``<algo>_<scenario>``.
    :param n_evaluations: evaluations (and pruning checks) per trial.
    :param eval_episodes: episodes per evaluation.
    :param n_startup_trials: trials sampled at random and never pruned before TPE and the
        pruner take over.
    :param n_envs: parallel training envs per trial.
    :param hyperparams: a YAML file replacing ``agents/hyperparams/<algo>.yml`` as the base.
    :param env_kwargs: scenario overrides (``key:value`` strings or a mapping).
    :param fidelity: environment fidelity, ``embedding`` or ``pixel``.
    :param device: torch device (cpu, cuda).
    :param timeout: stop starting new trials after this many seconds; ``None``: no limit.
    :param threads: torch CPU threads of this process; ``None``: torch's default (one per core).
        Pass 1 when the study shares the cores with other runs (see ``cmai train --threads``).
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
    env_kwargs: Sequence[str] | Mapping[str, Any] = field(default_factory=list, metadata={"metavar": "KEY:VALUE"})
    fidelity: str = field(default="embedding", metadata={"choices": FIDELITIES})
    device: str = "cpu"
    timeout: float | None = None
    threads: int | None = None
    verbose: int = 1


def param_docs(cls: type) -> dict[str, str]:
    """``{name: text}`` of the ``:param name: text`` entries of a class docstring (one line each)."""
    found: dict[str, str] = {}
    for match in re.finditer(r":param (\w+):(.*?)(?=\n\s*:\w|\Z)", cls.__doc__ or "", re.S):
        text = " ".join(match.group(2).split()).replace("``None``", "unset").replace("``", "`")
        found[match.group(1)] = text
    return found


def _option_type(hint: Any) -> tuple[Any, bool]:
    """(scalar type, is a list option) of a field's annotation; ``X | None`` is ``X``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    origin = typing.get_origin(args[0])
    if origin is not None and issubclass(origin, (Sequence, Mapping)):
        return str, True
    return args[0], False


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the dataclass ``cls`` (see the module docstring).

    Booleans: ``--name`` when the default is false, ``--no-name`` when it is true. List fields
    (``Sequence | Mapping``) take several values and may be repeated.

    :raises ValueError: a field without a ``:param:`` line (it would have no help).
    """
    docs = param_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in docs:
            raise ValueError(f"{cls.__name__}.{f.name} has no ':param {f.name}:' line in the class docstring")
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = docs[f.name].replace("%", "%%")
        kind, many = _option_type(hints[f.name])
        extra = {k: v for k, v in f.metadata.items() if k in ("choices", "metavar")}
        if kind is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(f"--no-{flag[2:]}" if default else flag, dest=f.name, action=action, help=help_text)
        elif many:
            parser.add_argument(flag, dest=f.name, action="extend", nargs="+", default=list(default), help=help_text, **extra)
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text + shown, **extra)


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The dataclass ``cls`` from the options :func:`add_dataclass_options` added."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
