"""Attack library: budgets, valid range, effect, side effects, determinism, registry, torchattacks parity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmai_env.attacks import (
    PairBatch,
    ZeroShotTask,
    attack_class,
    attack_success_rate,
    available_attacks,
    make_attack,
    task_loss,
    token_masks,
)
from cmai_env.cli.main import main as cmai
from cmai_env.data import load_dataset
from cmai_env.robustness import evaluate_attack

EXPECTED = {
    "bridge_image_to_text",
    "bridge_text_to_image",
    "co_attack",
    "fgsm",
    "pgd_l2",
    "pgd_linf",
    "text_embedding_pgd",
    "token_substitution",
    "universal",
}

# Small budgets / few steps so that the whole file stays fast on two CPU cores.
SMALL = {
    "fgsm": {},
    "pgd_linf": {"steps": 3},
    "pgd_l2": {"steps": 3, "step_size": 0.2},
    "text_embedding_pgd": {"steps": 3},
    "token_substitution": {"k": 2, "candidate_vocab": 256},
    "bridge_image_to_text": {"steps": 3},
    "bridge_text_to_image": {"steps": 3},
    "co_attack": {"steps": 3, "text_steps": 3},
    "universal": {"steps": 2, "step_size": 4 / 255, "batch_size": 8},
}
# Which budget each attack spends: image "linf"/"l2"/None, text "token_l2"/"tokens"/None.
BUDGET = {
    "fgsm": ("linf", None),
    "pgd_linf": ("linf", None),
    "pgd_l2": ("l2", None),
    "text_embedding_pgd": (None, "token_l2"),
    "token_substitution": (None, "tokens"),
    "bridge_image_to_text": ("linf", None),
    "bridge_text_to_image": (None, "token_l2"),
    "co_attack": ("linf", "token_l2"),
    "universal": ("linf", None),
}


@pytest.fixture(scope="module")
def data(backbone):
    return load_dataset("shapes", split="test", n=8, seed=3, image_size=backbone.image_size)


def _run(name: str, task: ZeroShotTask, batch: PairBatch, seed: int = 0):
    attack = make_attack(name, **SMALL[name])
    return attack, attack(task, batch, torch.Generator().manual_seed(seed))


#: Attacks whose properties are tested in their own file (evaluation-grade chains, detector-aware
#: and transfer attacks need fixtures of their own), instead of by the generic tests below.
TESTED_ELSEWHERE = {
    "apgd_ce": "test_autoattack.py",
    "apgd_t": "test_autoattack.py",
    "fab_t": "test_autoattack.py",
    "square": "test_autoattack.py",
    "autoattack": "test_autoattack.py",
    "aware_pgd_linf": "test_adaptive_attacks.py",
    "aware_caption_rewrite": "test_adaptive_attacks.py",
    "transfer": "test_transfer.py",
}


def test_registry_holds_exactly_the_documented_attacks():
    assert set(available_attacks()) == EXPECTED | set(TESTED_ELSEWHERE)  # a new attack must get tests
    assert set(SMALL) == EXPECTED and set(BUDGET) == EXPECTED
    for name, test_file in TESTED_ELSEWHERE.items():
        assert f'"{name}"' in (Path(__file__).parent / test_file).read_text(), f"{name} is not tested in {test_file}"
    for name in available_attacks():
        cls = attack_class(name)
        assert cls.modality in ("image", "text", "both") and cls.description
        assert all(isinstance(key, str) for key in cls.parameters())


def test_registry_rejects_unknown_names_and_parameters_listing_allowed_ones():
    with pytest.raises(ValueError, match="pgd_linf") as unknown:
        make_attack("pgd_inf")
    assert "token_substitution" in str(unknown.value)
    with pytest.raises(ValueError, match="step_size") as bad_param:
        make_attack("pgd_linf", epsilon=0.1)
    assert "epsilon" in str(bad_param.value) and "random_start" in str(bad_param.value)
    with pytest.raises(ValueError, match="steps"):
        make_attack("pgd_linf", steps=0)
    with pytest.raises(ValueError, match="eps"):
        make_attack("fgsm", eps=-0.1)
    with pytest.raises(ValueError, match="target"):
        make_attack("bridge_image_to_text", target="farthest")
    assert make_attack("pgd_linf", eps=4 / 255).eps == pytest.approx(4 / 255)
    assert "fitted_on" not in attack_class("universal").parameters()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_respects_budget_and_valid_range(name, task, batch, backbone):
    attack, result = _run(name, task, batch)
    adv = result.batch
    assert result.modality == attack.modality
    assert adv.images.min() >= 0.0 and adv.images.max() <= 1.0
    assert torch.equal(adv.labels, batch.labels)
    image_budget, text_budget = BUDGET[name]
    delta = adv.images - batch.images
    if image_budget is None:
        assert torch.equal(adv.images, batch.images)
    elif image_budget == "linf":
        assert delta.abs().max() <= attack.eps + 1e-6
        assert delta.abs().max() > 0.5 * attack.eps  # it did spend the budget
    else:
        norms = delta.flatten(1).norm(dim=1)
        assert norms.max() <= attack.eps + 1e-5 and norms.max() > 0.5 * attack.eps

    real, content = token_masks(backbone, batch.tokens)
    if text_budget is None:
        assert torch.equal(adv.tokens, batch.tokens) and adv.token_embeds is None
    elif text_budget == "token_l2":
        eps = attack.text_eps if name == "co_attack" else attack.eps
        assert torch.equal(adv.tokens, batch.tokens) and adv.token_embeds is not None
        per_token = (adv.token_embeds - backbone.token_embeddings(batch.tokens)).norm(dim=-1)
        assert per_token.max() <= eps + 1e-5
        assert per_token[~content].abs().max() == 0  # start/end-of-text and padding never move
        assert per_token[content].max() > 0.5 * eps
    else:
        assert adv.token_embeds is None
        changed = adv.tokens != batch.tokens
        assert changed.sum(-1).max() <= attack.k
        assert not changed[~content].any()  # special tokens and padding untouched
        assert changed.any()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_raises_task_loss(name, task, batch):
    attack, result = _run(name, task, batch)
    with torch.no_grad():
        clean = task_loss(task.forward(batch), batch.labels, attack.modality)
        adv = task_loss(task.forward(result.batch), batch.labels, attack.modality)
    assert adv > clean + 0.1, f"{name}: task loss {float(clean):.4f} → {float(adv):.4f}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_leaves_parameters_mode_and_grads_alone(name, task, batch, backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    frozen = backbone.clip.logit_scale
    frozen.requires_grad_(False)  # a caller's own freezing must survive the attack
    backbone.train()
    try:
        _run(name, task, batch)
        assert backbone.training and all(m.training for m in backbone.modules())
        assert all(p.grad is None for p in backbone.parameters())
        assert not frozen.requires_grad
        assert all(p.requires_grad for n, p in backbone.named_parameters() if p is not frozen)
        after = backbone.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        frozen.requires_grad_(True)
        backbone.eval()
    _run(name, task, batch)
    assert not backbone.training


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_is_deterministic_under_a_seeded_generator(name, task, batch):
    _, first = _run(name, task, batch, seed=7)
    _, second = _run(name, task, batch, seed=7)
    assert torch.equal(first.batch.images, second.batch.images)
    assert torch.equal(first.batch.tokens, second.batch.tokens)
    if first.batch.token_embeds is not None:
        assert torch.equal(first.batch.token_embeds, second.batch.token_embeds)
    if getattr(make_attack(name), "random_start", False) and name != "universal":
        _, other = _run(name, task, batch, seed=8)
        moved = other.batch.token_embeds if BUDGET[name][0] is None else other.batch.images
        same = first.batch.token_embeds if BUDGET[name][0] is None else first.batch.images
        assert not torch.equal(moved, same), f"{name}: the generator does not drive the random start"


def test_universal_is_fitted_once_and_transfers_to_unseen_images(backbone, task):
    fit = PairBatch.from_dataset(backbone, load_dataset("shapes", split="train", n=64, seed=0, image_size=backbone.image_size))
    unseen = PairBatch.from_dataset(backbone, load_dataset("shapes", split="test", n=32, seed=5, image_size=backbone.image_size))
    attack = make_attack("universal", steps=3, step_size=2 / 255, batch_size=32)
    assert attack.fitted_on is None and attack.delta is None
    attack.fit(task, fit, torch.Generator().manual_seed(0))
    assert attack.fitted_on == 64 and attack.delta.shape == (1, 3, backbone.image_size, backbone.image_size)
    assert attack.delta.abs().max() <= attack.eps + 1e-7
    adv = attack(task, unseen, torch.Generator().manual_seed(1)).batch
    interior = (unseen.images > attack.eps) & (unseen.images < 1 - attack.eps)  # no clamping there
    delta = adv.images - unseen.images
    assert torch.allclose(delta[interior], attack.delta.expand_as(delta)[interior], atol=1e-6)
    with torch.no_grad():
        assert task_loss(task.forward(adv), unseen.labels, "image") > task_loss(task.forward(unseen), unseen.labels, "image")
    # unfitted: perturb fits on the batch it is given, once
    lazy = make_attack("universal", steps=1, batch_size=32)
    lazy(task, unseen, torch.Generator().manual_seed(0))
    assert lazy.fitted_on == len(unseen)


def test_bridge_image_to_text_pulls_images_toward_the_nearest_wrong_prompt(task, batch, backbone):
    attack = make_attack("bridge_image_to_text", steps=5)
    adv = attack(task, batch, torch.Generator().manual_seed(0)).batch
    with torch.no_grad():
        clean_sim = backbone.encode_image(batch.images) @ task.class_embeds.T
        clean_sim[torch.arange(len(batch)), batch.labels] = -2.0
        target = clean_sim.argmax(-1)
        before = clean_sim.gather(1, target[:, None]).squeeze(1)
        after = (backbone.encode_image(adv.images) @ task.class_embeds.T).gather(1, target[:, None]).squeeze(1)
    assert (after > before).all()


def test_pgd_linf_is_at_least_as_strong_as_torchattacks(backbone):
    torchattacks = pytest.importorskip("torchattacks")
    data = load_dataset("shapes", split="test", n=192, seed=11, image_size=backbone.image_size)
    task = ZeroShotTask.from_dataset(backbone, data)
    batch = PairBatch.from_dataset(backbone, data)
    model = backbone.zero_shot_classifier(data.class_names, data.templates)
    eps, alpha, steps = 4 / 255, 1 / 255, 10
    torch.manual_seed(0)
    reference = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(batch.images, batch.labels)
    ours = make_attack("pgd_linf", eps=eps, step_size=alpha, steps=steps)(task, batch, torch.Generator().manual_seed(0)).batch
    with torch.no_grad():
        clean_ok = model(batch.images).argmax(-1) == batch.labels
        ref_asr = attack_success_rate(clean_ok, model(reference).argmax(-1) == batch.labels)
        our_asr = attack_success_rate(clean_ok, model(ours.images).argmax(-1) == batch.labels)
    assert clean_ok.float().mean() > 0.9
    assert 0.2 < ref_asr < 0.98, f"torchattacks ASR {ref_asr:.3f}: the comparison is saturated, change eps"
    assert our_asr >= ref_asr - 0.02, f"pgd_linf ASR {our_asr:.3f} vs torchattacks {ref_asr:.3f}"


def test_evaluate_attack_report(backbone, task):
    clean = PairBatch.from_dataset(backbone, load_dataset("shapes", split="test", n=48, seed=1, image_size=backbone.image_size))
    calibration = PairBatch.from_dataset(backbone, load_dataset("shapes", split="val", n=64, seed=1, image_size=backbone.image_size))
    report = evaluate_attack(
        task, clean, make_attack("pgd_linf", steps=3), torch.Generator().manual_seed(0), calibration=calibration, batch_size=20
    )
    assert report.n == 48 and report.calibrated_on == "calibration"
    assert report.clean_accuracy > 0.9
    # ASR is the share of originally correct predictions flipped: at least the net accuracy drop / clean accuracy
    assert report.asr >= (report.clean_accuracy - report.robust_accuracy) / report.clean_accuracy - 1e-9
    assert report.asr > 0.5 and report.loss_adv > report.loss_clean
    assert report.consistency_adv < report.consistency_clean
    assert 0.0 <= report.detector_fpr <= 1.0 and report.detector_auroc > 0.8
    assert report.images_per_s > 0 and set(report.as_dict()) >= {"clean_accuracy", "asr", "detector_auroc"}


def test_cli_attack_list_and_eval_json(capsys):
    assert cmai(["attack", "list"]) == 0
    listing = capsys.readouterr().out
    for name in EXPECTED:
        assert name in listing
    assert "eps=8/255" in listing and "k=1" in listing
    code = cmai(["attack", "eval", "--attack", "pgd_linf", "--eps", "4/255", "--steps", "2", "--n", "16", "--seed", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("clean_accuracy", "asr", "consistency_clean", "consistency_adv", "detector_auroc", "detector_tpr", "detector_fpr"):
        assert isinstance(result[key], float), key
    assert result["n"] == 16 and result["params"]["eps"] == pytest.approx(4 / 255) and result["params"]["steps"] == 2
    assert cmai(["attack", "eval", "--attack", "fgsm", "--k", "2", "--n", "4"]) == 1
    assert "allowed" in capsys.readouterr().err
