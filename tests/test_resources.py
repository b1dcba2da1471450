"""Environment counts the memory cannot hold are refused before anything is built (cmai_env.resources)."""

from __future__ import annotations

import gymnasium as gym
import pytest

import cmai_env  # noqa: F401  (registers the IDs)
from cmai_env import resources
from cmai_env.resources import GIB, SAFETY, ResourceError, check_memory, embedding_bytes_per_env, estimated_bytes, free_bytes
from cmai_env.scenario import apply_overrides, load_scenario


def test_the_estimate_grows_with_the_sizes_that_set_a_rounds_working_set():
    quickstart = load_scenario("quickstart")
    base = embedding_bytes_per_env(quickstart)
    assert embedding_bytes_per_env(apply_overrides(quickstart, {"batch_size": 256})) > base
    assert embedding_bytes_per_env(apply_overrides(quickstart, {"dataset.probe_n": 1024})) > base
    # the probe is attacked once per mixture entry of the widest phase
    mixed = load_scenario("mixed_modalities")
    widest = max(len(phase.attacks) for phase in mixed.phases)
    assert widest > 1
    same_sizes = apply_overrides(quickstart, {"batch_size": mixed.batch_size, "dataset.probe_n": mixed.dataset.probe_n})
    assert embedding_bytes_per_env(mixed) > embedding_bytes_per_env(same_sizes)
    # the measurements it stands on: quickstart's sizes predict ~0.70 MB per environment (0.74 measured)
    assert 0.6 < base / 1024**2 < 0.8
    assert estimated_bytes(quickstart, 4, "pixel", processes=True) == 4 * resources.PIXEL_PROCESS_BYTES
    assert estimated_bytes(quickstart, 4, "pixel") < estimated_bytes(quickstart, 4, "pixel", processes=True)


def test_a_count_over_the_free_memory_names_the_largest_that_fits():
    scenario = load_scenario("quickstart")
    available = 4 * GIB
    with pytest.raises(ResourceError) as error:
        check_memory(scenario, 100_000, "embedding", what="--n-envs", available=available)
    message = str(error.value)
    assert "--n-envs 100000" in message and "quickstart" in message and "batch_size 32" in message and "4.0 GB free" in message
    fits = int(message.split("use at most ")[1].split(",")[0])
    assert SAFETY * estimated_bytes(scenario, fits, "embedding") <= available < SAFETY * estimated_bytes(scenario, fits + 1, "embedding")
    check_memory(scenario, fits, "embedding", available=available)  # that many are accepted
    with pytest.raises(ResourceError, match="none fit"):
        check_memory(scenario, 2, "pixel", processes=True, available=1 * GIB)


def test_free_memory_is_read_for_the_cpu_and_for_a_cuda_device(monkeypatch):
    assert free_bytes("cpu") > 0  # /proc/meminfo's MemAvailable on Linux
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    assert free_bytes("cuda") == 3 * GIB and free_bytes("cuda:0") == 3 * GIB
    scenario = load_scenario("quickstart")
    with pytest.raises(ResourceError, match="cuda has 3.0 GB free"):  # the batched world lives on the device
        check_memory(scenario, 100_000, "embedding", device="cuda")
    # pixel environments live in host memory whatever the device
    check_memory(scenario, 1, "pixel", device="cuda", available=None)


def test_vector_envs_and_cmai_train_refuse_before_building_anything(tmp_path, capsys, monkeypatch):
    # pixel: one process per environment; refused before any process starts
    with pytest.raises(ResourceError, match="a process each"):
        gym.make_vec("cmai_env/CMAI-v0", num_envs=4096, vectorization_mode="vector_entry_point", scenario="quickstart", fidelity="pixel")
    with pytest.raises(ResourceError, match="batched"):
        gym.make_vec("cmai_env/CMAI-v0", num_envs=10**7, vectorization_mode="vector_entry_point", scenario="quickstart", fidelity="embedding")
    from cmai_env.cli.main import main

    code = main(["train", "--scenario", "quickstart", "--n-envs", "10000000", "--timesteps", "10", "--out", str(tmp_path / "runs")])
    assert code != 0 and "n_envs (--n-envs or the hyperparameters') 10000000" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_dataset_larger_than_the_free_memory_is_refused_before_it_is_generated(capsys):
    from cmai_env.cli.main import main
    from cmai_env.data import load_dataset
    from cmai_env.resources import check_dataset_memory

    with pytest.raises(ResourceError) as error:
        check_dataset_memory("shapes", 10**6, 224, what="--n", available=2 * GIB)
    message = str(error.value)
    assert "--n 1000000" in message and "'shapes' at 224×224" in message and "2.0 GB free" in message
    fits = int(message.split("use at most ")[1])
    check_dataset_memory("shapes", fits, 224, available=2 * GIB)
    with pytest.raises(ResourceError):
        check_dataset_memory("shapes", fits + 1, 224, available=2 * GIB)
    with pytest.raises(ResourceError, match="dataset 'shapes'"):
        load_dataset("shapes", n=10**9)
    assert main(["backbone", "eval", "--n", "1000000000"]) != 0
    assert "1000000000 images of dataset 'shapes'" in capsys.readouterr().err


def test_a_rollout_or_replay_buffer_larger_than_the_free_memory_is_refused(tmp_path, capsys):
    from cmai_env.cli.main import main
    from cmai_env.resources import check_buffer_memory

    check_buffer_memory({"n_steps": 128}, 32, 68, 3, available=1 * GIB)  # the shipped sizes fit easily
    check_buffer_memory({"learning_rate": 1e-3}, 1, 68, 3, available=0)  # nothing set: the algorithm's defaults
    with pytest.raises(ResourceError, match=r"n_steps = 10000000: a rollout of 10000000 steps × 32 environments"):
        check_buffer_memory({"n_steps": 10**7}, 32, 68, 3, available=1 * GIB)
    with pytest.raises(ResourceError, match="buffer_size = 100000000: a replay buffer"):
        check_buffer_memory({"buffer_size": 1e8}, 1, 68, 3, available=1 * GIB)  # as YAML reads 1e8
    code = main(["train", "--scenario", "quickstart", "--timesteps", "10", "--set", "n_steps=1000000000", "--out", str(tmp_path / "runs")])
    assert code != 0 and "hyperparameter n_steps = 1000000000" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_memory_benchmark_prints_measurement_beside_estimate():
    """benchmarks/env_memory.py: what the estimates stand on, re-measurable (tiny counts here)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "env_memory.py"
    done = subprocess.run([sys.executable, str(script), "--counts", "2", "8", "--rounds", "1", "--no-pixel"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "embedding, N =     8" in done.stdout and "marginal per environment (N 2 → 8)" in done.stdout and "estimate 0.68 MiB" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--counts", "8", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--counts 8 2" in bad.stderr
