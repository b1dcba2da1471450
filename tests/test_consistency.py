"""Consistency verification: L_consistency against hand-computed values, its gradients, and the detector's calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmai_env.attacks import PairBatch, ZeroShotTask
from cmai_env.consistency import ConsistencyDetector, auroc, consistency_loss, consistency_score, consistency_terms
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone
from cmai_env.robustness import consistency_scores


def _toy():
    """2 samples, 2-d embeddings, 3 classes; logits are log-probabilities so p is exact.

    Sample 0: e_v = e_t (cos 1), p_v = (½, ¼, ¼), p_t = (¼, ½, ¼)
        KL(p_v‖p_t) = ½ ln 2 + ¼ ln ½ = ¼ ln 2,  KL(p_t‖p_v) = ¼ ln ½ + ½ ln 2 = ¼ ln 2.
    Sample 1: e_v = (1, 0), e_t = (1, 1) (cos 1/√2), p_v = p_t = uniform (KL 0).
    """
    image = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    image_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    text_logits = torch.log(torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])) + 7.0  # softmax ignores shifts
    return image, text, image_logits, text_logits


def test_l_consistency_matches_hand_computed_toy_example():
    image, text, image_logits, text_logits = _toy()
    lam = 2.0
    # L = 2(1 − cos) + λ(KL(p_v‖p_t) + KL(p_t‖p_v))
    expected = torch.tensor([0.0 + lam * 0.5 * math.log(2.0), 2.0 * (1.0 - 1.0 / math.sqrt(2.0)) + 0.0])
    per_sample = consistency_loss(image, text, image_logits, text_logits, kl_weight=lam, reduction="none")
    torch.testing.assert_close(per_sample, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(consistency_loss(image, text, image_logits, text_logits, kl_weight=lam), expected.mean())
    terms = consistency_terms([image, text], [image_logits, text_logits], lam)
    torch.testing.assert_close(terms.cosine, torch.tensor([1.0, 1.0 / math.sqrt(2.0)]))
    torch.testing.assert_close(terms.kl, torch.tensor([0.5 * math.log(2.0), 0.0]), atol=1e-6, rtol=0)
    # symmetric in the modalities (the sum runs over ordered pairs)
    swapped = consistency_loss(text, image, text_logits, image_logits, kl_weight=lam, reduction="none")
    torch.testing.assert_close(swapped, per_sample)
    assert consistency_score(image, text) == pytest.approx((1.0 + 1.0 / math.sqrt(2.0)) / 2, abs=1e-6)


def test_l_consistency_over_three_modalities_counts_every_ordered_pair():
    image, text, image_logits, text_logits = _toy()
    # a third modality identical to the image adds the pairs (v,3),(3,v) = 0 and (t,3),(3,t) = L(v,t): twice L(v,t)
    three = consistency_terms([image, text, image], [image_logits, text_logits, image_logits]).loss
    two = consistency_terms([image, text], [image_logits, text_logits]).loss
    torch.testing.assert_close(three, 2.0 * two)
    with pytest.raises(ValueError, match="modalities"):
        consistency_terms([image], [image_logits])


def test_gradient_flows_into_embeddings_and_logits():
    image, text, image_logits, text_logits = (t.clone().requires_grad_(True) for t in _toy())
    consistency_loss(image, text, image_logits, text_logits).backward()
    for tensor in (image, text, image_logits, text_logits):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    # sample 1 disagrees in direction, so its embeddings get a non-zero pull; sample 0's logits disagree
    assert image.grad[1].abs().sum() > 0 and text.grad[1].abs().sum() > 0
    assert image_logits.grad[0].abs().sum() > 0 and text_logits.grad[0].abs().sum() > 0


def test_detector_calibrated_on_synthetic_clean_scores_hits_target_fpr():
    rng = np.random.default_rng(0)
    calibration, held_out = rng.gamma(2.0, 0.3, size=2000), rng.gamma(2.0, 0.3, size=2000)
    detector = ConsistencyDetector(target_fpr=0.05)
    threshold = detector.calibrate(calibration)
    assert abs(detector.flag_rate(held_out) - 0.05) <= 0.03
    assert (calibration > threshold).mean() <= 0.05
    report = detector.evaluate(held_out, held_out + 2.0)
    assert report.tpr > 0.95 and report.auroc > 0.95 and abs(report.fpr - 0.05) <= 0.03


def test_detector_calibrated_on_backbone_clean_scores_holds_fpr_on_another_split():
    backbone = load_backbone()
    val = load_dataset("shapes", split="val", n=1000, seed=0, image_size=backbone.image_size)
    test = load_dataset("shapes", split="test", n=1000, seed=0, image_size=backbone.image_size)
    task = ZeroShotTask.from_dataset(backbone, val)
    detector = ConsistencyDetector(target_fpr=0.05)
    detector.calibrate(consistency_scores(task, PairBatch.from_dataset(backbone, val)))
    fpr = detector.flag_rate(consistency_scores(task, PairBatch.from_dataset(backbone, test)))
    assert abs(fpr - 0.05) <= 0.03, f"held-out clean FPR {fpr:.3f} is more than 3 points off the 5% target"


def test_detector_errors_and_auroc_edge_cases():
    with pytest.raises(ValueError, match="target_fpr"):
        ConsistencyDetector(target_fpr=0.0)
    with pytest.raises(RuntimeError, match="calibrate"):
        ConsistencyDetector().flags(np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        ConsistencyDetector().calibrate(np.array([0.1, np.nan]))
    assert auroc(np.array([0.0, 0.1]), np.array([0.2, 0.3])) == 1.0
    assert math.isnan(auroc(np.array([]), np.array([1.0])))
