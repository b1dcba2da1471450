"""``CMAIVectorEnv``: N CMAI environments stepped as one batched torch computation.

    import gymnasium, cmai_env
    envs = gymnasium.make_vec("cmai_env/CMAI-v0", num_envs=64, vectorization_mode="vector_entry_point",
                              scenario="abrupt_shift", fidelity="embedding")
    obs, infos = envs.reset(seed=0)                     # env i is seeded 0 + i
    obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())

Each of the N environments is a full :class:`cmai_env.env.CMAIEnv` of the embedding fidelity:
its own defended adapters and AdamW state, its own ``np_random`` (seeded per environment by
``reset(seed=...)``), attack schedule position, detector threshold, change detector and
latency tracker. The model side of every round (crafting the incoming traffic, observing it,
the trainer update and the probe) runs for all environments at once on stacked parameters
(:class:`cmai_env.fidelity.stacked.StackedEmbeddingWorld`, the same code the single
environment runs with one), so a step costs little more than one environment's round; each
environment's round then ends in :func:`cmai_env.round_outcome.finish_round`, as a single
environment's does (detector recalibration, system metrics, reward, ``info``), and
``tests/test_vector_env.py`` checks that N batched environments and N single ones with the same
seeds and actions return the same observations, rewards and infos.

Gymnasium vector API: observations ``(N, 68)``, rewards / terminations / truncations ``(N,)``,
``info`` batched with ``_key`` masks (:func:`batch_infos`; :func:`unbatch_info` gives one
environment's dict back), next-step autoreset by default (an environment whose episode ended
is reset by the following ``step``, which returns its first observation with reward 0), and
``autoreset_mode="disabled"`` with ``reset(options={"reset_mask": mask})`` for callers that
reset themselves (the SB3 adapter :mod:`agents.vec_adapter` does). Pixel fidelity has no
batched form: :func:`make_vector_env` (the registered vector entry point) returns gymnasium's
``AsyncVectorEnv`` of single environments for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv

from cmai_env.consistency import ConsistencyDetector
from cmai_env.env import ACTION_SCALE, DISCRETE_BETAS, FLAG_RATE_FACTOR, CMAIEnv, _now_ms, _quiet_plan, resolve_scenario
from cmai_env.fidelity.stacked import StackedEmbeddingWorld, StackedTraffic
from cmai_env.latency import LatencyTracker
from cmai_env.observation import OBS_BOUND, OBS_SIZE, TRAFFIC_WIDTH, PreviousRound, assemble_observations, episode_clock, fixed_projection, memory_features, traffic_features
from cmai_env.resources import check_memory
from cmai_env.round import feed_change_detector
from cmai_env.round_outcome import finish_round
from cmai_env.scenario import Scenario, load_scenario
from cmai_env.stream import AttackStream, RoundPlan

AUTORESET_MODES = {"next_step": AutoresetMode.NEXT_STEP, "disabled": AutoresetMode.DISABLED}


def make_vector_env(num_envs: int, scenario: str | Path | Scenario = "quickstart", fidelity: str | None = None, **kwargs: Any) -> VectorEnv:
    """The registered ``vector_entry_point``: batched for the embedding fidelity, async processes for pixel.

    Pixel rounds are dominated by backbone forward/backward passes, which a process per
    environment can run on separate cores; the embedding fidelity is batched in one process.
    """
    base = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    resolved = fidelity if fidelity is not None else base.fidelity
    if resolved == "pixel":
        if isinstance(num_envs, bool) or int(num_envs) != num_envs or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        num_envs = int(num_envs)
        autoreset_mode = kwargs.pop("autoreset_mode", "next_step")
        if autoreset_mode not in AUTORESET_MODES:
            raise ValueError(f"autoreset_mode must be one of {sorted(AUTORESET_MODES)}, got {autoreset_mode!r}")
        check_memory(base, num_envs, "pixel", processes=num_envs > 1)  # a process of ~1 GB per environment
        env_kwargs = {"scenario": scenario, "fidelity": fidelity, **kwargs}
        fns = [lambda: CMAIEnv(**env_kwargs) for _ in range(num_envs)]
        vector = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
        return vector(fns, autoreset_mode=AUTORESET_MODES[autoreset_mode])
    return CMAIVectorEnv(num_envs, scenario, fidelity=fidelity, **kwargs)


@dataclass
class _Slot:
    """One environment's bookkeeping (everything but the model, which is stacked)."""

    stream: AttackStream
    detector: ConsistencyDetector
    latency: LatencyTracker
    rng: np.random.Generator | None = None
    change_detector: Any = None
    t: int = 0
    previous: PreviousRound = field(default_factory=PreviousRound)
    last_drift: int | None = None
    drift: bool = False
    plan: RoundPlan | None = None
    flags: np.ndarray | None = None
    started: bool = False
    needs_reset: bool = False


