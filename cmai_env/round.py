"""One definition of a defence round's arithmetic, shared by both fidelities and the batched env.

Everything here is plain tensor algebra over trailing dimensions, so the same function serves
one environment (rows ``(R, ·)``) and N stacked environments (``(N, R, ·)``):

* the loss terms of the trainer update (CMAI mechanism 2)

      L_task        = mean_r [CE(s·e_v·Cᵀ, y) + CE(s·e_t·Cᵀ, y)]            on the clean pairs
      L_adv         = mean_r [CE_v + CE_t]                                   on the adversarial pairs
                      (``defense.adv_loss: trades``: on the crafted ones, TRADES's
                       CE(clean) + β_TRADES·[KL(p_v ‖ p_v') + KL(p_t ‖ p_t')], :func:`crafted_adv_loss`)
      L_consistency = mean_r L_consistency(e_v, e_t)                        on the clean pairs
      L_total       = β_task·L_task + β_consist·L_consistency + β_adv·L_adv

  (:func:`pair_ce`, :func:`defence_terms`, :func:`total_loss`); the adversarial pairs are the
  ones crafted for ``L_adv`` plus the observed traffic the detector flagged (unless
  ``defense.train_on_flagged`` is off; only the truly adversarial flagged pairs unless
  ``defense.flagged_pairs`` is ``all``; :func:`observed_adversarial`);
* the inner maximisation's objective ``CE_v + CE_t + α·L_consistency`` (:func:`bridging_objective`)
  and the projected-gradient steps that climb it (:func:`l2_ascent`, :func:`linf_ascent`), with
  Madry et al.'s default step ``2.5·ε/steps`` (:func:`default_step_size`);
* the compute-saving rule that ties crafting to ``β_adv`` (:func:`crafting_steps`);
* the probe's attacked-pair count (:data:`PROBE_ATTACK_N`), its mixture-weighted ASR
  (:func:`mixture_asr`) and how confident the defended model still is (:func:`prediction_entropy`);
* the reward (:func:`reward_terms`) from the probe metrics and the detector's TPR / FPR on the
  round's traffic (:func:`detection_rates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmai_env.consistency import consistency_terms
from cmai_env.scenario import ADV_LOSSES, FLAGGED_PAIRS

#: Probe pairs attacked per active attack when measuring ASR (the clean metrics use the whole probe set).
PROBE_ATTACK_N = 64
#: Loss-term names in the order of β.
TERMS = ("task", "consistency", "adv")


# ---------------------------------------------------------------------------- crafting schedule
def crafting_steps(beta_adv: float, attack_steps: int, skip_below: float = 0.1, full_at: float = 0.5) -> int:
    """PGD steps to spend on ``L_adv``'s examples for a given ``β_adv``.

    ``0`` if ``β_adv < skip_below`` (or ``attack_steps == 0``), else
    ``max(1, round(attack_steps · min(1, β_adv / full_at)))`` (rounding half up).
    """
    if attack_steps <= 0 or beta_adv < skip_below:
        return 0
    return max(1, int(math.floor(attack_steps * min(1.0, beta_adv / full_at) + 0.5)))


def default_step_size(budget: float | torch.Tensor, steps: int | torch.Tensor) -> float | torch.Tensor:
    """Madry et al.'s rule of thumb: ``2.5·ε/steps`` (reaches the boundary from any start)."""
    return 2.5 * budget / steps


