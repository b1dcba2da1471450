"""Load trained models and normalisation statistics without unpickling anything from disk.

A Stable-Baselines3 archive (``.zip``) stores its network weights as ``.pth`` entries (read by
SB3 with ``torch.load(weights_only=True)``, which runs no code) and its class parameters in a JSON
``data`` entry, where every value JSON cannot hold (the policy class, the spaces, schedules,
``policy_kwargs`` with classes in them, buffers) is a base64 cloudpickle. ``BaseAlgorithm.load``
unpickles those, so a crafted archive runs code when loaded. SB3's own escape hatch is
``custom_objects``: a key given there is never deserialised. :func:`load_model` rebuilds every
pickled entry from what CMAI knows independently of the archive (the algorithm, the run's
``config.yml`` hyperparameters, the environment's spaces) and refuses an archive with a pickled
entry it cannot rebuild, naming the file and the key. Nothing in the archive is unpickled.

``VecNormalize`` statistics are saved by SB3 as a pickle (``vecnormalize.pkl``); CMAI saves them
as ``vecnormalize.npz`` (:func:`save_normalization`, read with ``allow_pickle=False``). A
``.pkl`` from an older run is never loaded: :func:`normalization_path` says how to convert it.

Every model file CMAI writes also carries a ``cmai.json`` entry (:func:`write_model_metadata`:
algorithm, env ID, hyperparameters), so a model copied out of its run folder still loads safely.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import pickle
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecNormalize

#: SB3's marker of a cloudpickled value in an archive's ``data`` entry.
SERIALIZED = ":serialized:"
#: Name of CMAI's metadata entry inside model archives.
METADATA_ENTRY = "cmai.json"
#: Pickled runtime state that a loaded model rebuilds itself (``_setup_model`` or the next
#: ``learn()``): replaced by these values instead of being unpickled.
RUNTIME_STATE: dict[str, Callable[[], Any]] = {
    "ep_info_buffer": lambda: deque(maxlen=100),
    "ep_success_buffer": lambda: deque(maxlen=100),
    "_last_obs": lambda: None,
    "_last_episode_starts": lambda: None,
    "_last_original_obs": lambda: None,
    "_last_lstm_states": lambda: None,
    "lr_schedule": lambda: None,
    "exploration_schedule": lambda: None,
}
NORMALIZATION_FILE = "vecnormalize.npz"


class UnsafeFileError(ValueError):
    """A file would need unpickling (running code) to load; CMAI refuses it."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ archives
def read_model_data(path: str | Path) -> dict[str, Any]:
    """The archive's ``data`` entry as plain JSON (pickled values stay base64 text).

    :raises ValueError: not a zip archive, no ``data`` entry, or invalid JSON (naming the file).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("data")
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a Stable-Baselines3 model archive (not a zip file)") from None
    except KeyError:
        raise ValueError(f"{path}: not a Stable-Baselines3 model archive (no 'data' entry)") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: the archive's 'data' entry is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the archive's 'data' entry is not a JSON object")
    return data


def read_model_metadata(path: str | Path) -> dict[str, Any] | None:
    """CMAI's ``cmai.json`` entry of a model archive, or ``None`` if it has none."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY not in archive.namelist():
                return None
            meta = json.loads(archive.read(METADATA_ENTRY))
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a Stable-Baselines3 model archive (not a zip file)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: the archive's {METADATA_ENTRY} entry is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not {"algo", "env_id", "hyperparams"} <= set(meta):
        raise ValueError(f"{path}: the archive's {METADATA_ENTRY} entry lacks algo, env_id or hyperparams")
    return meta


def write_model_metadata(path: str | Path, algo: str, env_id: str, hyperparams: Mapping[str, Any]) -> None:
    """Add (or replace) the ``cmai.json`` entry of a model archive SB3 just saved."""
    path = Path(path)
    entry = json.dumps({"algo": algo, "env_id": env_id, "hyperparams": dict(hyperparams)}, default=str)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist() if info.filename != METADATA_ENTRY]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, content in entries:
            archive.writestr(info, content)
        archive.writestr(METADATA_ENTRY, entry)
    path.write_bytes(buffer.getvalue())


