"""benchmarks/defended_fidelity.py on a tiny quickstart: both fidelities played, cells counted as printed."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark
from test_adaptivity_gap import TINY


def test_both_fidelities_are_played_and_every_printed_cell_is_counted(capsys):
    bench = load_benchmark("defended_fidelity")
    task_only = bench.betas_arg("1,0,0")
    assert bench.betas_arg("0,2,1") == pytest.approx((0.0, 2 / 3, 1 / 3))
    result = bench.compare("quickstart", [task_only], [0], TINY)  # at both fidelities
    pixel, embedding = result[task_only]["pixel"], result[task_only]["embedding"]
    assert list(pixel) == list(embedding) == ["text_bridge", "image_pgd"]  # six rounds: two attacked phases
    for phase in (pixel, embedding):
        for row in phase.values():
            for asr, system in row["attacks"].values():
                assert 0.0 <= system <= asr <= 1.0  # an attack the detector passes was an attack that flipped
            assert 0.0 <= row["detector_tpr"] <= 1.0 and row["detector_threshold"] > 0.0
            assert 0.0 <= row["prediction_entropy"] <= 1.0
    assert pixel != embedding  # two worlds, not one played twice
    counts = bench.print_comparison("quickstart", result, ["text_bridge", "image_pgd", "noisy_text"])
    lines = capsys.readouterr().out.splitlines()
    cells = [line for line in lines if line.startswith(("text_bridge", "image_pgd"))]
    assert counts.total == 2 * len(cells) == 4
    assert counts.within == sum(2 - line.count("*") for line in cells)  # a cell outside ±0.10 is starred
    phases = [line for line in lines if "(phase) detector TPR" in line]
    assert counts.entropy_total == len(phases) == 2
    assert counts.entropy_within == sum(not line.endswith("*") for line in phases)
