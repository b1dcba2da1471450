"""Non-RL gating baselines: fixed loss weights, a detector heuristic and adaptive loss weighting.

Every baseline follows the :class:`agents.policies.GatingPolicy` protocol (``name``,
``reset()``, ``predict(observation, ...)``, ``observe(info)``) so that evaluation, benchmark
and TensorBoard code treat them exactly like a trained SB3 gating network. A baseline decides
the loss weights ``β = [β_task, β_consist, β_adv]`` of
``L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv`` and encodes them as the
environment's action:

* continuous env (``Box(-1, 1, (3,))``, ``β = softmax(3·a)``): :func:`cmai_env.env.action_from_betas`;
* discrete env (``Discrete(10)``): the index of the nearest (L1) row of ``DISCRETE_BETAS``.

=====================  =============================================================================
name                   rule
=====================  =============================================================================
``no_defense``         β = (1, 0, 0): task loss only
``static_adversarial`` β = (0.2, 0, 0.8): TeCoA-style adversarial fine-tuning (mostly L_adv, a
                       little clean loss to hold accuracy; TeCoA itself trains on L_adv alone)
``static_consistency`` β = (0.2, 0.8, 0): consistency regularisation, no adversarial crafting
``uniform``            β = (1/3, 1/3, 1/3)
``detector_switch``    β = (0.2, 0.4, 0.4) while the detector's flag rate exceeds its threshold,
                       else (0.9, 0.05, 0.05)
``proeat_dynamic``     ProEAT: w = EMA₀.₉(L_task), EMA₀.₉(L_adv), normalised; β = (w_c, 0, w_a)
``gradnorm``           GradNorm (Chen et al., 2018) over the three terms
``uncertainty``        homoscedastic-uncertainty weighting (Kendall et al., 2018)
``dwa``                Dynamic Weight Average (Liu et al., 2019), T = 2
=====================  =============================================================================

The adaptive methods read ``info["losses"]`` (and ``info["grad_norms"]``) in :meth:`observe`.
A loss term counts as *measured* in a round when it is finite and strictly positive: the
environment reports ``L_adv = 0`` when it skipped adversarial crafting (β_adv < 0.1) and no
flagged adversarial traffic arrived, and feeding that 0 into a loss-driven rule would drive
β_adv to 0 forever (no crafting → L_adv = 0 → weight 0 → no crafting). Unmeasured terms keep
their state.

Why hand-written and not torchjd: torchjd implements gradient aggregators over a model's
per-loss Jacobians; here the weights are chosen *before* the update from scalar losses and
gradient norms that the environment reports, so the update rules are a few lines of numpy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gymnasium import spaces

from cmai_env.env import DISCRETE_BETAS, action_from_betas, betas_from_action
from cmai_env.observation import OBS_SLICES

if TYPE_CHECKING:  # the protocol lives with the learned policies
    from agents.policies import GatingPolicy

#: Loss terms in β order.
TERMS: tuple[str, str, str] = ("task", "consistency", "adv")
#: Flag-rate threshold of ``detector_switch`` when neither given nor read from the env (3 × a 5% FPR).
DEFAULT_FLAG_RATE_THRESHOLD = 0.15


# ---------------------------------------------------------------------------- encoding
def discrete_action(betas: np.ndarray) -> np.ndarray:
    """Index (as a 0-d int64 array) of the ``DISCRETE_BETAS`` row nearest to ``β`` in L1."""
    distances = np.abs(DISCRETE_BETAS - np.asarray(betas, dtype=np.float64)).sum(axis=1)
    return np.asarray(int(np.argmin(distances)), dtype=np.int64)


def encode_betas(betas: np.ndarray, action_mode: str) -> np.ndarray:
    """β as an action of the ``continuous`` or ``discrete`` environment."""
    return discrete_action(betas) if action_mode == "discrete" else action_from_betas(betas)


def decode_action(action: Any, action_mode: str) -> np.ndarray:
    """The β an action of the ``continuous`` or ``discrete`` environment stands for."""
    if action_mode == "discrete":
        return DISCRETE_BETAS[int(np.asarray(action).reshape(-1)[0])].copy()
    return betas_from_action(np.asarray(action, dtype=np.float64).reshape(3))


def action_mode_of(action_space: spaces.Space) -> str:
    """``"discrete"`` for a ``Discrete`` action space, else ``"continuous"``."""
    return "discrete" if isinstance(action_space, spaces.Discrete) else "continuous"


def measured_losses(info: dict) -> dict[str, float]:
    """The loss terms of ``info["losses"]`` that were measured this round (finite and > 0)."""
    losses = info.get("losses") or {}
    out = {}
    for term in TERMS:
        value = losses.get(term)
        if value is not None and math.isfinite(float(value)) and float(value) > 0.0:
            out[term] = float(value)
    return out


def _normalise(weights: np.ndarray) -> np.ndarray:
    weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    total = weights.sum()
    return weights / total if total > 0 else np.full(len(weights), 1.0 / len(weights))


# ---------------------------------------------------------------------------- base
class BaselinePolicy:
    """Common machinery: β per observation → action, batching, action-mode binding.

    Subclasses implement :meth:`weights` (β for one observation) and, if adaptive,
    :meth:`observe` and :meth:`reset`.

    :param action_mode: ``"continuous"`` or ``"discrete"``; :meth:`bind` sets it from an env.
    """

    name: str = "baseline"

    def __init__(self, action_mode: str = "continuous") -> None:
        if action_mode not in ("continuous", "discrete"):
            raise ValueError(f"action_mode must be 'continuous' or 'discrete', got {action_mode!r}")
        self.action_mode = action_mode

    def bind(self, env: Any) -> None:
        """Adopt ``env``'s action mode (called by the evaluation before the first episode)."""
        self.action_mode = action_mode_of(env.action_space)

    def reset(self) -> None:
        """Start of an episode: forget per-episode state (none for fixed weights)."""

    def observe(self, info: dict) -> None:
        """Read the step's ``info`` (fixed weights ignore it)."""

    def weights(self, observation: np.ndarray) -> np.ndarray:
        """β = [β_task, β_consist, β_adv] for one observation."""
        raise NotImplementedError

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        """SB3-style ``(action, state)``; a 2-D observation gives one action per row."""
        obs = np.asarray(observation, dtype=np.float32)
        if obs.ndim == 2:
            return np.stack([encode_betas(self.weights(row), self.action_mode) for row in obs]), state
        return encode_betas(self.weights(obs), self.action_mode), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, action_mode={self.action_mode!r})"


