"""The gating network ``g`` as a Stable-Baselines3 policy, and the interface every agent speaks.

How ``g`` maps onto an SB3 policy
---------------------------------
The design's gating network reads the hidden-state observation ``h_t`` (the 68-d vector of
:mod:`cmai_env.observation`: projected image/text/gap embeddings, consistency statistics,
detector state, last round's metrics, weights and losses) and outputs the loss weights
``β = [β_task, β_consist, β_adv] = softmax(g(h_t))``. In SB3 terms::

    h_t ──► GatingExtractor ──────────► action head ──────────► a = g(h_t) ∈ R³   (gating logits)
            MLP, default [64, 64] tanh    Linear(64, 3)            env: β = softmax(3 · clip(a, −1, 1))
            (features_extractor_class)    (net_arch pi = [])

* **PPO / A2C** (``MlpPolicy``): ``a`` is the mean of the Gaussian action distribution; the
  deterministic action is ``g(h_t)`` itself. The value head shares the extractor
  (``net_arch = {"pi": [], "vf": [64]}``).
* **RecurrentPPO** (``MlpLstmPolicy``): ``h_t ──► GatingExtractor ──► LSTM ──► Linear``, so the
  gate can integrate the attack stream over rounds.
* **SAC / TD3**: the actor is ``tanh(Linear(GatingExtractor(h_t)))`` (SB3 squashes to the
  action box); the critics get their own extractor plus ``qf = [64, 64]`` layers over
  ``[features, a]``.
* **DQN** uses ``cmai_env/CMAI-Discrete-v0``: the Q-network is ``Linear(GatingExtractor(h_t))``
  with 10 outputs, one per weight vector of :data:`cmai_env.env.DISCRETE_BETAS`; the greedy
  action picks the grid β with the highest Q.

The hyperparameter files (``agents/hyperparams/<algo>.yml``) spell this as YAML-safe
``policy_kwargs``: ``gating: {hidden_sizes: [64, 64], activation: tanh}`` becomes
``features_extractor_class=GatingExtractor`` (see :func:`resolve_policy_kwargs`).

The shared interface
--------------------
Learned policies (:class:`SB3GatingPolicy`, loaded with :func:`load_policy`) and the fixed or
adaptive baselines (``agents/baselines.py``) implement :class:`GatingPolicy`, so evaluation code
drives all of them with the same loop::

    policy.reset()
    obs, info = env.reset(seed=seed)
    state, start = None, True
    while not done:
        action, state = policy.predict(obs, state, episode_start=np.array([start]))
        obs, reward, terminated, truncated, info = env.step(action)
        policy.observe(info)
        start, done = False, terminated or truncated
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
import torch
import yaml
from sb3_contrib import RecurrentPPO
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from cmai_env import CONTINUOUS_ENV_ID, DISCRETE_ENV_ID
from cmai_env.env import DISCRETE_BETAS, betas_from_action
from cmai_env.observation import OBS_SLICES

#: Algorithms ``cmai train`` knows, by their command-line name.
ALGOS: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "sac": SAC,
    "td3": TD3,
    "dqn": DQN,
    "recurrent_ppo": RecurrentPPO,
}
#: The environment each algorithm trains on: DQN needs the Discrete weight grid.
ENV_ID_FOR_ALGO: dict[str, str] = {algo: DISCRETE_ENV_ID if algo == "dqn" else CONTINUOUS_ENV_ID for algo in ALGOS}
#: Head layers after the gating extractor: ``pi: []`` makes the action head one Linear layer,
#: so the actor is exactly ``g``; critics get their own layers.
GATING_NET_ARCH: dict[str, Any] = {
    "ppo": {"pi": [], "vf": [64]},
    "a2c": {"pi": [], "vf": [64]},
    "recurrent_ppo": {"pi": [], "vf": [64]},
    "sac": {"pi": [], "qf": [64, 64]},
    "td3": {"pi": [], "qf": [64, 64]},
    "dqn": [],
}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def algo_class(algo: str) -> type[BaseAlgorithm]:
    """The SB3 / sb3-contrib class for a command-line algorithm name."""
    try:
        return ALGOS[algo]
    except KeyError:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}") from None


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


class GatingExtractor(BaseFeaturesExtractor):
    """The trunk of the gating network ``g``: an MLP over (selected fields of) the observation.

    ``features = act(W_k … act(W_1 · h_t[fields]))``; the policy's action head (one Linear layer
    with ``net_arch pi = []``) turns the features into the gating logits ``a``, and the
    environment applies ``β = softmax(3 · a)``.

    :param observation_space: the environment's ``Box`` observation space (68-d for ``-v0``).
    :param hidden_sizes: widths of the MLP's layers; the last one is ``features_dim``.
    :param activation: name of the non-linearity (``tanh``, ``relu``, ``elu``, ``leaky_relu``,
        ``gelu``, ``silu``).
    :param fields: observation fields to read, by their :data:`cmai_env.observation.OBS_SLICES`
        names (``None``: the whole vector), e.g. ``["consistency_mean", "flag_rate", "prev_asr"]``
        to gate on the detector statistics only.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        fields: Sequence[str] | None = None,
    ) -> None:
        hidden_sizes = [int(h) for h in hidden_sizes]
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got {hidden_sizes}")
        super().__init__(observation_space, features_dim=hidden_sizes[-1])
        n_inputs = int(np.prod(observation_space.shape))
        if fields is None:
            index = torch.arange(n_inputs)
        else:
            unknown = [f for f in fields if f not in OBS_SLICES]
            if unknown:
                raise ValueError(f"unknown observation field(s) {unknown}; known: {', '.join(OBS_SLICES)}")
            index = torch.cat([torch.arange(n_inputs)[OBS_SLICES[f]] for f in fields])
        self.register_buffer("index", index, persistent=False)
        act = _activation(activation)
        layers: list[nn.Module] = []
        width = len(index)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        self.mlp = nn.Sequential(*layers)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        flat = observations.reshape(observations.shape[0], -1)
        return self.mlp(flat.index_select(1, self.index))


