"""Train a gating policy with Stable-Baselines3 on a CMAI scenario, through rl-zoo3.

    from agents.train import TrainArgs, train
    run_dir = train(TrainArgs(algo="ppo", scenario="quickstart", timesteps=20_000, out=Path("runs")))

is what ``cmai train --algo ppo --scenario quickstart --timesteps 20000 --out runs`` runs. The
steps, top to bottom: resolve the scenario and the hyperparameters (validated before anything is
written), lay out the run folder, and hand the rest to rl-zoo3's ``ExperimentManager``
(:class:`agents.zoo.CMAIExperimentManager`): it preprocesses the hyperparameters (``lin_``
schedules, ``normalize``, action noise), builds the monitored training envs (seeded
``seed + rank``) and the model (its policy is the gating network, see :mod:`agents.policies`),
and learns with CMAI's callbacks (TensorBoard metrics, evaluation on an env seeded
``seed + EVAL_SEED_OFFSET``, checkpoints). What stays here is what rl-zoo3 has no notion of: the
scenario, the run record and its statuses, and pickle-free saving.

Run folder (the rl-baselines3-zoo layout), ``<out>/<algo>/<scenario>_<n>/`` with ``n`` the next
free integer::

    <scenario>.zip             final model
    best_model.zip             best mean evaluation return (EvalCallback)
    evaluations.npz            evaluation returns over training (EvalCallback)
    checkpoints/               rl_model_<steps>_steps.zip (+ rl_model_vecnormalize_<steps>_steps.npz)
    <scenario>/config.yml      resolved hyperparameters (policy, n_timesteps, n_envs, ...)
    <scenario>/args.yml        the TrainArgs / command-line arguments
    <scenario>/env_kwargs.yml  keyword arguments of the env beyond the scenario (fidelity, overrides)
    <scenario>/scenario.yml    byte copy of the scenario file (sha256 in run.json)
    <scenario>/vecnormalize.npz  observation/return statistics, when ``normalize`` is on (no pickle)
    0.monitor.csv ...          Monitor episode logs of the training envs
    run.json                   algo, env_id, scenario name + sha256, seed, versions, timesteps, wall time,
                               status (running, finished, failed, interrupted), sha256 of every model file

Every model archive also carries a ``cmai.json`` entry (algorithm, env ID, hyperparameters), so it
loads without unpickling (:mod:`agents.safe_load`) even when copied out of the folder.

Hyperparameters
---------------
``agents/hyperparams/<algo>.yml`` maps a scenario name (or ``default``) to the algorithm's
keyword arguments; the scenario's entry is merged over ``default``. Keys that are not
constructor arguments (rl-zoo3's): ``policy``, ``n_timesteps``, ``n_envs``, ``normalize`` (bool or
VecNormalize kwargs), ``noise_type``/``noise_std`` (TD3/SAC action noise). Values
``lin_<x>`` for ``learning_rate``/``clip_range``/``clip_range_vf`` decay linearly from x to 0;
``train_freq: [1, episode]`` becomes a tuple. ``policy_kwargs`` uses the YAML form of
:func:`agents.policies.resolve_policy_kwargs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from agents.callbacks import CMAIMetricsCallback, FinalEvalCallback
from agents.protocol import EVAL_SEED_OFFSET
from agents.train_args import FIDELITIES, TrainArgs  # noqa: F401 (TrainArgs is part of this module's API)
from agents.policies import ENV_ID_FOR_ALGO, RUN_FILE, RunInfo, normalization_for, algo_class, read_run, resolve_policy_kwargs
from cmai_env.cli.common import set_torch_threads, validate_device, validate_threads
from cmai_env.keyvalue import load_yaml, load_yaml_mapping, parse_assignments, parse_value, set_dotted  # noqa: F401 (re-exported)
from cmai_env.observation import OBS_SIZE
from cmai_env.resources import check_buffer_memory, check_memory
from agents.safe_load import file_sha256, read_model_data, read_model_metadata, save_normalization, write_model_metadata

if TYPE_CHECKING:
    from cmai_env.scenario import Scenario

HYPERPARAMS_DIR = Path(__file__).parent / "hyperparams"
#: Hyperparameter keys that configure the run, not the algorithm's constructor.
RUN_KEYS = ("policy", "n_timesteps", "n_envs", "normalize", "noise_type", "noise_std")
#: Constructor arguments ``cmai train`` sets from its own options.
RESERVED_KEYS = {"env": "the scenario", "seed": "--seed", "device": "--device", "tensorboard_log": "--tensorboard", "verbose": "--verbose"}
SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf")
#: ``--env-kwargs`` keys that are CMAIEnv constructor arguments rather than scenario fields.
ENV_ARGUMENTS = ("fidelity", "device", "render_mode")
NOISE_TYPES = ("normal", "ornstein-uhlenbeck")
#: Algorithms that collect rollouts of ``n_steps`` per environment between policy updates.
ON_POLICY = ("ppo", "a2c", "recurrent_ppo")


# ---------------------------------------------------------------------------------- scenario
@dataclass
class ScenarioSource:
    """The scenario a run uses: its validated name, the file's bytes and their sha256."""

    argument: str
    name: str
    data: bytes
    sha256: str
    evaluation_only: bool
    #: the validated scenario with the overrides that are scenario fields applied
    resolved: "Scenario"


