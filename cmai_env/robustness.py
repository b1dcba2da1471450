"""Robustness evaluation: what one attack does to a model, and whether the consistency detector sees it.

:func:`evaluate_attack` runs an attack over a clean evaluation batch in chunks and reports, for the
attack's modality ``m`` (``both``: a pair counts as correct only when both modalities are):

* ``clean_accuracy`` = mean 1[argmax p_m(clean) = y],  ``robust_accuracy`` the same on the attacked pairs;
* ``asr`` = |{correct on clean ∧ wrong on adversarial}| / |{correct on clean}| (the VLP papers'
  attack success rate: the share of originally correct predictions the attack flips);
* ``consistency_clean`` / ``consistency_adv`` = mean cos(e_v, e_t) of matched pairs;
* the detector: score = per-sample ``L_consistency``; ``τ`` is calibrated on a *separate* clean
  batch (``calibration``) to the detector's target FPR (5% by default); ``detector_tpr`` is the
  share of attacked pairs flagged, ``detector_fpr`` the share of the clean evaluation pairs
  flagged, ``detector_auroc`` the threshold-free separability of the two score sets;
* the defended system rejects flagged pairs, so what the attacker wins is a flipped *and*
  unflagged pair: ``system_asr`` = |{correct on clean ∧ wrong on adversarial ∧ not flagged}| /
  |{correct on clean}|, and ``detector_tpr_flipped`` is the share of the flipped pairs flagged
  (an attack that leaves some pairs unchanged, like the AutoAttack chain, lowers
  ``detector_tpr`` without evading anything; this figure does not move);
* ``seconds`` = time spent crafting, ``images_per_s`` = n / seconds.

The environment and adversarial-training tools reuse this function on their own probe sets.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from typing import Callable

import torch

from cmai_env.attacks.base import Attack, PairBatch, ZeroShotTask, attack_success_rate, task_loss
from cmai_env.consistency import ConsistencyDetector


@dataclass(frozen=True)
class AttackReport:
    """One attack's effect on one evaluation batch (see the module docstring for definitions)."""

    attack: str
    modality: str
    n: int
    clean_accuracy: float
    robust_accuracy: float
    asr: float
    consistency_clean: float
    consistency_adv: float
    detector_auroc: float
    detector_tpr: float
    detector_fpr: float
    system_asr: float  #: share of originally correct pairs flipped and not flagged
    detector_tpr_flipped: float  #: share of flipped pairs flagged (NaN when none flipped)
    detector_threshold: float
    #: where τ came from: ``calibration`` (the separate clean batch), ``given`` (the detector was
    #: already calibrated) or ``evaluation`` (no calibration batch: the evaluated clean pairs)
    calibrated_on: str
    loss_clean: float  #: mean task loss of the attacked modality on clean pairs
    loss_adv: float  #: the same on attacked pairs
    seconds: float
    images_per_s: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@torch.no_grad()
def _score(task: ZeroShotTask, batch: PairBatch, modality: str) -> dict[str, torch.Tensor]:
    """Per-sample correctness, L_consistency, cosine and task loss of one chunk."""
    out = task.forward(batch)
    return {
        "correct": task.correct(out, batch.labels, modality).cpu(),
        "consistency": task.consistency(out).cpu(),
        "cosine": torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).cpu(),
        "loss": task_loss(out, batch.labels, modality, reduction="none").cpu(),
    }


