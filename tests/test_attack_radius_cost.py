"""benchmarks/attack_radius_cost.py: building and stepping at ``law`` and ``pixel_travel``, side by side."""

from __future__ import annotations


import pytest

from benchmark_scripts import load_benchmark

def test_prints_both_modes_and_the_cached_rebuild(capsys):
    load_benchmark("attack_radius_cost").main(["--scenarios", "quickstart", "--envs", "2", "--rounds", "1", "--set", "dataset.train_n=128", "dataset.probe_n=32", "batch_size=16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("quickstart ")]
    assert [row[1] for row in rows] == ["law", "pixel_travel"]
    build, again, rounds = (float(x) for x in rows[1][2:])
    assert build > again >= 0 and rounds >= 0  # the second build reads the pixel attacks' radii from the cache


def test_bad_overrides_are_refused(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("attack_radius_cost").main(["--set", "dataset.train_n"])
    assert "--set expects key=value" in capsys.readouterr().err
