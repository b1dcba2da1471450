"""Files a user loads never run code; interrupted runs resume; concurrent commands never lose results.

Each malicious file carries a pickle whose unpickling would create a marker file: the tests
check the marker never appears and the error names the file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agents.policies import load_policy, read_run
from agents.safe_load import METADATA_ENTRY, UnsafeFileError, load_normalization, read_model_metadata
from agents.train import TrainArgs, TrainingInterrupted, run_training, train
from cmai_env.cli.main import main

SMALL_ENV = ["episode_rounds:8", "phases.0.rounds:4", "phases.1.rounds:4", "batch_size:16", "dataset.train_n:128", "dataset.probe_n:32"]
REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates ``marker`` (what an attacker's pickle would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _serialized(marker: Path) -> dict:
    return {":type:": "<class 'object'>", ":serialized:": base64.b64encode(pickle.dumps(_Payload(marker))).decode()}


def _rewrite_zip(path: Path, edit) -> None:
    """Rewrite the archive at ``path`` with ``edit(name, bytes) -> bytes``."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries:
            archive.writestr(name, edit(name, content))
    path.write_bytes(buffer.getvalue())


def _poison_data(archive: Path, key: str, marker: Path) -> None:
    """Set ``key`` of the archive's ``data`` entry to a pickle that would create ``marker``."""

    def edit(name: str, content: bytes) -> bytes:
        if name != "data":
            return content
        data = json.loads(content)
        data[key] = _serialized(marker)
        return json.dumps(data).encode()

    _rewrite_zip(archive, edit)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(
        TrainArgs(algo="ppo", scenario="quickstart", timesteps=64, seed=0, out=out, env_kwargs=SMALL_ENV,
                  set={"n_steps": 32, "batch_size": 32, "normalize": True}, eval_freq=0, checkpoint_freq=32,
                  progress=False, verbose=0)
    )


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _evaluate(policy: str, out: Path) -> int:
    return main(["evaluate", "--policy", policy, "--scenario", "quickstart", "--seeds", "0", "--out", str(out),
                 "--no-plots", "--quiet", "--env-kwargs", *SMALL_ENV])


# ------------------------------------------------------------------------------ run files
def test_a_run_writes_no_pickles_and_records_model_hashes(run_dir):
    assert not list(run_dir.rglob("*.pkl"))
    assert (run_dir / "quickstart" / "vecnormalize.npz").is_file()
    assert sorted(run_dir.glob("checkpoints/*.npz"))  # checkpoint statistics too
    record = read_run(run_dir).record
    assert record["status"] == "finished" and "quickstart.zip" in record["files"]
    assert any(name.startswith("checkpoints/") for name in record["files"])
    assert read_model_metadata(run_dir / "quickstart.zip")["algo"] == "ppo"
    stats = load_normalization(run_dir / "quickstart" / "vecnormalize.npz")
    assert stats.norm_obs and stats.obs_mean.shape == (68,) and stats.obs_count > 64