class FixedWeightsPolicy(BaselinePolicy):
    """The same β every round.

    :param name: registry name.
    :param betas: [β_task, β_consist, β_adv] (normalised to sum 1).
    """

    def __init__(self, name: str, betas: tuple[float, float, float], action_mode: str = "continuous") -> None:
        super().__init__(action_mode)
        self.name = name
        self.betas = _normalise(np.asarray(betas, dtype=np.float64))

    def weights(self, observation: np.ndarray) -> np.ndarray:
        return self.betas.copy()


class DetectorSwitchPolicy(BaselinePolicy):
    """Heuristic: defend while the consistency detector flags traffic, recover otherwise.

    ``β = attack_betas`` if ``flag_rate > threshold`` else ``quiet_betas``, where ``flag_rate``
    is the observation's ``OBS_SLICES["flag_rate"]`` (share of this round's incoming pairs with
    ``L_consistency > τ``). The defaults raise β_adv and β_consist together under attack,
    (0.2, 0.4, 0.4), and favour β_task in quiet rounds, (0.9, 0.05, 0.05), where β_adv < 0.1
    also skips adversarial crafting.

    :param threshold: flag rate above which the round counts as attacked; ``None`` takes the
        environment's own ``flag_rate_threshold`` in :meth:`bind` (the one its latency tracker
        uses), else ``DEFAULT_FLAG_RATE_THRESHOLD``.
    """

    name = "detector_switch"

    def __init__(
        self,
        threshold: float | None = None,
        attack_betas: tuple[float, float, float] = (0.2, 0.4, 0.4),
        quiet_betas: tuple[float, float, float] = (0.9, 0.05, 0.05),
        action_mode: str = "continuous",
    ) -> None:
        super().__init__(action_mode)
        self._explicit_threshold = threshold is not None
        self.threshold = float(threshold) if threshold is not None else DEFAULT_FLAG_RATE_THRESHOLD
        self.attack_betas = _normalise(np.asarray(attack_betas))
        self.quiet_betas = _normalise(np.asarray(quiet_betas))

    def bind(self, env: Any) -> None:
        super().bind(env)
        env_threshold = getattr(getattr(env, "unwrapped", env), "flag_rate_threshold", None)
        if not self._explicit_threshold and env_threshold is not None:
            self.threshold = float(env_threshold)

    def weights(self, observation: np.ndarray) -> np.ndarray:
        flag_rate = float(np.asarray(observation).reshape(-1)[OBS_SLICES["flag_rate"]][0])
        return (self.attack_betas if flag_rate > self.threshold else self.quiet_betas).copy()