def resolve_scenario(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> ScenarioSource:
    """Load and validate a scenario (plus env overrides) before anything is written.

    :raises FileNotFoundError: neither a shipped name nor an existing file.
    :raises ValueError: the file or an override does not validate (the message names the field).
    """
    from cmai_env.scenario import apply_overrides, load_scenario, scenario_bytes

    scenario = load_scenario(name_or_path)
    # Constructor arguments of CMAIEnv are not scenario fields; the env validates those itself.
    scenario_fields = {k: v for k, v in (overrides or {}).items() if k not in ENV_ARGUMENTS}
    if scenario_fields:
        scenario = apply_overrides(scenario, scenario_fields)
    data = scenario_bytes(name_or_path)
    return ScenarioSource(
        argument=str(name_or_path),
        name=scenario.name,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        evaluation_only=scenario.evaluation_only,
        resolved=scenario,
    )


# ---------------------------------------------------------------------------------- hyperparameters
def load_hyperparams(algo: str, scenario: str, path: Path | None = None) -> dict[str, Any]:
    """The hyperparameters for ``scenario``: its entry merged over ``default``.

    :param path: a file in the same format replacing ``agents/hyperparams/<algo>.yml``.
    """
    path = Path(path) if path is not None else HYPERPARAMS_DIR / f"{algo}.yml"
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file not found: {path}")
    table = load_yaml(path) or {}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping of scenario name (or 'default') to hyperparameters")
    if scenario not in table and "default" not in table:
        raise ValueError(f"{path} has no entry for scenario {scenario!r} and no 'default' entry (it has: {', '.join(map(str, table))})")
    merged: dict[str, Any] = {}
    for key in ("default", scenario):
        entry = table.get(key) or {}
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {key!r} must be a mapping of hyperparameters")
        for name, value in entry.items():
            if isinstance(value, dict) and isinstance(merged.get(name), dict):
                merged[name] = {**merged[name], **value}
            else:
                merged[name] = value
    return merged


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_hyperparams(algo: str, hyperparams: Mapping[str, Any]) -> None:
    """Reject names the algorithm (or its policy) does not take, naming the bad key.

    :raises ValueError: unknown or reserved hyperparameter, unknown policy, bad noise type.
    """
    cls = algo_class(algo)
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "policy", "_init_setup_model"}
    known = sorted((params - set(RESERVED_KEYS)) | set(RUN_KEYS))
    for key in hyperparams:
        if key in RESERVED_KEYS:
            raise ValueError(f"hyperparameter {key!r} is set by cmai train ({RESERVED_KEYS[key]}), not in the hyperparameters")
        if key not in known:
            raise ValueError(f"unknown hyperparameter {key!r} for {algo}{_suggest(key, known)}; known: {', '.join(known)}")
    policy = hyperparams.get("policy", "MlpPolicy")
    if not isinstance(policy, str) or policy not in cls.policy_aliases:
        raise ValueError(f"unknown policy {policy!r} for {algo}; choose one of {', '.join(cls.policy_aliases)}")
    policy_kwargs = hyperparams.get("policy_kwargs") or {}
    if not isinstance(policy_kwargs, dict):
        raise ValueError(f"policy_kwargs must be a mapping, got {policy_kwargs!r}")
    policy_params = set(inspect.signature(cls.policy_aliases[policy].__init__).parameters) - {"self", "observation_space", "action_space", "lr_schedule"}
    policy_known = sorted(policy_params | {"gating"})
    for key in policy_kwargs:
        if key not in policy_known:
            raise ValueError(f"unknown hyperparameter 'policy_kwargs.{key}' for {algo}/{policy}{_suggest(key, policy_known)}; known: {', '.join(policy_known)}")
    # rl-zoo3 eval()s these when they are strings (ExperimentManager._preprocess_hyperparams /
    # _preprocess_normalization): a string here would run as Python code. CMAI takes data only.
    normalize = hyperparams.get("normalize", False)
    if not isinstance(normalize, (bool, dict)):
        raise ValueError(f"hyperparameter normalize must be true, false or a mapping of VecNormalize arguments, got {normalize!r}")
    for key in ("replay_buffer_class", "replay_buffer_kwargs"):
        if isinstance(hyperparams.get(key), str):
            raise ValueError(f"hyperparameter {key} must not be a string (rl-zoo3 would evaluate it as Python code), got {hyperparams[key]!r}")
    for key, value in [*hyperparams.items(), *((f"policy_kwargs.{k}", v) for k, v in policy_kwargs.items())]:
        if isinstance(value, float) and not math.isfinite(value):  # SB3 would train on NaN and fail mid-run
            raise ValueError(f"hyperparameter {key} must be a finite number, got {value!r}")
    noise = hyperparams.get("noise_type")
    if noise is not None and noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise_type {noise!r}; choose one of {', '.join(NOISE_TYPES)}")
    for key in ("n_timesteps", "n_envs"):
        if key in hyperparams and (not isinstance(hyperparams[key], int) or hyperparams[key] < 1):
            raise ValueError(f"hyperparameter {key} must be a positive integer, got {hyperparams[key]!r}")
    model_kwargs(algo, hyperparams, n_actions=3)  # gating spec, activations, schedules, noise