# ---------------------------------------------------------------------------- per-pair terms
def pair_ce(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CE(image_logits, y) + CE(text_logits, y)`` per pair; logits ``(..., R, C)``, labels ``(..., R)``."""
    classes = image_logits.shape[-1]
    ce_v = F.cross_entropy(image_logits.reshape(-1, classes), labels.reshape(-1), reduction="none")
    ce_t = F.cross_entropy(text_logits.reshape(-1, classes), labels.reshape(-1), reduction="none")
    return (ce_v + ce_t).reshape(labels.shape)


def pair_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(clean) ‖ softmax(adv))`` per pair; logits ``(..., R, C)``, result ``(..., R)``."""
    return F.kl_div(F.log_softmax(adv_logits, -1), F.log_softmax(clean_logits, -1), reduction="none", log_target=True).sum(-1)


def crafted_adv_loss(
    adv_loss: str,
    trades_beta: float,
    clean_logits: tuple[torch.Tensor, torch.Tensor],
    crafted_logits: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
) -> torch.Tensor:
    """``L_adv``'s per-pair value on pairs crafted from clean ones (``defense.adv_loss``).

    ``ce``: ``CE_v + CE_t`` of the crafted pair. ``trades`` (Zhang et al. 2019, their eq. 5): the
    clean pair's ``CE_v + CE_t`` plus ``trades_beta``·``[KL(p_v ‖ p_v') + KL(p_t ‖ p_t')]``, the
    gradient flowing through both sides as in TRADES. The CE term makes ``β_adv`` alone TRADES's
    whole objective (with the KL alone, a gate giving ``β_task`` no weight lets the adapters
    flatten every prediction, which zeroes the KL). The crafting is the caller's: here the bridging
    objective, where TRADES climbs the KL.

    :param clean_logits: ``(image, text)`` logits of the clean pairs, ``(..., R, C)`` each.
    :param crafted_logits: the same for the pairs crafted from them, row for row.
    :raises ValueError: an unknown ``adv_loss``.
    """
    if adv_loss == "ce":
        return pair_ce(*crafted_logits, labels)
    if adv_loss == "trades":
        kl = pair_kl(clean_logits[0], crafted_logits[0]) + pair_kl(clean_logits[1], crafted_logits[1])
        return pair_ce(*clean_logits, labels) + trades_beta * kl
    raise ValueError(f"adv_loss must be one of {ADV_LOSSES}, got {adv_loss!r}")


def pair_consistency(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, image_logits: torch.Tensor, text_logits: torch.Tensor, kl_weight: float = 1.0
) -> torch.Tensor:
    """``L_consistency`` per pair (:func:`cmai_env.consistency.consistency_terms`) for ``(..., R, ·)`` inputs."""
    lead = image_embeds.shape[:-1]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    terms = consistency_terms([flat(image_embeds), flat(text_embeds)], [flat(image_logits), flat(text_logits)], kl_weight)
    return terms.loss.reshape(lead)


def bridging_objective(ce: torch.Tensor, consistency: torch.Tensor, alpha: float) -> torch.Tensor:
    """What the inner maximisation climbs, per pair: ``CE_v + CE_t + α·L_consistency``."""
    return ce + alpha * consistency


# ---------------------------------------------------------------------------- the update's loss
def defence_terms(
    clean_ce: torch.Tensor,
    clean_consistency: torch.Tensor,
    adv_ce: torch.Tensor | None = None,
    adv_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``L_task``, ``L_consistency``, ``L_adv`` (module docstring) from per-pair values.

    ``L_consistency`` is trained on the clean pairs only. Pulling their scores down is what
    tightens the detector's τ (the ``(1 − target_fpr)`` quantile of clean scores). Trained on the
    adversarial pairs as well, ``β_consist`` taught the model to make attacked pairs look
    consistent, hiding them from the detector: over ``abrupt_shift`` at embedding fidelity τ
    rose from 0.37 to 0.45 and detector TPR fell from 0.96 to 0.87 (a run of 2026-11-26 before
    this change, on the abrupt_shift of that day). On clean pairs only, ``benchmarks/detector_weights.py``
    printed τ 0.36 → 0.29 at TPR 1.00 for β = (0, 1, 0) over the ``quickstart`` of before 2026-11-27
    (clean images, adapters at lr 1e-3). Adversarial pairs are ``L_adv``'s job.

    :param clean_ce: ``CE_v + CE_t`` of the clean pairs, ``(..., R)``.
    :param clean_consistency: their ``L_consistency``, ``(..., R)``.
    :param adv_ce: ``CE_v + CE_t`` of the adversarial pairs, ``(..., A)``; ``None`` when there are none.
    :param adv_weight: 0/1 mask ``(..., A)`` of the adversarial pairs that exist (stacked
        environments pad to a common ``A``); ``None``: all of them. A row whose mask is all 0 has
        ``L_adv = 0``.
    :return: ``{"task", "consistency", "adv"}``, each of shape ``(...)``.
    """
    l_task = clean_ce.mean(-1)
    l_cons = clean_consistency.mean(-1)
    if adv_ce is None:
        return {"task": l_task, "consistency": l_cons, "adv": torch.zeros_like(l_task)}
    if adv_weight is None:
        return {"task": l_task, "consistency": l_cons, "adv": adv_ce.mean(-1)}
    count = adv_weight.sum(-1)
    l_adv = torch.where(count > 0, (adv_weight * adv_ce).sum(-1) / count.clamp_min(1.0), torch.zeros_like(l_task))
    return {"task": l_task, "consistency": l_cons, "adv": l_adv}


def observed_adversarial(
    is_adv: np.ndarray, flagged: np.ndarray, train_on_flagged: bool, flagged_pairs: str = "adversarial"
) -> np.ndarray:
    """Which received pairs join ``L_adv`` beside the crafted examples. Any shape, elementwise.

    * none when ``defense.train_on_flagged`` is off;
    * ``flagged_pairs="adversarial"`` (the shipped default): the flagged pairs that are adversarial.
      The defender is told which of its detector's flags were right, an oracle a deployed system
      does not have;
    * ``flagged_pairs="all"``: every flagged pair, false positives included, which is all a
      deployed system knows.
    """
    if flagged_pairs not in FLAGGED_PAIRS:
        raise ValueError(f"flagged_pairs {flagged_pairs!r}: allowed {', '.join(FLAGGED_PAIRS)}")
    observed = np.asarray(flagged, dtype=bool)
    if flagged_pairs == "adversarial":
        observed = observed & np.asarray(is_adv, dtype=bool)
    return observed if train_on_flagged else np.zeros_like(observed)


def total_loss(betas: Sequence[float] | torch.Tensor, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv``.

    ``betas``: three floats, or a ``(..., 3)`` tensor matching the terms' shape.
    """
    if isinstance(betas, torch.Tensor):
        return betas[..., 0] * terms["task"] + betas[..., 1] * terms["consistency"] + betas[..., 2] * terms["adv"]
    return betas[0] * terms["task"] + betas[1] * terms["consistency"] + betas[2] * terms["adv"]


# ---------------------------------------------------------------------------- ascent steps
def l2_ascent(delta: torch.Tensor, grad: torch.Tensor, step: float | torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """One projected L2 ascent step per last-dimension vector: ``Π_{‖δ‖≤r}(δ + a·g/‖g‖)``.

    ``step`` and ``radius`` are floats or tensors broadcasting against ``delta[..., :1]``
    (one budget per row). Used for embedding-space PGD and, per token, for the text side of
    the pixel trainer's joint PGD.
    """
    moved = delta + step * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return moved * (radius / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def linf_ascent(x: torch.Tensor, grad: torch.Tensor, step: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """One projected ℓ∞ (sign-gradient) ascent step inside the box ``[lo, hi]`` (in place on ``x``)."""
    x = x.add_(grad.sign(), alpha=step)
    return torch.minimum(torch.maximum(x, lo, out=x), hi, out=x)


# ---------------------------------------------------------------------------- probe and reward
def mixture_asr(weights: Sequence[float], asrs: Sequence[float]) -> float:
    """The round's ASR: the mixture-weighted mean of the active attacks' ASRs (0 with none active)."""
    if not len(weights):
        return 0.0
    total = sum(w * a for w, a in zip(weights, asrs))
    return total / max(sum(weights), 1e-12)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, divided by ``ln K`` (K classes).

    0 is a one-hot prediction, 1 the uniform one. The probe reports its mean over the clean probe
    images as ``info["prediction_entropy"]``: a defence with no ``β_task`` can keep clean accuracy
    while flattening every prediction toward uniform (the argmax survives, the margins do not),
    which also flattens ``L_consistency`` and so blinds the detector; accuracy alone does not show it.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(logits.shape[-1])


def probe_split(probe_n: int) -> int:
    """How many probe pairs form the *evaluation split*: ``min(PROBE_ATTACK_N, probe_n // 2)``.

    The probe set is split once: pairs ``[0, n)`` are attacked and scored (ASR, system ASR,
    false rejections); pairs ``[n, probe_n)`` are never attacked and calibrate the detector's τ.
    Keeping them apart makes the false-rejection rate an out-of-sample figure (τ calibrated on the
    evaluation pairs themselves would reject exactly ``target_fpr`` of them by construction).
    """
    return min(PROBE_ATTACK_N, probe_n // 2)


@dataclass(frozen=True)
class AttackOutcome:
    """One attack's result on the probe's evaluation split (per pair, numpy).

    :param clean_ok: the clean prediction was correct (for the attack's modality; both for
        two-modality attacks).
    :param flipped: ``clean_ok`` and the attacked prediction is wrong.
    :param consistency: ``L_consistency`` of the attacked pair (the detector's score).
    """

    clean_ok: np.ndarray
    flipped: np.ndarray
    consistency: np.ndarray

    @property
    def asr(self) -> float:
        """The share of originally correct pairs that are flipped (0 with none correct), as
        :func:`cmai_env.attacks.attack_success_rate` defines ASR."""
        correct = int(self.clean_ok.sum())
        return float(self.flipped.sum() / correct) if correct else 0.0

    def undetected(self, threshold: float) -> "AttackOutcome":
        """The same outcome counting only the flips the detector passes (``L_consistency ≤ τ``)."""
        return AttackOutcome(self.clean_ok, self.flipped & (np.asarray(self.consistency) <= threshold), self.consistency)


@dataclass(frozen=True)
class SystemMetrics:
    """The defended *system* (model + detector that rejects flagged inputs) on the probe.

    :param system_asr: mixture-weighted share of originally correct attacked pairs that are
        flipped *and not flagged* (``L_consistency ≤ τ``): attacks that get through end to end.
    :param system_asr_per_attack: the same per attack name.
    :param false_rejection_rate: share of clean evaluation pairs the detector flags.
    :param system_clean_acc: share of clean evaluation pairs classified correctly (image) and not
        rejected.
    """

    system_asr: float
    system_asr_per_attack: dict[str, float]
    false_rejection_rate: float
    system_clean_acc: float


def system_metrics(
    threshold: float,
    eval_clean_consistency: np.ndarray,
    eval_clean_correct: np.ndarray,
    mixture: Sequence,
    outcomes: Sequence[AttackOutcome],
) -> SystemMetrics:
    """:class:`SystemMetrics` for a detector with threshold ``τ`` (flag: ``L_consistency > τ``).

    :param eval_clean_consistency: clean ``L_consistency`` of the evaluation split's pairs.
    :param eval_clean_correct: whether each of them is classified correctly (image side).
    :param mixture: the round's active attacks (entries with ``name`` and ``weight``).
    :param outcomes: each one's :class:`AttackOutcome`, in mixture order.
    """
    rejected = np.asarray(eval_clean_consistency) > threshold
    rates = [outcome.undetected(threshold).asr for outcome in outcomes]
    return SystemMetrics(
        system_asr=mixture_asr([entry.weight for entry in mixture], rates),
        system_asr_per_attack={entry.name: rate for entry, rate in zip(mixture, rates)},
        false_rejection_rate=float(rejected.mean()) if rejected.size else 0.0,
        system_clean_acc=float((np.asarray(eval_clean_correct) & ~rejected).mean()) if rejected.size else 0.0,
    )


def detection_rates(flags: np.ndarray, is_adv: np.ndarray) -> tuple[float, float]:
    """Detector TPR (flagged share of the adversarial pairs) and FPR (of the clean ones); 0 without any."""
    n_adv = int(np.count_nonzero(is_adv))
    n_clean = is_adv.size - n_adv
    flagged_adv = int(np.count_nonzero(flags & is_adv))
    tpr = flagged_adv / n_adv if n_adv else 0.0
    fpr = (int(np.count_nonzero(flags)) - flagged_adv) / n_clean if n_clean else 0.0
    return tpr, fpr


def feed_change_detector(change_detector, flags: np.ndarray) -> bool:
    """Feed one 0/1 flag per incoming pair (river's ``update``); True if it fired during the round.

    Per pair rather than one rate per round: ADWIN needs the sample count to see a change within
    a few rounds. ``None`` (no change detector) never fires.
    """
    if change_detector is None:
        return False
    fired = False
    update = change_detector.update
    for bit in np.asarray(flags, dtype=np.float64).tolist():
        update(bit)
        fired = change_detector.drift_detected or fired
    return bool(fired)


def scored_metrics(weights, clean_acc: float, asr: float, system: SystemMetrics) -> tuple[float, float]:
    """The ``(acc, ASR)`` the reward reads: the system's (default) or the model's (``reward.metrics``)."""
    if weights.metrics == "model":
        return clean_acc, asr
    return system.system_clean_acc, system.system_asr


def reward_terms(
    weights, clean_acc: float, asr: float, consistency_score: float, tpr: float, fpr: float, attacked: bool, compute_cost: float
) -> dict[str, float]:
    """The reward's terms (their sum is the reward; see :class:`cmai_env.env.CMAIEnv`, Rewards).

    ``weights`` is the scenario's ``reward`` block; in rounds without adversarial traffic the
    detection term is ``−fpr``.
    """
    detection = (tpr - fpr) if attacked else -fpr
    return {
        "clean_acc": weights.clean_acc * clean_acc,
        "asr": -weights.asr * asr,
        "consistency": weights.consistency * consistency_score,
        "detection": weights.detection * detection,
        "compute": -weights.compute * compute_cost,
    }


__all__ = [
    "PROBE_ATTACK_N",
    "TERMS",
    "AttackOutcome",
    "SystemMetrics",
    "bridging_objective",
    "crafting_steps",
    "default_step_size",
    "defence_terms",
    "detection_rates",
    "feed_change_detector",
    "l2_ascent",
    "linf_ascent",
    "mixture_asr",
    "observed_adversarial",
    "pair_ce",
    "pair_consistency",
    "probe_split",
    "reward_terms",
    "scored_metrics",
    "system_metrics",
    "total_loss",
]
