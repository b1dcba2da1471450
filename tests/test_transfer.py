"""`transfer`: inner attacks crafted on a surrogate backbone and applied to the target."""

from __future__ import annotations

import json
import textwrap

import open_clip
import pytest
import torch

from cmai_env.attacks import PairBatch, ZeroShotTask, attack_class, available_attacks, make_attack
from cmai_env.attacks.transfer import nearest_tokens
from cmai_env.cli.main import main
from cmai_env.data import load_dataset
from cmai_env.models import checkpoint_info, load_backbone
from cmai_env.models.backbone import Backbone
from cmai_env.scenario import ScenarioError, load_scenario

EPS = 8 / 255


@pytest.fixture(scope="module")
def target():
    backbone = load_backbone("cmai-tiny")
    data = load_dataset("shapes", split="test", n=96, seed=3, image_size=backbone.image_size)
    return ZeroShotTask.from_dataset(backbone, data), PairBatch.from_dataset(backbone, data)


def image_asr(task: ZeroShotTask, clean: PairBatch, adv: PairBatch) -> float:
    with torch.no_grad():
        ok = task.image_logits(clean.images).argmax(-1) == clean.labels
        still = task.image_logits(adv.images).argmax(-1) == clean.labels
    return float((ok & ~still).sum()) / max(int(ok.sum()), 1)


def test_registered_with_a_black_box_threat_model():
    assert "transfer" in available_attacks()
    cls = attack_class("transfer")
    assert set(cls.parameters()) == {"inner", "surrogate", "surrogate_pretrained", "eps", "steps", "step_size", "k"}
    assert cls.parameters()["surrogate"] == "cmai-tiny-rn" and cls.embedding is None
    assert cls.modality == "image" and cls.threat_model.knowledge == "black-box"
    text = make_attack("transfer", inner="token_substitution", k=2)
    assert text.modality == "text" and text.threat_model.controls == ("text",) and text.inner_attack.k == 2
    both = make_attack("transfer", inner="co_attack")
    assert both.threat_model.controls == ("image", "text") and both.threat_model.knowledge == "black-box"


def test_parameters_are_validated_and_forwarded():
    attack = make_attack("transfer", eps="4/255", steps=3.0)
    assert attack.inner_attack.eps == pytest.approx(4 / 255) and attack.inner_attack.steps == 3
    assert attack.inner_attack.step_size == pytest.approx(2 / 255)  # unset: the inner default
    with pytest.raises(ValueError, match="inner must be a registered attack"):
        make_attack("transfer", inner="pgd_linfinity")
    with pytest.raises(ValueError, match="other than 'transfer'"):
        make_attack("transfer", inner="transfer")
    with pytest.raises(ValueError, match="surrogate 'ResNet-9000'"):
        make_attack("transfer", surrogate="ResNet-9000")
    with pytest.raises(ValueError, match="'pgd_linf' has no parameter 'k'"):
        make_attack("transfer", k=1)
    with pytest.raises(ValueError, match="eps must be ≥ 0"):
        make_attack("transfer", eps=-1.0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        make_attack("transfer", steps=2.5)
    with pytest.raises(ValueError, match="does not exist"):
        make_attack("transfer", surrogate_pretrained="/nowhere/model.pt")


def test_same_model_as_surrogate_is_the_white_box_attack(target):
    task, batch = target
    transfer = make_attack("transfer", surrogate="cmai-tiny", eps=EPS, steps=5)
    crafted = transfer(task, batch, torch.Generator().manual_seed(1)).batch
    white = make_attack("pgd_linf", eps=EPS, steps=5)(task, batch, torch.Generator().manual_seed(1)).batch
    assert torch.equal(crafted.images, white.images)
    assert image_asr(task, batch, crafted) > 0.9


def test_cross_architecture_transfer_is_weaker_than_white_box(target):
    task, batch = target
    params = [p.detach().clone() for p in task.backbone.parameters()]
    transfer = make_attack("transfer", eps=EPS)  # default surrogate: the embedded cmai-tiny-rn
    result = transfer(task, batch, torch.Generator().manual_seed(0))
    adv = result.batch
    assert result.modality == "image" and adv.images.shape == batch.images.shape
    assert float((adv.images - batch.images).abs().max()) <= EPS + 1e-6
    assert float(adv.images.min()) >= 0.0 and float(adv.images.max()) <= 1.0
    assert torch.equal(adv.tokens, batch.tokens) and torch.equal(adv.labels, batch.labels)
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(task.backbone.parameters(), params))
    surrogate_task = transfer.surrogate_task(task)
    assert surrogate_task.backbone.name == "cmai-tiny-rn" and surrogate_task.class_names == task.class_names
    white_on_surrogate = transfer.inner_attack(surrogate_task, batch, torch.Generator().manual_seed(0)).batch
    assert torch.equal(white_on_surrogate.images, adv.images)  # same examples, scored on two models
    surrogate_asr, transfer_asr = image_asr(surrogate_task, batch, adv), image_asr(task, batch, adv)
    # On shapes, PGD examples of the convolutional surrogate barely move the ViT (README: transfer matrix)
    assert surrogate_asr > 0.9 and transfer_asr < surrogate_asr - 0.5