class CMAIVectorEnv(VectorEnv):
    """N embedding-fidelity CMAI environments in one batched computation (module docstring).

    :param num_envs: N.
    :param scenario: a shipped name, a YAML path or a :class:`Scenario` (shared by all N).
    :param fidelity: ``embedding`` (or ``None`` when the scenario says so); ``pixel`` is refused
        here (use :func:`make_vector_env`).
    :param action_mode: ``continuous`` (``Box(-1, 1, (N, 3))``) or ``discrete`` (``MultiDiscrete``).
    :param device: torch device of the stacked model.
    :param autoreset_mode: ``next_step`` (Gymnasium's default) or ``disabled``.
    :param allow_evaluation_only: needed for evaluation-only scenarios.
    :param overrides: scenario overrides, as for :class:`CMAIEnv`.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        scenario: str | Path | Scenario = "quickstart",
        fidelity: str | None = None,
        action_mode: str = "continuous",
        device: str = "cpu",
        autoreset_mode: str = "next_step",
        allow_evaluation_only: bool = False,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        if int(num_envs) != num_envs or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.scenario = resolve_scenario(scenario, fidelity, overrides, allow_evaluation_only)
        if self.scenario.fidelity != "embedding":
            raise ValueError(
                f"CMAIVectorEnv batches the embedding fidelity only, got fidelity={self.scenario.fidelity!r}; "
                "use cmai_env.vector_env.make_vector_env (async processes) for pixel"
            )
        if action_mode not in ("continuous", "discrete"):
            raise ValueError(f"action_mode must be 'continuous' or 'discrete', got {action_mode!r}")
        if autoreset_mode not in AUTORESET_MODES:
            raise ValueError(f"autoreset_mode must be one of {sorted(AUTORESET_MODES)}, got {autoreset_mode!r}")
        if render_mode is not None:
            raise ValueError(f"CMAIVectorEnv does not render (render_mode must be None, got {render_mode!r}); render a single CMAIEnv")
        check_memory(self.scenario, int(num_envs), "embedding", device=device)  # refused here, not killed for memory later
        self.num_envs = int(num_envs)
        self.action_mode = action_mode
        self.device = device
        self.render_mode = None
        self.metadata = {**self.metadata, "autoreset_mode": AUTORESET_MODES[autoreset_mode]}
        self.single_action_space = (
            spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32) if action_mode == "continuous" else spaces.Discrete(len(DISCRETE_BETAS))
        )
        self.single_observation_space = spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(OBS_SIZE,), dtype=np.float32)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)

        self.world = StackedEmbeddingWorld(self.scenario, self.num_envs, device)
        self.projection = fixed_projection(self.world.embed_dim).to(device)
        detector_spec = self.scenario.detector
        threshold = detector_spec.flag_rate_threshold
        self.flag_rate_threshold = threshold if threshold is not None else FLAG_RATE_FACTOR * detector_spec.target_fpr
        self.slots = [
            _Slot(
                AttackStream(self.scenario, np.random.default_rng(0)),
                ConsistencyDetector(detector_spec.target_fpr),
                LatencyTracker(self.flag_rate_threshold, self.scenario.asr_target),
            )
            for _ in range(self.num_envs)
        ]
        # The undefended model's clean probe scores: every reset calibrates τ on them.
        self._initial_clean = self.world.probe(torch.tensor([0], device=self.world.device), [_quiet_plan()]).clean_consistency[0]
        self._traffic: StackedTraffic | None = None
        self._features = np.zeros((self.num_envs, TRAFFIC_WIDTH), dtype=np.float32)  # the observation's traffic part
        self.last_timing: dict[str, float] = {}
        self.closed = False

    def timelines(self) -> list[list[tuple[int, int, str]]]:
        """Each environment's phase timeline for its current episode: ``(start, end, phase name)`` segments.

        A random schedule draws a new timeline at every reset, so an analysis that plays a β per
        phase (``benchmarks/adaptivity_gap.py``) reads each environment's here after ``reset``.
        """
        return [slot.stream.timeline for slot in self.slots]

    # ------------------------------------------------------------------ actions
    def betas_for(self, actions: Any) -> np.ndarray:
        """Validate a batch of actions and turn it into (N, 3) loss weights β (as :meth:`CMAIEnv.betas_for`)."""
        n = self.num_envs
        if self.action_mode == "discrete":
            arr = np.asarray(actions)
            if arr.shape not in ((n,), (n, 1)) or not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0)):
                raise ValueError(f"discrete actions must be {n} integers in [0, {len(DISCRETE_BETAS)}), got {actions!r}")
            index = arr.reshape(n).astype(np.int64)
            if index.min() < 0 or index.max() >= len(DISCRETE_BETAS):
                raise ValueError(f"discrete actions must be in [0, {len(DISCRETE_BETAS)}), got {index.tolist()}")
            return DISCRETE_BETAS[index].copy()
        arr = np.asarray(actions, dtype=np.float64)
        if arr.shape != (n, 3):
            raise ValueError(f"actions must have shape ({n}, 3) = [β_task, β_consist, β_adv] logits in [-1, 1] per env, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            bad = np.flatnonzero(~np.isfinite(arr).all(1))
            raise ValueError(f"actions must be finite, got {arr[bad].tolist()} for env(s) {bad.tolist()}")
        logits = ACTION_SCALE * np.clip(arr, -1.0, 1.0)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return weights / weights.sum(axis=1, keepdims=True)

    # ------------------------------------------------------------------ gym vector API
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict | None = None):
        """Reset every environment (or those in ``options["reset_mask"]``); ``seed``: int (env i gets
        ``seed + i``), a list of per-environment seeds, or ``None`` (keep each generator)."""
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset(seed=...) needs one seed per environment ({self.num_envs}), got {len(seeds)}")
        mask = np.ones(self.num_envs, dtype=bool)
        if options and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), got shape {mask.shape}")
        if self._traffic is None and not mask.all():
            raise RuntimeError("the first reset() must reset every environment")
        envs = np.flatnonzero(mask)
        infos = self._reset_envs(envs, [seeds[i] for i in envs])
        full: list[dict | None] = [None] * self.num_envs
        for i, info in zip(envs, infos):
            full[i] = info
        return self._observations(), batch_infos(full, self.num_envs)

    def step(self, actions):
        obs, rewards, terminated, truncated, infos = self.step_list(actions)
        return obs, rewards, terminated, truncated, batch_infos(infos, self.num_envs)

    def close_extras(self, **kwargs: Any) -> None:
        self._traffic = None

    # ------------------------------------------------------------------ the batched round
    def step_list(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """:meth:`step` with the infos as one dict per environment (what SB3 wants; no batching cost)."""
        if self._traffic is None:
            raise RuntimeError("call reset() before step()")
        start = _now_ms()
        betas = self.betas_for(actions)
        n = self.num_envs
        resetting = np.array([slot.needs_reset for slot in self.slots])
        ended = [i for i, slot in enumerate(self.slots) if not slot.needs_reset and slot.t >= len(slot.stream)]
        if ended:
            raise RuntimeError(f"env(s) {ended} ended their episode and autoreset is disabled; call reset(options={{'reset_mask': ...}})")
        stepping = np.flatnonzero(~resetting)
        rewards = np.zeros(n, dtype=np.float64)
        truncated = np.zeros(n, dtype=bool)
        infos: list[dict] = [{} for _ in range(n)]
        timing = {"update_ms": 0.0, "probe_ms": 0.0}
        if len(stepping):
            envs = None if len(stepping) == n else torch.as_tensor(stepping, device=self.world.device)
            traffic = self._traffic if envs is None else _subset(self._traffic, envs, stepping)
            for i in stepping:
                self.slots[i].latency.action_received(self.slots[i].t, start, betas[i])
            update = self.world.update(envs, traffic, betas[stepping], np.stack([self.slots[i].flags for i in stepping]))
            probe = self.world.probe(envs, [self.slots[i].plan for i in stepping])
            timing.update(update_ms=update.update_ms + update.attack_ms, probe_ms=probe.probe_ms)
            for k, i in enumerate(stepping):
                rewards[i], infos[i] = self._finish_round(i, k, betas[i], update, probe, traffic.attack_index[k])
                truncated[i] = self.slots[i].t >= len(self.slots[i].stream)
        resets = np.flatnonzero(resetting)
        if len(resets):
            self._reset_envs(resets, [None] * len(resets), draw=False)
        draw = np.sort(np.concatenate([stepping[~truncated[stepping]], resets])).astype(np.int64)
        if len(draw):
            self._draw_traffic(draw)
        for i in resets:
            infos[i] = self._reset_info(i)
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            for i in np.flatnonzero(truncated):
                self.slots[i].needs_reset = True
        self.last_timing = {**timing, "round_ms": _now_ms() - start}
        return self._observations(), rewards, np.zeros(n, dtype=bool), truncated, infos

    def _finish_round(self, i: int, k: int, betas: np.ndarray, update, probe, attack_index: np.ndarray) -> tuple[float, dict]:
        """Env ``i``'s reward, info and bookkeeping after the batched update and probe (``k``: its row)."""
        slot = self.slots[i]
        reward, info, slot.previous = finish_round(
            slot.t, slot.plan, betas, slot.flags, attack_index >= 0, update.row(k, self.scenario.defense.attack_steps), probe.row(k),
            slot.detector, slot.latency, self.scenario.reward, slot.drift, _now_ms(),
        )
        slot.t += 1
        return reward, info

    def _reset_info(self, i: int) -> dict:
        plan = self.slots[i].plan
        return {"round": 0, "phase": plan.phase, "attacks": [e.name for e in plan.mixture]}

    def _reset_envs(self, envs: np.ndarray, seeds: Sequence[int | None], draw: bool = True) -> list[dict]:
        """:meth:`CMAIEnv.reset` for ``envs``: model, schedule, trackers, τ, and (``draw``) round 0's traffic."""
        self.world.reset(None if len(envs) == self.num_envs else torch.as_tensor(envs, device=self.world.device))
        for i, seed in zip(envs, seeds):
            slot = self.slots[i]
            if seed is not None or slot.rng is None:
                slot.rng, _ = seeding.np_random(seed)
            slot.stream.reset(slot.rng)
            slot.latency.reset()
            slot.t, slot.previous, slot.last_drift, slot.drift = 0, PreviousRound(), None, False
            slot.change_detector = CMAIEnv._make_change_detector(self)  # reads only self.scenario
            slot.detector.calibrate(self._initial_clean)
            slot.started, slot.needs_reset = True, False
        if not draw:
            return []
        self._draw_traffic(np.asarray(envs, dtype=np.int64))
        return [self._reset_info(i) for i in envs]

    def _draw_traffic(self, envs: np.ndarray) -> None:
        """Round ``t``'s traffic, hidden states and flags for ``envs`` (:meth:`CMAIEnv._observe_round`)."""
        slots = [self.slots[i] for i in envs]
        now = _now_ms()
        for slot in slots:
            slot.plan = slot.stream.plan(slot.t)
            plan = slot.plan
            slot.latency.traffic_started(slot.t, now, plan.shift, plan.phase, bool(plan.mixture) and plan.adversarial_share > 0)
        all_envs = len(envs) == self.num_envs
        index = None if all_envs else torch.as_tensor(envs, device=self.world.device)
        traffic = self.world.incoming(index, [s.plan for s in slots], [s.rng for s in slots])
        stats = self.world.observe(index, traffic.adv_v, traffic.adv_t)
        if all_envs or self._traffic is None:
            self._traffic = traffic
        else:
            _write_rows(self._traffic, traffic, index, envs)
        self._features[envs] = traffic_features(self.projection, stats.image_embeds, stats.text_embeds, stats.consistency, stats.cosine)
        scores = stats.consistency.detach().cpu().numpy()
        now = _now_ms()
        for k, slot in enumerate(slots):
            slot.flags = slot.detector.flags(scores[k])
            drift = feed_change_detector(slot.change_detector, slot.flags)
            if drift:
                slot.last_drift = slot.t
            slot.drift = drift
            slot.latency.traffic_observed(slot.t, now, float(slot.flags.mean()), drift, np.asarray(slot.previous.betas))

    def _observations(self) -> np.ndarray:
        """(N, 68) observations (:func:`cmai_env.observation.build_observation`'s layout)."""
        memory = np.empty((self.num_envs, OBS_SIZE - TRAFFIC_WIDTH), dtype=np.float64)
        for i, slot in enumerate(self.slots):
            since, progress = episode_clock(slot.t, len(slot.stream), slot.last_drift)
            memory[i] = memory_features(float(slot.flags.mean()), slot.drift, since, slot.previous, progress)
        return assemble_observations(self._features, memory)


