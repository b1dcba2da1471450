"""``cmai train`` / ``cmai tune``, the gating policy and the TensorBoard tags, on tiny budgets.

Every run uses the embedding fidelity, 8-round episodes with the quickstart shift moved to
round 4 (so latencies get measured), small batches and 64-128 timesteps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.callbacks import ALWAYS_ROUND_TAGS, EPISODE_TAGS, LATENCY_TAGS, ROUND_TAGS, TensorBoardRecorder, round_scalars
from agents.policies import (
    CONTINUOUS_ENV_ID,
    DISCRETE_ENV_ID,
    GatingExtractor,
    GatingPolicy,
    SB3GatingPolicy,
    load_policy,
    read_run,
    resolve_policy_kwargs,
)
from agents.protocol import EVAL_SEED_OFFSET
from agents.train import TrainArgs, load_hyperparams, parse_assignments, run_training, validate_hyperparams
from agents.train_args import TuneArgs, add_dataclass_options, from_namespace
from cmai_env.cli.main import main
from cmai_env.env import DISCRETE_BETAS

SMALL_ENV = ["episode_rounds:8", "phases.0.rounds:4", "phases.1.rounds:4", "batch_size:16", "dataset.train_n:128", "dataset.probe_n:32"]
QUIET = ["--no-progress", "--verbose", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: one thread avoids contention (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*argv: str) -> int:
    """Run ``cmai`` in-process; argparse's own errors (SystemExit) become their exit code."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code)


