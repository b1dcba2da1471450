"""The environment on the generative backbone: ``flamingo_shift`` at pixel fidelity (cmai_env/fidelity/generative.py)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import cmai_env
from cmai_env.env import action_from_betas
from cmai_env.fidelity.generative import GenerativePixelFidelity, GenerativeRoundTrainer
from cmai_env.models.flamingo_task import GenerativeOutputs
from cmai_env.scenario import ScenarioError, apply_overrides, load_scenario

#: Small but real: attacks are crafted through the language model and the captions generated.
SMALL = {"batch_size": 8, "dataset.train_n": 64, "dataset.probe_n": 16, "episode_rounds": 3}


def make(**overrides):
    return gym.make("cmai_env/CMAI-v0", scenario="flamingo_shift", **{**SMALL, **overrides}).unwrapped


@pytest.fixture(scope="module")
def env():
    return make()


def test_flamingo_shift_passes_both_env_checkers(env):
    assert isinstance(env.world, GenerativePixelFidelity) and env.scenario.fidelity == "pixel"
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_flamingo_shift_is_listed_for_pixel_only():
    assert "flamingo_shift" in cmai_env.scenarios_available(include_evaluation_only=False)
    assert "flamingo_shift" in cmai_env.scenarios_available(fidelity="pixel")
    assert "flamingo_shift" not in cmai_env.scenarios_available(fidelity="embedding")


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _moved(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_round_defends_the_lm_tower_and_scores_the_captions(env):
    env.reset(seed=0)
    backbone, world = env.world.backbone, env.world
    assert isinstance(world.trainer, GenerativeRoundTrainer)
    assert world.trainer.num_defended == sum(p.numel() for p in backbone.lm_visual.parameters()) == 251_040
    clip_tower, resampler, lm_tower = _tensors(backbone.clip.visual), _tensors(backbone.lm.model.perceiver_resampler), _tensors(backbone.lm_visual)
    _, _, _, _, info = env.step(action_from_betas(np.array([0.2, 0.0, 0.8])))
    assert info["phase"] == "image_pgd" and info["attacks"] == ["pgd_linf"]
    assert _moved(lm_tower, backbone.lm_visual), "β ≠ 0 must update the language model's vision tower"
    assert not _moved(clip_tower, backbone.clip.visual) and not _moved(resampler, backbone.lm.model.perceiver_resampler)
    assert info["losses"]["adv"] > 0 and info["attack_steps_used"] > 0
    # PGD-ℓ∞ 8/255 flips most captions of the embedded model; system ASR only counts the unflagged flips
    assert 0.5 <= info["asr"] <= 1.0 and 0.0 <= info["system_asr"] <= info["asr"]
    assert 0.0 <= info["clean_acc"] <= 1.0 and -1.0 <= info["consistency_score"] <= 1.0


def test_the_probe_measures_asr_on_generations(env):
    env.reset(seed=1)
    world = env.world
    plan = env.stream.plan(0)
    probe = world.probe(plan, np.random.default_rng(0))
    with torch.no_grad():
        out = world.task.forward(world.probe_batch)
    assert isinstance(out, GenerativeOutputs)
    captions_right = (out.generated_labels == world.probe_batch.labels).numpy()
    assert probe.clean_acc == pytest.approx(captions_right.mean()) and probe.clean_acc >= 0.9
    (outcome,) = probe.outcomes
    n = len(outcome.clean_ok)
    np.testing.assert_array_equal(outcome.clean_ok, captions_right[:n])
    assert probe.asr == pytest.approx(outcome.flipped.sum() / outcome.clean_ok.sum())


def test_the_update_follows_the_weights(env):
    env.reset(seed=2)
    world = env.world
    batch = world.pool_batch.subset(slice(0, 8))
    tower = world.backbone.lm_visual
    before = _tensors(tower)
    quiet = world.trainer.step(batch, (0.0, 0.0, 0.0))
    assert not _moved(before, tower) and quiet.attack_steps_used == 0 and quiet.l_adv == 0.0
    for betas in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        world.reset()
        result = world.trainer.step(batch, betas)
        assert _moved(before, tower), betas
        assert result.l_task > 0 and result.l_consistency > 0
    assert result.attack_steps_used == world.trainer.config.attack_steps and result.l_adv > result.l_task
    world.reset()
    assert not _moved(before, tower), "reset restores the defended tower"


def test_embedding_fidelity_refuses_a_generative_backbone_with_the_reason():
    with pytest.raises(ScenarioError, match=r"(?s)backbone.name = 'cmai-tiny-flamingo'.*fidelity: pixel only: no faithful embedding proxy"):
        gym.make("cmai_env/CMAI-v0", scenario="flamingo_shift", fidelity="embedding")


def test_defended_set_of_a_contrastive_model_is_refused_on_the_generative_one():
    with pytest.raises(ScenarioError, match=r"defense.defended = 'all'.*language model's own copy of the vision tower"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.defended": "all"})
    with pytest.raises(ScenarioError, match=r"defense.embedding_lr = 0.01.*pixel fidelity only"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.embedding_lr": 0.01})
    with pytest.raises(ScenarioError, match=r"defense.embedding_train_radius_scale = 3.0.*pixel fidelity only"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.embedding_train_radius_scale": 3})


def test_an_attack_without_generative_version_is_refused_naming_the_phase():
    # refused when the scenario is validated (`cmai scenarios validate` too), not only when the env is built
    with pytest.raises(ScenarioError, match=r"phases.0.attacks.0.name = 'aware_caption_rewrite'.*no generative version"):
        apply_overrides(load_scenario("flamingo_shift"), {"phases.0.attacks.0.name": "aware_caption_rewrite"})


# Slow: the README's own `cmai benchmark --scenarios flamingo_shift ...` line runs in every CI
# (tests/test_readme.py); this adds the results.json checks for CMAI_SLOW=1 runs.
@pytest.mark.slow
def test_cmai_benchmark_runs_on_flamingo_shift(tmp_path, own_cache):
    from cmai_env.cli.main import main

    out = tmp_path / "bench"
    code = main(["benchmark", "--scenarios", "flamingo_shift", "--seeds", "0", "--out", str(out), "--baselines", "no_defense",
                 "--env-kwargs", "batch_size:8", "dataset.train_n:64", "dataset.probe_n:16", "episode_rounds:2",
                 "--bootstrap-reps", "100", "--no-plots", "--quiet"])
    assert code == 0
    block = json.loads((out / "results.json").read_text())["scenarios"]["flamingo_shift"]
    rows = {row["policy"]: row for row in block["comparison"]}
    assert {"no_defense", "static_adversarial"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= row["asr"]["mean"] <= 1.0 and np.isfinite(row["return"]["mean"])