def test_a_pickled_policy_class_is_never_unpickled(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    _poison_data(run / "quickstart.zip", "policy_class", marker)  # rebuilt from the run's config instead
    record = json.loads((run / "run.json").read_text())
    record["files"].pop("quickstart.zip")  # no recorded hash: the rebuild alone must keep it safe
    (run / "run.json").write_text(json.dumps(record))
    policy = load_policy(run)
    assert not marker.exists()
    assert policy.model.policy.__class__.__name__ == "ActorCriticPolicy"


def test_an_unknown_pickled_entry_is_refused_naming_the_file(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    _poison_data(run / "quickstart.zip", "innocent_looking", marker)
    with pytest.raises(ValueError, match="sha256 differs"):  # the recorded hash catches the edit first
        load_policy(run)
    record = json.loads((run / "run.json").read_text())
    record["files"].pop("quickstart.zip")
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(UnsafeFileError, match=r"quickstart\.zip.*'innocent_looking'.*refusing to unpickle"):
        load_policy(run)
    assert _evaluate(str(run), tmp_path / "eval") == 1
    assert not marker.exists()


def test_a_pickled_vecnormalize_is_never_loaded(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    (run / "quickstart" / "vecnormalize.npz").unlink()
    legacy = run / "quickstart" / "vecnormalize.pkl"
    legacy.write_bytes(pickle.dumps(_Payload(marker)))
    assert _evaluate(str(run), tmp_path / "eval") == 1
    err = capsys.readouterr().err
    assert str(legacy) in err and "agents.convert_run" in err
    assert not marker.exists()
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_the_converter_runs_no_code_from_the_file(tmp_path, capsys):
    from agents.convert_run import main as convert

    marker = tmp_path / "pwned"
    legacy = tmp_path / "vecnormalize.pkl"
    legacy.write_bytes(pickle.dumps(_Payload(marker)))
    for flags in ([], ["--trust-pickle"]):  # the old flag is accepted and changes nothing
        assert convert([str(legacy), *flags]) == 1
        err = capsys.readouterr().err
        assert str(legacy) in err and "touch, which VecNormalize statistics never contain" in err
    assert not marker.exists() and not (tmp_path / "vecnormalize.npz").exists()
    legacy.write_bytes(b"not a pickle")
    assert convert([str(legacy)]) == 1
    assert "not a readable pickle" in capsys.readouterr().err


def test_the_converter_turns_a_legacy_pickle_into_statistics_that_load(run_dir, tmp_path, capsys):
    import gymnasium as gym
    import numpy as np
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from agents.convert_run import main as convert

    run = _copy_run(run_dir, tmp_path)
    npz = run / "quickstart" / "vecnormalize.npz"
    stats = load_normalization(npz)

    class Observations(gym.Env):  # stands in for the env: the pickle holds no env
        observation_space = gym.spaces.Box(-np.inf, np.inf, stats.obs_mean.shape, np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    legacy = VecNormalize(DummyVecEnv([Observations]), clip_obs=stats.clip_obs, gamma=stats.gamma)
    stats.apply_to(legacy)
    legacy.observation_space.sample()  # its random generator travels in the pickle too
    pkl = npz.with_suffix(".pkl")
    legacy.save(pkl)  # what cmai train wrote before it wrote .npz
    npz.unlink()
    assert convert([str(pkl)]) == 0 and f"wrote {npz}" in capsys.readouterr().out
    converted = load_normalization(npz)
    for field in ("obs_mean", "obs_var", "obs_count", "ret_mean", "ret_var", "clip_obs", "gamma", "norm_obs"):
        np.testing.assert_allclose(getattr(converted, field), getattr(stats, field))
    assert convert([str(pkl)]) == 1 and "already exists" in capsys.readouterr().err  # nothing overwritten
    assert _evaluate(str(run), tmp_path / "eval") == 0


def test_a_standalone_model_loads_from_its_own_metadata_only(run_dir, tmp_path):
    standalone = tmp_path / "model.zip"
    standalone.write_bytes((run_dir / "quickstart.zip").read_bytes())
    assert load_policy(standalone).algo == "ppo"
    bare = tmp_path / "bare.zip"  # an SB3 archive without CMAI's metadata entry
    with zipfile.ZipFile(standalone) as source, zipfile.ZipFile(bare, "w") as archive:
        for info in source.infolist():
            if info.filename != METADATA_ENTRY:
                archive.writestr(info.filename, source.read(info.filename))
    with pytest.raises(UnsafeFileError, match=r"bare\.zip.*run folder"):
        load_policy(bare)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "run.json").write_text('{"algo": "ppo", "env_'), r"run\.json: not valid JSON"),
        (lambda run: _rewrite_zip(run / "quickstart.zip", lambda n, c: b"garbage" if n == "policy.pth" else c), r"quickstart\.zip: the model's weights cannot be loaded"),
        (lambda run: (run / "quickstart" / "vecnormalize.npz").write_bytes(b"not an npz"), r"vecnormalize\.npz: not a CMAI normalisation file"),
    ],
    ids=["truncated-run-json", "garbage-policy-pth", "garbage-statistics"],
)
def test_damaged_run_files_name_the_file(run_dir, tmp_path, damage, message):
    run = _copy_run(run_dir, tmp_path)
    record = json.loads((run / "run.json").read_text())
    record.pop("files")  # let the damage reach the loader rather than the hash check
    (run / "run.json").write_text(json.dumps(record))
    damage(run)
    with pytest.raises(ValueError, match=message):
        load_policy(run)


