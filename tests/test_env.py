"""The Gymnasium environment, tested the way Minigrid and Gymnasium-Robotics test theirs."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import cmai_env
from cmai_env.env import DISCRETE_BETAS, CMAIEnv, action_from_betas, betas_from_action
from cmai_env.observation import OBS_SIZE, OBS_SLICES, episode_clock

# Small but real: the pixel fidelity still crafts attacks through the backbone.
SMALL = {"batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32, "episode_rounds": 4}
# Scenarios that run at both fidelities; flamingo_shift (generative backbone, pixel only) is tested in test_flamingo_env.py.
TRAINING_SCENARIOS = cmai_env.scenarios_available(include_evaluation_only=False, fidelity="embedding")
EVAL_SCENARIOS = sorted(set(cmai_env.scenarios_available(fidelity="embedding")) - set(TRAINING_SCENARIOS))


def make(scenario="quickstart", fidelity="embedding", **overrides) -> CMAIEnv:
    kwargs = {**SMALL, **overrides}
    return gym.make("cmai_env/CMAI-v0", scenario=scenario, fidelity=fidelity, **kwargs).unwrapped


def strip_wall_clock(info: dict) -> dict:
    """Info without wall-clock fields (the only ones allowed to differ between identical runs)."""
    out = {}
    for key, value in info.items():
        if key.endswith("_ms"):
            continue
        out[key] = strip_wall_clock(value) if isinstance(value, dict) else value
    return out


def assert_same_info(a: dict, b: dict) -> None:
    a, b = strip_wall_clock(a), strip_wall_clock(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_equal(a[key], b[key], err_msg=key)


def rollout(env: CMAIEnv, seed: int, actions: list) -> list:
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return out


def assert_same_rollout(a: list, b: list) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    assert len(a) == len(b)
    for step_a, step_b in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(step_a[0], step_b[0])
        assert step_a[1:4] == step_b[1:4]
        assert_same_info(step_a[4], step_b[4])


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
@pytest.mark.parametrize("scenario", TRAINING_SCENARIOS)
def test_check_env_every_training_scenario(scenario, fidelity):
    env = make(scenario, fidelity)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
@pytest.mark.parametrize("scenario", EVAL_SCENARIOS)
def test_check_env_evaluation_scenarios_through_eval_id(scenario, fidelity):
    env = gym.make("cmai_env/CMAI-Eval-v0", scenario=scenario, fidelity=fidelity, **SMALL).unwrapped
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_discrete_id_check_env():
    env = gym.make("cmai_env/CMAI-Discrete-v0", fidelity="embedding", **SMALL).unwrapped
    assert env.action_space.n == len(DISCRETE_BETAS)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_evaluation_only_scenarios_cannot_be_trained_on():
    assert EVAL_SCENARIOS, "at least one evaluation-only scenario ships"
    with pytest.raises(ValueError, match="evaluation-only"):
        gym.make("cmai_env/CMAI-v0", scenario=EVAL_SCENARIOS[0], fidelity="embedding")


def test_spaces_and_observation_layout():
    env = make()
    assert env.action_space == gym.spaces.Box(-1, 1, (3,), np.float32)
    assert env.observation_space.shape == (OBS_SIZE,)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, _, _, _, info = env.step(action_from_betas(np.array([0.2, 0.3, 0.5])))
    np.testing.assert_allclose(obs[OBS_SLICES["prev_betas"]], info["betas"], atol=1e-6)
    np.testing.assert_allclose(info["betas"], [0.2, 0.3, 0.5], atol=1e-3)
    # The previous round's metrics are the ones the reward reads: the system's by default.
    assert obs[OBS_SLICES["prev_clean_acc"]][0] == pytest.approx(info["system_clean_acc"], abs=1e-6)
    assert obs[OBS_SLICES["prev_asr"]][0] == pytest.approx(info["system_asr"], abs=1e-6)


def test_episode_clock_counts_from_the_round_whose_traffic_is_observed():
    assert episode_clock(4, 10, None) == (1.0, 0.4)  # the detector never fired
    assert episode_clock(5, 10, 3) == pytest.approx((0.2, 0.5))
    # After the last round no new traffic is drawn: the observation still shows round 9's.
    assert episode_clock(10, 10, 9) == pytest.approx((0.0, 1.0))
    assert episode_clock(10, 10, 7) == pytest.approx((0.2, 1.0))


def test_the_last_observation_of_an_episode_reads_progress_1():
    env = make()
    env.reset(seed=0)
    action = action_from_betas(np.array([1.0, 0.0, 0.0]))
    for _ in range(env.unwrapped.episode_rounds):
        obs, _, terminated, truncated, _ = env.step(action)
    assert truncated and not terminated
    assert obs[OBS_SLICES["progress"]][0] == pytest.approx(1.0)
    assert 0.0 <= obs[OBS_SLICES["rounds_since_drift"]][0] <= 1.0


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
def test_system_metrics_count_the_detector_and_select_the_reward(fidelity):
    """system_asr counts only flips the detector lets through; reward.metrics picks whose figures score."""
    both_phases = {"phases.0.rounds": 2, "phases.1.rounds": 2}
    env = make(fidelity=fidelity, **both_phases)
    env.reset(seed=3)
    infos = [env.step(action_from_betas(np.array([1.0, 0.0, 0.0])))[4] for _ in range(env.episode_rounds)]
    attacked = [i for i in infos if i["attacks"] and i["asr"] > 0]
    assert attacked, "the test scenario must have rounds where the attacks succeed"
    # These attacks keep the true caption, so the detector catches part of what flips the model.
    assert np.mean([i["system_asr"] for i in attacked]) < np.mean([i["asr"] for i in attacked])
    for info in infos:
        assert 0.0 <= info["system_asr"] <= info["asr"] + 1e-12
        assert set(info["system_asr_per_attack"]) == set(info["asr_per_attack"])
        assert 0.0 <= info["false_rejection_rate"] <= 1.0
        assert info["system_clean_acc"] <= 1.0 - info["false_rejection_rate"] + 1e-12
        weights = env.scenario.reward
        assert info["reward_terms"]["asr"] == pytest.approx(-weights.asr * info["system_asr"])
        assert info["reward_terms"]["clean_acc"] == pytest.approx(weights.clean_acc * info["system_clean_acc"])
    model_env = make(fidelity=fidelity, **both_phases, **{"reward.metrics": "model"})
    model_env.reset(seed=3)
    info = model_env.step(action_from_betas(np.array([1.0, 0.0, 0.0])))[4]
    assert info["reward_terms"]["asr"] == pytest.approx(-model_env.scenario.reward.asr * info["asr"])
    assert info["reward_terms"]["clean_acc"] == pytest.approx(model_env.scenario.reward.clean_acc * info["clean_acc"])


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
def test_same_seed_same_rollout_across_instances_and_resets(fidelity):
    rng = np.random.default_rng(1)
    actions = [rng.uniform(-1, 1, 3).astype(np.float32) for _ in range(4)]
    first, second = make(fidelity=fidelity), make(fidelity=fidelity)
    a = rollout(first, 7, actions)
    assert_same_rollout(a, rollout(second, 7, actions))
    assert_same_rollout(a, rollout(first, 7, actions))  # one instance reset twice
    different = rollout(first, 8, actions)
    assert not np.array_equal(a[1][0], different[1][0])


def test_pickle_round_trip_mid_episode():
    env = make(fidelity="pixel")
    env.reset(seed=3)
    env.step(np.zeros(3, np.float32))
    clone = pickle.loads(pickle.dumps(env))
    action = np.array([0.5, -0.5, 0.2], np.float32)
    original, copied = env.step(action), clone.step(action)
    np.testing.assert_array_equal(original[0], copied[0])
    assert original[1] == copied[1]
    assert_same_info(original[4], copied[4])


def test_subproc_vec_env_with_two_workers():
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    # "module:ID" makes each worker import cmai_env (which registers the IDs) before gym.make.
    vec = make_vec_env(
        "cmai_env:cmai_env/CMAI-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
        env_kwargs={"fidelity": "embedding", **SMALL},
    )
    try:
        obs = vec.reset()
        assert obs.shape == (2, OBS_SIZE)
        obs, rewards, dones, infos = vec.step(np.zeros((2, 3), np.float32))
        assert rewards.shape == (2,) and np.all(np.isfinite(rewards))
        assert {"asr", "clean_acc", "betas"} <= infos[0].keys()
    finally:
        vec.close()


def test_gymnasium_make_vec_with_two_workers():
    vec = gym.make_vec("cmai_env/CMAI-v0", num_envs=2, vectorization_mode="async", fidelity="embedding", **SMALL)
    try:
        obs, _ = vec.reset(seed=0)
        assert obs.shape == (2, OBS_SIZE)
        obs, rewards, _, _, infos = vec.step(np.zeros((2, 3), np.float32))
        assert np.all(np.isfinite(rewards)) and "asr" in infos
    finally:
        vec.close()


def test_wrong_actions_are_clear_errors():
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        env.step(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0, 0], np.float32))
    discrete = gym.make("cmai_env/CMAI-Discrete-v0", fidelity="embedding", **SMALL).unwrapped
    discrete.reset(seed=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        discrete.step(10)


def test_step_before_reset_and_after_the_end():
    env = make(episode_rounds=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3, np.float32))
    env.reset(seed=0)
    env.step(np.zeros(3, np.float32))
    *_, truncated, _ = env.step(np.zeros(3, np.float32))
    assert truncated
    with pytest.raises(RuntimeError, match="episode ended"):
        env.step(np.zeros(3, np.float32))


def test_betas_round_trip_through_actions():
    for betas in ([1 / 3] * 3, [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]):
        np.testing.assert_allclose(betas_from_action(action_from_betas(np.array(betas))), betas, atol=1e-6)


def test_info_has_every_documented_key():
    env = make(scenario="abrupt_shift", episode_rounds=None)
    env.reset(seed=0)
    info = None
    while True:
        _, _, _, truncated, info = env.step(env.action_space.sample())
        if info["shift"] or truncated:
            break
    for key in ("clean_acc", "asr", "asr_per_attack", "consistency_score", "prediction_entropy", "detector_tpr", "detector_fpr",
                "betas", "phase", "attacks", "latency", "compute_cost", "losses"):
        assert key in info, key
    assert env.unwrapped.last_timing.round_ms > 0
    assert set(info["latency"]) >= {"detection_rounds", "detection_ms", "weight_response_rounds",
                                    "weight_response_ms", "recovery_rounds", "recovery_ms"}
    assert info["shift"], "abrupt_shift shifts within its episode"


def test_render_rgb_array():
    env = make(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.zeros(3, np.float32))
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8 and frame.std() > 0


def test_thousand_random_rounds_stay_finite_and_memory_flat():
    env = make(scenario="mixed_modalities", episode_rounds=100)
    env.action_space.seed(0)

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    after_first = None
    for episode in range(10):
        obs, _ = env.reset(seed=episode)
        assert np.all(np.isfinite(obs))
        truncated = False
        while not truncated:
            obs, reward, _, truncated, _ = env.step(env.action_space.sample())
            assert np.all(np.isfinite(obs)) and np.isfinite(reward)
        if episode == 0:
            after_first = rss_mb()
    assert rss_mb() - after_first < 50, "memory grew after the first episode"


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="batch_size"):
        make(batch_size=-3)
    with pytest.raises(ValueError, match="fidelity"):
        make(fidelity="voxel")


@pytest.mark.slow
@pytest.mark.ci_slow
def test_decision_matters_on_quickstart():
    """Fixed task-only vs fixed adversarial-favouring weights end the image-PGD phase ≥ 0.2 ASR apart."""
    final = {}
    for name, betas in {"task_only": [1.0, 0.0, 0.0], "adv_favouring": [0.1, 0.1, 0.8]}.items():
        env = gym.make("cmai_env/CMAI-v0", scenario="quickstart").unwrapped
        env.reset(seed=0)
        action = action_from_betas(np.array(betas))
        asrs, phase = [], None
        while phase != "noisy_text":  # the PGD phase's last round has been played
            _, _, _, _, info = env.step(action)
            phase = info["phase"]
            if info["attacks"] and phase == "image_pgd":
                asrs.append(info["asr"])
        final[name] = float(np.mean(asrs[-3:]))
    assert final["task_only"] - final["adv_favouring"] >= 0.2, final


def test_docstring_observation_table_matches_the_layout():
    """The env's docstring is its contract: its observation table must list OBS_SLICES exactly."""
    rows = []
    for line in CMAIEnv.__doc__.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] in OBS_SLICES and parts[0][0].isdigit():
            rows.append((parts[0], parts[1]))
    expected = [
        (f"{s.start}" if s.stop - s.start == 1 else f"{s.start}-{s.stop - 1}", name) for name, s in OBS_SLICES.items()
    ]
    assert rows == expected


