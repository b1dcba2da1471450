"""``CMAIEnv``: attacker vs. defender as a Gymnasium environment."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from cmai_env.consistency import ConsistencyDetector
from cmai_env.fidelity.base import Fidelity, ProbeResult, RoundTraffic, TrafficStats, UpdateResult
from cmai_env.latency import LatencyTracker
from cmai_env.observation import OBS_BOUND, OBS_SIZE, PreviousRound, build_observation, episode_clock, fixed_projection
from cmai_env.round import feed_change_detector
from cmai_env.round_outcome import finish_round
from cmai_env.scenario import Scenario, apply_overrides, load_scenario
from cmai_env.stream import AttackStream, RoundPlan

#: The Discrete action space's weight grid: every (β_task, β_consist, β_adv) on the simplex with
#: step 1/3 (index → weights, in this order).
DISCRETE_BETAS = np.array(
    [
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 1],
        [2 / 3, 1 / 3, 0],
        [2 / 3, 0, 1 / 3],
        [1 / 3, 2 / 3, 0],
        [0, 2 / 3, 1 / 3],
        [1 / 3, 0, 2 / 3],
        [0, 1 / 3, 2 / 3],
        [1 / 3, 1 / 3, 1 / 3],
    ],
    dtype=np.float64,
)
#: Continuous actions a ∈ [-1, 1]³ become β = softmax(ACTION_SCALE · a).
ACTION_SCALE = 3.0
#: Default flag-rate threshold for "the detector sees an attack", as a multiple of the target FPR.
FLAG_RATE_FACTOR = 3.0


def betas_from_action(action: np.ndarray, scale: float = ACTION_SCALE) -> np.ndarray:
    """β = softmax(scale · a) for a continuous action ``a`` in [-1, 1]³."""
    logits = scale * np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def action_from_betas(betas: np.ndarray, scale: float = ACTION_SCALE) -> np.ndarray:
    """The continuous action ``a ∈ [-1, 1]³`` with ``softmax(scale·a) ≈ β``.

    ``a_i = 1 + (log β_i − log max β) / scale``, clipped to [-1, 1]: the largest weight sits at
    +1, so the round trip is exact whenever ``max β / min β ≤ e^(2·scale)`` (≈ 403 at the default
    scale) and, beyond that, only the smallest weights are raised (to ``≈ max β · e^(−2·scale)``)
    while the ratios of the others are kept: (0.2, 0, 0.8) comes back as ≈ (0.2, 0.002, 0.798).
    Lets fixed-weight baselines speak the same action interface as learned policies.
    """
    logits = np.log(np.clip(np.asarray(betas, dtype=np.float64), 1e-12, None)) / scale
    return np.clip(1.0 + logits - logits.max(), -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class RoundTiming:
    """Wall-clock milliseconds of the last round's parts (``CMAIEnv.last_timing``).

    Kept out of ``info`` so that two runs with the same seed and actions return identical infos
    (Gymnasium's ``check_env`` compares them); the adaptation latencies in ``info["latency"]``
    are the only wall-clock values there, and they appear only once a shift has been answered.
    """

    traffic_attack_ms: float
    update_attack_ms: float
    update_ms: float
    probe_ms: float
    round_ms: float


class CMAIEnv(gym.Env):
    """Cross-Modal Adversarial Immunization: one step is one defence round.

    ## Description
    An open_clip CLIP model (the defended model) receives a stream of image–caption pairs. A
    scenario file decides, round by round, which attacks are active, in what mixture and on
    what share of the traffic (:class:`cmai_env.stream.AttackStream`). Each round:

    1. the stream emits the round's incoming batch: clean pairs plus adversarial pairs crafted
       by the active attack(s) against the *current* defended model;
    2. the environment computes the model's hidden states on that batch, the cross-modal
       consistency loss ``L_consistency`` per pair and the detector's flags
       (``L_consistency > τ``); this is the observation the agent acts on;
    3. the agent's action gives the loss weights ``β = [β_task, β_consist, β_adv]`` (the policy
       network is the gating network ``g``: ``β = softmax(g(h_t))``);
    4. the trainer updates the defended parameters with
       ``L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv`` (crafting L_adv's
       examples is skipped when β_adv < 0.1 and shortened below 0.5);
    5. robustness is measured on a probe set (clean accuracy, per-attack ASR, consistency) and
       turned into the reward; τ is re-calibrated on the clean probe pairs for the next round.

    ## Action Space
    ``action_mode="continuous"`` (default): ``Box(-1, 1, (3,), float32)``; β = softmax(3·a).
    ``action_mode="discrete"``: ``Discrete(10)``, index into ``DISCRETE_BETAS`` (the simplex grid
    with step 1/3). A wrong shape or a non-finite value raises ``ValueError``.

    ## Observation Space
    ``Box(-10, 10, (68,), float32)``, built from the incoming batch's hidden states and the
    previous round (``cmai_env.observation.OBS_SLICES`` maps each name to its slice):

    =====  ======================  =========================================================  =========
    index  name                    meaning                                                    range
    =====  ======================  =========================================================  =========
    0-15   image_embed_proj        P·mean(e_v): batch-mean image embedding, fixed projection  [-10, 10]
    16-31  text_embed_proj         P·mean(e_t): batch-mean caption embedding                  [-10, 10]
    32-47  gap_embed_proj          P·mean(e_v − e_t): mean cross-modal gap                    [-10, 10]
    48     consistency_mean        mean L_consistency over the incoming batch                 [0, 10]
    49     consistency_std         its standard deviation                                     [0, 10]
    50     consistency_max         its maximum                                                [0, 10]
    51     cosine_mean             mean cos(e_v, e_t) of incoming pairs                       [-1, 1]
    52     cosine_min              minimum cos(e_v, e_t)                                      [-1, 1]
    53     flag_rate               share of incoming pairs the detector flags                 [0, 1]
    54     drift                   1 if the change detector fired this round                  {0, 1}
    55     rounds_since_drift      rounds since it last fired, /episode length (1 if never)   [0, 1]
    56     prev_clean_acc          previous round's probe accuracy (the reward's: system)     [0, 1]
    57     prev_asr                previous round's probe ASR (the reward's: system_asr)      [0, 1]
    58     prev_consistency_score  previous round's probe consistency score (mean cosine)     [-1, 1]
    59     prev_detector_tpr       previous round's detector TPR on incoming traffic          [0, 1]
    60     prev_detector_fpr       previous round's detector FPR on incoming traffic          [0, 1]
    61-63  prev_betas              previous [β_task, β_consist, β_adv]                        [0, 1]
    64-66  prev_losses             previous log(1 + [L_task, L_consistency, L_adv])           [0, 10]
    67     progress                round / episode length                                     [0, 1]
    =====  ======================  =========================================================  =========

    ``P`` is a fixed (D × 16) Gaussian matrix seeded with 0 per embedding width D, so every
    backbone gives the same size (see :mod:`cmai_env.observation`).

    ## Rewards
    ``r = w_clean·acc − w_asr·asr + w_consistency·consistency_score
    + w_detection·(tpr − fpr) − w_compute·compute_cost`` with weights from the scenario's
    ``reward`` block (defaults 1, 1, 0.25, 0.25, 0.05). ``compute_cost`` = crafting steps run for
    L_adv / the maximum (1 when a full adversarial update ran, 0 when skipped). In quiet rounds
    asr = 0 and the detection term is ``−fpr``.

    The detector is part of the defended system: a flagged input is rejected. By default
    (``reward.metrics: system``) ``acc`` is ``system_clean_acc`` (clean probe pairs classified
    correctly and not rejected) and ``asr`` is ``system_asr`` (originally correct attacked probe
    pairs that are flipped *and* pass the detector); ``reward.metrics: model`` scores the model
    alone (``clean_acc``, ``asr``). The probe set is split once
    (:func:`cmai_env.round.probe_split`): attacks and false rejections are measured on its first
    pairs, τ is calibrated on the rest, so ``false_rejection_rate`` is out of sample.

    How the weights act on the detector: ``β_consist`` trains ``L_consistency`` down on the
    round's clean pairs, which shrinks the clean score distribution that τ is the ``(1 − target_fpr)``
    quantile of, so τ tightens; ``β_adv`` trains on adversarial examples and lowers the model's
    ASR, which is what is left against attacks built to pass the detector.

    ## Starting State
    The defended parameters are those of the scenario's backbone (embedded ``cmai-tiny`` by
    default) with identity adapters (a generative backbone such as ``cmai-tiny-flamingo``, pixel
    fidelity only: the language model's own copy of its vision tower, and the probe scores the
    generated captions; :mod:`cmai_env.fidelity.generative`); the stream starts at round 0 of its (possibly randomised)
    schedule. ``reset(seed)`` restores both.

    ## Episode End
    Truncation after ``episode_rounds`` rounds (the schedule's length by default). There is no
    terminal state.

    ## info
    Every step: ``round``, ``phase``, ``attacks`` (active names), ``shift``, ``clean_acc``,
    ``asr``, ``asr_per_attack``, ``system_asr``, ``system_asr_per_attack``,
    ``false_rejection_rate``, ``system_clean_acc``, ``consistency_score``, ``prediction_entropy`` (the clean
    probe predictions' mean entropy over ln K; near 1 the defence has flattened them toward uniform),
    ``detector_tpr``, ``detector_fpr``, ``detector_flag_rate``, ``detector_pairs`` (adversarial and clean pairs the TPR and FPR are over), ``detector_threshold``, ``drift_detected``, ``betas``, ``losses``
    (task, consistency, adv, total), ``attack_steps_used``, ``compute_cost``, ``reward_terms``,
    ``latency`` (the latest shift's detection / weight-response / recovery latency in rounds and
    ms, ``None`` until measured; see :mod:`cmai_env.latency`). The latencies' ``*_ms`` values are
    the only wall-clock fields in ``info`` and the only ones that differ between two runs with the
    same seed; the round's own timings (attack crafting, update, probe, whole round) are in
    :attr:`last_timing` (a :class:`RoundTiming`).

    ## Arguments
    ``scenario``: a shipped name (:func:`cmai_env.scenarios_available`) or a YAML path.
    ``fidelity``: ``pixel`` or ``embedding`` (overrides the scenario). ``action_mode``.
    ``render_mode``: ``None`` or ``"rgb_array"``. ``device``: ``cpu`` or ``cuda``.
    ``allow_evaluation_only``: needed for evaluation-only scenarios (the ``CMAI-Eval-v0`` ID sets
    it). Other keyword arguments override scenario fields, dotted for nested ones
    (``**{"defense.lr": 1e-3}``) or as nested dicts (``defense={"lr": 1e-3}``).

    ## Version History
    * v0: initial release.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        scenario: str | Path | Scenario = "quickstart",
        fidelity: str | None = None,
        action_mode: str = "continuous",
        render_mode: str | None = None,
        device: str = "cpu",
        allow_evaluation_only: bool = False,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.scenario = resolve_scenario(scenario, fidelity, overrides, allow_evaluation_only)
        if action_mode not in ("continuous", "discrete"):
            raise ValueError(f"action_mode must be 'continuous' or 'discrete', got {action_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.action_mode = action_mode
        self.render_mode = render_mode
        self.device = device

        self.action_space = (
            spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
            if action_mode == "continuous"
            else spaces.Discrete(len(DISCRETE_BETAS))
        )
        self.observation_space = spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(OBS_SIZE,), dtype=np.float32)

        self.world: Fidelity = _make_fidelity(self.scenario, device)
        self.projection = fixed_projection(self.world.embed_dim).to(device)
        self.stream = AttackStream(self.scenario, np.random.default_rng(0))
        detector_spec = self.scenario.detector
        self.detector = ConsistencyDetector(detector_spec.target_fpr)
        flag_threshold = detector_spec.flag_rate_threshold
        self.flag_rate_threshold = flag_threshold if flag_threshold is not None else FLAG_RATE_FACTOR * detector_spec.target_fpr
        self.latency = LatencyTracker(self.flag_rate_threshold, self.scenario.asr_target)
        self.history: list[dict] = []
        self._t = 0
        self._episode_started = False

    # ------------------------------------------------------------------ helpers
    @property
    def episode_rounds(self) -> int:
        return len(self.stream)

    def betas_for(self, action: Any) -> np.ndarray:
        """Validate an action and turn it into loss weights β."""
        if self.action_mode == "discrete":
            arr = np.asarray(action)
            if arr.size != 1 or arr.dtype.kind not in "iuf" or not float(arr.reshape(-1)[0]).is_integer():
                raise ValueError(f"discrete action must be one integer in [0, {len(DISCRETE_BETAS)}), got {action!r}")
            index = int(arr.reshape(-1)[0])
            if not 0 <= index < len(DISCRETE_BETAS):
                raise ValueError(f"discrete action must be in [0, {len(DISCRETE_BETAS)}), got {index}")
            return DISCRETE_BETAS[index].copy()
        try:
            arr = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"action must be 3 numbers [β_task, β_consist, β_adv] logits in [-1, 1] (e.g. env.action_space.sample()), got {action!r}"
            ) from None
        if arr.shape != (3,):
            raise ValueError(f"action must have shape (3,) = [β_task, β_consist, β_adv] logits in [-1, 1], got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action must be finite, got {arr.tolist()}")
        return betas_from_action(arr)

    def _make_change_detector(self):
        kind = self.scenario.detector.change_detector
        if kind == "none":
            return None
        from river import drift

        # Fed one 0/1 flag per incoming pair (not one rate per round): ADWIN needs the sample
        # count to see a change within a few rounds.
        if kind == "adwin":
            return drift.ADWIN(delta=0.002, clock=16)
        return drift.PageHinkley(min_instances=30, delta=0.005, threshold=10.0)

    def _observe_round(self, now_ms: float) -> np.ndarray:
        """Draw round ``_t``'s traffic, compute hidden states + flags, return the observation."""
        t = self._t
        plan = self.stream.plan(t)
        self.latency.traffic_started(t, now_ms, plan.shift, plan.phase, bool(plan.mixture) and plan.adversarial_share > 0)
        self._plan = plan
        self._traffic: RoundTraffic = self.world.incoming(plan, self.np_random)
        self._stats: TrafficStats = self.world.observe(self._traffic)
        self._flags = self.detector.flags(self._stats.consistency)
        drift = feed_change_detector(self._change_detector, self._flags)
        if drift:
            self._last_drift = t
        self._drift = drift
        flag_rate = float(self._flags.mean())
        self.latency.traffic_observed(t, _now_ms(), flag_rate, drift, np.asarray(self._previous.betas))
        return self._observation()

    def _observation(self) -> np.ndarray:
        """The observation of the traffic held in ``_stats``/``_flags`` (drawn in the current round)."""
        since, progress = episode_clock(self._t, self.episode_rounds, self._last_drift)
        return build_observation(
            self.projection,
            self._stats.image_embeds,
            self._stats.text_embeds,
            self._stats.consistency,
            self._stats.cosine,
            float(self._flags.mean()),
            self._drift,
            since,
            self._previous,
            progress,
        )

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.world.reset()
        self.stream.reset(self.np_random)
        self.latency.reset()
        self.history = []
        self.last_timing: RoundTiming | None = None
        self._t = 0
        self._previous = PreviousRound()
        self._change_detector = self._make_change_detector()
        self._last_drift: int | None = None
        # τ starts calibrated on the clean probe pairs of the undefended model.
        self.detector.calibrate(self.world.probe(_quiet_plan(), self.np_random).clean_consistency)
        self._episode_started = True
        obs = self._observe_round(_now_ms())
        self._last_obs = obs
        return obs, {"round": 0, "phase": self._plan.phase, "attacks": [e.name for e in self._plan.mixture]}

    def step(self, action):
        if not self._episode_started:
            raise RuntimeError("call reset() before step()")
        if self._t >= self.episode_rounds:
            raise RuntimeError(f"episode ended after {self.episode_rounds} rounds; call reset()")
        received_ms = _now_ms()
        betas = self.betas_for(action)
        t, plan, traffic, flags = self._t, self._plan, self._traffic, self._flags
        self.latency.action_received(t, received_ms, betas)

        update: UpdateResult = self.world.update(traffic, betas, flags, self.np_random)
        probe: ProbeResult = self.world.probe(plan, self.np_random)
        reward, info, self._previous = finish_round(
            t, plan, betas, flags, traffic.is_adv, update, probe, self.detector, self.latency, self.scenario.reward, self._drift, _now_ms()
        )
        self.history.append(
            {k: info[k] for k in ("round", "phase", "clean_acc", "asr", "system_asr", "consistency_score", "detector_tpr", "detector_fpr")}
            | {"betas": betas.copy()}
        )

        self._t += 1
        truncated = self._t >= self.episode_rounds
        if truncated:
            # No next round: the last observation is refreshed with this round's metrics only.
            obs = self._observation()
        else:
            obs = self._observe_round(_now_ms())
        self.last_timing = RoundTiming(traffic.attack_ms, update.attack_ms, update.update_ms, probe.probe_ms, _now_ms() - received_ms)
        self._last_obs = obs
        return obs, reward, False, truncated, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        from cmai_env.render import render_history

        return render_history(self.history, self.stream.timeline, self.episode_rounds, self.scenario.name)

    def close(self) -> None:
        self.history = []


def resolve_scenario(
    scenario: str | Path | Scenario, fidelity: str | None, overrides: dict[str, Any], allow_evaluation_only: bool
) -> Scenario:
    """The validated scenario an environment runs: loaded, ``fidelity`` and overrides applied,
    evaluation-only ones refused unless allowed (shared by :class:`CMAIEnv` and the vector env)."""
    base = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    if fidelity is not None:
        overrides = {**overrides, "fidelity": fidelity}
    resolved = apply_overrides(base, overrides) if overrides else base
    if resolved.evaluation_only and not allow_evaluation_only:
        raise ValueError(
            f"scenario {resolved.name!r} is evaluation-only (held-out attacks); "
            "use the cmai_env/CMAI-Eval-v0 ID or allow_evaluation_only=True in evaluation code"
        )
    return resolved


def _make_fidelity(scenario: Scenario, device: str) -> Fidelity:
    if scenario.fidelity == "pixel":
        if scenario.backbone.generative:
            from cmai_env.fidelity.generative import GenerativePixelFidelity

            return GenerativePixelFidelity(scenario, device)
        from cmai_env.fidelity.pixel import PixelFidelity

        return PixelFidelity(scenario, device)
    from cmai_env.fidelity.embedding import EmbeddingFidelity

    return EmbeddingFidelity(scenario, device)


def _quiet_plan() -> RoundPlan:
    return RoundPlan(round=0, phase="calibration", phase_index=0, mixture=(), adversarial_share=0.0, shift=False, blend=1.0)


def _now_ms() -> float:
    return time.perf_counter() * 1000.0
