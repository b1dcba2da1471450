"""benchmarks/env_throughput.py: the arithmetic report (FLOPs per round, achieved and peak GFLOP/s) and the device check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "env_throughput.py"
SMALL = {"batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("env_throughput")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(previous)


def test_arithmetic_counts_the_rounds_flops_and_reduced_rounds_do_less(bench):
    from cmai_env.fidelity import stacked

    cfg = {"scenario": "abrupt_shift", "device": "cpu", "n": 2, "steps": 2, "overrides": SMALL}
    measured = bench.bench_arithmetic(cfg)
    assert measured["rounds"] == 4 and measured["dim"] == 64 and measured["hidden"] == stacked.ADAPTER_HIDDEN
    assert 0 < measured["model_cpu"] <= measured["cpu"] and measured["peak"] > 0
    per_round = measured["flops"] / measured["rounds"]
    # At least the probe's clean forward: 32 pairs x 2 sides through the adapter (4·D·H) and the class logits (2·D·C).
    per_pass = 4 * 64 * measured["hidden"] + 2 * 64 * measured["classes"]
    assert per_round >= 32 * 2 * per_pass
    reduced = {"all three": bench.bench_arithmetic({**cfg, "reduced": bench.REDUCED["all three"]})}
    assert (stacked.MAX_STEPS, stacked.ADAPTER_HIDDEN) == (3, 64)  # restored after the reduced round
    assert reduced["all three"]["flops"] / reduced["all three"]["rounds"] < per_round / 2
    lines = bench.arithmetic_lines(measured, reduced, "cpu")
    assert f"{per_round / 1e6:.1f} MFLOP per round" in lines[0]
    achieved = float(re.search(r"achieved ([\d.]+) GFLOP/s per CPU second", lines[1]).group(1))
    assert achieved == pytest.approx(measured["flops"] / measured["cpu"] / 1e9, abs=0.06)
    allowed = float(re.search(r"allow at most ([\d,]+) rounds/s", lines[3]).group(1).replace(",", ""))
    assert allowed == pytest.approx(measured["peak"] * 1e9 / per_round, abs=1)
    assert "all three" in lines[-1]


def test_matmul_peak_is_a_rate_of_the_adapters_shape(bench):
    assert 0.1 < bench.matmul_peak("cpu", 2, 64, 64, 64, windows=2, seconds=0.02) < 1e4


def test_device_check():
    from cmai_env.cli.common import validate_device

    assert validate_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        validate_device("tpu")
    if torch.cuda.is_available():
        assert validate_device("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            validate_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "CUDA is not available on this machine" in done.stderr and "rounds/s" not in done.stdout