def _schedule(key: str, value: Any) -> Any:
    if isinstance(value, str) and not value.startswith("lin_"):
        # rl-zoo3 would split any string on "_" and fail with "not enough values to unpack"
        raise ValueError(f"{key}: expected a number or a linear schedule like lin_3e-4, got {value!r}")
    if isinstance(value, str) and value.startswith("lin_"):
        try:
            start = float(value[len("lin_") :])
        except ValueError:
            # rl-zoo3's preprocessing would fail on float('fast') without naming the key.
            raise ValueError(f"{key}: linear schedule must look like lin_3e-4, got {value!r}") from None
        from rl_zoo3.utils import SimpleLinearSchedule

        return SimpleLinearSchedule(start)
    return value


def model_kwargs(algo: str, hyperparams: Mapping[str, Any], n_actions: int) -> tuple[str, dict[str, Any]]:
    """(policy name, constructor kwargs) from validated YAML-form hyperparameters.

    Training gets its kwargs from rl-zoo3's preprocessing (:class:`agents.zoo.CMAIExperimentManager`);
    this is what validation tries and what :mod:`agents.safe_load` rebuilds a saved model's
    pickled entries from, without a manager or an env (rl-zoo3 needs both).
    """
    kwargs = {k: v for k, v in hyperparams.items() if k not in RUN_KEYS}
    for key in SCHEDULE_KEYS:
        if key in kwargs:
            kwargs[key] = _schedule(key, kwargs[key])
    if isinstance(kwargs.get("train_freq"), list):
        kwargs["train_freq"] = tuple(kwargs["train_freq"])
    if "policy_kwargs" in kwargs:
        kwargs["policy_kwargs"] = resolve_policy_kwargs(kwargs["policy_kwargs"])
    noise = hyperparams.get("noise_type")
    if noise is not None:
        sigma = float(hyperparams.get("noise_std", 0.1)) * np.ones(n_actions)
        cls = NormalActionNoise if noise == "normal" else OrnsteinUhlenbeckActionNoise
        kwargs["action_noise"] = cls(mean=np.zeros(n_actions), sigma=sigma)
    return str(hyperparams.get("policy", "MlpPolicy")), kwargs


