"""Every benchmark refuses a count or scale outside its range with argparse's message, not a traceback.

Before, ``benchmarks/attacks.py --batch-size 0`` died in open_clip's reshape, ``--repeats 0`` in
``statistics.median`` and ``transfer_matrix.py --n 0`` in ``torch.cat``, after loading a backbone.

Each case calls the script's ``main()`` in this process with the flags as ``sys.argv``: any other
exception than argparse's exit fails the test, as a traceback would. Starting a Python per case
cost about 7 s of the suite each (torch's import); one case still runs the script as the user
types it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cmai_env.cli.common import non_negative_float, non_negative_int, positive_float, positive_int

from benchmark_scripts import BENCHMARKS, usage_error


@pytest.mark.parametrize(
    ("script", "flag", "value", "expected"),
    [
        ("attacks.py", "--batch-size", "0", "expected an integer ≥ 1"),
        ("attacks.py", "--repeats", "-1", "expected an integer ≥ 1"),
        ("env_pool.py", "--repeats", "0", "expected an integer ≥ 1"),
        ("env_throughput.py", "--pixel-rounds", "-1", "expected an integer ≥ 0"),
        ("env_memory.py", "--rounds", "0", "expected an integer ≥ 1"),
        ("listing_speed.py", "--target", "nan", "expected a finite number > 0"),
        ("transfer_matrix.py", "--n", "0", "expected an integer ≥ 1"),
        ("flamingo_defence.py", "--lr", "inf", "expected a finite number > 0"),
        ("adaptivity_gap.py", "--segments", "0", "expected an integer ≥ 1"),
        ("defence_per_phase.py", "--threads", "0", "expected an integer ≥ 1"),
        ("defended_fidelity.py", "--jobs", "0", "expected an integer ≥ 1"),
        ("defended_fidelity.py", "--betas", "1,2", "expected β as three numbers ≥ 0 with a positive sum, such as 0,2/3,1/3"),
        ("defended_fidelity.py", "--betas", "1,-1,1", "expected β as three numbers ≥ 0 with a positive sum, such as 0,2/3,1/3"),
        ("defended_fidelity.py", "--betas", "a,b,c", "expected β as three numbers ≥ 0 with a positive sum, such as 0,2/3,1/3"),
        ("held_out_regimes.py", "--budgets", "0", "expected a finite number > 0"),
        ("held_out_regimes.py", "--clean-allowance", "-0.1", "expected a finite number ≥ 0"),
        ("learned_gate.py", "--timesteps", "0", "expected an integer ≥ 1"),
        ("fidelity_calibration.py", "--radius", "-1", "expected a finite number > 0"),
    ],
)
def test_a_benchmark_names_the_bad_flag_and_what_it_allows(script, flag, value, expected, monkeypatch, capsys):
    assert f"argument {flag}: {expected}, got '{value}'" in usage_error(script, [flag, value], monkeypatch, capsys)


def test_a_bad_flag_typed_at_the_shell_exits_2_without_a_traceback():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "attacks.py"), "--batch-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "argument --batch-size: expected an integer ≥ 1, got '0'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_argument_types_take_their_range_and_nothing_else():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert positive_float("2e-3") == 2e-3 and non_negative_float("0") == 0.0
    for parse, text in [(positive_int, "0"), (positive_int, "1.5"), (non_negative_int, "-1"), (non_negative_int, "x"),
                        (positive_float, "0"), (positive_float, "nan"), (positive_float, "inf"),
                        (non_negative_float, "-0.1"), (non_negative_float, "nan")]:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


@pytest.mark.parametrize(("script", "flag"), [("adaptivity_gap.py", "--env-kwargs"), ("defence_per_phase.py", "--env-kwargs"), ("defended_fidelity.py", "--embedding-kwargs"),
                                              ("held_out_regimes.py", "--env-kwargs"), ("learned_gate.py", "--held-out-env-kwargs")])
def test_a_malformed_override_is_a_usage_error_naming_its_flag(script, flag, monkeypatch, capsys):
    err = usage_error(script, [flag, "episode_rounds"], monkeypatch, capsys)
    assert f"{flag} expects key:value (e.g. episode_rounds:20), got 'episode_rounds'" in err