def only_run(root: Path, algo: str) -> Path:
    runs = sorted((root / algo).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def rollout_observations(policy: SB3GatingPolicy, n: int = 8) -> list[np.ndarray]:
    """Observations of one episode of the run's env driven by the loaded policy itself."""
    env = policy.run.make_env()
    obs, _ = env.reset(seed=123)
    out = [obs]
    policy.reset()
    for _ in range(n - 1):
        action, _ = policy.predict(obs)
        obs, _, terminated, truncated, _ = env.step(action)
        out.append(obs)
        if terminated or truncated:
            break
    env.close()
    return out


# ------------------------------------------------------------------------------ PPO end to end
@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    tb = root / "tb"
    torch.set_num_threads(2)  # --threads 1 below must set it back (the module runs on one thread)
    rc = cli(
        "train", "--algo", "ppo", "--scenario", "quickstart", "--timesteps", "128", "--seed", "3", "--n-envs", "1",
        "--out", str(root), "--tensorboard", str(tb), "--env-kwargs", *SMALL_ENV,
        "--set", "n_steps=64", "batch_size=32", "learning_rate=1e-3", "--set", "policy_kwargs.gating.hidden_sizes=[32,32]",
        "--eval-freq", "64", "--eval-episodes", "1", "--checkpoint-freq", "64", "--threads", "1", *QUIET,
    )
    assert rc == 0
    return only_run(root, "ppo"), tb


def test_train_writes_the_zoo_run_folder(ppo_run):
    run_dir, _ = ppo_run
    assert run_dir.name == "quickstart_1"
    for name in ("quickstart.zip", "best_model.zip", "evaluations.npz", "run.json", "0.monitor.csv",
                 "checkpoints/rl_model_64_steps.zip", "checkpoints/rl_model_128_steps.zip",
                 "quickstart/config.yml", "quickstart/args.yml", "quickstart/env_kwargs.yml", "quickstart/scenario.yml"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["algo"] == "ppo" and record["env_id"] == CONTINUOUS_ENV_ID and record["status"] == "finished"
    assert record["seed"] == 3 and record["timesteps"] == 128 and record["timesteps_done"] == 128
    assert record["versions"]["cmai"] and record["wall_time_s"] > 0 and record["cpu_time_s"] > 0
    assert record["threads"] == 1 == torch.get_num_threads()  # --threads 1 (the fixture had set 2)
    # The scenario copy is byte-identical to the shipped file and its hash is recorded.
    copy = (run_dir / "quickstart/scenario.yml").read_bytes()
    shipped = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"
    assert copy == shipped.read_bytes()
    assert record["scenario"]["sha256"] == hashlib.sha256(copy).hexdigest()
    evaluations = np.load(run_dir / "evaluations.npz")
    assert evaluations["timesteps"].tolist() == [64, 128]
    assert evaluations["results"].shape == (2, 1)
    args = yaml.safe_load((run_dir / "quickstart/args.yml").read_text())
    assert args["algo"] == "ppo" and args["set"][:2] == ["n_steps=64", "batch_size=32"]


def test_set_and_env_kwargs_reach_the_model_and_env(ppo_run):
    run_dir, _ = ppo_run
    config = yaml.safe_load((run_dir / "quickstart/config.yml").read_text())
    assert config["n_steps"] == 64 and config["batch_size"] == 32 and config["learning_rate"] == pytest.approx(1e-3)
    assert config["policy_kwargs"]["gating"]["hidden_sizes"] == [32, 32]
    assert config["policy_kwargs"]["gating"]["activation"] == "tanh"  # merged, not replaced
    env_kwargs = yaml.safe_load((run_dir / "quickstart/env_kwargs.yml").read_text())
    assert env_kwargs["episode_rounds"] == 8 and env_kwargs["phases.0.rounds"] == 4 and env_kwargs["fidelity"] == "embedding"

    policy = load_policy(run_dir)
    model = policy.model
    assert model.n_steps == 64 and model.batch_size == 32 and model.learning_rate == pytest.approx(1e-3)
    extractor = model.policy.features_extractor
    assert isinstance(extractor, GatingExtractor)
    assert [m.out_features for m in extractor.mlp if isinstance(m, torch.nn.Linear)] == [32, 32]
    # net_arch pi = []: the action head is one Linear layer from the gating features to 3 logits.
    assert (model.policy.action_net.in_features, model.policy.action_net.out_features) == (32, 3)
    env = policy.run.make_env()
    assert env.unwrapped.episode_rounds == 8 and env.unwrapped.scenario.batch_size == 16
    env.close()


def test_load_policy_from_checkpoints_and_standalone_archives(ppo_run, tmp_path):
    run_dir, _ = ppo_run
    checkpoint = load_policy(run_dir / "checkpoints" / "rl_model_64_steps.zip")
    assert checkpoint.run is not None and checkpoint.run.run_dir == run_dir and checkpoint.model.num_timesteps == 64
    standalone = tmp_path / "model.zip"
    standalone.write_bytes((run_dir / "quickstart.zip").read_bytes())
    policy = load_policy(standalone)  # no run.json: the algorithm is read from the archive's JSON
    assert policy.algo == "ppo" and policy.run is None and policy.env_id == CONTINUOUS_ENV_ID
    obs = np.linspace(-1, 1, 68, dtype=np.float32)
    np.testing.assert_array_equal(policy.predict(obs)[0], load_policy(run_dir).predict(obs)[0])
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        load_policy(tmp_path / "no_such_run")


def test_training_without_tensorboard_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """SB3's default logger makes an empty tempdir/SB3-<time> folder per run; CMAI's runs do not."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    rc = cli(
        "train", "--algo", "ppo", "--scenario", "quickstart", "--timesteps", "32", "--seed", "0", "--n-envs", "1",
        "--out", str(tmp_path / "runs"), "--env-kwargs", *SMALL_ENV, "--set", "n_steps=32", "batch_size=16",
        "--eval-freq", "0", "--checkpoint-freq", "0", "--threads", "1", "--no-progress", "--verbose", "1",
    )
    assert rc == 0 and (only_run(tmp_path / "runs", "ppo") / "quickstart.zip").is_file()
    assert [p.name for p in temp.iterdir() if p.name.startswith("SB3-")] == []


def test_tensorboard_has_every_documented_tag(ppo_run):
    _, tb = ppo_run
    (event_dir,) = sorted((tb / "quickstart").iterdir())
    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    cmai_tags = {t for t in tags if t.startswith("cmai/")}
    assert cmai_tags <= set(ROUND_TAGS) | set(EPISODE_TAGS), cmai_tags - set(ROUND_TAGS) - set(EPISODE_TAGS)
    for tag in ALWAYS_ROUND_TAGS:  # one point per round
        assert [e.step for e in accumulator.Scalars(tag)] == list(range(1, 129)), tag
    episode_tags = {t for t in EPISODE_TAGS if "latency" not in t}
    assert episode_tags <= tags, episode_tags - tags
    assert [e.step for e in accumulator.Scalars("cmai/episode/length")] == list(range(8, 129, 8))
    assert all(e.value == 1.0 for e in accumulator.Scalars("cmai/episode/shifts"))  # the shift at round 4
    # The shift at round 4 is attacked traffic the detector flags: detection latency is measured.
    assert "cmai/latency/detection_rounds" in tags and "cmai/episode/latency/detection_rounds" in tags
    betas = [np.mean([e.value for e in accumulator.Scalars(t)]) for t in ("cmai/beta_task", "cmai/beta_consist", "cmai/beta_adv")]
    assert sum(betas) == pytest.approx(1.0, abs=1e-5)
    assert {"eval/mean_reward", "train/value_loss"} <= tags  # SB3's own logging is untouched


def test_recorder_logs_latencies_only_once_measured(tmp_path):
    info = {"asr": 0.5, "clean_acc": 0.9, "consistency_score": 0.8, "detector_tpr": 1.0, "detector_fpr": 0.1,
            "compute_cost": 0.5, "betas": np.array([0.2, 0.3, 0.5]), "reward_terms": {"a": 0.25, "b": -0.5},
            "latency": {"shift_round": 2, "detection_rounds": 1, "detection_ms": 12.5, "weight_response_rounds": None,
                        "weight_response_ms": None, "recovery_rounds": None, "recovery_ms": None}}
    scalars = round_scalars(info)
    assert scalars["cmai/reward"] == pytest.approx(-0.25) and scalars["cmai/beta_adv"] == pytest.approx(0.5)
    assert {t for t in LATENCY_TAGS if t in scalars} == {"cmai/latency/detection_rounds", "cmai/latency/detection_ms"}
    recorder = TensorBoardRecorder(tmp_path / "eval")
    recorder.record_round(info, step=0)
    # info keeps carrying the shift's detection latency: it is not written again
    recorder.record_round({**info, "asr": 0.1}, step=1, done=True)
    recorder.close()
    assert recorder.last_episode["cmai/episode/asr"] == pytest.approx(0.3)
    assert recorder.last_episode["cmai/episode/return"] == pytest.approx(-0.5)
    assert recorder.last_episode["cmai/episode/latency/detection_ms"] == pytest.approx(12.5)
    accumulator = EventAccumulator(str(tmp_path / "eval"))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("cmai/asr")] == pytest.approx([0.5, 0.1])
    assert [(e.step, e.value) for e in accumulator.Scalars("cmai/latency/detection_rounds")] == [(0, 1.0)]
    assert "cmai/latency/recovery_rounds" not in accumulator.Tags()["scalars"]


def test_recovery_after_a_shift_into_a_quiet_phase_is_not_logged(tmp_path):
    """summary.json counts recovery over shifts into attacking phases only; TensorBoard does too."""
    base = {"asr": 0.0, "clean_acc": 0.9, "consistency_score": 0.8, "detector_tpr": 0.0, "detector_fpr": 0.1,
            "compute_cost": 0.0, "betas": np.array([1 / 3, 1 / 3, 1 / 3]), "reward_terms": {"a": 1.0}}
    empty = {"detection_rounds": None, "detection_ms": None, "weight_response_rounds": None, "weight_response_ms": None}
    quiet = {**base, "latency": {**empty, "shift_round": 0, "attacking": False, "recovery_rounds": 0, "recovery_ms": 10.0}}
    attacked = {**base, "latency": {**empty, "shift_round": 1, "attacking": True, "recovery_rounds": 0, "recovery_ms": 30.0}}
    recorder = TensorBoardRecorder(tmp_path / "eval")
    recorder.record_round(quiet, step=0)
    recorder.record_round(attacked, step=1, done=True)
    recorder.close()
    assert recorder.last_episode["cmai/episode/latency/recovery_ms"] == pytest.approx(30.0)  # not the mean with the quiet shift's 10
    accumulator = EventAccumulator(str(tmp_path / "eval"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("cmai/latency/recovery_ms")] == [(1, 30.0)]


def test_each_latency_reaches_tensorboard_once_per_shift_when_measured(tmp_path):
    """A scenario where recovery happens (asr_target 1.0: ASR is back at target in the shift round): every latency appears, once per shift."""
    tb = tmp_path / "tb"
    assert cli("evaluate", "--policy", "baseline:detector_switch", "--scenario", "quickstart", "--seeds", "0", "--episodes", "2",
               "--out", str(tmp_path / "eval"), "--tensorboard", str(tb), "--no-plots", "--quiet",
               "--env-kwargs", *SMALL_ENV, "asr_target:1.0") == 0
    accumulators = []
    for events in sorted(tb.rglob("events.out.tfevents.*")):  # one folder per seed and episode
        accumulators.append(EventAccumulator(str(events.parent)))
        accumulators[-1].Reload()
    assert len(accumulators) == 2
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for key in ("detection_rounds", "weight_response_rounds", "recovery_rounds", "recovery_ms"):
        points = [e for acc in accumulators if f"cmai/latency/{key}" in acc.Tags()["scalars"] for e in acc.Scalars(f"cmai/latency/{key}")]
        measured = summary["latency"][key]["measured"]
        assert measured >= 1 and len(points) == measured, (key, points, summary["latency"][key])
        assert all(e.value >= 0 for e in points)


# ------------------------------------------------------------------------------ reload = in-memory
def test_reloaded_policy_acts_like_the_in_memory_model(tmp_path):
    """With VecNormalize on, so the saved statistics must be applied to match."""
    result = run_training(
        TrainArgs(algo="ppo", scenario="quickstart", timesteps=64, seed=1, out=tmp_path, env_kwargs=SMALL_ENV,
                  set={"n_steps": 32, "batch_size": 32, "normalize": True}, eval_freq=0, checkpoint_freq=0,
                  progress=False, verbose=0)
    )
    try:
        assert (result.run_dir / "quickstart/vecnormalize.npz").is_file()
        assert not list(result.run_dir.rglob("*.pkl"))  # nothing pickled is written
        policy = load_policy(result.run_dir)
        assert isinstance(policy, GatingPolicy) and policy.obs_normalizer is not None
        for obs in rollout_observations(policy):
            expected, _ = result.model.predict(result.env.normalize_obs(obs), deterministic=True)
            action, state = policy.predict(obs)
            np.testing.assert_allclose(action, expected, rtol=0, atol=1e-6)
            assert state is None
            np.testing.assert_allclose(policy.betas(action).sum(), 1.0)
    finally:
        result.env.close()


# ------------------------------------------------------------------------------ other algorithms
def small_run(tmp_path: Path, algo: str, *extra: str) -> Path:
    rc = cli("train", "--algo", algo, "--timesteps", "64", "--out", str(tmp_path), "--env-kwargs", *SMALL_ENV,
             "--eval-freq", "64", "--eval-episodes", "1", *QUIET, *extra)
    assert rc == 0
    run_dir = only_run(tmp_path, algo)
    for name in ("quickstart.zip", "best_model.zip", "evaluations.npz", "run.json", "quickstart/config.yml"):
        assert (run_dir / name).is_file(), name
    return run_dir


def test_gsde_policy_evaluates_on_the_batched_env(tmp_path):
    """A PPO gate trained with gSDE (shift_evasion's shipped entry) evaluates all its seeds in one
    batch: the per-seed copies share the model, whose exploration matrix deepcopy refuses."""
    rc = cli("train", "--algo", "ppo", "--scenario", "quickstart", "--timesteps", "64", "--seed", "0", "--n-envs", "2",
             "--out", str(tmp_path / "runs"), "--env-kwargs", *SMALL_ENV, "fidelity:embedding",
             "--set", "n_steps=32", "batch_size=32", "use_sde=true", "sde_sample_freq=-1", "--eval-freq", "0", *QUIET)
    assert rc == 0
    run_dir = only_run(tmp_path / "runs", "ppo")
    policy = load_policy(run_dir)
    assert policy.model.use_sde and not policy.model.policy.action_dist.exploration_mat.is_leaf
    twin = copy.deepcopy(policy)
    assert twin.model is policy.model and twin is not policy
    obs = rollout_observations(policy, 4)
    np.testing.assert_array_equal(twin.predict(obs[-1])[0], policy.predict(obs[-1])[0])
    assert cli("evaluate", "--policy", str(run_dir), "--scenario", "quickstart", "--seeds", "0", "1",
               "--out", str(tmp_path / "eval"), "--env-kwargs", *SMALL_ENV, "--no-plots", "--quiet") == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metadata"]["seeds"] == [0, 1] and summary["metadata"]["fidelity"] == "embedding"


def test_dqn_trains_on_the_discrete_grid(tmp_path):
    run_dir = small_run(tmp_path, "dqn", "--set", "learning_starts=16", "train_freq=4")
    assert read_run(run_dir).env_id == DISCRETE_ENV_ID
    policy = load_policy(run_dir, which="best")
    assert policy.discrete and policy.env_id == DISCRETE_ENV_ID
    assert policy.model.q_net.q_net[-1].out_features == len(DISCRETE_BETAS)
    assert policy.model.num_timesteps == 64
    for obs in rollout_observations(policy, n=3):
        action, _ = policy.predict(obs)
        assert 0 <= int(action) < len(DISCRETE_BETAS)
        np.testing.assert_array_equal(policy.betas(action), DISCRETE_BETAS[int(action)])


def test_sac_trains_and_reloads(tmp_path):
    run_dir = small_run(tmp_path, "sac", "--set", "learning_starts=16", "batch_size=16")
    policy = load_policy(run_dir)
    assert isinstance(policy.model.actor.features_extractor, GatingExtractor)
    assert policy.model.num_timesteps == 64 and policy.model.batch_size == 16
    from stable_baselines3 import SAC

    reference = SAC.load(run_dir / "quickstart.zip")
    for obs in rollout_observations(policy, n=3):
        action, _ = policy.predict(obs)
        assert np.all(np.abs(action) <= 1.0)
        np.testing.assert_allclose(action, reference.predict(obs, deterministic=True)[0], atol=1e-6)


def test_recurrent_ppo_keeps_its_lstm_state(tmp_path):
    run_dir = small_run(tmp_path, "recurrent_ppo", "--set", "n_steps=32", "batch_size=32")
    policy = load_policy(run_dir)
    assert policy.recurrent
    observations = rollout_observations(policy, n=4)
    from sb3_contrib import RecurrentPPO

    reference = RecurrentPPO.load(run_dir / "quickstart.zip")
    policy.reset()
    state, start = None, np.array([True])
    for obs in observations:
        expected, state = reference.predict(obs, state=state, episode_start=start, deterministic=True)
        start = np.array([False])
        action, policy_state = policy.predict(obs)  # state tracked inside the wrapper
        np.testing.assert_allclose(action, expected, atol=1e-6)
        assert len(policy_state) == 2 and policy_state[0].shape == (1, 1, 32)
    policy.reset()
    np.testing.assert_allclose(policy.predict(observations[0])[0], reference.predict(observations[0], episode_start=np.array([True]), deterministic=True)[0], atol=1e-6)


@pytest.mark.parametrize("algo", ["td3", "a2c"])
def test_other_algorithms_train(tmp_path, algo):
    extra = ("--set", "learning_starts=16") if algo == "td3" else ()
    policy = load_policy(small_run(tmp_path, algo, *extra))
    assert isinstance(policy.model.policy.features_extractor if algo == "a2c" else policy.model.actor.features_extractor, GatingExtractor)


# ------------------------------------------------------------------------------ rl-zoo3 does the work
def test_run_training_goes_through_rl_zoo3s_experiment_manager(tmp_path, monkeypatch):
    """rl-zoo3 preprocesses the hyperparameters and builds the model: a float learning rate becomes
    its ConstantSchedule (CMAI's own code never makes one), lin_ its SimpleLinearSchedule; an error
    raised inside ExperimentManager reaches the caller and leaves no run folder."""
    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.utils import SimpleLinearSchedule
    from stable_baselines3.common.utils import ConstantSchedule

    seen = []
    original = ExperimentManager._preprocess_hyperparams
    monkeypatch.setattr(ExperimentManager, "_preprocess_hyperparams", lambda self, hp: seen.append(dict(hp)) or original(self, hp))
    result = run_training(
        TrainArgs(algo="ppo", scenario="quickstart", timesteps=32, seed=2, out=tmp_path, env_kwargs=SMALL_ENV,
                  set={"n_steps": 32, "batch_size": 32, "learning_rate": 1e-3, "clip_range": "lin_0.3"},
                  eval_freq=0, checkpoint_freq=0, progress=False, verbose=0)
    )
    result.env.close()
    assert len(seen) == 1 and seen[0]["clip_range"] == "lin_0.3" and seen[0]["n_timesteps"] == 32
    assert isinstance(result.model.learning_rate, ConstantSchedule) and result.model.learning_rate(1.0) == pytest.approx(1e-3)
    assert isinstance(result.model.clip_range.value_schedule, SimpleLinearSchedule)
    assert result.model.clip_range(1.0) == pytest.approx(0.3) and result.model.clip_range(0.5) == pytest.approx(0.15)
    assert result.model.seed == 2 and result.record["status"] == "finished"

    def fail(self, *args, **kwargs):
        raise RuntimeError("inside rl-zoo3's ExperimentManager")

    monkeypatch.setattr(ExperimentManager, "_preprocess_action_noise", fail)
    with pytest.raises(RuntimeError, match="inside rl-zoo3"):
        run_training(TrainArgs(algo="ppo", timesteps=32, out=tmp_path / "again", env_kwargs=SMALL_ENV, progress=False, verbose=0))
    assert not (tmp_path / "again" / "ppo" / "quickstart_1").exists()


def test_resuming_a_normalising_run_loads_nothing_pickled(tmp_path, monkeypatch, interrupt_training):
    """Ctrl-C, then --resume: rl-zoo3's continue-training path, with CMAI's safe loading and .npz statistics."""
    from agents.train import TrainingInterrupted
    from agents.zoo import CMAIExperimentManager

    stop_interrupting = interrupt_training(40)
    args = TrainArgs(algo="ppo", timesteps=64, seed=0, out=tmp_path, env_kwargs=SMALL_ENV, eval_freq=0, checkpoint_freq=0,
                     set={"n_steps": 32, "batch_size": 32, "normalize": True}, progress=False, verbose=0)
    with pytest.raises(TrainingInterrupted) as stop:
        run_training(args)
    run = stop.value.run_dir
    saved = np.load(run / "quickstart" / "vecnormalize.npz")["obs_mean"]
    stop_interrupting()
    applied = []
    load = CMAIExperimentManager._load_pretrained_agent

    def spy(self, hyperparams, env):
        model = load(self, hyperparams, env)
        applied.append(env.obs_rms.mean.copy())
        return model

    monkeypatch.setattr(CMAIExperimentManager, "_load_pretrained_agent", spy)
    result = run_training(TrainArgs(resume=run, progress=False, verbose=0))
    result.env.close()
    np.testing.assert_allclose(applied[0], saved)  # the interrupted run's statistics, from the .npz
    assert result.record["status"] == "finished" and result.record["resumes"][0]["at_timesteps"] == 40
    assert 64 <= result.model.num_timesteps < 64 + 32
    assert not list(run.rglob("*.pkl"))


def test_zoo_manager_seeds_training_envs_by_rank_and_the_eval_env_apart(tmp_path):
    from agents.zoo import CMAIExperimentManager

    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize, sync_envs_normalization

    env_kwargs = {"scenario": "quickstart", "fidelity": "embedding", **parse_assignments(SMALL_ENV, ":", "--env-kwargs")}

    def manager_for(n_envs: int, folder: Path) -> CMAIExperimentManager:
        hyperparams = {**load_hyperparams("ppo", "quickstart"), "n_timesteps": 64, "n_envs": n_envs, "normalize": True}
        manager = CMAIExperimentManager("ppo", CONTINUOUS_ENV_ID, hyperparams, folder, folder / "quickstart", "quickstart",
                                        seed=3, env_kwargs=env_kwargs, verbose=0)
        manager._preprocess_hyperparams(manager.read_hyperparameters()[0])  # n_envs, normalize: rl-zoo3's reading
        return manager

    single = manager_for(1, tmp_path / "single")
    try:
        training = single.create_envs(1)  # rl-zoo3's make_vec_env
        evaluation = single.create_envs(1, eval_env=True)  # the same, reseeded apart
        assert isinstance(training.venv, DummyVecEnv) and training.venv._seeds == [3]
        assert evaluation.venv._seeds == [3 + EVAL_SEED_OFFSET] and single.seed == 3
        assert evaluation.training is False and evaluation.norm_reward is False
        assert (tmp_path / "single" / "0.monitor.csv").is_file()  # training envs log into the run folder
    finally:
        single.close_envs()
    assert single.envs == []
    batched = manager_for(2, tmp_path / "batched")
    try:
        training = batched.create_envs(2)  # embedding fidelity, 2 envs: CMAI's batched adapter, env i on seed + i
        evaluation = batched.create_envs(1, eval_env=True)
        assert isinstance(training, VecNormalize) and type(training.venv.venv).__name__ == "CMAIVecEnvAdapter"
        assert training.venv.venv._seeds == [3, 4] and evaluation.venv.venv._seeds == [3 + EVAL_SEED_OFFSET]
        sync_envs_normalization(training, evaluation)  # what EvalCallback does: needs envs wrapped alike
    finally:
        batched.close_envs()


def test_options_are_generated_from_the_argument_dataclasses():
    import argparse
    import dataclasses

    for cls in (TrainArgs, TuneArgs):
        parser = argparse.ArgumentParser()
        add_dataclass_options(parser, cls)
        assert from_namespace(cls, parser.parse_args([])) == cls()  # same defaults
        assert {f.name for f in dataclasses.fields(cls)} <= {a.dest for a in parser._actions}
        assert all(a.help for a in parser._actions)
    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, TrainArgs)
    args = from_namespace(TrainArgs, parser.parse_args(["--n-envs", "4", "--no-progress", "--subproc", "--set", "a=1", "b=2",
                                                         "--set", "c=3", "--resume", "runs/x", "--fidelity", "pixel"]))
    assert (args.n_envs, args.progress, args.subproc, args.set, args.resume, args.fidelity) == (4, False, True, ["a=1", "b=2", "c=3"], Path("runs/x"), "pixel")
    with pytest.raises(SystemExit):
        parser.parse_args(["--fidelity", "voxel"])

    @dataclasses.dataclass
    class Undocumented:
        """No param lines."""

        x: int = 0

    with pytest.raises(ValueError, match="Undocumented.x"):
        add_dataclass_options(argparse.ArgumentParser(), Undocumented)


# ------------------------------------------------------------------------------ tune
def test_tune_writes_best_hyperparams(tmp_path, monkeypatch):
    from rl_zoo3.exp_manager import ExperimentManager

    threads_set: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, _set=torch.set_num_threads: threads_set.append(n) or _set(n))

    trials = []
    objective = ExperimentManager.objective
    monkeypatch.setattr(ExperimentManager, "objective", lambda self, trial: trials.append(trial.number) or objective(self, trial))
    out = tmp_path / "tune"
    rc = cli("tune", "--algo", "ppo", "--scenario", "quickstart", "--trials", "2", "--timesteps", "128", "--seed", "0",
             "--out", str(out), "--env-kwargs", *SMALL_ENV, "--n-evaluations", "2", "--verbose", "0", "--threads", "1")
    assert rc == 0
    assert threads_set[:1] == [1]  # --threads reached torch before the study started
    best = yaml.safe_load((out / "best_hyperparams.yml").read_text())
    assert set(best) == {"quickstart"}
    hyperparams = load_hyperparams("ppo", "quickstart", out / "best_hyperparams.yml")
    validate_hyperparams("ppo", hyperparams)
    assert 1e-5 <= hyperparams["learning_rate"] <= 3e-3 and hyperparams["n_steps"] in (32, 64, 128, 256)
    assert hyperparams["policy_kwargs"]["gating"]["hidden_sizes"][0] in (32, 64, 128)
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("number,state,value")
    summary = json.loads((out / "study.json").read_text())
    assert summary["n_trials"] == 2 and summary["complete"] >= 1
    assert trials == [0, 1]  # every trial ran rl-zoo3's objective
    assert not list(out.rglob("*.pkl"))  # rl-zoo3's report pickle is not written


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--algo", "ppo2"], "'ppo2'"),
        (["--set", "learning_rate"], "'learning_rate'"),
        (["--set", "learning_rat=0.1"], "'learning_rat'"),
        (["--set", "policy_kwargs.nett_arch=[8]"], "policy_kwargs.nett_arch"),
        (["--set", "seed=3"], "--seed"),
        (["--set", "n_steps=[1,"], "[1,"),
        (["--env-kwargs", "episode_rounds=8"], "episode_rounds=8"),
        (["--env-kwargs", "no_such_field:1"], "no_such_field"),
        (["--scenario", "missing/scenario.yaml"], "missing/scenario.yaml"),
        (["--scenario", "unseen_attacks"], "evaluation-only"),
        (["--hyperparams", "nowhere.yml"], "nowhere.yml"),
        (["--set", "policy_kwargs.gating.activation=sigmoid"], "'sigmoid'"),
        (["--set", "learning_rate=lin_fast"], "lin_fast"),
        (["--threads", "0"], "threads must be at least 1, got 0"),
    ],
)
def test_bad_inputs_exit_2_naming_the_value(tmp_path, capsys, argv, needle):
    assert cli("train", "--timesteps", "64", "--out", str(tmp_path), *QUIET, *argv) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "ppo").exists()  # nothing written for a rejected configuration


@pytest.mark.parametrize(
    "algo, key",
    [("ppo", "normalize"), ("sac", "replay_buffer_kwargs"), ("dqn", "replay_buffer_class")],
)
def test_a_hyperparameter_string_rl_zoo3_would_eval_is_refused_and_never_run(tmp_path, capsys, algo, key):
    # rl-zoo3 eval()s a string `normalize`, `replay_buffer_class` or `replay_buffer_kwargs`.
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran') and dict()"
    hyperparams = tmp_path / "hp.yml"
    hyperparams.write_text(f"default:\n  {key}: {json.dumps(code)}\n")
    argv = ["train", "--algo", algo, "--timesteps", "64", "--out", str(tmp_path / "runs"), "--hyperparams", str(hyperparams)]
    assert cli(*argv, "--env-kwargs", *SMALL_ENV, *QUIET) == 1
    assert f"hyperparameter {key}" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "runs" / algo).exists()


def test_hyperparameters_the_algorithm_rejects_leave_no_run_folder(tmp_path, capsys):
    argv = ["train", "--timesteps", "64", "--out", str(tmp_path), "--env-kwargs", *SMALL_ENV, *QUIET]
    assert cli(*argv, "--set", "n_steps=abc") == 1
    assert "ppo rejected the hyperparameters" in capsys.readouterr().err
    assert not (tmp_path / "ppo" / "quickstart_1").exists()


def test_tune_rejects_unknown_algo(tmp_path, capsys):
    assert cli("tune", "--algo", "nope", "--out", str(tmp_path)) == 1
    assert "'nope'" in capsys.readouterr().err


def test_tune_rejects_zero_threads(tmp_path, capsys):
    assert cli("tune", "--threads", "0", "--out", str(tmp_path / "tune")) == 1
    assert "threads must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()  # refused before anything was written


# ------------------------------------------------------------------------------ units
def test_parse_assignments_reads_yaml_values():
    parsed = parse_assignments(["learning_rate=3e-4", "policy_kwargs.net_arch=[32, 32]", "normalize=true", "noise_type=normal"], "=", "--set")
    assert parsed == {"learning_rate": 3e-4, "policy_kwargs.net_arch": [32, 32], "normalize": True, "noise_type": "normal"}
    assert parse_assignments(["defense.lr:0.001", "episode_rounds:20"], ":", "--env-kwargs") == {"defense.lr": 0.001, "episode_rounds": 20}


def test_every_shipped_entry_names_a_shipped_scenario_validates_and_uses_the_gating_network():
    """A typo in an entry's name would silently train that scenario on ``default``."""
    from agents.train import HYPERPARAMS_DIR
    from cmai_env import scenarios_available
    from cmai_env.keyvalue import load_yaml

    shipped = scenarios_available()
    for algo in ("ppo", "a2c", "sac", "td3", "dqn", "recurrent_ppo"):
        path = HYPERPARAMS_DIR / f"{algo}.yml"
        for name in load_yaml(path):
            assert name == "default" or name in shipped, f"{path.name}: entry {name!r} is no shipped scenario"
            hyperparams = load_hyperparams(algo, name)
            validate_hyperparams(algo, hyperparams)
            kwargs = resolve_policy_kwargs(hyperparams["policy_kwargs"])
            assert kwargs["features_extractor_class"] is GatingExtractor, (algo, name)
            assert kwargs["net_arch"] == [] or kwargs["net_arch"]["pi"] == [], (algo, name)


def test_gating_extractor_reads_selected_fields():
    import gymnasium as gym

    from cmai_env.observation import OBS_SIZE, OBS_SLICES

    space = gym.spaces.Box(-10, 10, (OBS_SIZE,), np.float32)
    extractor = GatingExtractor(space, hidden_sizes=[8], activation="relu", fields=["flag_rate", "prev_asr"])
    assert extractor.mlp[0].in_features == 2 and extractor.features_dim == 8
    obs = torch.zeros(1, OBS_SIZE)
    base = extractor(obs)
    obs[0, OBS_SLICES["image_embed_proj"]] = 5.0  # a field the gate does not read
    assert torch.equal(extractor(obs), base)
    with pytest.raises(ValueError, match="no_field"):
        GatingExtractor(space, fields=["no_field"])


def test_benchmark_keeps_apart_two_runs_of_the_same_name(ppo_run, tmp_path, capsys):
    """Runs named alike under different roots (``a/ppo/quickstart_1``, ``b/ppo/quickstart_1``) get
    one row each, labelled by their paths; one run given twice is refused."""
    import shutil

    run_dir, _ = ppo_run
    first, second = tmp_path / "a" / run_dir.name, tmp_path / "b" / run_dir.name
    shutil.copytree(run_dir, first)
    shutil.copytree(run_dir, second)
    out = tmp_path / "bench"
    common = ["benchmark", "--scenarios", "quickstart", "--seeds", "0", "--fidelity", "embedding", "--baselines", "no_defense",
              "--env-kwargs", *SMALL_ENV, "--no-plots", "--quiet", "--bootstrap-reps", "100", "--threads", "1"]
    assert cli(*common, "--out", str(out), "--policies", str(first), str(second)) == 0
    block = json.loads((out / "results.json").read_text())["scenarios"]["quickstart"]
    trained = [row["policy"] for row in block["comparison"] if row["kind"] == "trained"]
    assert trained == [f"ppo:{first.as_posix()}", f"ppo:{second.as_posix()}"]
    assert [a["policy"] for a in block["ablation"]] == trained
    assert cli(*common, "--out", str(tmp_path / "twice"), "--policies", str(first), str(first / ".." / run_dir.name)) == 1
    assert "given more than once" in capsys.readouterr().err