# ---------------------------------------------------------------------------------- environments
def make_envs(env_id: str, env_kwargs: Mapping[str, Any], n_envs: int, seed: int, monitor_dir: Path | None = None) -> VecEnv:
    """Monitored, vectorised CMAI envs outside a training run (benchmarks, tests): env ``i``
    seeded ``seed + i``, batched at embedding fidelity when ``n_envs > 1``, else ``DummyVecEnv``.

    ``cmai train`` and ``cmai tune`` build theirs through rl-zoo3
    (:meth:`agents.zoo.CMAIExperimentManager.create_envs`), which does the same.
    """
    import cmai_env  # noqa: F401  (registers the IDs)
    from agents.vec_adapter import batched_supported, make_batched_vec_env

    if n_envs > 1 and batched_supported(env_id, env_kwargs):
        return make_batched_vec_env(env_id, env_kwargs, n_envs, seed, monitor_dir)
    spec = gym.spec(env_id)
    return make_vec_env(spec.make, n_envs=n_envs, seed=seed, env_kwargs=dict(env_kwargs), vec_env_cls=DummyVecEnv,
                        monitor_dir=None if monitor_dir is None else str(monitor_dir))


# ---------------------------------------------------------------------------------- run folder
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "scenario"


def next_run_dir(out: Path, algo: str, scenario: str) -> Path:
    """``<out>/<algo>/<scenario>_<n>`` with ``n`` one more than the largest existing (from 1)."""
    root = Path(out) / algo
    pattern = re.compile(rf"^{re.escape(scenario)}_(\d+)$")
    taken = [int(m.group(1)) for p in root.glob(f"{scenario}_*") if (m := pattern.match(p.name)) and p.is_dir()]
    return root / f"{scenario}_{max(taken, default=0) + 1}"


def _yaml(data: Any, flow: bool | None = None) -> bytes:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=flow).encode()