@torch.no_grad()
def consistency_scores(task: ZeroShotTask, batch: PairBatch, batch_size: int = 256) -> torch.Tensor:
    """Per-sample ``L_consistency`` of ``batch`` (the detector's score), computed in chunks."""
    parts = [task.consistency(task.forward(batch.subset(slice(s, s + batch_size)))).cpu() for s in range(0, len(batch), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


def evaluate_attack(
    task: ZeroShotTask,
    clean: PairBatch,
    attack: Attack,
    generator: torch.Generator | None = None,
    detector: ConsistencyDetector | None = None,
    calibration: PairBatch | None = None,
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
    on_examples: Callable[[PairBatch, PairBatch], None] | None = None,
) -> AttackReport:
    """Attack ``clean`` chunk by chunk and report accuracy, ASR, consistency and detection.

    :param task: the zero-shot task (backbone + class prompts) under attack.
    :param clean: the evaluation pairs.
    :param attack: a registered attack (called as ``attack(task, chunk, generator)``).
    :param generator: seeds the attack's randomness; consumed chunk after chunk.
    :param detector: a :class:`ConsistencyDetector`; default one with target FPR 5%. It is
        (re)calibrated on ``calibration`` when given.
    :param calibration: clean pairs from a *separate* split to calibrate ``τ`` on. Without it an
        already calibrated ``detector`` is used as is, else ``τ`` is calibrated on ``clean``
        itself (optimistic FPR; the report says so in ``calibrated_on``).
    :param batch_size: pairs per attack call (memory grows with it).
    :param progress: called with the number of pairs done after each chunk (e.g. a progress bar's ``update``).
    :param on_examples: called with each clean chunk and the adversarial examples made from it, in
        order (e.g. to measure how far they moved, :func:`cmai_env.fidelity.travel.embedding_moves`).
    """
    if len(clean) == 0:
        raise ValueError("evaluate_attack needs at least one clean pair")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    detector = detector if detector is not None else ConsistencyDetector(target_fpr=0.05)
    modality = attack.modality
    clean_parts: list[dict[str, torch.Tensor]] = []
    adv_parts: list[dict[str, torch.Tensor]] = []
    seconds = 0.0
    for start in range(0, len(clean), batch_size):
        chunk = clean.subset(slice(start, start + batch_size))
        clean_parts.append(_score(task, chunk, modality))
        tic = time.perf_counter()
        adversarial = attack(task, chunk, generator).batch
        seconds += time.perf_counter() - tic
        adv_parts.append(_score(task, adversarial, modality))
        if on_examples is not None:
            on_examples(chunk, adversarial)
        if progress is not None:
            progress(len(chunk))
    clean_stats = {k: torch.cat([p[k] for p in clean_parts]) for k in clean_parts[0]}
    adv_stats = {k: torch.cat([p[k] for p in adv_parts]) for k in adv_parts[0]}

    if calibration is not None:
        detector.calibrate(consistency_scores(task, calibration, batch_size))
        calibrated_on = "calibration"
    elif detector.threshold is not None:
        calibrated_on = "given"
    else:
        detector.calibrate(clean_stats["consistency"])
        calibrated_on = "evaluation"
    det = detector.evaluate(clean_stats["consistency"], adv_stats["consistency"])
    flagged = torch.from_numpy(detector.flags(adv_stats["consistency"]))
    flipped = clean_stats["correct"] & ~adv_stats["correct"]

    n = len(clean)
    return AttackReport(
        attack=attack.name,
        modality=modality,
        n=n,
        clean_accuracy=float(clean_stats["correct"].double().mean()),
        robust_accuracy=float(adv_stats["correct"].double().mean()),
        asr=attack_success_rate(clean_stats["correct"], adv_stats["correct"]),
        consistency_clean=float(clean_stats["cosine"].double().mean()),
        consistency_adv=float(adv_stats["cosine"].double().mean()),
        detector_auroc=det.auroc,
        detector_tpr=det.tpr,
        detector_fpr=det.fpr,
        system_asr=attack_success_rate(clean_stats["correct"], adv_stats["correct"] | flagged),
        detector_tpr_flipped=float(flagged[flipped].double().mean()) if flipped.any() else float("nan"),
        detector_threshold=det.threshold,
        calibrated_on=calibrated_on,
        loss_clean=float(clean_stats["loss"].double().mean()),
        loss_adv=float(adv_stats["loss"].double().mean()),
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("inf"),
    )


__all__ = ["AttackReport", "consistency_scores", "evaluate_attack"]