def gating_policy_kwargs(algo: str, hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh") -> dict[str, Any]:
    """The YAML-form ``policy_kwargs`` that make ``algo``'s policy the gating network ``g``.

    These are what the shipped hyperparameter files contain; :func:`resolve_policy_kwargs` turns
    them into SB3 keyword arguments.
    """
    algo_class(algo)
    return {"gating": {"hidden_sizes": list(hidden_sizes), "activation": activation}, "net_arch": GATING_NET_ARCH[algo]}


def resolve_policy_kwargs(spec: dict[str, Any] | None) -> dict[str, Any]:
    """Turn YAML ``policy_kwargs`` into SB3 keyword arguments.

    * ``gating: {hidden_sizes, activation, fields}`` →
      ``features_extractor_class=GatingExtractor, features_extractor_kwargs={...}``
      (``gating: null`` keeps SB3's default ``FlattenExtractor``);
    * ``activation_fn: relu`` (a name) → ``torch.nn.ReLU``;
    * everything else (``net_arch``, ``log_std_init``, ``ortho_init``, ``lstm_hidden_size``, …)
      passes through unchanged.
    """
    spec = dict(spec or {})
    out: dict[str, Any] = {}
    gating = spec.pop("gating", None)
    if gating:
        if not isinstance(gating, dict):
            raise ValueError(f"policy_kwargs.gating must be a mapping like {{hidden_sizes: [64, 64], activation: tanh}}, got {gating!r}")
        unknown = set(gating) - {"hidden_sizes", "activation", "fields"}
        if unknown:
            raise ValueError(f"unknown policy_kwargs.gating key(s) {sorted(unknown)}; known: hidden_sizes, activation, fields")
        if "activation" in gating:
            _activation(gating["activation"])  # fail early, with the name
        out["features_extractor_class"] = GatingExtractor
        out["features_extractor_kwargs"] = dict(gating)
    if "activation_fn" in spec and isinstance(spec["activation_fn"], str):
        spec["activation_fn"] = _activation(spec["activation_fn"])
    out.update(spec)
    return out


# ---------------------------------------------------------------------------------- interface
@runtime_checkable
class GatingPolicy(Protocol):
    """What evaluation needs from any gating policy, learned or hand-written.

    ``predict`` follows SB3's signature: it returns the action (continuous gating logits in
    [-1, 1]³, or an index into ``DISCRETE_BETAS``) and the next recurrent state (``None`` for
    stateless policies).
    """

    name: str

    def reset(self) -> None:
        """Called at the start of every episode."""

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        """The action for ``observation``, and the next state."""

    def observe(self, info: dict) -> None:
        """Called after every ``env.step`` with its ``info`` (adaptive baselines read losses and metrics)."""


# ---------------------------------------------------------------------------------- run folders
RUN_FILE = "run.json"


@dataclass
class RunInfo:
    """What a training run folder records (``run.json``), with its paths resolved.

    :param run_dir: ``<out>/<algo>/<scenario>_<n>``.
    :param record: the parsed ``run.json``.
    """

    run_dir: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def algo(self) -> str:
        return self.record["algo"]

    @property
    def env_id(self) -> str:
        return self.record["env_id"]

    @property
    def scenario(self) -> str:
        return self.record["scenario"]["name"]

    @property
    def params_dir(self) -> Path:
        """``<run>/<scenario>/``: config.yml, args.yml, env_kwargs.yml, scenario.yml."""
        return self.run_dir / self.record["scenario"].get("params_dir", self.scenario)

    @property
    def scenario_file(self) -> Path:
        """The copy of the scenario file the run trained on."""
        return self.run_dir / self.record["scenario"]["file"]

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments (beyond ``scenario``) the training env was made with: fidelity + overrides."""
        path = self.params_dir / "env_kwargs.yml"
        return dict(yaml.safe_load(path.read_text()) or {}) if path.exists() else dict(self.record.get("env_kwargs", {}))

    def model_path(self, which: str = "final") -> Path:
        """``final`` (``<scenario>.zip``), ``best`` (``best_model.zip``) or a file name in the run."""
        if which == "final":
            return self.run_dir / self.record["model"]
        if which == "best":
            return self.run_dir / "best_model.zip"
        candidate = self.run_dir / which
        return candidate if candidate.exists() else self.run_dir / "checkpoints" / which

    def make_env(self, scenario: str | Path | None = None, **overrides: Any) -> gym.Env:
        """A fresh environment like the training one (same env ID, scenario copy and env kwargs)."""
        import cmai_env  # noqa: F401  (registers the IDs)

        kwargs = {**self.env_kwargs, **overrides}
        return gym.make(self.env_id, scenario=str(scenario if scenario is not None else self.scenario_file), **kwargs)


def read_run(run_dir: str | Path) -> RunInfo:
    """Parse ``run.json`` of a run folder written by ``cmai train``.

    :raises FileNotFoundError: no ``run.json``.
    :raises ValueError: ``run.json`` is damaged or lacks the fields a run needs (naming the file).
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cmai training run (no {RUN_FILE}); pass a run folder or a model .zip")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the run folder is damaged") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("algo", "env_id", "scenario", "model") if key not in record]
    if missing or not isinstance(record.get("scenario"), dict):
        raise ValueError(f"{path}: lacks {', '.join(missing) or 'scenario'}; the run folder is damaged")
    return RunInfo(run_dir=run_dir, record=record)