# ------------------------------------------------------------------------------ interrupt and resume
def test_ctrl_c_saves_an_interrupted_run_that_resume_finishes(tmp_path, interrupt_training):
    stop_interrupting = interrupt_training(40)
    args = TrainArgs(algo="ppo", scenario="quickstart", timesteps=96, seed=0, out=tmp_path, env_kwargs=SMALL_ENV,
                     set={"n_steps": 32, "batch_size": 32}, eval_freq=0, checkpoint_freq=32, progress=False, verbose=0)
    with pytest.raises(TrainingInterrupted) as stop:
        run_training(args)
    run = stop.value.run_dir
    record = read_run(run).record
    assert record["status"] == "interrupted" and record["timesteps_done"] == 40
    spent = record["wall_time_s"], record["cpu_time_s"]  # the interrupted part counts towards the run's time
    assert spent[0] > 0 and spent[1] > 0
    policy = load_policy(run)  # the model so far is evaluable
    assert "(interrupted)" in policy.name and policy.model.num_timesteps == 40
    stop_interrupting()

    assert main(["train", "--resume", str(run), "--no-progress", "--verbose", "0"]) == 0
    record = read_run(run).record
    # PPO collects whole rollouts of n_steps = 32: from step 40 it ends within one rollout past 96.
    assert record["status"] == "finished" and 96 <= record["timesteps_done"] < 96 + 32
    assert record["resumes"][0]["at_timesteps"] == 40 and record["resumes"][0]["from"] == "quickstart.zip"
    assert record["wall_time_s"] > spent[0] and record["cpu_time_s"] > spent[1]
    assert load_policy(run).model.num_timesteps == record["timesteps_done"]
    assert main(["train", "--resume", str(run), "--no-progress", "--verbose", "0"]) == 1  # finished: nothing to resume


def test_evaluating_a_failed_run_says_so(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    (run / "quickstart.zip").unlink()
    record = json.loads((run / "run.json").read_text())
    record["status"] = "failed"
    (run / "run.json").write_text(json.dumps(record))
    assert _evaluate(str(run), tmp_path / "eval") == 1
    assert "is 'failed'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ nothing written is lost
def _cmai(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from cmai_env.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_evaluations_into_one_out_never_lose_results(tmp_path):
    out = tmp_path / "eval"
    argv = ("evaluate", "--scenario", "quickstart", "--seeds", "0", "--out", str(out), "--no-plots", "--quiet", "--env-kwargs", *SMALL_ENV)
    first = _cmai(*argv, "--policy", "baseline:uniform")
    second = _cmai(*argv, "--policy", "baseline:no_defense")
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert str(out) in refused and ("another cmai command" in refused or "already holds results" in refused)
    summary = json.loads((out / "summary.json").read_text())
    winner = "uniform" if results[0][0] == 0 else "no_defense"
    assert summary["metadata"]["policy"] == winner
    # Run again sequentially: refused without --overwrite, nothing touched.
    before = (out / "summary.json").read_bytes()
    assert main([*argv, "--policy", "baseline:dwa"]) == 1
    assert (out / "summary.json").read_bytes() == before


def test_two_trainings_into_one_out_get_separate_run_folders(tmp_path):
    argv = ("train", "--timesteps", "32", "--out", str(tmp_path), "--set", "n_steps=32", "batch_size=32",
            "--eval-freq", "0", "--checkpoint-freq", "0", "--no-progress", "--verbose", "0", "--env-kwargs", *SMALL_ENV)
    procs = [_cmai(*argv), _cmai(*argv)]
    outputs = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    folders = sorted(line.split("run folder: ")[1].strip() for _, out, _ in outputs for line in out.splitlines() if line.startswith("run folder: "))
    assert len(set(folders)) == 2
    for folder in folders:
        assert read_run(folder).record["status"] == "finished"