def _spaces(env_id: str):
    """The observation and action spaces of a CMAI env ID, without building the environment."""
    from gymnasium import spaces

    from cmai_env.env import DISCRETE_BETAS
    from cmai_env.observation import OBS_BOUND, OBS_SIZE

    observation = spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(OBS_SIZE,), dtype=np.float32)
    if env_id.endswith("CMAI-Discrete-v0"):
        return observation, spaces.Discrete(len(DISCRETE_BETAS))
    return observation, spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)


def rebuilt_objects(path: Path, algo: str, env_id: str, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
    """``custom_objects`` covering every pickled entry of the archive at ``path``.

    :raises UnsafeFileError: a pickled entry CMAI cannot rebuild (it would have to be unpickled).
    """
    from agents.policies import algo_class
    from agents.train import model_kwargs

    cls = algo_class(algo)
    observation_space, action_space = _spaces(env_id)
    policy_name, kwargs = model_kwargs(algo, hyperparams, int(np.prod(action_space.shape or (1,))))
    if policy_name not in cls.policy_aliases:
        raise ValueError(f"{path}: unknown policy {policy_name!r} for {algo}")
    custom: dict[str, Any] = {
        "policy_class": cls.policy_aliases[policy_name],
        "observation_space": observation_space,
        "action_space": action_space,
        **kwargs,
    }
    # Constructor arguments the run left at their defaults (SB3 pickles some after turning them
    # into schedules or classes: clip_range, train_freq, rollout_buffer_class, ...).
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    data = read_model_data(path)
    for key, value in data.items():
        if isinstance(value, dict) and SERIALIZED in value and key not in custom:
            if key in RUNTIME_STATE:
                custom[key] = RUNTIME_STATE[key]()
            elif key in defaults and key not in ("policy", "env"):
                custom[key] = defaults[key]
            else:
                raise UnsafeFileError(
                    f"{path}: the archive's data entry {key!r} is a pickled object that CMAI does not rebuild; "
                    "refusing to unpickle it (loading a file must not run code). Re-save the model with cmai train."
                )
    return custom


def load_model(
    path: str | Path,
    algo: str,
    env_id: str,
    hyperparams: Mapping[str, Any],
    device: str = "cpu",
    env: Any = None,
) -> "BaseAlgorithm":
    """Load an SB3 archive without unpickling: pickled entries are rebuilt (see the module docstring).

    :param path: the ``.zip``.
    :param algo: its algorithm (``ppo``, ``sac``, …).
    :param env_id: the CMAI env ID it acts in (fixes the spaces).
    :param hyperparams: the run's YAML-form hyperparameters (``config.yml`` or ``cmai.json``).
    :param device: torch device.
    :param env: an environment to continue training on (``None``: prediction only).
    :raises UnsafeFileError, ValueError: the archive cannot be loaded safely or is damaged.
    """
    from agents.policies import algo_class

    path = Path(path)
    custom = rebuilt_objects(path, algo, env_id, hyperparams)
    try:
        return algo_class(algo).load(path, env=env, device=device, custom_objects=custom)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # weights_only=True refuses anything but tensors; a damaged .pth entry ends up here.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: the model's weights cannot be loaded ({reason})") from None


# ------------------------------------------------------------------------------ normalisation
@dataclass
class NormalizationStats:
    """``VecNormalize``'s running statistics, as plain arrays (what ``vecnormalize.npz`` holds)."""

    obs_mean: np.ndarray
    obs_var: np.ndarray
    obs_count: float
    ret_mean: float
    ret_var: float
    ret_count: float
    clip_obs: float
    clip_reward: float
    epsilon: float
    gamma: float
    norm_obs: bool
    norm_reward: bool

    @classmethod
    def from_vecnormalize(cls, env: "VecNormalize") -> "NormalizationStats":
        return cls(
            obs_mean=np.asarray(env.obs_rms.mean, dtype=np.float64),
            obs_var=np.asarray(env.obs_rms.var, dtype=np.float64),
            obs_count=float(env.obs_rms.count),
            ret_mean=float(np.asarray(env.ret_rms.mean).reshape(-1)[0]),
            ret_var=float(np.asarray(env.ret_rms.var).reshape(-1)[0]),
            ret_count=float(env.ret_rms.count),
            clip_obs=float(env.clip_obs),
            clip_reward=float(env.clip_reward),
            epsilon=float(env.epsilon),
            gamma=float(env.gamma),
            norm_obs=bool(env.norm_obs),
            norm_reward=bool(env.norm_reward),
        )

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """``clip((obs − mean) / sqrt(var + ε), ±clip_obs)``, as ``VecNormalize.normalize_obs``."""
        if not self.norm_obs:
            return np.asarray(obs, dtype=np.float32)
        scaled = (np.asarray(obs, dtype=np.float64) - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon)
        return np.clip(scaled, -self.clip_obs, self.clip_obs).astype(np.float32)

    def apply_to(self, env: "VecNormalize") -> None:
        """Restore these statistics into a fresh ``VecNormalize`` (to continue training)."""
        env.obs_rms.mean[...] = self.obs_mean
        env.obs_rms.var[...] = self.obs_var
        env.obs_rms.count = self.obs_count
        env.ret_rms.mean = np.asarray(self.ret_mean)
        env.ret_rms.var = np.asarray(self.ret_var)
        env.ret_rms.count = self.ret_count


def save_normalization(env: "VecNormalize", path: str | Path) -> Path:
    """Write ``env``'s statistics to an ``.npz`` file (no pickles)."""
    path = Path(path)
    stats = NormalizationStats.from_vecnormalize(env)
    np.savez(path, **{k: np.asarray(v) for k, v in stats.__dict__.items()})
    return path


def load_normalization(path: str | Path) -> NormalizationStats:
    """Read statistics written by :func:`save_normalization` (``allow_pickle=False``).

    :raises ValueError: damaged file, missing field, or statistics of the wrong shape (naming the file).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            values = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: not a CMAI normalisation file ({exc})") from None
    fields = NormalizationStats.__dataclass_fields__
    missing = sorted(set(fields) - set(values))
    if missing:
        raise ValueError(f"{path}: normalisation file lacks {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        value = values[name]
        if name in ("obs_mean", "obs_var"):
            kwargs[name] = np.asarray(value, dtype=np.float64)
        elif name in ("norm_obs", "norm_reward"):
            kwargs[name] = bool(value)
        else:
            kwargs[name] = float(value)
    stats = NormalizationStats(**kwargs)
    if stats.obs_mean.shape != stats.obs_var.shape or not np.all(np.isfinite(stats.obs_var)) or np.any(stats.obs_var < 0):
        raise ValueError(f"{path}: obs_mean/obs_var have mismatched shapes or invalid variances")
    return stats


def normalization_path(folder: Path, stem: str = "vecnormalize") -> Path | None:
    """``<folder>/<stem>.npz`` if present; a legacy ``.pkl`` there raises with how to convert it.

    :raises UnsafeFileError: only a pickled ``<stem>.pkl`` exists (CMAI never unpickles it).
    """
    npz, pkl = folder / f"{stem}.npz", folder / f"{stem}.pkl"
    if npz.is_file():
        return npz
    if pkl.is_file():
        raise UnsafeFileError(
            f"{pkl}: normalisation statistics saved as a pickle by an older CMAI; loading a pickle can run code, "
            f"so CMAI does not. Convert it once with `python -m agents.convert_run {pkl}` (writes {npz.name}; "
            f"it reads only the classes such statistics are made of), or retrain the run."
        )
    return None
