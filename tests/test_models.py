"""Backbone loader and wrapper: the embedded checkpoint, real loading paths and their errors."""

from __future__ import annotations

import json
import re
import pickle

import pytest
import torch
from PIL import Image

from cmai_env.cli.main import main as cmai
from cmai_env.data import load_dataset
from cmai_env.models import available_backbones, checkpoint_info, load_backbone


@pytest.fixture(scope="module")
def backbone():
    return load_backbone()


def test_embedded_checkpoint_is_small_and_documented():
    info = checkpoint_info("cmai-tiny")
    assert info["command"].startswith("cmai backbone pretrain")
    assert info["zero_shot_accuracy"]["value"] >= 0.95
    assert "seed" in info["config"]
    from cmai_env.models.registry import embedded_checkpoint

    assert embedded_checkpoint("cmai-tiny").stat().st_size <= 10 * 1024 * 1024


def test_zero_shot_accuracy_on_held_out_shapes(backbone):
    data = load_dataset("shapes", split="test", n=300, seed=0)
    class_embeds = backbone.class_text_embeddings(data.class_names, data.templates)
    assert backbone.zero_shot_accuracy(data.images, data.labels, class_embeds) >= 0.95


def test_random_init_is_not_the_checkpoint(backbone):
    random = load_backbone(pretrained="random")
    data = load_dataset("shapes", n=200)
    class_embeds = random.class_text_embeddings(data.class_names, data.templates)
    assert random.zero_shot_accuracy(data.images, data.labels, class_embeds) < 0.5


def test_text_from_embeddings_matches_text_from_ids(backbone):
    tokens = backbone.tokenize(["a red circle", "a photo of a blue cross"])
    direct = backbone.encode_text(tokens)
    via_embeds = backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens)
    torch.testing.assert_close(direct, via_embeds)


def test_hidden_states_shapes(backbone):
    images = torch.rand(4, 3, 32, 32)
    tokens = backbone.tokenize(["a red circle"] * 4)
    pooled = backbone.hidden_states(images, tokens)
    assert pooled.image_embeds.shape == (4, backbone.embed_dim)
    torch.testing.assert_close(pooled.image_embeds.norm(dim=-1), torch.ones(4))
    layered = backbone.hidden_states(images, tokens, per_layer=True)
    assert len(layered.image_layers) == 3 and len(layered.text_layers) == 2
    torch.testing.assert_close(layered.image_embeds, pooled.image_embeds, atol=1e-5, rtol=1e-4)


def test_zero_shot_classifier_is_a_logits_module(backbone):
    data = load_dataset("shapes", n=8)
    head = backbone.zero_shot_classifier(data.class_names, data.templates)
    logits = head(data.images)
    assert logits.shape == (8, 30)
    assert (logits.argmax(-1) == data.labels).float().mean() >= 0.75


def test_preprocess_keeps_pixels_in_unit_range(backbone):
    image = Image.new("RGB", (50, 40), (255, 0, 0))
    x = backbone.preprocess(image)
    assert x.shape == (3, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_wrong_image_size_is_a_clear_error(backbone):
    with pytest.raises(ValueError, match="expects images of 32x32"):
        backbone.encode_image(torch.rand(1, 3, 28, 28))


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="cmai-tiny") as err:
        load_backbone("no-such-model")
    assert "ViT-B-32" in str(err.value)
    assert "cmai-tiny" in available_backbones() and "ViT-B-32" in available_backbones()


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone("cmai-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_unknown_open_clip_tag_lists_tags():
    with pytest.raises(ValueError, match="laion2b"):
        load_backbone("ViT-B-32", pretrained="not-a-tag")


def test_checkpoint_path_round_trip(tmp_path, backbone):
    path = tmp_path / "copy.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in backbone.clip.state_dict().items()}}, path)
    copy = load_backbone("cmai-tiny", pretrained=str(path))
    tokens = backbone.tokenize(["a green square"])
    torch.testing.assert_close(copy.encode_text(tokens), backbone.encode_text(tokens))


def test_checkpoint_for_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit architecture cmai-tiny"):
        load_backbone("cmai-tiny", pretrained=str(path))


class _Payload:
    def __reduce__(self):  # what a malicious pickle would do: run code at load time
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_backbone("cmai-tiny", pretrained=str(path))


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_backbone("cmai-tiny", pretrained=str(path))


def test_cli_backbone_eval_json(capsys):
    assert cmai(["backbone", "eval", "--n", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["zero_shot_accuracy"] >= 0.9 and result["n"] == 64


def test_cli_reports_bad_input_without_traceback(capsys):
    assert cmai(["backbone", "eval", "--backbone", "nope", "--n", "4"]) == 1
    assert "unknown backbone 'nope'" in capsys.readouterr().err


def test_pretrain_config_refuses_a_batch_larger_than_its_pool_and_other_bad_values(capsys):
    """Checked when the config is built (cmai backbone pretrain), not as numpy's sampling error mid-run."""
    from cmai_env.models.pretrain import PretrainConfig

    for kwargs, needle in (
        ({"batch_size": 512, "pool_size": 256}, "PretrainConfig.batch_size (512) must be ≤ pool_size (256)"),
        ({"steps": 0}, "PretrainConfig.steps must be ≥ 1"),
        ({"lr": 0.0}, "lr and budget_minutes must be > 0"),
    ):
        with pytest.raises(ValueError, match=re.escape(needle)):
            PretrainConfig(**kwargs)
    assert cmai(["backbone", "pretrain", "--batch-size", "100000", "--out", "/nonexistent/never-written"]) != 0
    assert "must be ≤ pool_size (20000)" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["clip", "flamingo"])
def test_pretrain_never_replaces_a_checkpoint_without_overwrite(tmp_path, capsys, arch):
    from cmai_env.models.registry import weights_dir

    shipped = {p.name: p.read_bytes() for p in weights_dir().glob("*.pt")}
    name = "cmai-tiny-flamingo" if arch == "flamingo" else "cmai-tiny"
    assert cmai(["backbone", "pretrain", "--arch", arch, "--steps", "1"]) == 1  # no --out: the shipped weights
    assert f"{name}.pt already exists (the shipped weights" in capsys.readouterr().err
    (tmp_path / f"{name}.pt").write_bytes(b"an earlier run")
    assert cmai(["backbone", "pretrain", "--arch", arch, "--steps", "1", "--out", str(tmp_path)]) == 1
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / f"{name}.pt").read_bytes() == b"an earlier run"
    assert {p.name: p.read_bytes() for p in weights_dir().glob("*.pt")} == shipped