def _versions() -> dict[str, str]:
    import sb3_contrib
    import stable_baselines3
    import torch

    import cmai_env

    return {
        "cmai": cmai_env.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "sb3_contrib": sb3_contrib.__version__,
        "gymnasium": gym.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------------------------- training
@dataclass
class PreparedRun:
    """A validated configuration, before anything is written or built."""

    args: TrainArgs
    scenario: ScenarioSource
    env_id: str
    env_kwargs: dict[str, Any]
    hyperparams: dict[str, Any]
    timesteps: int
    n_envs: int


@dataclass
class TrainingResult:
    """What :func:`run_training` leaves in memory: the run folder, the model and its env."""

    run_dir: Path
    model: BaseAlgorithm
    env: VecEnv
    record: dict[str, Any]


def check_run_memory(scenario: "Scenario", hyperparams: Mapping[str, Any], n_envs: int, fidelity: str, device: str,
                     what: str, processes: bool = False) -> None:
    """Before a run folder exists (``cmai train``, ``cmai tune``): environments or a rollout/replay
    buffer the memory cannot hold are an error message (:class:`cmai_env.resources.ResourceError`),
    not a kill for memory."""
    check_memory(scenario, n_envs, fidelity, device=device, processes=processes, what=what)
    check_buffer_memory(hyperparams, n_envs, OBS_SIZE, 3)


def prepare(args: TrainArgs) -> PreparedRun:
    """Validate every input (algorithm, scenario, overrides, hyperparameters) without side effects.

    :raises ValueError, FileNotFoundError: with a message naming the bad value.
    """
    algo_class(args.algo)
    validate_device(args.device)
    if args.fidelity not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {', '.join(FIDELITIES)}, got {args.fidelity!r}")
    env_overrides = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    for key in ("scenario", "action_mode", "allow_evaluation_only"):
        if key in env_overrides:
            raise ValueError(f"--env-kwargs cannot set {key!r}: it follows from --scenario and --algo")
    env_overrides.setdefault("fidelity", args.fidelity)
    scenario = resolve_scenario(args.scenario, env_overrides)
    if scenario.evaluation_only:
        raise ValueError(f"scenario {scenario.name!r} is evaluation-only (held-out attacks); train on a training scenario and evaluate on it")

    hyperparams = load_hyperparams(args.algo, scenario.name, args.hyperparams)
    for key, value in parse_assignments(args.set, "=", "--set").items():
        set_dotted(hyperparams, key, value)
    validate_hyperparams(args.algo, hyperparams)
    timesteps = args.timesteps if args.timesteps is not None else hyperparams.get("n_timesteps")
    if timesteps is None or int(timesteps) < 1:
        raise ValueError(f"timesteps must be a positive integer (--timesteps or n_timesteps), got {timesteps!r}")
    n_envs = args.n_envs if args.n_envs is not None else int(hyperparams.get("n_envs", 1))
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    check_run_memory(scenario.resolved, hyperparams, n_envs, env_overrides["fidelity"], args.device,
                     "n_envs (--n-envs or the hyperparameters')", processes=args.subproc and n_envs > 1)
    for name in ("eval_freq", "checkpoint_freq"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 (0 disables it), got {value}")
    if args.eval_episodes < 1:
        raise ValueError(f"eval_episodes must be at least 1, got {args.eval_episodes}")
    validate_threads(args.threads)
    if args.tensorboard is not None and Path(args.tensorboard).exists() and not Path(args.tensorboard).is_dir():
        raise ValueError(f"--tensorboard {args.tensorboard} is a file, not a folder")
    if args.seed < 0:  # gymnasium refuses it when the envs are built, with a traceback
        raise ValueError(f"seed must be >= 0, got {args.seed}")
    hyperparams["n_timesteps"] = int(timesteps)
    hyperparams["n_envs"] = n_envs
    hyperparams.setdefault("policy", "MlpPolicy")
    return PreparedRun(args, scenario, ENV_ID_FOR_ALGO[args.algo], env_overrides, hyperparams, int(timesteps), n_envs)


class SafeCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` that stores the normalisation statistics as ``.npz``, not a pickle.

    Files: ``rl_model_<steps>_steps.zip`` and, when normalising, ``rl_model_vecnormalize_<steps>_steps.npz``.
    """

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            self.model.save(self._checkpoint_path(extension="zip"))
            env = self.model.get_vec_normalize_env()
            if self.save_vecnormalize and env is not None:
                save_normalization(env, self._checkpoint_path("vecnormalize_", extension="npz"))
        return True


def _callbacks(args: TrainArgs, plan: PreparedRun, run_dir: Path, eval_env: VecEnv | None, eval_freq: int, checkpoint_freq: int) -> list[BaseCallback]:
    """TensorBoard metrics, best-model evaluation and checkpoints (frequencies in env steps)."""
    callbacks: list[BaseCallback] = [CMAIMetricsCallback()]
    if eval_env is not None:
        callbacks.append(
            FinalEvalCallback(
                eval_env,
                n_eval_episodes=args.eval_episodes,
                eval_freq=max(eval_freq // plan.n_envs, 1),  # the callback counts vectorised steps
                log_path=str(run_dir),
                best_model_save_path=str(run_dir),
                deterministic=True,
                verbose=args.verbose,
            )
        )
    if checkpoint_freq > 0:
        callbacks.append(
            SafeCheckpointCallback(
                save_freq=max(checkpoint_freq // plan.n_envs, 1),
                save_path=str(run_dir / "checkpoints"),
                name_prefix="rl_model",
                save_vecnormalize=bool(plan.hyperparams.get("normalize", False)),
            )
        )
    return callbacks


def reserve_run_dir(out: Path, algo: str, scenario: str) -> Path:
    """Create and return the next free ``<out>/<algo>/<scenario>_<n>``.

    ``mkdir`` either creates the folder or fails, so two runs started at once never share one.
    """
    while True:
        candidate = next_run_dir(out, algo, scenario)
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))


def _seal_model_files(run_dir: Path, plan: PreparedRun, record: dict[str, Any]) -> None:
    """Give every model archive of the run its ``cmai.json`` entry and record its sha256 in ``run.json``.

    The entry lets a model copied out of the folder load without unpickling; the hashes let
    :func:`agents.policies.load_policy` notice a file modified after training.
    """
    files: dict[str, str] = {}
    for archive in sorted([*run_dir.glob("*.zip"), *(run_dir / "checkpoints").glob("*.zip")]):
        if read_model_metadata(archive) is None:
            write_model_metadata(archive, plan.args.algo, plan.env_id, plan.hyperparams)
        files[archive.relative_to(run_dir).as_posix()] = file_sha256(archive)
    record["files"] = files


def _latest_model(run: RunInfo) -> Path:
    """The model file of ``run`` with the most environment steps (final/interrupted model or checkpoint)."""
    candidates = [run.model_path("final"), *sorted((run.run_dir / "checkpoints").glob("rl_model_*_steps.zip"))]
    found = [(int(read_model_data(p).get("num_timesteps", 0)), p) for p in candidates if p.is_file()]
    if not found:
        raise FileNotFoundError(f"{run.run_dir}: no model or checkpoint to resume from (the run stopped before its first checkpoint); start it again")
    return max(found, key=lambda item: item[0])[1]


def resume_args(run_dir: Path) -> TrainArgs:
    """The :class:`TrainArgs` a run was started with (its ``args.yml``), set to resume it."""
    run = read_run(run_dir)
    path = run.params_dir / "args.yml"
    stored = load_yaml_mapping(path, f"the cmai train arguments {run_dir} was started with, needed to resume it")
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{path}: unknown argument(s) {', '.join(unknown)}")
    for key in ("out", "tensorboard", "hyperparams"):
        if stored.get(key) is not None:
            stored[key] = Path(stored[key])
    stored["resume"] = Path(run_dir)
    return TrainArgs(**stored)


def run_training(args: TrainArgs, run_dir: Path | None = None) -> TrainingResult:
    """Train as :func:`train` does and keep the model and env in memory (the caller closes ``env``).

    :param run_dir: train into this folder (created, or empty) instead of the next free
        ``<out>/<algo>/<scenario>_<n>``: ``cmai sweep`` fixes each trial's folder in its manifest.

    With ``args.resume`` set, continues that run folder from its latest model or checkpoint
    (same hyperparameters, environments and seeds) up to its recorded number of timesteps.
    A ``KeyboardInterrupt`` (Ctrl-C) saves the current model, marks the run ``interrupted`` and
    re-raises; ``cmai train --resume RUN_DIR`` continues it.
    """
    from agents.zoo import CMAIExperimentManager

    if args.resume is not None:
        resumed = read_run(args.resume)
        if resumed.record.get("status") == "finished":
            raise ValueError(f"{args.resume} already finished ({resumed.record.get('timesteps_done')} steps); nothing to resume")
        args = dataclasses.replace(resume_args(args.resume), progress=args.progress, verbose=args.verbose, threads=args.threads)
    # 1. Validate everything before writing anything.
    plan = prepare(args)
    set_torch_threads(args.threads)
    hp = plan.hyperparams
    # On-policy algorithms change the policy once per rollout (n_steps × n_envs steps): evaluating or
    # checkpointing more often than that repeats work on the same policy (and swamps tiny budgets).
    n_steps = hp.get("n_steps")  # validated by the algorithm itself below (a bad value is its error to name)
    rollout = n_steps * plan.n_envs if args.algo in ON_POLICY and isinstance(n_steps, int) else 1
    eval_freq = max(plan.timesteps // 10, rollout, 1) if args.eval_freq is None else args.eval_freq
    checkpoint_freq = max(plan.timesteps // 4, rollout, 1) if args.checkpoint_freq is None else args.checkpoint_freq

    # 2. The run folder, then rl-zoo3's ExperimentManager: it preprocesses the hyperparameters,
    #    builds the envs (training seed + rank, evaluation seed + EVAL_SEED_OFFSET) and the model,
    #    whose policy is the gating network g, and writes the parameter files once the algorithm
    #    has accepted them: hyperparameters it rejects leave no half-made run folder.
    scenario_name = _slug(plan.scenario.name)
    resuming = args.resume is not None
    if resuming:
        run_dir = Path(args.resume)
    elif run_dir is None:
        run_dir = reserve_run_dir(args.out, args.algo, scenario_name)
    else:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} is not empty; train into an empty folder or resume it")
    resumed_from = _latest_model(read_run(run_dir)) if resuming else None
    manager = CMAIExperimentManager(
        args.algo, plan.env_id, hp, run_dir, run_dir / scenario_name, scenario_name,
        params_files={
            "args.yml": _yaml(args.to_dict()),
            "config.yml": _yaml(hp),
            "env_kwargs.yml": _yaml(plan.env_kwargs, flow=False),
            "scenario.yml": plan.scenario.data,
        },
        # Looked up when called (not bound now), so a test may wrap _callbacks.
        callbacks=lambda eval_env: _callbacks(args, plan, run_dir, eval_env, eval_freq, checkpoint_freq),
        resume_from=resumed_from,
        resume_normalization=None if resumed_from is None else normalization_for(resumed_from, read_run(run_dir)),
        append_monitor=resuming,
        tensorboard_log=None if args.tensorboard is None else Path(args.tensorboard) / scenario_name,
        seed=args.seed, n_timesteps=plan.timesteps, eval_freq=eval_freq, n_eval_episodes=args.eval_episodes,
        env_kwargs={"scenario": plan.scenario.argument, "device": args.device, **plan.env_kwargs},
        vec_env_type="subproc" if args.subproc and plan.n_envs > 1 else "dummy",
        device=args.device, verbose=args.verbose, show_progress=args.progress, log_interval=-1,
    )
    start = time.perf_counter()
    try:
        # rl-zoo3 prints its env kwargs whatever the verbosity; --verbose 0 is silent.
        with contextlib.redirect_stdout(io.StringIO()) if args.verbose == 0 else contextlib.nullcontext():
            model, _ = manager.setup_experiment()
    except BaseException as exc:
        manager.close_envs()
        if not resuming:
            shutil.rmtree(run_dir, ignore_errors=True)  # only Monitor files were written
        if isinstance(exc, (TypeError, AssertionError)):
            raise ValueError(f"{args.algo} rejected the hyperparameters {hp}: {exc}") from exc
        raise
    env = model.get_env()
    setup_time = time.perf_counter() - start

    # 3. The run record: what reproduces the run is written before learning starts.
    if resuming:
        record = read_run(run_dir).record
        record.setdefault("resumes", []).append(
            {"from": resumed_from.relative_to(run_dir).as_posix(), "at_timesteps": int(model.num_timesteps),
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        )
        record["status"] = "running"
    else:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        record = _new_record(args, plan, scenario_name)
    _write_record(run_dir, record)

    # 4. Learn, then save the final model and the normalisation statistics it expects. Ctrl-C
    #    saves what was learnt so far.
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        manager.learn(model)
        wall_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
        manager.save_trained_model(model)
    except KeyboardInterrupt:
        manager.save_trained_model(model)
        _seal_model_files(run_dir, plan, record)
        # the time spent so far counts: a resumed run adds its own to these when it finishes
        record.update(status="interrupted", timesteps_done=int(model.num_timesteps),
                      interrupted=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      wall_time_s=round(time.perf_counter() - start + float(record.get("wall_time_s") or 0.0), 3),
                      cpu_time_s=round(time.process_time() - cpu_start + float(record.get("cpu_time_s") or 0.0), 3))
        _write_record(run_dir, record)
        manager.close_envs()
        raise TrainingInterrupted(run_dir, int(model.num_timesteps)) from None
    except BaseException:
        record["status"] = "failed"
        _write_record(run_dir, record)
        manager.close_envs()
        raise
    manager.close_envs(keep=env)

    _seal_model_files(run_dir, plan, record)
    record.update(
        status="finished",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=round(wall_time + float(record.get("wall_time_s") or 0.0), 3),
        cpu_time_s=round(cpu_time + float(record.get("cpu_time_s") or 0.0), 3),
        setup_time_s=round(setup_time, 3),
        timesteps_done=int(model.num_timesteps),
        tensorboard_dir=None if args.tensorboard is None else model.logger.get_dir(),
        best_model="best_model.zip" if (run_dir / "best_model.zip").exists() else None,
    )
    _write_record(run_dir, record)
    return TrainingResult(run_dir=run_dir, model=model, env=env, record=record)


def _new_record(args: TrainArgs, plan: PreparedRun, scenario_name: str) -> dict[str, Any]:
    """``run.json`` of a new run (status ``running``)."""
    return {
        "algo": args.algo,
        "env_id": plan.env_id,
        "scenario": {
            "name": plan.scenario.name,
            "argument": plan.scenario.argument,
            "sha256": plan.scenario.sha256,
            "file": f"{scenario_name}/scenario.yml",
            "params_dir": scenario_name,
        },
        "env_kwargs": plan.env_kwargs,
        "seed": args.seed,
        "eval_seed": args.seed + EVAL_SEED_OFFSET,
        "timesteps": plan.timesteps,
        "n_envs": plan.n_envs,
        "fidelity": plan.env_kwargs.get("fidelity"),
        "device": args.device,
        "threads": torch.get_num_threads(),  # set by --threads, else torch's default
        "normalize": bool(plan.hyperparams.get("normalize", False)),
        "model": f"{scenario_name}.zip",
        "versions": _versions(),
        "command": " ".join(sys.argv) if sys.argv and Path(sys.argv[0]).name == "cmai" else None,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
    }


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the model so far is saved in :attr:`run_dir` (status ``interrupted``)."""

    def __init__(self, run_dir: Path, timesteps: int) -> None:
        super().__init__(f"training interrupted after {timesteps} steps; model saved in {run_dir}")
        self.run_dir = run_dir
        self.timesteps = timesteps


def train(args: TrainArgs, run_dir: Path | None = None) -> Path:
    """Train a gating policy (or resume one, ``args.resume``) and return its run folder (layout in the module docstring)."""
    result = run_training(args, run_dir)
    result.env.close()
    return result.run_dir
