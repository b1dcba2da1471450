"""What a round scores once the defence has updated and the probe has run: reward, ``info`` and memory.

:class:`cmai_env.env.CMAIEnv` (one environment, either fidelity) and
:class:`cmai_env.vector_env.CMAIVectorEnv` (N embedding-fidelity environments in one batched
round) both end a round here, so the detector's recalibration, the system metrics, the reward,
the ``info`` keys (documented on :class:`cmai_env.env.CMAIEnv`) and what the next observation
remembers of the round have one definition.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cmai_env.consistency import ConsistencyDetector
from cmai_env.fidelity.base import ProbeResult, UpdateResult
from cmai_env.latency import LatencyTracker
from cmai_env.observation import PreviousRound
from cmai_env.round import detection_rates, reward_terms, scored_metrics, system_metrics
from cmai_env.scenario import RewardWeights
from cmai_env.stream import RoundPlan

__all__ = ["RoundOutcome", "finish_round"]


class RoundOutcome(NamedTuple):
    """A finished round: its reward, its ``info`` dict and what the next observation remembers."""

    reward: float
    info: dict
    previous: PreviousRound


def finish_round(
    t: int,
    plan: RoundPlan,
    betas: np.ndarray,
    flags: np.ndarray,
    is_adv: np.ndarray,
    update: UpdateResult,
    probe: ProbeResult,
    detector: ConsistencyDetector,
    latency: LatencyTracker,
    weights: RewardWeights,
    drift: bool,
    now_ms: float,
) -> RoundOutcome:
    """Score round ``t`` after the update and the probe.

    Recalibrates ``detector`` on the probe's clean calibration split (τ follows the defended
    model), scores the end-to-end system with that τ, computes the reward from the scenario's
    ``weights`` and tells ``latency`` the round's scored ASR at ``now_ms``.

    :param flags: the detector's flags on the round's incoming pairs (drawn before the update).
    :param is_adv: which incoming pairs were adversarial.
    :param drift: whether the change detector fired on the round's traffic.
    :raises FloatingPointError: a non-finite reward (naming the round and its terms).
    """
    detector.calibrate(probe.clean_consistency)
    system = system_metrics(detector.threshold, probe.eval_clean_consistency, probe.eval_clean_correct, plan.mixture, probe.outcomes)
    scored_acc, scored_asr = scored_metrics(weights, probe.clean_acc, probe.asr, system)
    tpr, fpr = detection_rates(flags, is_adv)
    compute_cost = update.attack_steps_used / max(update.max_attack_steps, 1)
    terms = reward_terms(weights, scored_acc, scored_asr, probe.consistency_score, tpr, fpr, bool(is_adv.any()), compute_cost)
    reward = float(sum(terms.values()))
    if not np.isfinite(reward):
        raise FloatingPointError(f"non-finite reward at round {t}: terms {terms}")
    latency.round_finished(t, now_ms, scored_asr)
    info = {
        "round": t,
        "phase": plan.phase,
        "attacks": [e.name for e in plan.mixture],
        "shift": plan.shift,
        "clean_acc": probe.clean_acc,
        "asr": probe.asr,
        "asr_per_attack": dict(probe.asr_per_attack),
        "system_asr": system.system_asr,
        "system_asr_per_attack": dict(system.system_asr_per_attack),
        "false_rejection_rate": system.false_rejection_rate,
        "system_clean_acc": system.system_clean_acc,
        "consistency_score": probe.consistency_score,
        "prediction_entropy": probe.prediction_entropy,
        "detector_tpr": tpr,
        "detector_fpr": fpr,
        # TPR is undefined without adversarial pairs, FPR without clean ones (both read 0.0 above)
        "detector_pairs": {"adversarial": int(is_adv.sum()), "clean": int(is_adv.size - is_adv.sum())},
        "detector_flag_rate": float(flags.mean()),
        "detector_threshold": float(detector.threshold),
        "drift_detected": drift,
        "betas": betas.copy(),
        "losses": {"task": update.l_task, "consistency": update.l_consistency, "adv": update.l_adv, "total": update.l_total},
        "attack_steps_used": update.attack_steps_used,
        "compute_cost": compute_cost,
        "reward_terms": terms,
        "grad_norms": update.grad_norms,
        "latency": latency.latest(),
    }
    previous = PreviousRound(
        clean_acc=scored_acc,
        asr=scored_asr,
        consistency_score=probe.consistency_score,
        detector_tpr=tpr,
        detector_fpr=fpr,
        betas=tuple(float(b) for b in betas),
        losses=(update.l_task, update.l_consistency, update.l_adv),
    )
    return RoundOutcome(reward, info, previous)
