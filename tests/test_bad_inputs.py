"""Bad inputs a newcomer can type: each gets an error naming the file, field, value and what is allowed.

Limits are checked when a scenario is validated (before any allocation), and a failing command
exits 1 without touching what is already on disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmai_env.cli.main import main
from cmai_env.data import DatasetFormatError, load_dataset
from cmai_env.models.registry import read_state_dict
from cmai_env.scenario import MAX_EPISODE_ROUNDS, MAX_YAML_ALIASES, ScenarioError, load_scenario

QUIET_PHASES = "phases:\n  - {name: q, rounds: 3}\n"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("phases:\n  - {name: q, rounds: 1000000000}\n", f"exceeds the limit of {MAX_EPISODE_ROUNDS:,} rounds"),
        ("episode_rounds: 1000000000\n" + QUIET_PHASES, "episode_rounds"),
        ("schedule: periodic\nrepeat: 100000000\n" + QUIET_PHASES, "repeat"),
        ("dataset: {train_n: 100000000}\n" + QUIET_PHASES, "dataset.train_n (line 2) = 100000000: Input should be less than or equal to 50000"),
        ("dataset: {probe_n: 100000000}\n" + QUIET_PHASES, "dataset.probe_n (line 2) = 100000000"),
        ("batch_size: 300\ndataset: {train_n: 200}\n" + QUIET_PHASES, "batch_size (line 2) = 300: must be at most dataset.train_n (200)"),
        ("reward: {clean_acc: 0, asr: 0, consistency: 0, detection: 0, compute: 0}\n" + QUIET_PHASES, "at least one reward weight must be positive"),
    ],
    ids=["rounds", "episode-rounds", "repeat", "train-n", "probe-n", "batch-over-pool", "zero-reward"],
)
def test_resource_limits_and_silly_settings_fail_validation(tmp_path, body, message):
    path = write(tmp_path, "bad.yaml", "name: bad\n" + body)
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "bomb.yaml", "name: bomb\n" + "\n".join(levels) + "\n" + QUIET_PHASES)
    assert path.stat().st_size < 700
    start = time.perf_counter()
    with pytest.raises(ScenarioError, match=rf"bomb\.yaml, line \d+: more than {MAX_YAML_ALIASES} YAML aliases"):
        load_scenario(path)
    assert time.perf_counter() - start < 2.0


def test_a_binary_file_is_named_and_validate_goes_on_to_the_next_file(tmp_path, capsys):
    binary = write(tmp_path, "binary.yaml", b"\x80\x81\x82PK\x00\x00garbage")
    good = write(tmp_path, "good.yaml", "name: good\n" + QUIET_PHASES)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert main(["scenarios", "validate", str(binary), str(folder), str(good)]) == 1
    captured = capsys.readouterr()
    assert f"{binary}: not a UTF-8 text file" in captured.err
    assert f"OK {good}" in captured.out  # the file after the bad ones was still validated
    assert "2 of 3 scenario file(s) invalid" in captured.err


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, "huge.yaml", "name: huge\n" + "# padding\n" * 40_000 + QUIET_PHASES)
    with pytest.raises(ScenarioError, match=r"huge\.yaml: [\d,]+ bytes; a scenario file may have at most"):
        load_scenario(path)


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_paths_that_are_directories_empty_or_nan_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_state_dict(tmp_path)
    empty = write(tmp_path, "empty.pt", b"")
    with pytest.raises(ValueError, match=r"empty\.pt is empty \(0 bytes\)"):
        read_state_dict(empty)
    garbage = write(tmp_path, "garbage.pt", b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read checkpoint .*garbage\.pt: \S"):
        read_state_dict(garbage)
    nan = tmp_path / "nan.pt"
    torch.save({"visual.proj": torch.full((2, 2), float("nan")), "ok": torch.ones(2)}, nan)
    with pytest.raises(ValueError, match=r"nan\.pt has NaN or infinite values in 1 tensor\(s\) \(visual\.proj\)"):
        read_state_dict(nan)


def test_the_cli_reports_a_directory_checkpoint_and_exits_1(tmp_path, capsys):
    assert main(["backbone", "eval", "--pretrained", str(tmp_path) + "/", "--n", "4"]) == 1
    assert "is a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ actions and data
def test_a_string_action_gets_a_clear_error():
    import gymnasium

    import cmai_env  # noqa: F401

    env = gymnasium.make("cmai_env/CMAI-v0", scenario="quickstart", fidelity="embedding", batch_size=16, dataset={"train_n": 64, "probe_n": 16}).unwrapped
    with pytest.raises(ValueError, match=r"action must be 3 numbers .* got 'abc'"):
        env.betas_for("abc")
    discrete = gymnasium.make("cmai_env/CMAI-Discrete-v0", scenario="quickstart", fidelity="embedding", batch_size=16, dataset={"train_n": 64, "probe_n": 16}).unwrapped
    with pytest.raises(ValueError, match=r"discrete action must be one integer"):
        discrete.betas_for("3")
    np.testing.assert_allclose(env.betas_for([0.0, 0.0, 0.0]), [1 / 3] * 3)


def test_an_image_folder_too_small_for_a_split_is_named(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / label / "0.png")
    assert len(load_dataset("folder", split="train", root=tmp_path).labels) == 1
    with pytest.raises(DatasetFormatError, match=r"folder at .*: the 'test' split is empty"):
        load_dataset("folder", split="test", root=tmp_path)


@pytest.mark.parametrize("fidelity", ["embedding", "pixel"])
def test_a_generative_backbone_in_a_scenario_is_refused_not_silently_replaced(fidelity):
    """Embedding fidelity refuses it (no faithful proxy); pixel fidelity runs the generative round, never the CLIP one."""
    import gymnasium

    import cmai_env  # noqa: F401

    kwargs = dict(scenario="quickstart", fidelity=fidelity, backbone={"name": "cmai-tiny-flamingo"}, batch_size=16,
                  dataset={"train_n": 64, "probe_n": 16}, defense={"defended": "adapter", "embedding_lr": None, "attack_steps": 1})
    if fidelity == "embedding":
        with pytest.raises(ValueError, match=r"backbone.name = 'cmai-tiny-flamingo'.* generative .*backbone.*no faithful embedding proxy.*Allowed: cmai-tiny"):
            gymnasium.make("cmai_env/CMAI-v0", **kwargs)
        return
    from cmai_env.fidelity.base import defended_backbone
    from cmai_env.fidelity.generative import GenerativePixelFidelity
    from cmai_env.fidelity.pixel import PixelFidelity

    env = gymnasium.make("cmai_env/CMAI-v0", **kwargs).unwrapped
    assert isinstance(env.world, GenerativePixelFidelity) and env.world.backbone.generative
    # the contrastive round itself still refuses it, rather than defending the CLIP head
    with pytest.raises(ValueError, match=r"backbone.name = 'cmai-tiny-flamingo' is a generative backbone.*fidelity: pixel"):
        PixelFidelity(env.scenario)
    with pytest.raises(ValueError, match=r"backbone.name = 'cmai-tiny' is not a generative backbone"):
        defended_backbone(load_scenario("quickstart"), generative=True)


# ------------------------------------------------------------------------------ command-line values
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["backbone", "eval", "--device", "cuda"], "CUDA is not available on this machine"),
        (["attack", "eval", "--attack", "fgsm", "--device", "bogus"], "expected cpu, cuda or cuda:N"),
        (["backbone", "eval", "--n", "0"], "argument --n: expected an integer ≥ 1, got '0'"),
        (["attack", "eval", "--attack", "fgsm", "--seed", "-1"], "argument --seed: expected an integer ≥ 0, got '-1'"),
        (["attack", "eval", "--attack", "fgsm", "--calibration-n", "0"], "argument --calibration-n: expected an integer ≥ 1, got '0'"),
        (["attack", "eval", "--attack", "fgsm", "--eps", "1e400"], "expected a number or fraction like 8/255, got '1e400'"),
    ],
)
def test_bad_command_line_values_are_argparse_errors_naming_the_option(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seed", "-1"], "seed must be >= 0, got -1"),
        (["--set", "learning_rate=fast"], "learning_rate: expected a number or a linear schedule like lin_3e-4, got 'fast'"),
        (["--set", "gamma=.nan"], "hyperparameter gamma must be a finite number, got nan"),
        (["--tensorboard", __file__], "is a file, not a folder"),
    ],
)
def test_train_refuses_before_writing_a_run_folder(tmp_path, capsys, argv, needle):
    assert main(["train", "--timesteps", "64", "--out", str(tmp_path / "runs"), *argv]) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_hyperparameter_file_that_is_not_text_is_named(tmp_path, capsys):
    hyperparams = write(tmp_path, "hp.yml", b"default:\n  n_steps: \xff\xfe\n")
    assert main(["train", "--hyperparams", str(hyperparams), "--timesteps", "64", "--out", str(tmp_path / "runs")]) == 1
    assert f"{hyperparams}: not a UTF-8 text file" in capsys.readouterr().err


def test_tune_validates_like_train_before_any_trial(tmp_path, capsys):
    hyperparams = write(tmp_path, "hp.yml", "default: {n_steps: 32, batch_size: 32}\n")  # no policy: train's default
    big = write(tmp_path, "big.yml", "default: {policy: MlpPolicy, buffer_size: 10000000000000}\n")
    assert main(["tune", "--algo", "sac", "--hyperparams", str(big), "--trials", "1", "--out", str(tmp_path / "t1")]) == 1
    assert "buffer" in capsys.readouterr().err and not (tmp_path / "t1").exists()
    assert main(["tune", "--hyperparams", str(hyperparams), "--trials", "1", "--timeout", "0", "--out", str(tmp_path / "t2")]) == 1
    assert "timeout must be > 0 seconds, got 0" in capsys.readouterr().err


def test_benchmark_checks_bootstrap_reps_before_evaluating(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "--scenarios", "quickstart", "--seeds", "0", "--baselines", "no_defense", "--no-plots",
            "--bootstrap-reps", "50", "--out", str(out)]
    started = time.perf_counter()
    assert main(argv) == 1
    assert "--bootstrap-reps must be at least 100, got 50" in capsys.readouterr().err
    assert time.perf_counter() - started < 10 and not list(out.rglob("*.json"))
