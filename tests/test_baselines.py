"""Baselines: each weighting rule by its formula on scripted infos, then on the real env."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cmai_env  # noqa: F401  (registers the environments)
from agents.baselines import (
    DetectorSwitchPolicy,
    DWAPolicy,
    GradNormPolicy,
    ProEATDynamicPolicy,
    UncertaintyWeightingPolicy,
    available_baselines,
    decode_action,
    make_baseline,
)
from agents.benchmark import with_fixed_weights, without_adversarial, without_consistency
from agents.env_pool import EnvPool
from agents.env_spec import env_spec
from cmai_env.env import DISCRETE_BETAS, action_from_betas, betas_from_action
from cmai_env.observation import OBS_SIZE, OBS_SLICES

TINY = {"batch_size": 8, "dataset.train_n": 64, "dataset.probe_n": 16, "episode_rounds": 6}
OBS = np.zeros(OBS_SIZE, dtype=np.float32)


def losses(task: float, consistency: float, adv: float, grad_norms: dict | None = None) -> dict:
    """A scripted ``info`` with the fields the adaptive baselines read."""
    return {"losses": {"task": task, "consistency": consistency, "adv": adv, "total": task + consistency + adv}, "grad_norms": grad_norms}


def betas_of(policy, obs: np.ndarray = OBS) -> np.ndarray:
    action, _ = policy.predict(obs)
    return decode_action(action, policy.action_mode)


def test_registry_names_and_unknown_name():
    assert available_baselines() == [
        "no_defense",
        "static_adversarial",
        "static_consistency",
        "uniform",
        "detector_switch",
        "proeat_dynamic",
        "gradnorm",
        "uncertainty",
        "dwa",
    ]
    for name in available_baselines():
        assert make_baseline(name).name == name
    with pytest.raises(ValueError, match="unknown baseline 'nope'; available: no_defense"):
        make_baseline("nope")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("static_adversarial", (0.2, 0.0, 0.8)),
        ("static_consistency", (0.2, 0.8, 0.0)),
        ("uniform", (1 / 3, 1 / 3, 1 / 3)),
    ],
)
def test_fixed_weights_round_trip_through_the_action(name, expected):
    # A zero weight is approximated by e^-6 of the largest; the others keep their ratio.
    np.testing.assert_allclose(betas_of(make_baseline(name)), expected, atol=0.005)


def test_no_defense_is_as_close_to_task_only_as_the_action_space_allows():
    betas = betas_of(make_baseline("no_defense"))
    expected = math.exp(3) / (math.exp(3) + 2 * math.exp(-3))  # softmax(3·[1, -1, -1])
    assert betas[0] == pytest.approx(expected, abs=1e-6)
    assert betas[0] > 0.99 and betas[2] < 0.1  # β_adv < 0.1: the env skips adversarial crafting


def test_action_from_betas_keeps_ratios_when_a_weight_is_zero():
    action = action_from_betas(np.array([0.2, 0.0, 0.8]))
    betas = betas_from_action(action)
    assert betas[2] / betas[0] == pytest.approx(4.0, rel=1e-5)
    np.testing.assert_allclose(betas_from_action(action_from_betas(np.array([0.5, 0.3, 0.2]))), [0.5, 0.3, 0.2], atol=1e-6)


def test_discrete_mode_emits_grid_indices():
    assert int(make_baseline("no_defense", action_mode="discrete").predict(OBS)[0]) == 0
    assert int(make_baseline("uniform", action_mode="discrete").predict(OBS)[0]) == 9
    index = int(make_baseline("static_adversarial", action_mode="discrete").predict(OBS)[0])
    np.testing.assert_allclose(DISCRETE_BETAS[index], [1 / 3, 0, 2 / 3])


def test_batched_observations_give_one_action_per_row():
    actions, _ = make_baseline("uniform").predict(np.zeros((3, OBS_SIZE), dtype=np.float32))
    assert actions.shape == (3, 3)


def test_detector_switch_follows_the_flag_rate():
    policy = DetectorSwitchPolicy(threshold=0.15)
    quiet, attacked = OBS.copy(), OBS.copy()
    quiet[OBS_SLICES["flag_rate"]] = 0.10
    attacked[OBS_SLICES["flag_rate"]] = 0.40
    np.testing.assert_allclose(betas_of(policy, quiet), [0.9, 0.05, 0.05], atol=1e-6)
    np.testing.assert_allclose(betas_of(policy, attacked), [0.2, 0.4, 0.4], atol=1e-6)


def test_proeat_ema_by_hand():
    policy = ProEATDynamicPolicy()
    np.testing.assert_allclose(policy.weights(OBS), [0.5, 0.0, 0.5])  # nothing measured yet
    policy.observe(losses(2.0, 9.0, 4.0))  # EMAs start at the first losses: (2, 4)
    np.testing.assert_allclose(policy.weights(OBS), [1 / 3, 0.0, 2 / 3])
    policy.observe(losses(1.0, 9.0, 5.0))  # m_c = 0.9·2 + 0.1·1 = 1.9, m_a = 0.9·4 + 0.1·5 = 4.1
    np.testing.assert_allclose(policy.weights(OBS), [1.9 / 6.0, 0.0, 4.1 / 6.0])
    policy.observe(losses(1.0, 9.0, 0.0))  # L_adv = 0: crafting skipped, EMA of L_adv unchanged
    m_c = 0.9 * 1.9 + 0.1 * 1.0
    np.testing.assert_allclose(policy.weights(OBS), [m_c / (m_c + 4.1), 0.0, 4.1 / (m_c + 4.1)])
    policy.reset()
    np.testing.assert_allclose(policy.weights(OBS), [0.5, 0.0, 0.5])


def test_dwa_ratios_by_hand():
    policy = DWAPolicy()
    policy.observe(losses(1.0, 2.0, 4.0))
    np.testing.assert_allclose(policy.weights(OBS), np.full(3, 1 / 3))  # one measurement: r = 1
    policy.observe(losses(0.5, 2.0, 3.2))
    r = np.array([0.5, 1.0, 0.8])
    np.testing.assert_allclose(policy.rates(), r)
    expected = np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(policy.weights(OBS), expected)
    assert policy.weights(OBS).argmax() == 1  # the term that stopped improving gets most weight


def test_uncertainty_weighting_one_step_and_fixed_point():
    policy = UncertaintyWeightingPolicy(lr=0.1)
    policy.observe(losses(0.5, 2.0, 4.0))  # s_i = −0.1·(1 − L_i) = (−0.05, 0.1, 0.3)
    expected = np.exp(-np.array([-0.05, 0.1, 0.3]))
    np.testing.assert_allclose(policy.weights(OBS), expected / expected.sum())
    for _ in range(300):
        policy.observe(losses(0.5, 2.0, 4.0))
    inverse = np.array([1 / 0.5, 1 / 2.0, 1 / 4.0])
    np.testing.assert_allclose(policy.weights(OBS), inverse / inverse.sum(), atol=1e-4)  # exp(−s_i) → 1/L_i


def test_uncertainty_weighting_moves_toward_the_lower_loss_term():
    policy = UncertaintyWeightingPolicy()
    before = policy.weights(OBS)
    for _ in range(5):
        policy.observe(losses(0.3, 3.0, 3.0))
    after = policy.weights(OBS)
    assert after[0] > before[0] and after[1] < before[1]


def test_gradnorm_with_given_grad_norms_by_hand():
    policy = GradNormPolicy(alpha=1.5, lr=0.025)
    norms = {"task": 1.0, "consistency": 1.0, "adv": 1.0}
    policy.observe(losses(1.0, 1.0, 1.0, norms))  # records L_i(0); nothing to balance yet
    np.testing.assert_allclose(policy.weights(OBS), np.full(3, 1 / 3))
    policy.observe(losses(1.0, 0.5, 0.5, norms))
    # L̃ = (1, .5, .5), r = L̃/mean(L̃) = (1.5, .75, .75); G = (1, 1, 1), Ḡ = 1;
    # targets 1.5^1.5 > 1 (task lags: weight up), 0.75^1.5 < 1 (others: down).
    w = np.array([1.025, 0.975, 0.975])
    np.testing.assert_allclose(policy.weights(OBS), w / w.sum())
    assert policy.used_proxy is False


def test_gradnorm_falls_back_to_the_loss_ratio_proxy():
    policy = GradNormPolicy()
    policy.observe(losses(2.0, 2.0, 2.0))
    policy.observe(losses(2.0, 1.0, 1.0))
    assert policy.used_proxy is True
    weights = policy.weights(OBS)
    assert weights[0] > 1 / 3 > weights[1]  # the slower-training task term gains weight
    assert weights.sum() == pytest.approx(1.0)


def test_ablation_wrappers_rewrite_betas():
    uniform = make_baseline("uniform")
    np.testing.assert_allclose(betas_of_wrapper(without_consistency(uniform)), [0.5, 0.0, 0.5], atol=0.005)
    np.testing.assert_allclose(betas_of_wrapper(without_adversarial(uniform)), [0.5, 0.5, 0.0], atol=0.005)
    fixed = with_fixed_weights(make_baseline("detector_switch"), np.array([0.6, 0.3, 0.1]))
    np.testing.assert_allclose(betas_of_wrapper(fixed), [0.6, 0.3, 0.1], atol=1e-6)
    assert without_consistency(uniform).name == "uniform/no_consist"


def betas_of_wrapper(policy) -> np.ndarray:
    return betas_from_action(policy.predict(OBS)[0])


def test_every_baseline_plays_an_episode_with_valid_actions():
    with EnvPool() as pool:
        env = pool.env(env_spec("quickstart", "embedding", TINY))
        for name in available_baselines():
            policy = make_baseline(name)
            policy.bind(env)
            policy.reset()
            obs, _ = env.reset(seed=0)
            done, rounds = False, 0
            while not done:
                action, _ = policy.predict(obs)
                assert env.action_space.contains(action), (name, action)
                obs, reward, terminated, truncated, info = env.step(action)
                policy.observe(info)
                assert np.isfinite(reward)
                np.testing.assert_allclose(info["betas"].sum(), 1.0)
                done, rounds = terminated or truncated, rounds + 1
            assert rounds == TINY["episode_rounds"]
            if name == "static_adversarial":
                np.testing.assert_allclose(info["betas"], [0.2, 0.0, 0.8], atol=0.005)