def test_system_metrics_arithmetic():
    """τ rejects clean pairs above it; only flips at or below τ count toward system_asr."""
    from cmai_env.round import AttackOutcome, probe_split, system_metrics

    outcome = AttackOutcome(
        clean_ok=np.array([True, True, True, True, False]),
        flipped=np.array([True, True, False, True, False]),
        consistency=np.array([0.1, 0.9, 0.2, 0.5, 0.1]),
    )
    quiet = AttackOutcome(np.array([True, False]), np.array([False, False]), np.array([0.0, 0.0]))
    from types import SimpleNamespace

    mixture = [SimpleNamespace(name="a", weight=3.0), SimpleNamespace(name="b", weight=1.0)]
    metrics = system_metrics(0.5, np.array([0.2, 0.6, 0.4, 0.7]), np.array([True, True, False, True]), mixture, [outcome, quiet])
    assert metrics.system_asr_per_attack == {"a": 0.5, "b": 0.0}  # flips at 0.1 and 0.5 pass, 0.9 is caught
    assert metrics.system_asr == pytest.approx(0.375)  # (3·0.5 + 1·0) / 4
    assert metrics.false_rejection_rate == 0.5
    assert metrics.system_clean_acc == 0.25  # only the first pair is correct and accepted
    assert [probe_split(n) for n in (2, 16, 128, 256)] == [1, 8, 64, 64]


