"""Tests for cmai_env.training (the modality-bridging trainer) and ``cmai adv-train``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmai_env.attacks import PairBatch, ZeroShotTask, token_masks
from cmai_env.cli.adv_train import EVAL_ATTACKS
from cmai_env.cli.main import main
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone
from cmai_env.training import (
    ModalityBridgingTrainer,
    TrainerConfig,
    bridging_objective,
    crafting_steps,
    joint_pgd,
    save_checkpoint,
    validate_weights,
)

N = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a shared 2-core machine oversubscribe badly; one is faster and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return load_dataset("shapes", "train", n=N, seed=3, image_size=32)


@pytest.fixture
def task(data):
    """A fresh backbone per test: trainers update it in place."""
    return ZeroShotTask.from_dataset(load_backbone("cmai-tiny"), data)


@pytest.fixture
def batch(task, data):
    return PairBatch.from_dataset(task.backbone, data)


def trainer_for(task, seed: int = 0, **config) -> ModalityBridgingTrainer:
    return ModalityBridgingTrainer(task, TrainerConfig(**config), torch.Generator().manual_seed(seed))


def trainable(backbone) -> set[str]:
    return {n for n, p in backbone.named_parameters() if p.requires_grad}


def params_of(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- defended parameters
def test_defended_adapter_only_adapters_train(task):
    trainer_for(task, defended="adapter", adapter_hidden=16)
    names = trainable(task.backbone)
    assert names == {f"{t}_adapter.{l}.{w}" for t in ("image", "text") for l in ("down", "up") for w in ("weight", "bias")}


def test_defended_projection(task):
    trainer_for(task, defended="projection")
    assert trainable(task.backbone) == {"clip.visual.proj", "clip.text_projection"}


def test_defended_last_blocks(task):
    trainer_for(task, defended="last_blocks", last_blocks=1)
    names = trainable(task.backbone)
    assert {"clip.visual.proj", "clip.text_projection", "clip.visual.ln_post.weight", "clip.ln_final.bias"} <= names
    assert any(n.startswith("clip.visual.transformer.resblocks.2.") for n in names)  # last of 3 image blocks
    assert any(n.startswith("clip.transformer.resblocks.1.") for n in names)  # last of 2 text blocks
    assert not any(n.startswith(("clip.visual.transformer.resblocks.1.", "clip.transformer.resblocks.0.")) for n in names)
    assert "clip.token_embedding.weight" not in names and "clip.visual.conv1.weight" not in names
    with pytest.raises(ValueError, match="last_blocks=3"):
        trainer_for(load_task_like(task), defended="last_blocks", last_blocks=3)


def load_task_like(task) -> ZeroShotTask:
    return ZeroShotTask(load_backbone("cmai-tiny"), task.class_names, task.templates)


def test_defended_all(task):
    trainer = trainer_for(task, defended="all")
    assert trainable(task.backbone) == {n for n, _ in task.backbone.named_parameters()}
    assert trainer.num_defended == sum(p.numel() for p in task.backbone.parameters())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="defended"):
        TrainerConfig(defended="everything")
    with pytest.raises(ValueError, match="eps_v"):
        TrainerConfig(eps_v=-0.1)
    with pytest.raises(ValueError, match="lr"):
        TrainerConfig(lr=float("nan"))


def test_adapters_start_as_identity(task, batch):
    backbone = task.backbone
    with torch.no_grad():
        embeds = backbone.token_embeddings(batch.tokens)
        before = (backbone.encode_image(batch.images), backbone.encode_text(batch.tokens), backbone.encode_text_embeddings(embeds, batch.tokens))
        states = backbone.hidden_states(batch.images, batch.tokens, per_layer=True)
    trainer_for(task, defended="adapter")
    assert backbone.has_adapters
    with torch.no_grad():
        after = (backbone.encode_image(batch.images), backbone.encode_text(batch.tokens), backbone.encode_text_embeddings(embeds, batch.tokens))
        states_after = backbone.hidden_states(batch.images, batch.tokens, per_layer=True)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert torch.allclose(states.image_embeds, states_after.image_embeds, atol=1e-6)
    assert torch.allclose(states.text_embeds, states_after.text_embeds, atol=1e-6)


def test_adapters_are_on_the_attacked_path(task, batch):
    """A trained adapter changes encode_image, so attacks see the defended model."""
    backbone = task.backbone
    image_adapter, _ = backbone.add_adapters(8)
    with torch.no_grad():
        before = backbone.encode_image(batch.images)
        image_adapter.up.weight.fill_(0.05)
        assert not torch.allclose(before, backbone.encode_image(batch.images))


# ---------------------------------------------------------------------------- inner maximisation
def test_joint_pgd_respects_budgets_and_raises_objective(task, batch):
    eps_v, eps_t, alpha = 4 / 255, 0.3, 1.0
    backbone = task.backbone
    trainer_for(task, defended="projection")
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    weights = [p.detach().clone() for p in backbone.parameters()]
    crafted = joint_pgd(task, batch, eps_v, eps_t, alpha, steps=3, generator=torch.Generator().manual_seed(0))
    adv = crafted.batch

    assert (adv.images - batch.images).abs().max() <= eps_v + 1e-6
    assert adv.images.min() >= 0.0 and adv.images.max() <= 1.0
    norms = crafted.delta_t.norm(dim=-1)
    assert norms.max() <= eps_t + 1e-5
    real, _ = token_masks(backbone, batch.tokens)
    assert norms[~real].max() == 0.0  # padding never moves
    assert norms[real].mean() > 0.5 * eps_t  # and the real tokens did
    with torch.no_grad():
        clean_clean_embeds = backbone.token_embeddings(batch.tokens)
        assert torch.allclose(adv.token_embeds, clean_clean_embeds + crafted.delta_t, atol=1e-6)

        def objective(b: PairBatch) -> float:
            return float(bridging_objective(task, task.forward(b), b.labels, alpha).mean())

        assert objective(adv) > objective(batch) + 1.0
    # Parameters, their flags and the mode are as before; no gradients were left on them.
    assert all(torch.equal(w, p) for w, p in zip(weights, backbone.parameters()))
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags
    assert all(p.grad is None for p in backbone.parameters())
    assert not backbone.training


def test_crafting_steps_rule():
    assert [crafting_steps(b, 4) for b in (0.0, 0.09, 0.1, 0.2, 0.25, 0.5, 1.0)] == [0, 0, 1, 2, 2, 4, 4]
    assert crafting_steps(0.3, 3) == 2  # 1.8 → 2
    assert crafting_steps(0.25, 3) == 2  # 1.5 rounds half up
    assert crafting_steps(1.0, 0) == 0
    assert crafting_steps(0.05, 10, skip_below=0.01, full_at=0.1) == 5


# ---------------------------------------------------------------------------- step
def test_beta_adv_zero_crafts_nothing_and_one_crafts(task, batch):
    trainer = trainer_for(task, attack_steps=2)
    quiet = trainer.step(batch, (1.0, 1.0, 0.0))
    assert quiet.attack_steps_used == 0 and quiet.l_adv == 0.0
    loud = trainer.step(batch, np.array([0.0, 0.0, 1.0]))
    assert loud.attack_steps_used == 2 and loud.attack_ms > 0
    assert loud.l_adv > quiet.l_task  # the crafted pair is harder than the clean one
    assert math.isclose(loud.l_total, loud.l_adv, rel_tol=1e-6)


def test_updates_per_round_repeats(task, batch):
    trainer = trainer_for(task, attack_steps=2, updates_per_round=2)
    assert trainer.step(batch, (1.0, 0.0, 1.0)).attack_steps_used == 4


def test_weights_weight(task, batch):
    trainer = trainer_for(task, defended="projection", attack_steps=1, lr=1e-3, track_grad_norms=True)
    start = trainer.snapshot()

    result = trainer.step(batch, (0.5, 0.25, 2.0))
    assert math.isclose(result.l_total, 0.5 * result.l_task + 0.25 * result.l_consistency + 2.0 * result.l_adv, rel_tol=1e-5)
    assert set(result.grad_norms) == {"task", "consistency", "adv"} and all(v > 0 for v in result.grad_norms.values())

    deltas = {}
    for betas in [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)]:
        trainer.restore(start)
        trainer.generator.manual_seed(0)
        before = params_of(trainer)
        trainer.step(batch, betas)
        deltas[betas] = torch.cat([(a - b).flatten() for a, b in zip(params_of(trainer), before)])
    task_d, adv_d, cons_d = deltas.values()
    assert task_d.abs().sum() > 0 and adv_d.abs().sum() > 0 and cons_d.abs().sum() > 0
    # Each term pushes θ its own way.
    cos = torch.nn.functional.cosine_similarity
    assert cos(task_d, adv_d, dim=0) < 0.99 and cos(task_d, cons_d, dim=0) < 0.99

    trainer.restore(start)
    before = params_of(trainer)
    nothing = trainer.step(batch, (0.0, 0.0, 0.0))
    assert nothing.l_total == 0.0 and same(before, params_of(trainer))


def test_consistency_weight_lowers_consistency(task, batch):
    trainer = trainer_for(task, defended="adapter", lr=1e-2)
    first = trainer.step(batch, (0.0, 1.0, 0.0))
    for _ in range(4):
        last = trainer.step(batch, (0.0, 1.0, 0.0))
    assert last.l_consistency < 0.9 * first.l_consistency


def test_few_steps_lower_total_loss(task, batch):
    trainer = trainer_for(task, defended="projection", attack_steps=2, lr=3e-3)
    weights = (1.0, 0.1, 1.0)
    crafted = trainer.craft(batch)

    def fixed_total() -> float:
        # The objective at fixed (clean, adversarial) pairs, so only θ changes between readings.
        with torch.no_grad():
            terms = trainer.losses(batch, crafted)
        return float(weights[0] * terms["task"] + weights[1] * terms["consistency"] + weights[2] * terms["adv"])

    before = fixed_total()
    for _ in range(5):
        trainer.step(batch, weights)
    assert fixed_total() < 0.9 * before


def test_text_updates_refresh_class_embeddings(task, batch):
    trainer = trainer_for(task, defended="adapter", lr=1e-2)
    old = task.class_embeds.clone()
    trainer.step(batch, (1.0, 1.0, 0.0))
    assert not torch.allclose(old, task.class_embeds)
    assert torch.allclose(task.class_embeds, task.backbone.class_text_embeddings(task.class_names, task.templates))


# ---------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "weights, match",
    [
        ((float("nan"), 1.0, 1.0), "β_task=nan"),
        ((1.0, -0.5, 1.0), "β_consist=-0.5"),
        ((1.0, 1.0, float("inf")), "β_adv=inf"),
        ((1.0, 1.0), "3 numbers"),
        (("a", 1, 1), "3 numbers"),
    ],
)
def test_bad_weights_raise(task, batch, weights, match):
    trainer = trainer_for(task)
    before = params_of(trainer)
    with pytest.raises(ValueError, match=match):
        trainer.step(batch, weights)
    assert same(before, params_of(trainer))


def test_validate_weights_accepts_arrays():
    assert validate_weights(np.array([0.2, 0.3, 0.5], dtype=np.float32)) == pytest.approx((0.2, 0.3, 0.5))


def test_nan_loss_raises_and_leaves_parameters(task, batch):
    trainer = trainer_for(task, defended="projection")
    trainer.step(batch, (1.0, 0.0, 0.0))  # give the optimizer some state to protect
    params, optimizer = params_of(trainer), trainer.snapshot().optimizer
    poisoned = PairBatch(batch.images.clone(), batch.tokens, batch.labels)
    poisoned.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="L_task"):
        trainer.step(poisoned, (1.0, 1.0, 0.0))
    assert same(params, params_of(trainer))
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], optimizer["state"][k]["exp_avg"]) for k in state)
    assert all(p.grad is None for p in trainer.params)


# ---------------------------------------------------------------------------- snapshot / restore
def test_snapshot_restore_is_exact(task, batch):
    trainer = trainer_for(task, defended="adapter", lr=1e-2, attack_steps=1)
    trainer.step(batch, (1.0, 0.5, 1.0))
    state = trainer.snapshot()
    class_embeds = task.class_embeds.clone()

    trainer.generator.manual_seed(7)
    trainer.step(batch, (1.0, 0.5, 1.0))
    first = params_of(trainer)
    trainer.step(batch, (0.2, 0.2, 1.0))
    assert not same(first, list(state.params))

    trainer.restore(state)
    assert same(params_of(trainer), list(state.params))
    assert torch.equal(task.class_embeds, class_embeds)
    # The optimizer state came back too: the same step from the snapshot gives the same θ.
    trainer.generator.manual_seed(7)
    trainer.step(batch, (1.0, 0.5, 1.0))
    assert same(first, params_of(trainer))
    # and the snapshot itself was not mutated by training after the restore
    trainer.restore(state)
    assert same(params_of(trainer), list(state.params))


# ---------------------------------------------------------------------------- checkpoints and CLI
def test_save_checkpoint_failure_keeps_existing(tmp_path, task, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(task.backbone, path)
    original = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(task.backbone, path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def _adv_train(tmp_path: Path, capsys, *extra: str) -> dict:
    out = tmp_path / "run"
    code = main(
        ["adv-train", "--budget-minutes", "0.05", "--eval-n", "32", "--train-n", "48", "--batch-size", "16",
         "--attack-steps", "1", "--json", "--out", str(out), *extra]
    )
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_cli_adv_train_writes_loadable_checkpoint(tmp_path, capsys):
    report = _adv_train(tmp_path, capsys, "--defended", "adapter", "--eps-v", "4/255", "--weights", "1,0.5,1")
    # The PGD-10-style attacks plus the AutoAttack-grade figure adv-train reports beside them.
    assert set(report["before"]) == set(report["after"]) == {*EVAL_ATTACKS, "autoattack"}
    for side in ("before", "after"):
        for name in EVAL_ATTACKS:
            metrics = report[side][name]
            assert 0.0 <= metrics["clean_accuracy"] <= 1.0 and 0.0 <= metrics["asr"] <= 1.0
    assert report["training"]["steps"] >= 1
    assert report["config"]["eps_v"] == pytest.approx(4 / 255)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["after"] == report["after"]

    loaded = load_backbone("cmai-tiny", pretrained=str(tmp_path / "run" / "model.pt"))
    assert loaded.has_adapters  # adapters were saved under their own keys and rebuilt
    assert any(p.abs().sum() > 0 for p in loaded.image_adapter.up.parameters())  # and they were trained
    data = load_dataset("shapes", "test", n=32, seed=0, image_size=32)
    accuracy = loaded.zero_shot_accuracy(data.images, data.labels, loaded.class_text_embeddings(data.class_names, data.templates))
    assert accuracy == pytest.approx(report["after"]["pgd_linf"]["clean_accuracy"])


def test_cli_failed_run_keeps_existing_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(load_backbone("cmai-tiny"), out / "model.pt")
    original = (out / "model.pt").read_bytes()

    def crash(self, *args, **kwargs):
        raise RuntimeError("interrupted mid-training")

    # refused without --overwrite, before anything runs
    assert main(["adv-train", "--out", str(out), "--eval-n", "32", "--train-n", "48"]) == 1
    assert "already holds results (model.pt)" in capsys.readouterr().err
    monkeypatch.setattr(ModalityBridgingTrainer, "fit", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        _adv_train(tmp_path, capsys, "--overwrite")
    assert (out / "model.pt").read_bytes() == original
    load_backbone("cmai-tiny", pretrained=str(out / "model.pt"))


def test_cli_failure_after_training_keeps_previous_pair(tmp_path, capsys, monkeypatch):
    # model.pt and report.json are replaced together: a run that fails in its "after" evaluation
    # leaves the earlier run's checkpoint beside the earlier run's report.
    from cmai_env.cli import adv_train

    _adv_train(tmp_path, capsys, "--robust-eval", "none")
    out = tmp_path / "run"
    before = {name: (out / name).read_bytes() for name in ("model.pt", "report.json")}
    calls = []
    real = adv_train._evaluate

    def evaluate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed in the after evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(adv_train, "_evaluate", evaluate_then_crash)
    with pytest.raises(RuntimeError, match="after evaluation"):
        _adv_train(tmp_path, capsys, "--robust-eval", "none", "--overwrite", "--seed", "1")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "report.json"]


def test_cli_rejects_bad_weights(capsys):
    with pytest.raises(SystemExit):
        main(["adv-train", "--weights", "1,nan,1"])
    assert "β_consist=nan" in capsys.readouterr().err


def test_cli_rejects_zero_threads(capsys):
    # Like cmai train/evaluate/benchmark: 0 threads is refused with the flag named, not clamped to 1.
    with pytest.raises(SystemExit):
        main(["adv-train", "--threads", "0"])
    assert "--threads: expected an integer ≥ 1, got '0'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- fit
def test_fit_epochs_and_cosine_schedule_reset(task, data):
    trainer = trainer_for(task, defended="projection", attack_steps=1, lr=1e-3)
    seen = []
    original = trainer.step

    def spy(batch, weights, observed_adv=None):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return original(batch, weights, observed_adv)

    trainer.step = spy
    summary = trainer.fit(data, batch_size=4, weights=(1.0, 0.1, 1.0), epochs=1, lr_schedule="cosine", warmup_fraction=0.3)
    assert summary.steps == 3 and summary.stopped_by == "epochs" and summary.epochs == pytest.approx(1.0)
    assert seen[0] == 0.0 and 0 < seen[1] <= 1e-3 and seen[2] < seen[1]  # warm-up from 0, then annealing
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3  # rounds after fit use the constant rate
    assert set(summary.last()) == {"l_task", "l_consistency", "l_adv", "l_total"}


def test_fit_stops_at_budget_on_the_given_clock(task, data):
    trainer = trainer_for(task, defended="projection", attack_steps=1)
    ticks = iter(range(1000))
    summary = trainer.fit(data, budget_seconds=3.5, batch_size=2, weights=(1.0, 0.0, 0.0), clock=lambda: float(next(ticks)))
    assert summary.stopped_by == "budget" and 1 <= summary.steps < len(data) // 2