def tiny_clip(image_size: int) -> Backbone:
    """A random-weight ViT CLIP at another resolution (built directly, outside open_clip's registry)."""
    clip = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=image_size),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=20, vocab_size=49408, width=32, heads=2, layers=1),
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=20)
    return Backbone("tiny-48", clip.eval(), tokenizer, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def test_other_resolution_and_context_length(target):
    task, batch = target
    transfer = make_attack("transfer", surrogate="cmai-tiny", eps=EPS, steps=2)
    transfer._surrogate = tiny_clip(48)  # any open_clip model can stand in for the attacker's own
    surrogate = transfer.surrogate_task(task).backbone
    assert (surrogate.image_size, surrogate.context_length) == (48, 20)
    moved = transfer.to_surrogate(batch, surrogate)
    assert moved.images.shape[-1] == 48 and moved.tokens.shape[-1] == 20
    adv = transfer(task, batch, torch.Generator().manual_seed(0)).batch
    assert adv.images.shape == batch.images.shape and adv.tokens.shape == batch.tokens.shape
    delta = (adv.images - batch.images).abs()
    assert float(delta.max()) <= EPS + 1e-6 and float(delta.max()) > EPS / 4  # resized δ keeps the ℓ∞ budget


def test_continuous_text_perturbations_become_tokens(target):
    task, batch = target
    backbone = task.backbone
    clean = batch.subset(slice(0, 8))
    embeds = backbone.token_embeddings(clean.tokens).detach().clone()
    swap = backbone.tokenize("triangle")[0, 1]  # the word's id (after start-of-text)
    embeds[0, 2] = backbone.clip.token_embedding.weight[swap] + 1e-3  # nearest token of a moved position
    tokens = nearest_tokens(backbone, clean.tokens, embeds)
    assert tokens[0, 2] == swap and torch.equal(tokens[1:], clean.tokens[1:]) and torch.equal(tokens[0, 3:], clean.tokens[0, 3:])
    attack = make_attack("transfer", inner="text_embedding_pgd", surrogate="cmai-tiny", eps=0.6, steps=5)
    result = attack(task, clean, torch.Generator().manual_seed(0))
    adv = result.batch
    assert result.modality == "text" and adv.token_embeds is None  # only text crosses over
    changed = adv.tokens != clean.tokens
    assert bool(changed.any())
    specials = (clean.tokens == backbone.eot_token_id) | (clean.tokens == backbone.eot_token_id - 1) | (clean.tokens == 0)
    assert not bool((changed & specials).any())  # start/end-of-text and padding never move
    assert torch.equal(adv.images, clean.images)


def test_universal_inner_attack_is_fitted_on_the_surrogate(target):
    task, batch = target
    attack = make_attack("transfer", inner="universal", surrogate="cmai-tiny", eps=EPS, steps=2)
    attack.fit(task, batch, torch.Generator().manual_seed(0))
    assert attack.inner_attack.fitted_on == len(batch)
    adv = attack(task, batch.subset(slice(0, 4)), torch.Generator().manual_seed(0)).batch
    assert torch.allclose(adv.images, (batch.images[:4] + attack.inner_attack.delta).clamp(0, 1))


SCENARIO = textwrap.dedent(
    """
    name: transfer_test
    dataset: {name: shapes, train_n: 64, probe_n: 32}
    batch_size: 16
    defense: {attack_steps: 1}
    phases:
      - name: black_box
        rounds: 2
        adversarial_share: 0.5
        attacks:
          - {name: transfer, params: {inner: pgd_linf, surrogate: cmai-tiny-rn, eps: 8/255, steps: 2}}
    """
)


def test_transfer_in_a_scenario_file(tmp_path):
    from cmai_env.env import CMAIEnv

    path = tmp_path / "transfer.yaml"
    path.write_text(SCENARIO)
    entry = load_scenario(path).phases[0].attacks[0]
    built = make_attack(entry.name, **entry.params)  # as the pixel fidelity builds it
    assert built.inner_attack.eps == pytest.approx(EPS) and built.inner_attack.steps == 2 and built.surrogate == "cmai-tiny-rn"
    bad = tmp_path / "bad.yaml"
    bad.write_text(SCENARIO.replace("steps: 2}", "steps: 2, k: 1}"))
    with pytest.raises(ScenarioError, match="'pgd_linf' has no parameter 'k'"):
        load_scenario(bad)
    with pytest.raises(ValueError, match=r"'transfer' (has|declares) no embedding-fidelity counterpart"):
        CMAIEnv(scenario=path, fidelity="embedding")
    env = CMAIEnv(scenario=path, fidelity="pixel")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(env.action_space.sample() * 0)
    assert set(info["asr_per_attack"]) == {"transfer"} and 0.0 <= info["asr_per_attack"]["transfer"] <= 1.0
    assert info["attacks"] == ["transfer"] and reward == reward  # finite


def test_cli_reports_target_and_surrogate_asr(capsys):
    argv = [
        "attack", "eval", "--attack", "transfer", "--param", "inner=pgd_linf", "--param", "surrogate=cmai-tiny-rn",
        "--eps", "8/255", "--steps", "5", "--n", "64", "--calibration-n", "64", "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["attack"] == "transfer" and out["backbone"] == "cmai-tiny" and out["params"]["surrogate"] == "cmai-tiny-rn"
    assert out["threat_model"] == {"controls": ["image"], "knowledge": "black-box", "detector_aware": False}
    surrogate = out["surrogate"]
    assert surrogate["backbone"] == "cmai-tiny-rn" and surrogate["white_box_asr"] > 0.9
    assert out["asr"] < surrogate["white_box_asr"]
    assert checkpoint_info("cmai-tiny-rn")["zero_shot_accuracy"]["value"] >= 0.95
