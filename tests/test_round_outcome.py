"""``cmai_env.round_outcome.finish_round``: how every round ends, in the single and the batched env."""

from __future__ import annotations

import numpy as np
import pytest

from cmai_env.consistency import ConsistencyDetector
from cmai_env.fidelity.base import ProbeResult, UpdateResult
from cmai_env.latency import LatencyTracker
from cmai_env.round import AttackOutcome
from cmai_env.round_outcome import finish_round
from cmai_env.scenario import RewardWeights
from cmai_env.stream import MixtureEntry, RoundPlan


def _round(clean_acc: float = 0.9):
    """One attacked round: four evaluation pairs, all correct; the attack flips three, with scores 0.5, 2 and 4."""
    plan = RoundPlan(round=3, phase="text", phase_index=1, mixture=(MixtureEntry("text_embedding_pgd", {}, 1.0),), adversarial_share=0.5, shift=False)
    update = UpdateResult(l_task=0.5, l_consistency=0.25, l_adv=1.0, l_total=0.6, attack_steps_used=1, max_attack_steps=4, attack_ms=0.0, update_ms=0.0)
    outcome = AttackOutcome(np.ones(4, bool), np.array([True, True, True, False]), np.array([0.5, 2.0, 4.0, 0.1]))
    probe = ProbeResult(
        clean_acc=clean_acc,
        consistency_score=0.8,
        clean_consistency=np.linspace(0.0, 3.0, 21),  # 0, 0.15, …, 3: τ = 2.85 at 5% FPR
        asr=0.75,
        prediction_entropy=0.2,
        eval_clean_consistency=np.array([0.1, 0.2, 0.3, 3.5]),
        eval_clean_correct=np.ones(4, bool),
        outcomes=[outcome],
    )
    flags = np.array([True, False, True, False])
    is_adv = np.array([True, True, False, False])
    return plan, update, probe, flags, is_adv


def test_the_round_is_scored_with_tau_recalibrated_on_the_defended_model():
    plan, update, probe, flags, is_adv = _round()
    detector = ConsistencyDetector(threshold=0.1)  # last round's τ, which would flag every flip
    latency = LatencyTracker(flag_rate_threshold=0.3, asr_target=0.5)
    betas = np.array([0.5, 0.25, 0.25])
    reward, info, previous = finish_round(3, plan, betas, flags, is_adv, update, probe, detector, latency, RewardWeights(), False, 0.0)

    assert detector.threshold == pytest.approx(2.85)
    assert info["detector_threshold"] == pytest.approx(2.85)
    # Against τ = 2.85 the flips scored 0.5 and 2 pass; the one scored 4 is rejected: 2 of 4 correct pairs.
    assert info["system_asr"] == pytest.approx(0.5)
    assert info["false_rejection_rate"] == pytest.approx(0.25) and info["system_clean_acc"] == pytest.approx(0.75)
    assert (info["detector_tpr"], info["detector_fpr"]) == (0.5, 0.5)
    assert info["compute_cost"] == pytest.approx(0.25)
    # The reward scores the system (the default metrics): 0.75 − 0.5 + 0.25·0.8 + 0.25·(0.5 − 0.5) − 0.05·0.25.
    assert reward == pytest.approx(0.75 - 0.5 + 0.2 + 0.0 - 0.0125)
    assert reward == pytest.approx(sum(info["reward_terms"].values()))
    assert (previous.clean_acc, previous.asr) == (pytest.approx(0.75), pytest.approx(0.5))
    assert previous.betas == (0.5, 0.25, 0.25) and previous.losses == (0.5, 0.25, 1.0)
    assert info["betas"] is not betas and info["round"] == 3 and info["prediction_entropy"] == 0.2


def test_a_non_finite_reward_names_the_round_and_its_terms():
    plan, update, probe, flags, is_adv = _round(clean_acc=float("nan"))
    latency = LatencyTracker(flag_rate_threshold=0.3, asr_target=0.5)
    with pytest.raises(FloatingPointError, match=r"non-finite reward at round 3: terms .*'clean_acc': nan"):
        finish_round(3, plan, np.ones(3) / 3, flags, is_adv, update, probe, ConsistencyDetector(), latency,
                     RewardWeights(metrics="model"), False, 0.0)
