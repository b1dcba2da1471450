"""cmai-tiny-flamingo: the generative backbone, its tokenizer, checkpoint, task and attacks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cmai_env.attacks import make_attack
from cmai_env.cli.main import main
from cmai_env.consistency import auroc
from cmai_env.data import load_dataset
from cmai_env.data.shapes import render_shapes
from cmai_env.models import available_backbones, load_backbone
from cmai_env.models.flamingo import (
    FlamingoBackbone,
    FlamingoSpec,
    build_tokenizer,
    load_tokenizer,
    shapes_vocabulary,
)
from cmai_env.models.flamingo_pretrain import FlamingoPretrainConfig, pretrain_flamingo
from cmai_env.models.flamingo_task import GenerativeTask, generative_attack
from cmai_env.models.registry import checkpoint_info, weights_dir
from cmai_env.robustness import consistency_scores, evaluate_attack

NAME = "cmai-tiny-flamingo"


@pytest.fixture(scope="module")
def backbone() -> FlamingoBackbone:
    return load_backbone(NAME)


@pytest.fixture(scope="module")
def test_data():
    return load_dataset("shapes", split="test", n=200, seed=0)


# ---------------------------------------------------------------------------- tokenizer and config
def test_vocabulary_covers_every_shapes_caption_without_unknown_words():
    tokenizer = build_tokenizer(shapes_vocabulary())
    _, captions, _ = render_shapes(300, __import__("numpy").random.default_rng(1))
    unk = tokenizer.token_to_id("[UNK]")
    for caption in captions:
        ids = tokenizer.encode(caption, add_special_tokens=False).ids
        assert unk not in ids, caption
        assert tokenizer.decode(ids) == caption


def test_tokenizer_is_json_and_bad_files_are_clear_errors(tmp_path):
    tokenizer = build_tokenizer(["red", "circle"])
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    json.loads(path.read_text())  # plain JSON, nothing pickled
    assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    shuffled = build_tokenizer([]).to_str().replace('"[PAD]":0', '"[PAD]":9')
    (tmp_path / "ids.json").write_text(shuffled)
    with pytest.raises(ValueError, match=r"\[PAD\] must have id 0"):
        load_tokenizer(tmp_path / "ids.json")


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"architecture": "flamingo", "colour": 1}, r"unknown field\(s\) \['colour'\]"),
        ({"architecture": "clip"}, "'architecture' must be 'flamingo'"),
        ({"architecture": "flamingo", "class_template": "a {} and {}"}, "class_template"),
        ({"architecture": "flamingo", "max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, raw, match):
    path = tmp_path / "my-flamingo.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match) as info:
        FlamingoSpec.from_file(path)
    assert "my-flamingo.json" in str(info.value)


# ---------------------------------------------------------------------------- the embedded model
def test_listed_and_checkpoint_small_with_provenance():
    assert NAME in available_backbones()
    assert (weights_dir() / f"{NAME}.pt").stat().st_size <= 15 * 2**20
    info = checkpoint_info(NAME)
    assert info["command"].startswith("cmai backbone pretrain --arch flamingo")
    assert info["config"]["seed"] == 0 and info["train_cpu_minutes"] <= 10.0
    assert info["caption_accuracy"]["n"] == 1000 and info["caption_accuracy"]["value"] >= 0.90


def test_captions_and_likelihoods_classify_held_out_shapes(backbone, test_data):
    captions = backbone.generate(test_data.images)
    assert all(c.startswith("a photo of a ") for c in captions)
    caption_acc = (backbone.caption_classes(captions, test_data.class_names) == test_data.labels).float().mean()
    with torch.no_grad():
        lm_acc = (backbone.class_log_likelihoods(test_data.images, test_data.class_names).argmax(-1) == test_data.labels).float().mean()
    assert caption_acc >= 0.9 and lm_acc >= 0.9, (caption_acc, lm_acc)


def test_random_language_model_does_not_caption():
    random = load_backbone(NAME, pretrained="random")
    data = load_dataset("shapes", split="test", n=60, seed=0)
    hits = random.caption_classes(random.generate(data.images), data.class_names) == data.labels
    assert hits.float().mean() < 0.3


def test_cached_class_scores_equal_full_sequence_scores(backbone, test_data):
    """The KV-cached scorer equals scoring each full caption with one plain forward."""
    images = test_data.images[:4]
    with torch.no_grad():
        fast = backbone.class_log_likelihoods(images, test_data.class_names)
        latents = backbone.image_latents(images)
        for c, name in enumerate(test_data.class_names[:6]):
            ids = torch.tensor([[1, *backbone.lm_encode(f"a photo of a {name}"), 2]]).expand(4, -1)
            logits = backbone.lm_forward(latents, backbone.lm_token_embeddings(ids[:, :-1])).logits
            full = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[:, 4:].sum(-1)
            torch.testing.assert_close(fast[:, c], full, atol=1e-4, rtol=1e-4)


def test_class_log_likelihoods_are_differentiable_in_pixels(backbone, test_data):
    images = test_data.images[:3].clone().requires_grad_(True)
    scores = backbone.class_log_likelihoods(images, test_data.class_names, "a drawing of a {}")
    assert scores.shape == (3, 30) and bool((scores <= 0).all())
    (grad,) = torch.autograd.grad(scores[:, 0].sum(), images)
    assert grad.abs().sum() > 0


def test_generate_respects_max_new_tokens_and_rejects_zero(backbone, test_data):
    one = backbone.generate(test_data.images[:5], prompt="the", max_new_tokens=1)
    assert all(len(c.split()) == 2 and c.startswith("the ") for c in one)
    with pytest.raises(ValueError, match="max_new_tokens"):
        backbone.generate(test_data.images[:1], max_new_tokens=0)


def test_caption_parsing_needs_exactly_one_class():
    names = ["red circle", "blue circle", "red square"]
    got = FlamingoBackbone.caption_classes(["a red circle", "the circle is blue", "a red", "a red blue circle"], names)
    assert got.tolist() == [0, 1, -1, -1]


def test_hidden_states_expose_vision_and_decoder_layers(backbone, test_data):
    tokens = backbone.tokenize(test_data.captions[:2])
    states = backbone.hidden_states(test_data.images[:2], tokens, per_layer=True)
    assert states.image_layers[0].shape == (2, 17, 96) and states.image_layers[1].shape == (2, 8, 96)
    assert len(states.text_layers) == 3 and states.text_layers[-1].shape[-1] == 64
    torch.testing.assert_close(states.image_embeds, backbone.encode_image(test_data.images[:2]))


def test_checkpoint_round_trip_and_mismatch_error(backbone, test_data, tmp_path):
    path = tmp_path / "copy.pt"
    torch.save(backbone.checkpoint_state_dict(), path)
    again = load_backbone(NAME, str(path))
    with torch.no_grad():
        torch.testing.assert_close(
            again.class_log_likelihoods(test_data.images[:4], test_data.class_names),
            backbone.class_log_likelihoods(test_data.images[:4], test_data.class_names),
        )
    state = backbone.checkpoint_state_dict()
    state.pop(next(k for k in state if k.startswith("lm.")))
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken.pt does not fit .*lm\.\* keys"):
        load_backbone(NAME, str(tmp_path / "broken.pt"))


# ---------------------------------------------------------------------------- task, attacks, consistency
@pytest.fixture(scope="module")
def task(backbone, test_data):
    return GenerativeTask.from_dataset(backbone, test_data)


def test_pgd_flips_most_generations_and_the_detector_sees_it(task, test_data):
    data = test_data.subset(range(48))
    clean = task.pairs(data)
    attack = generative_attack(make_attack("pgd_linf", eps=8 / 255, steps=5))
    report = evaluate_attack(task, clean, attack, torch.Generator().manual_seed(0), batch_size=48)
    assert report.clean_accuracy >= 0.9
    assert report.asr >= 0.5, report
    assert report.detector_auroc >= 0.8, report


def test_prompt_attacks_change_only_the_prompt(task, test_data):
    batch = task.pairs(test_data.subset(range(16)))
    generator = torch.Generator().manual_seed(0)
    flipped = generative_attack(make_attack("token_substitution", k=1))(task, batch, generator).batch
    assert torch.equal(flipped.images, batch.images)
    changed = (flipped.tokens != batch.tokens).sum(-1)
    assert changed.max() <= 1 and changed.sum() > 0 and bool((flipped.tokens[:, 0] == 1).all())
    moved = generative_attack(make_attack("text_embedding_pgd", eps=0.5, steps=3))(task, batch, generator).batch
    delta = (moved.token_embeds - task.prompt_embeds(batch)).norm(dim=-1)
    assert delta[:, 0].max() == 0 and delta.max() <= 0.5 + 1e-5 and delta.max() > 0.1


def test_attacks_leave_model_untouched_and_unknown_ones_are_refused(task, test_data):
    batch = task.pairs(test_data.subset(range(8)))
    task.backbone.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in task.backbone.lm.state_dict().items()}
    generative_attack(make_attack("bridge_image_to_text", steps=2))(task, batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in task.backbone.lm.state_dict().items())
    assert all(p.grad is None for p in task.backbone.parameters())
    with pytest.raises(ValueError, match="no generative version.*pgd_linf"):
        generative_attack(make_attack("co_attack"))


def test_consistency_is_low_on_clean_pairs_and_compares_clip_with_lm(task, test_data):
    clean = task.pairs(test_data.subset(range(32)))
    with torch.no_grad():
        out = task.forward(clean)
    assert bool(task.correct(out, clean.labels, "image").float().mean() >= 0.9)
    assert F.cosine_similarity(out.image_embeds, out.text_embeds).mean() > 0.5
    # replace the generated captions by wrong ones: the score must rise for every pair
    scores = consistency_scores(task, clean)
    wrong = type(out)(**{**out.__dict__, "text_embeds": out.text_embeds.roll(1, 0), "image_logits": out.image_logits.roll(1, 0)})
    assert auroc(scores, task.consistency(wrong)) > 0.9


# ---------------------------------------------------------------------------- pretraining and CLI
def test_pretrain_writes_checkpoint_tokenizer_and_record(tmp_path):
    config = FlamingoPretrainConfig(steps=3, batch_size=16, pool_size=64, eval_n=20)
    record = pretrain_flamingo(config, out=tmp_path, command="test", progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {f"{NAME}.pt", f"{NAME}.json", f"{NAME}.tokenizer.json"}
    assert record["steps_run"] == 3 and 0.0 <= record["caption_accuracy"]["value"] <= 1.0
    load_tokenizer(tmp_path / f"{NAME}.tokenizer.json")
    with pytest.raises(ValueError, match="batch_size"):
        FlamingoPretrainConfig(batch_size=128, pool_size=64)


def test_cli_backbone_eval_reports_caption_and_zero_shot_accuracy(capsys):
    assert main(["backbone", "eval", "--backbone", NAME, "--n", "100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["caption_accuracy"] >= 0.9 and result["zero_shot_accuracy"] >= 0.9 and result["n"] == 100


def test_cli_attack_eval_on_generative_backbone(capsys):
    argv = ["attack", "eval", "--backbone", NAME, "--attack", "pgd_linf", "--eps", "8/255", "--steps", "3", "--n", "32", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["asr"] >= 0.5 and result["backbone"] == NAME


def test_a_scenario_naming_the_generative_backbone_is_refused_at_validation(tmp_path):
    from cmai_env.scenario import ScenarioError, load_scenario

    path = tmp_path / "flamingo.yaml"
    path.write_text("name: fl\nbackbone: {name: cmai-tiny-flamingo}\nfidelity: embedding\nphases:\n  - {name: quiet, rounds: 2}\n")
    with pytest.raises(ScenarioError, match=r"(?s)flamingo.yaml.*backbone.name \(line 2\) = 'cmai-tiny-flamingo'.*generative.*Allowed: cmai-tiny"):
        load_scenario(path)


def test_json_output_is_strict_and_alone_on_stdout_for_torchattacks_chains(capsys):
    # apgd_ce comes from torchattacks, which printed "Failed to set device automatically" on stdout
    # for a parameterless wrapper; detector_tpr_flipped is NaN when nothing flipped (JSON has no NaN).
    argv = ["attack", "eval", "--backbone", "cmai-tiny-flamingo", "--n", "4", "--json"]
    assert main([*argv, "--attack", "apgd_ce", "--steps", "2"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert main([*argv, "--attack", "text_embedding_pgd", "--steps", "1", "--eps", "0.001"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert report["asr"] == 0.0 and report["detector_tpr_flipped"] is None


def test_flamingo_mistakes_are_refused_before_running(capsys, tmp_path):
    assert main(["backbone", "pretrain", "--name", "cmai-tiny-flamingo", "--steps", "1", "--out", str(tmp_path)]) == 1
    assert "use `cmai backbone pretrain --arch flamingo`" in capsys.readouterr().err
    assert main(["backbone", "eval", "--backbone", "cmai-tiny-flamingo", "--dataset", "digits", "--n", "4"]) == 1
    assert "has no word for" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
