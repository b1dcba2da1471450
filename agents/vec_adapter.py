"""SB3 ``VecEnv`` over the batched :class:`cmai_env.vector_env.CMAIVectorEnv`.

Stable-Baselines3 speaks its own vector API (``step_async``/``step_wait``, a list of info dicts,
same-step reset with ``info["terminal_observation"]``); gymnasium's vector API batches infos and
resets on the next step. :class:`CMAIVecEnvAdapter` translates: it runs the batched env with
autoreset disabled, takes the per-environment info dicts directly (no batching and unbatching),
and resets the environments whose episode ended in the same call, as ``DummyVecEnv`` does. So
``cmai train --n-envs N`` trains every SB3 / sb3-contrib algorithm on N environments that cost
one batched computation per step.

    venv = make_batched_vec_env("cmai_env/CMAI-v0", {"scenario": "abrupt_shift", "fidelity": "embedding"}, n_envs=64, seed=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from stable_baselines3.common.monitor import ResultsWriter
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from cmai_env import ENV_IDS
from cmai_env.vector_env import CMAIVectorEnv, unbatch_info

#: Keyword arguments of ``gymnasium.make`` for each registered ID that the batched env also needs.
_ID_KWARGS = {env_id: {k: v for k, v in defaults.items() if k != "scenario"} for env_id, defaults in ENV_IDS.items()}


class CMAIVecEnvAdapter(VecEnv):
    """A :class:`CMAIVectorEnv` (``autoreset_mode="disabled"``) behind SB3's ``VecEnv`` interface.

    :param venv: the batched environment; its environments are SB3's environments, in order.
    """

    def __init__(self, venv: CMAIVectorEnv) -> None:
        from gymnasium.vector import AutoresetMode

        if venv.metadata["autoreset_mode"] != AutoresetMode.DISABLED:
            raise ValueError("CMAIVecEnvAdapter needs CMAIVectorEnv(..., autoreset_mode='disabled'): it resets finished envs itself")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        obs, infos = self.venv.reset(seed=list(self._seeds), options=None)
        self.reset_infos = [unbatch_info(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, infos = self.venv.step_list(self._actions)
        dones = terminated | truncated
        for i, info in enumerate(infos):
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        if dones.any():
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = obs[i].copy()
            obs, reset_infos = self.venv.reset(options={"reset_mask": dones})
            for i in np.flatnonzero(dones):
                self.reset_infos[i] = unbatch_info(reset_infos, i)
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    # The N environments share one object; per-environment attribute access reads it.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)  # once: the envs share one object
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def batched_supported(env_id: str, env_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``env_id`` with these kwargs runs batched (the embedding fidelity of a CMAI ID)."""
    if env_id not in _ID_KWARGS:
        return False
    from cmai_env.scenario import load_scenario

    fidelity = env_kwargs.get("fidelity")
    if fidelity is None:
        scenario = env_kwargs.get("scenario", "quickstart")
        fidelity = scenario.fidelity if hasattr(scenario, "fidelity") else load_scenario(str(scenario)).fidelity
    return fidelity == "embedding"


def make_batched_vec_env(
    env_id: str,
    env_kwargs: Mapping[str, Any],
    n_envs: int,
    seed: int,
    monitor_dir: Path | str | None = None,
    append_monitor: bool = False,
) -> VecEnv:
    """SB3 ``VecEnv`` of ``n_envs`` batched CMAI environments (env ``i`` seeded ``seed + i``),
    monitored like ``make_vec_env``'s: ``info["episode"]`` at episode ends and, with
    ``monitor_dir``, one ``0.monitor.csv`` for all of them (appended to with ``append_monitor``)."""
    kwargs = {**_ID_KWARGS[env_id], **dict(env_kwargs), "autoreset_mode": "disabled"}
    venv = CMAIVecEnvAdapter(CMAIVectorEnv(n_envs, **kwargs))
    venv.seed(seed)
    monitored = VecMonitor(venv)
    if monitor_dir is not None:
        header = {"t_start": monitored.t_start, "env_id": env_id}
        monitored.results_writer = ResultsWriter(str(Path(monitor_dir) / "0"), header=header, override_existing=not append_monitor)
    return monitored


__all__ = ["CMAIVecEnvAdapter", "batched_supported", "make_batched_vec_env"]