# ---------------------------------------------------------------------------- infos
def batch_infos(infos: Sequence[dict | None], num_envs: int) -> dict[str, Any]:
    """Gymnasium's batched ``info``: per key an array over environments and a ``_key`` mask.

    Same layout as ``VectorEnv._add_info`` (nested dicts are batched recursively; ints, floats,
    bools and numpy scalars become typed arrays, numpy arrays are stacked, anything else goes into
    an object array), built column by column; a key whose environments disagree on the type
    (``None`` in one, a float in another) becomes an object array rather than failing.
    """
    out: dict[str, Any] = {}
    keys: dict[str, None] = {}
    for info in infos:
        if info:
            keys.update(dict.fromkeys(info))
    for key in keys:
        present = [i for i, info in enumerate(infos) if info and key in info]
        values = [infos[i][key] for i in present]
        mask = np.zeros(num_envs, dtype=np.bool_)
        mask[present] = True
        if all(isinstance(v, dict) for v in values):
            nested: list[dict | None] = [None] * num_envs
            for i, v in zip(present, values):
                nested[i] = v
            out[key] = batch_infos(nested, num_envs)
        else:
            out[key] = _column(values, present, num_envs)
        out[f"_{key}"] = mask
    return out


def _column(values: list, present: list[int], num_envs: int) -> np.ndarray:
    kinds = {type(v) for v in values}
    if len(kinds) == 1:
        kind = next(iter(kinds))
        if kind in (int, float, bool) or issubclass(kind, np.number):
            array = np.zeros(num_envs, dtype=kind)
            array[present] = values
            return array
        if kind is np.ndarray and len({(v.shape, v.dtype) for v in values}) == 1:
            array = np.zeros((num_envs, *values[0].shape), dtype=values[0].dtype)
            array[present] = values
            return array
    array = np.full(num_envs, None, dtype=object)
    for i, v in zip(present, values):
        array[i] = v
    return array