def _find_run(model_path: Path) -> RunInfo | None:
    """The run a model file belongs to (its folder, or the parent of ``checkpoints/``)."""
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / RUN_FILE).is_file():
            return read_run(folder)
    return None


#: Where each algorithm's policy classes live (PPO and A2C share SB3's common actor-critic policies).
_POLICY_MODULES: dict[str, str] = {
    "stable_baselines3.sac.": "sac",
    "stable_baselines3.td3.": "td3",
    "stable_baselines3.dqn.": "dqn",
    "sb3_contrib.common.recurrent.": "recurrent_ppo",
    "sb3_contrib.ppo_recurrent.": "recurrent_ppo",
}


def _algo_from_zip(model_path: Path) -> str:
    """Infer the algorithm of a standalone SB3 .zip from its JSON ``data`` entry (no unpickling)."""
    from agents.safe_load import read_model_data

    data = read_model_data(model_path)
    module = str(data.get("policy_class", {}).get("__module__", ""))
    for prefix, algo in _POLICY_MODULES.items():
        if module.startswith(prefix):
            return algo
    if module.startswith("stable_baselines3.common."):
        return "ppo" if "n_epochs" in data else "a2c"  # PPO's minibatch epochs; A2C has none
    raise ValueError(f"cannot tell which algorithm saved {model_path} (policy module {module!r}); pass its run folder")