def test_consistency_training_tightens_the_detector():
    """β_consist trains clean pairs' L_consistency down, so τ (a clean-score quantile) tightens and TPR holds
    (over quickstart's phases on clean images; its last phase's noisy images move τ by themselves)."""
    env = gym.make("cmai_env/CMAI-v0", scenario="quickstart", fidelity="embedding").unwrapped
    env.reset(seed=0)
    infos = [env.step(action_from_betas(np.array([0.0, 1.0, 0.0])))[4] for _ in range(env.episode_rounds)]
    infos = [i for i in infos if i["phase"] != "noisy_text"]
    assert len(infos) == 24
    start, end = infos[0]["detector_threshold"], np.mean([i["detector_threshold"] for i in infos[-5:]])
    assert end < 0.9 * start, f"τ {start:.3f} → {end:.3f}"
    assert np.mean([i["detector_tpr"] for i in infos if i["attacks"]]) >= 0.9


def test_prediction_entropy_shows_a_defence_flattening_predictions_that_accuracy_hides():
    """Without β_task the embedding fidelity's adapters keep the argmax but flatten every prediction
    toward uniform (detector_evasion, 20 rounds, measured 2026-12-07: 0.935 at clean accuracy 1.000);
    info["prediction_entropy"] shows it, task-only stays confident (0.011). Fed pixel fidelity's input
    size (``defense.embedding_adapter_input: pooled_norm``) they flatten less: 0.772 (pixel fidelity 0.583)."""
    import torch

    from cmai_env.round import prediction_entropy

    assert prediction_entropy(torch.zeros(2, 30)).tolist() == pytest.approx([1.0, 1.0])
    assert prediction_entropy(torch.tensor([[50.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    defending = (0.0, 2 / 3, 1 / 3)
    last = {}
    for betas, adapter_input in (((1.0, 0.0, 0.0), "unit"), (defending, "unit"), (defending, "pooled_norm")):
        env = gym.make("cmai_env/CMAI-v0", scenario="detector_evasion", fidelity="embedding",
                       **{"defense.embedding_adapter_input": adapter_input}).unwrapped
        env.reset(seed=0)
        for _ in range(20):
            info = env.step(action_from_betas(np.array(betas)))[4]
        assert 0.0 <= info["prediction_entropy"] <= 1.0
        last[betas, adapter_input] = info
    task_only, defended = last[(1.0, 0.0, 0.0), "unit"], last[defending, "unit"]
    assert defended["clean_acc"] >= 0.9 and task_only["clean_acc"] >= 0.9  # accuracy alone does not tell them apart
    assert task_only["prediction_entropy"] < 0.1 < 0.8 < defended["prediction_entropy"]
    pooled = last[defending, "pooled_norm"]["prediction_entropy"]
    assert pooled < defended["prediction_entropy"] - 0.1, (pooled, defended["prediction_entropy"])


def test_consistency_term_ignores_adversarial_pairs():
    import torch

    from cmai_env.round import defence_terms

    clean_ce, clean_cons = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.2, 0.4]])
    terms = defence_terms(clean_ce, clean_cons, torch.tensor([[5.0, 7.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert terms["consistency"].item() == pytest.approx(0.3)
    assert terms["adv"].item() == pytest.approx(6.0) and terms["task"].item() == pytest.approx(2.0)
