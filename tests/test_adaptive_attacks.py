"""Threat models on every attack, detector-aware attacks against their counterparts, system ASR, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cmai_env.attacks import PairBatch, ThreatModel, ZeroShotTask, attack_class, available_attacks, make_attack
from cmai_env.attacks.adaptive import best_iterate_pgd_linf
from cmai_env.cli.main import main as cmai
from cmai_env.consistency import ConsistencyDetector
from cmai_env.data import load_dataset
from cmai_env.robustness import consistency_scores, evaluate_attack

AWARE = {"aware_pgd_linf": "pgd_linf", "aware_caption_rewrite": "bridge_image_to_text"}


@pytest.fixture(scope="module")
def task(backbone):
    return ZeroShotTask.from_dataset(backbone, load_dataset("shapes", split="test", n=8, seed=0, image_size=backbone.image_size))


@pytest.fixture(scope="module")
def pairs(backbone):
    def load(split: str, n: int, seed: int) -> PairBatch:
        return PairBatch.from_dataset(backbone, load_dataset("shapes", split=split, n=n, seed=seed, image_size=backbone.image_size))

    return load


@pytest.fixture(scope="module")
def detector(task, pairs):
    detector = ConsistencyDetector(0.05)
    detector.calibrate(consistency_scores(task, pairs("val", 128, 1)))
    return detector


def test_every_attack_states_its_threat_model():
    for name in available_attacks():
        cls = attack_class(name)
        model = cls.threat_model
        assert isinstance(model, ThreatModel) and model.controls and set(model.controls) <= {"image", "text"}
        assert model.knowledge in ("white-box", "black-box")
        if not model.detector_aware:
            assert cls.counterpart is None, name
    # attacks that did not declare one get the white-box model of the modality they perturb
    assert attack_class("pgd_linf").threat_model == ThreatModel(("image",))
    assert attack_class("text_embedding_pgd").threat_model == ThreatModel(("text",))
    assert attack_class("co_attack").threat_model == ThreatModel(("image", "text"))
    with pytest.raises(ValueError, match="controls"):
        ThreatModel(("audio",))
    with pytest.raises(ValueError, match="knowledge"):
        ThreatModel(("image",), "grey-box")


def test_detector_aware_attacks_declare_controls_and_a_counterpart_at_the_same_budget():
    assert attack_class("aware_pgd_linf").threat_model == ThreatModel(("image",), "white-box", detector_aware=True)
    assert attack_class("aware_caption_rewrite").threat_model == ThreatModel(("image", "text"), "white-box", detector_aware=True)
    for name, counterpart in AWARE.items():
        attack = make_attack(name, eps=4 / 255, steps=7)
        assert attack.counterpart == counterpart and not attack_class(counterpart).threat_model.detector_aware
        other = make_attack(counterpart, **attack.counterpart_params())
        assert (other.eps, other.steps, other.step_size) == (attack.eps, attack.steps, attack.step_size)
    with pytest.raises(ValueError, match="target"):
        make_attack("aware_caption_rewrite", target="farthest")
    with pytest.raises(ValueError, match="lam"):
        make_attack("aware_pgd_linf", lam=-1.0)


def test_caption_rewrite_names_the_target_class_and_keeps_the_image_budget(task, pairs, backbone):
    batch = pairs("test", 16, 4)
    attack = make_attack("aware_caption_rewrite", steps=5)
    adv = attack(task, batch, torch.Generator().manual_seed(0)).batch
    assert (adv.images - batch.images).abs().max() <= attack.eps + 1e-6
    assert adv.images.min() >= 0 and adv.images.max() <= 1 and torch.equal(adv.labels, batch.labels)
    with torch.no_grad():
        text_pred = backbone.zero_shot_logits(backbone.encode_text(adv.tokens), task.class_embeds).argmax(-1)
        image_pred = task.image_logits(adv.images).argmax(-1)
    assert (text_pred != batch.labels).all()  # every caption now names a wrong class
    assert (image_pred == text_pred).float().mean() >= 0.75  # and the image mostly follows it


def test_caption_rewrite_evades_the_detector_where_its_counterpart_is_caught(task, pairs, detector):
    """Issue 10: with the caption under the attacker's control, the detector misses most flips."""
    clean = pairs("test", 64, 7)
    aware = evaluate_attack(task, clean, make_attack("aware_caption_rewrite"), torch.Generator().manual_seed(0), detector)
    base = evaluate_attack(task, clean, make_attack("bridge_image_to_text", eps=8 / 255), torch.Generator().manual_seed(0), detector)
    assert aware.calibrated_on == base.calibrated_on == "given"
    assert base.asr > 0.8 and base.detector_tpr_flipped > 0.9 and base.system_asr < 0.1
    assert aware.asr > 0.8 and aware.detector_tpr < 0.5 and aware.system_asr > 0.5
    assert aware.detector_auroc < base.detector_auroc - 0.3
    for report in (aware, base):  # system ASR = flips that pass the detector
        assert report.system_asr == pytest.approx(report.asr * (1 - report.detector_tpr_flipped))


