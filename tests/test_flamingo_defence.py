"""FARE on cmai-tiny-flamingo: the LM's own vision tower, what moves, and that it resists PGD better."""

from __future__ import annotations

import json

import pytest
import torch

from cmai_env.attacks import make_attack
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone
from cmai_env.models.flamingo import VISION_PREFIX
from cmai_env.models.flamingo_defence import FlamingoAdvTrainConfig, adversarial_finetune, embedding_distance, fare_loss
from cmai_env.models.flamingo_task import GenerativeTask, generative_attack
from cmai_env.robustness import evaluate_attack

NAME = "cmai-tiny-flamingo"


@pytest.fixture(scope="module")
def data():
    return load_dataset("shapes", split="test", n=48, seed=0)


def test_split_tower_is_a_copy_and_the_clip_head_keeps_the_original(data):
    model = load_backbone(NAME)
    images = data.images[:8]
    with torch.no_grad():
        e_v, tokens = model.visual_features(images)
        scores = model.class_log_likelihoods(images, data.class_names)
    tower = model.split_vision_tower()
    assert tower is not model.clip.visual and model.split_vision_tower() is tower
    assert {id(p) for p in model.defended_parameters()} == {id(p) for p in tower.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(model.class_log_likelihoods(images, data.class_names), scores)
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
        e_v2, tokens2 = model.visual_features(images)
    torch.testing.assert_close(e_v2, e_v)  # the CLIP reference does not move
    assert (tokens2 - tokens).abs().max() > 0.1  # the LM now reads the moved copy
    torch.testing.assert_close(model.encode_image(images), e_v)


def test_checkpoint_with_its_own_tower_round_trips(data, tmp_path):
    model = load_backbone(NAME)
    with torch.no_grad():
        for p in model.split_vision_tower().parameters():
            p.mul_(1.1)
    state = model.checkpoint_state_dict()
    assert any(k.startswith(VISION_PREFIX) for k in state)
    torch.save(state, tmp_path / "fare.pt")
    again = load_backbone(NAME, str(tmp_path / "fare.pt"))
    assert again.lm_visual is not None
    with torch.no_grad():
        torch.testing.assert_close(again.visual_features(data.images[:4])[1], model.visual_features(data.images[:4])[1])
    assert load_backbone(NAME).lm_visual is None  # the shipped checkpoint shares the tower


def test_fare_moves_only_the_lm_tower_and_shrinks_the_adversarial_distance(data):
    model = load_backbone(NAME)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = FlamingoAdvTrainConfig(steps=30, batch_size=32, pool_size=256, pgd_steps=3, eps=8 / 255, lr=2e-3, seed=0)
    images = data.images[:32]
    with torch.no_grad():
        reference = model.vision_tokens(images, tower=model.clip.visual)
    start, _ = fare_loss(model, images, reference, config, torch.Generator().manual_seed(1))
    summary = adversarial_finetune(model, config)
    end, _ = fare_loss(model, images, reference, config, torch.Generator().manual_seed(1))
    assert summary["steps_run"] == 30 and summary["defended_parameters"] == sum(p.numel() for p in model.clip.visual.parameters())
    # held-out images: the adversarial embedding distance FARE minimises falls by more than a third
    assert end.item() < 0.66 * start.item(), (start.item(), end.item())
    for name, p in model.named_parameters():
        if not name.startswith("lm_visual."):
            assert torch.equal(before[name], p.detach()), name
            assert p.requires_grad == flags[name], name
    with pytest.raises(ValueError, match="clean_weight"):
        FlamingoAdvTrainConfig(clean_weight=-1)
    with pytest.raises(ValueError, match="batch_size"):
        FlamingoAdvTrainConfig(batch_size=64, pool_size=32)


def test_embedding_distance_is_squared_l2_over_width_mean_over_tokens():
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    b[1, 0] = 0.0
    torch.testing.assert_close(embedding_distance(b, a), torch.tensor([4.0, 8.0 / 3]))


def test_cli_adv_train_runs_fare_on_the_generative_backbone(tmp_path, capsys):
    from cmai_env.cli.main import main

    out = tmp_path / "adv"
    argv = ["adv-train", "--backbone", NAME, "--budget-minutes", "0.03", "--budget-clock", "cpu", "--eval-n", "4", "--train-n", "64",
            "--batch-size", "16", "--attack-steps", "1", "--robust-eval", "none", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training"]["method"] == "fare" and report["training"]["steps"] >= 1
    assert report["training"]["defended_parameters"] == 251_040 and report["config"]["eps"] == pytest.approx(8 / 255)
    assert set(report["before"]) == {"pgd_linf", "text_embedding_pgd", "bridge_image_to_text", "bridge_text_to_image"}
    assert set(report["before"]["pgd_linf"]) >= {"clean_accuracy", "asr", "robust_accuracy", "detector_auroc"}
    assert report["before"]["pgd_linf"]["asr"] >= 0.5 and report["eval_n"] == 4
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    assert load_backbone(NAME, str(out / "model.pt")).lm_visual is not None


def test_cli_adv_train_refuses_clip_trainer_flags_on_the_generative_backbone(tmp_path, capsys):
    from cmai_env.cli.main import main

    assert main(["adv-train", "--backbone", NAME, "--weights", "1,0,0", "--out", str(tmp_path)]) != 0
    assert "--weights configure the CLIP trainer" in capsys.readouterr().err


@pytest.mark.slow
def test_fare_lowers_pgd_asr_of_the_captions(data):
    """150 FARE steps at 4/255 (~30 CPU-s): PGD-5 at 4/255 flips clearly fewer captions (measured 0.75 → 0.53)."""
    model = load_backbone(NAME)
    task = GenerativeTask.from_dataset(model, data)
    clean = task.pairs(data)

    def asr() -> float:
        attack = generative_attack(make_attack("pgd_linf", eps=4 / 255, steps=5, step_size=1 / 255))
        return evaluate_attack(task, clean, attack, torch.Generator().manual_seed(0), batch_size=48).asr

    before = asr()
    adversarial_finetune(model, FlamingoAdvTrainConfig(steps=150, batch_size=32, pool_size=512, pgd_steps=3, eps=4 / 255, lr=3e-3, clean_weight=1))
    after = asr()
    assert after < before - 0.1, (before, after)


def test_autoattack_components_attack_the_captions(data):
    """APGD on the LM's class distribution (GenerativeClassifier), worst case per example as for CLIP."""
    model = load_backbone(NAME)
    task = GenerativeTask.from_dataset(model, data)
    clean = task.pairs(data.subset(range(12)))
    attack = generative_attack(make_attack("autoattack", eps=8 / 255, steps=5, components="apgd_ce"))
    report = evaluate_attack(task, clean, attack, torch.Generator().manual_seed(0), batch_size=12)
    assert report.asr >= 0.8, report
    assert attack.broken_by["apgd_ce"] == round(report.asr * report.clean_accuracy * 12)