class ProEATDynamicPolicy(BaselinePolicy):
    """ProEAT's dynamic weighting of the clean and adversarial losses.

    ``m_c ← μ·m_c + (1 − μ)·L_task``, ``m_a ← μ·m_a + (1 − μ)·L_adv`` with momentum μ = 0.9
    (each EMA starts at its first measured loss), then
    ``w_clean = clamp(m_c / (m_c + m_a), 0, 1)``, ``w_adv = clamp(m_a / (m_c + m_a), 0, 1)`` and
    ``β = (w_clean, 0, w_adv)``: the term with the larger running loss gets the larger weight.
    Before both losses have been measured, β = (0.5, 0, 0.5).
    """

    name = "proeat_dynamic"

    def __init__(self, momentum: float = 0.9, action_mode: str = "continuous") -> None:
        super().__init__(action_mode)
        self.momentum = momentum
        self.reset()

    def reset(self) -> None:
        self.ema: dict[str, float | None] = {"task": None, "adv": None}

    def observe(self, info: dict) -> None:
        losses = measured_losses(info)
        for term in ("task", "adv"):
            if term in losses:
                previous = self.ema[term]
                value = losses[term]
                self.ema[term] = value if previous is None else self.momentum * previous + (1 - self.momentum) * value

    def weights(self, observation: np.ndarray) -> np.ndarray:
        m_c, m_a = self.ema["task"], self.ema["adv"]
        if m_c is None or m_a is None:
            return np.array([0.5, 0.0, 0.5])
        w_clean = min(max(m_c / (m_c + m_a), 0.0), 1.0)
        w_adv = min(max(m_a / (m_c + m_a), 0.0), 1.0)
        return np.array([w_clean, 0.0, w_adv])


class GradNormPolicy(BaselinePolicy):
    """GradNorm (Chen et al., 2018) over ``L_task``, ``L_consistency``, ``L_adv``.

    Weights ``w_i`` (sum K = 3, β = w / 3) are moved so that the weighted gradient norms
    ``G_i = w_i·‖∇_W L_i‖`` follow the targets ``Ḡ·r_i^α``, with the inverse training rate
    ``r_i = L̃_i / mean_j L̃_j``, ``L̃_i = L_i(t) / L_i(0)`` and ``Ḡ = mean_j G_j``: one gradient
    step per round on ``L_grad = Σ_i |G_i − Ḡ·r_i^α|`` with the targets held constant,
    ``w_i ← w_i − lr·sign(G_i − Ḡ r_i^α)·‖∇_W L_i‖``, then ``w_i ≥ w_min`` and renormalisation to
    ``Σ w_i = K``. Terms that train slower (larger r_i) gain weight; α sets how strongly.

    ``‖∇_W L_i‖`` is read from ``info["grad_norms"][term]`` (the norm of the unweighted term's
    gradient w.r.t. the defended parameters) when the environment provides it. When it is
    ``None`` (the embedding fidelity does not compute per-term gradients) the **loss-ratio
    proxy** ``‖∇_W L_i‖ ≈ L_i`` is used (for cross-entropy-like losses the gradient norm shrinks
    with the loss), so ``G_i ≈ w_i·L_i``; :attr:`used_proxy` says which happened last.
    Only terms measured this round (and at least once before, for ``L_i(0)``) take part.

    :param alpha: asymmetry α (the paper uses 0.12–3; 1.5 is its NYUv2 setting).
    :param lr: step size for the weights (the paper's 0.025).
    :param w_min: floor for each weight before renormalisation.
    """

    name = "gradnorm"

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, w_min: float = 0.05, action_mode: str = "continuous") -> None:
        super().__init__(action_mode)
        self.alpha, self.lr, self.w_min = alpha, lr, w_min
        self.reset()

    def reset(self) -> None:
        self.w = np.ones(len(TERMS))
        self.initial_losses: dict[str, float] = {}
        self.used_proxy: bool | None = None

    def observe(self, info: dict) -> None:
        losses = measured_losses(info)
        grad_norms = info.get("grad_norms")
        self.used_proxy = grad_norms is None
        active = [i for i, term in enumerate(TERMS) if term in losses and term in self.initial_losses]
        for term, value in losses.items():
            self.initial_losses.setdefault(term, value)
        if len(active) < 2:  # with one term the target equals its own norm: nothing to balance
            return
        loss = np.array([losses[TERMS[i]] for i in active])
        initial = np.array([self.initial_losses[TERMS[i]] for i in active])
        if grad_norms is None:
            norms = loss
        else:
            norms = np.array([float(grad_norms.get(TERMS[i], losses[TERMS[i]])) for i in active])
        weights = self.w[active]
        g = weights * norms
        ratio = loss / initial
        r = ratio / ratio.mean()
        target = g.mean() * r**self.alpha
        self.w[active] = np.maximum(weights - self.lr * np.sign(g - target) * norms, self.w_min)
        self.w = len(TERMS) * self.w / self.w.sum()

    def weights(self, observation: np.ndarray) -> np.ndarray:
        return self.w / self.w.sum()