def normalization_for(model_path: Path, run: RunInfo | None) -> Path | None:
    """The normalisation statistics (``.npz``) that go with a model file, if the run used them.

    :raises agents.safe_load.UnsafeFileError: only a legacy pickled ``.pkl`` exists.
    """
    from agents.safe_load import normalization_path

    if model_path.parent.name == "checkpoints":
        # Checkpoints: rl_model_<steps>_steps.zip ↔ rl_model_vecnormalize_<steps>_steps.npz
        stem = model_path.stem
        if stem.endswith("_steps"):
            head, _, steps = stem[: -len("_steps")].rpartition("_")
            found = normalization_path(model_path.parent, f"{head}_vecnormalize_{steps}_steps")
            if found is not None:
                return found
    folders = [model_path.parent] if run is None else [run.params_dir, run.run_dir]
    for folder in folders:
        found = normalization_path(folder)
        if found is not None:
            return found
    return None


def _check_hash(model_path: Path, run: RunInfo | None) -> None:
    """Compare a model file with the sha256 its run recorded when saving it (if it did)."""
    if run is None:
        return
    from agents.safe_load import file_sha256

    try:
        relative = model_path.resolve().relative_to(run.run_dir.resolve()).as_posix()
    except ValueError:
        return
    expected = (run.record.get("files") or {}).get(relative)
    if expected is not None and file_sha256(model_path) != expected:
        raise ValueError(f"{model_path}: its sha256 differs from the one {run.run_dir / RUN_FILE} recorded at save time; the file was modified")


class SB3GatingPolicy:
    """A trained SB3 / sb3-contrib model behind the :class:`GatingPolicy` interface.

    Observations pass through the run's VecNormalize statistics (if it used them) before the
    model sees them; recurrent models keep their LSTM state between calls (reset by
    :meth:`reset`) unless the caller passes ``state`` explicitly. ``observe`` does nothing: the
    policy reads everything it needs from the observation.

    :param model: the loaded algorithm.
    :param algo: its command-line name (``ppo``, ``sac``, …).
    :param env_id: the environment ID it acts in (``CMAI-Discrete-v0`` for DQN).
    :param obs_normalizer: statistics whose ``normalize_obs`` is applied (an
        :class:`agents.safe_load.NormalizationStats` or a ``VecNormalize``), or ``None``.
    :param name: label used in reports (default ``<algo>:<run folder>``).
    :param run: the run folder's record, when loaded from one.
    """

    def __init__(
        self,
        model: BaseAlgorithm,
        algo: str,
        env_id: str,
        obs_normalizer: Any | None = None,
        name: str | None = None,
        run: RunInfo | None = None,
    ) -> None:
        self.model = model
        self.algo = algo
        self.env_id = env_id
        self.obs_normalizer = obs_normalizer
        self.run = run
        self.name = name or algo
        self.recurrent = isinstance(model, RecurrentPPO)
        self.discrete = isinstance(model.action_space, gym.spaces.Discrete)
        self._state: Any = None
        self._episode_start = True

    def reset(self) -> None:
        self._state = None
        self._episode_start = True

    def normalize(self, observation: np.ndarray) -> np.ndarray:
        """The observation as the model saw it during training."""
        obs = np.asarray(observation, dtype=np.float32)
        if self.obs_normalizer is None:
            return obs
        return np.asarray(self.obs_normalizer.normalize_obs(obs), dtype=np.float32)

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        obs = self.normalize(observation)
        if not self.recurrent:
            action, _ = self.model.predict(obs, deterministic=deterministic)
            return action, None
        n = 1 if obs.ndim == 1 else obs.shape[0]
        if state is None:
            state = self._state
        if episode_start is None:
            episode_start = np.full(n, self._episode_start, dtype=bool)
        action, next_state = self.model.predict(obs, state=state, episode_start=np.asarray(episode_start), deterministic=deterministic)
        self._state, self._episode_start = next_state, False
        return action, next_state

    def observe(self, info: dict) -> None:
        return None

    def __deepcopy__(self, memo: dict) -> "SB3GatingPolicy":
        """A copy for another environment (batched evaluation makes one per seed): it shares the
        model and the normalisation statistics, which acting only reads, and starts its own
        recurrent state. Copying the model itself would fail for gSDE policies, whose exploration
        matrix is a non-leaf tensor that ``copy.deepcopy`` refuses."""
        twin = copy.copy(self)
        twin.reset()
        memo[id(self)] = twin
        return twin

    def betas(self, action: np.ndarray) -> np.ndarray:
        """β = [β_task, β_consist, β_adv] that the environment derives from ``action``."""
        if self.discrete:
            return DISCRETE_BETAS[int(np.asarray(action).reshape(-1)[0])].copy()
        return betas_from_action(np.asarray(action).reshape(-1))

    def __repr__(self) -> str:
        return f"SB3GatingPolicy(name={self.name!r}, algo={self.algo!r}, env_id={self.env_id!r}, normalized={self.obs_normalizer is not None})"