def unbatch_info(infos: dict[str, Any], index: int) -> dict[str, Any]:
    """Environment ``index``'s own ``info`` dict out of a batched one (inverse of :func:`batch_infos`)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_") or not infos.get(f"_{key}", np.zeros(index + 1, bool))[index]:
            continue
        if isinstance(value, dict):
            out[key] = unbatch_info(value, index)
        else:
            item = value[index]
            out[key] = item.item() if isinstance(item, np.generic) else item
    return out


# ---------------------------------------------------------------------------- helpers
def _subset(traffic: StackedTraffic, index: torch.Tensor, rows: np.ndarray) -> StackedTraffic:
    return StackedTraffic(
        traffic.raw_v[index], traffic.raw_t[index], traffic.adv_v[index], traffic.adv_t[index], traffic.labels[index],
        traffic.attack_index[rows], traffic.attack_ms,
        None if traffic.train_radii is None else tuple(radius[index] for radius in traffic.train_radii),
    )


def _write_rows(full: StackedTraffic, part: StackedTraffic, index: torch.Tensor, rows: np.ndarray) -> None:
    for name in ("raw_v", "raw_t", "adv_v", "adv_t", "labels"):
        getattr(full, name)[index] = getattr(part, name)
    full.attack_index[rows] = part.attack_index
    if full.train_radii is not None:
        for whole, radius in zip(full.train_radii, part.train_radii):
            whole[index] = radius


__all__ = ["AUTORESET_MODES", "CMAIVectorEnv", "batch_infos", "make_vector_env", "unbatch_info"]