def test_image_only_aware_attack_lowers_consistency_but_stays_caught(task, pairs, detector):
    """Issue 10: while the caption is trusted, no image-only flip passes the detector."""
    clean = pairs("test", 48, 9)
    aware = evaluate_attack(task, clean, make_attack("aware_pgd_linf"), torch.Generator().manual_seed(0), detector)
    base = evaluate_attack(task, clean, make_attack("pgd_linf"), torch.Generator().manual_seed(0), detector)
    assert aware.asr > 0.5
    assert aware.consistency_adv > base.consistency_adv + 0.1  # it did optimise the detector's score
    assert aware.system_asr <= 0.05 and base.system_asr <= 0.05


def test_best_iterate_keeps_the_successful_point_with_the_lowest_consistency():
    # 1-pixel images; success when x > 0.55, "consistency" |x − 0.6|, objective pushes x up every step.
    images = torch.full((2, 1, 1, 1), 0.5)

    def objective(x):
        flat = x.flatten(1)[:, 0]
        return flat, flat > 0.55, (flat - 0.6).abs()

    best = best_iterate_pgd_linf(objective, images, eps=0.3, steps=6, step_size=0.05, random_start=False, generator=None)
    assert torch.allclose(best.flatten(), torch.full((2,), 0.6))  # not the last iterate (0.8)
    never = best_iterate_pgd_linf(objective, images, eps=0.04, steps=3, step_size=0.05, random_start=False, generator=None)
    assert torch.allclose(never.flatten(), torch.full((2,), 0.54))  # never successful: the last iterate


def test_aware_attacks_are_deterministic_and_leave_the_model_alone(task, pairs, backbone):
    batch = pairs("test", 8, 3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    for name in AWARE:
        first = make_attack(name, steps=2)(task, batch, torch.Generator().manual_seed(3)).batch
        second = make_attack(name, steps=2)(task, batch, torch.Generator().manual_seed(3)).batch
        other = make_attack(name, steps=2)(task, batch, torch.Generator().manual_seed(4)).batch
        assert torch.equal(first.images, second.images) and torch.equal(first.tokens, second.tokens)
        assert not torch.equal(first.images, other.images)
    assert all(p.grad is None for p in backbone.parameters()) and not backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_cli_list_shows_threat_models_and_eval_puts_the_counterpart_beside(capsys):
    assert cmai(["attack", "list"]) == 0
    listing = capsys.readouterr().out
    assert "controls image+text · white-box · detector-aware · non-adaptive counterpart: bridge_image_to_text" in listing
    assert "square [image]" in listing and "controls image · black-box" in listing
    args = ["attack", "eval", "--attack", "aware_caption_rewrite", "--steps", "3", "--n", "24", "--seed", "2", "--json"]
    assert cmai(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threat_model"] == {"controls": ["image", "text"], "knowledge": "white-box", "detector_aware": True}
    counterpart = result["counterpart"]
    assert counterpart["attack"] == "bridge_image_to_text" and counterpart["params"]["steps"] == 3
    assert counterpart["params"]["eps"] == pytest.approx(8 / 255)
    assert counterpart["detector_tpr"] > result["detector_tpr"]
    assert counterpart["system_asr"] < result["system_asr"]
    assert cmai(args + ["--no-counterpart"]) == 0
    assert "counterpart" not in json.loads(capsys.readouterr().out)