def _model_settings(model_path: Path, run: RunInfo | None) -> tuple[str, str, dict[str, Any]]:
    """(algo, env ID, hyperparameters) of a model: from its run folder, else its ``cmai.json`` entry."""
    from agents.safe_load import UnsafeFileError, read_model_metadata

    if run is not None:
        from agents.train import load_yaml_mapping

        hyperparams = load_yaml_mapping(run.params_dir / "config.yml", f"the run's hyperparameters, needed to load {model_path.name}")
        return run.algo, run.env_id, hyperparams
    meta = read_model_metadata(model_path)
    if meta is None:
        _algo_from_zip(model_path)  # a clear error for files that are no SB3 archive at all
        raise UnsafeFileError(
            f"{model_path}: a model archive outside a cmai run folder and without CMAI's cmai.json entry; "
            "loading it would mean unpickling its settings, which can run code. Pass its run folder instead."
        )
    return str(meta["algo"]), str(meta["env_id"]), dict(meta["hyperparams"])


def load_policy(run_dir_or_model_path: str | Path, which: str = "final", device: str = "cpu") -> SB3GatingPolicy:
    """Load a trained gating policy without unpickling anything (see :mod:`agents.safe_load`).

    :param run_dir_or_model_path: a run folder written by ``cmai train``
        (``<out>/<algo>/<scenario>_<n>``) or a model ``.zip`` (inside a run, its
        ``checkpoints/``, or standalone: its ``cmai.json`` entry then gives the algorithm and
        hyperparameters).
    :param which: for a run folder, ``final`` (``<scenario>.zip``), ``best`` (``best_model.zip``)
        or a checkpoint file name.
    :param device: torch device for the network.
    :return: the policy; ``policy.env_id`` says which environment ID it acts in.
    :raises FileNotFoundError: no such run or model file (a failed or interrupted run says so).
    :raises ValueError: a damaged file, or one that could only be loaded by unpickling it.
    """
    from agents.safe_load import load_model, load_normalization

    path = Path(run_dir_or_model_path)
    if path.is_dir():
        run: RunInfo | None = read_run(path)
        model_path = run.model_path(which)
    elif path.is_file() or path.with_suffix(".zip").is_file():
        model_path = path if path.is_file() else path.with_suffix(".zip")
        run = _find_run(model_path)
    else:
        raise FileNotFoundError(f"no run folder or model file at {path}")
    if not model_path.is_file():
        status = run.record.get("status") if run is not None else None
        if status in ("failed", "running"):
            raise FileNotFoundError(
                f"model file not found: {model_path}: run {run.run_dir} is {status!r} "
                f"({'it stopped with an error' if status == 'failed' else 'still training, or killed before it could save'}); "
                f"resume it with cmai train --resume {run.run_dir}"
            )
        raise FileNotFoundError(f"model file not found: {model_path}")
    _check_hash(model_path, run)
    algo, env_id, hyperparams = _model_settings(model_path, run)
    model = load_model(model_path, algo, env_id, hyperparams, device=device)
    stats_path = normalization_for(model_path, run)
    normalizer = None if stats_path is None else load_normalization(stats_path)
    label = f"{algo}:{run.run_dir.name}" if run is not None else f"{algo}:{model_path.stem}"
    if run is not None and run.record.get("status") == "interrupted":
        label += " (interrupted)"
    return SB3GatingPolicy(model, algo, env_id, obs_normalizer=normalizer, name=label, run=run)