class UncertaintyWeightingPolicy(BaselinePolicy):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, 2018).

    Learned log-variances ``s_i`` (start 0) weight the terms in
    ``L = Σ_i exp(−s_i)·L_i + s_i``; each round one gradient step with the observed losses,
    ``s_i ← s_i − lr·(1 − exp(−s_i)·L_i)``, whose fixed point is ``exp(−s_i) = 1/L_i``. Then
    ``β_i = exp(−s_i) / Σ_j exp(−s_j)``: the term with the lower loss gets the higher weight.
    (The 1/2 factor of the regression form is dropped, as for classification losses.)

    :param lr: step size on ``s``.
    """

    name = "uncertainty"

    def __init__(self, lr: float = 0.1, action_mode: str = "continuous") -> None:
        super().__init__(action_mode)
        self.lr = lr
        self.reset()

    def reset(self) -> None:
        self.log_vars = np.zeros(len(TERMS))

    def observe(self, info: dict) -> None:
        losses = measured_losses(info)
        for i, term in enumerate(TERMS):
            if term in losses:
                s = self.log_vars[i]
                self.log_vars[i] = s - self.lr * (1.0 - math.exp(-s) * losses[term])

    def weights(self, observation: np.ndarray) -> np.ndarray:
        precision = np.exp(-(self.log_vars - self.log_vars.min()))
        return precision / precision.sum()


class DWAPolicy(BaselinePolicy):
    """Dynamic Weight Average (Liu, Johns & Davison, 2019).

    ``w_i = K·exp(r_i / T) / Σ_j exp(r_j / T)`` with ``r_i = L_i(t−1) / L_i(t−2)``, the ratio of a
    term's last two measured losses (per round here; the paper uses epoch means), T = 2, K = 3 and
    β = w / K. A term with fewer than two measurements has ``r_i = 1``, so the first rounds are
    uniform. Terms whose loss falls more slowly get more weight.

    :param temperature: T; larger is closer to uniform.
    """

    name = "dwa"

    def __init__(self, temperature: float = 2.0, action_mode: str = "continuous") -> None:
        super().__init__(action_mode)
        self.temperature = temperature
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, list[float]] = {term: [] for term in TERMS}

    def observe(self, info: dict) -> None:
        for term, value in measured_losses(info).items():
            self.history[term] = (self.history[term] + [value])[-2:]

    def rates(self) -> np.ndarray:
        """``r_i = L_i(t−1) / L_i(t−2)`` (1 where fewer than two measurements)."""
        return np.array([h[1] / h[0] if len(h) == 2 else 1.0 for h in (self.history[t] for t in TERMS)])

    def weights(self, observation: np.ndarray) -> np.ndarray:
        logits = self.rates() / self.temperature
        w = np.exp(logits - logits.max())
        return w / w.sum()


# ---------------------------------------------------------------------------- registry
_BASELINES: dict[str, Callable[..., BaselinePolicy]] = {
    "no_defense": lambda **kw: FixedWeightsPolicy("no_defense", (1.0, 0.0, 0.0), **kw),
    "static_adversarial": lambda **kw: FixedWeightsPolicy("static_adversarial", (0.2, 0.0, 0.8), **kw),
    "static_consistency": lambda **kw: FixedWeightsPolicy("static_consistency", (0.2, 0.8, 0.0), **kw),
    "uniform": lambda **kw: FixedWeightsPolicy("uniform", (1 / 3, 1 / 3, 1 / 3), **kw),
    "detector_switch": DetectorSwitchPolicy,
    "proeat_dynamic": ProEATDynamicPolicy,
    "gradnorm": GradNormPolicy,
    "uncertainty": UncertaintyWeightingPolicy,
    "dwa": DWAPolicy,
}


def available_baselines() -> list[str]:
    """Registered baseline names, in table order."""
    return list(_BASELINES)


def make_baseline(name: str, action_mode: str = "continuous", **kwargs: Any) -> "GatingPolicy":
    """A fresh baseline policy by name (see the module table).

    :param name: one of :func:`available_baselines`.
    :param action_mode: ``"continuous"`` or ``"discrete"`` (evaluation re-binds it to the env).
    :param kwargs: the baseline's own parameters (e.g. ``threshold`` for ``detector_switch``).
    """
    if name not in _BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(_BASELINES)}")
    return _BASELINES[name](action_mode=action_mode, **kwargs)


__all__ = [
    "TERMS",
    "BaselinePolicy",
    "DWAPolicy",
    "DetectorSwitchPolicy",
    "FixedWeightsPolicy",
    "GradNormPolicy",
    "ProEATDynamicPolicy",
    "UncertaintyWeightingPolicy",
    "action_mode_of",
    "available_baselines",
    "decode_action",
    "discrete_action",
    "encode_betas",
    "make_baseline",
    "measured_losses",
]
