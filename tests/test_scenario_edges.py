"""Scenario files and environment options that used to be accepted and then ignored, hung or
failed deep inside numpy / gymnasium (see each test)."""

from __future__ import annotations

import numpy as np
import pytest

from cmai_env.scenario import ScenarioError, apply_overrides, load_scenario

QUIET = "phases: [{name: a, rounds: 2, attacks: []}]\n"


def write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nested_aliases_within_the_alias_limit_do_not_expand(tmp_path):
    # 63 aliases (the limit is 64), 2^31 leaves once expanded: read in well under a second
    lines = ["name: bomb", "a0: &a0 [lol]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 32)]
    path = write(tmp_path, "\n".join(lines + ["description: *a31", QUIET]))
    with pytest.raises(ScenarioError, match=r"description \(line \d+\) = \[\[\[.*\.\.\.: Input should be a valid string"):
        load_scenario(path)


def test_a_recursive_alias_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ScenarioError, match=r"x \(line 2\) = \[\[\[.*unknown field"):
        load_scenario(write(tmp_path, "name: rec\nx: &a [*a]\n" + QUIET))


def test_a_key_given_twice_is_an_error_not_the_last_one_wins(tmp_path):
    path = write(tmp_path, "name: dup\ndefense: {lr: 0.01}\n" + QUIET + "defense: {eps_v: 8/255}\n")
    with pytest.raises(ScenarioError, match=r"line 4 .*duplicate key 'defense' \(first given on line 2\)"):
        load_scenario(path)
    # a merge key's fields may still be overridden
    merged = write(tmp_path, "name: m\ndefense:\n  <<: {lr: 0.01, eps_v: 4/255}\n  lr: 0.02\n" + QUIET, "m.yaml")
    assert load_scenario(merged).defense.lr == 0.02


def test_a_nested_dict_override_changes_only_the_fields_it_names():
    quickstart = load_scenario("quickstart")
    nested = apply_overrides(quickstart, {"defense": {"lr": 5e-3}})
    assert nested == apply_overrides(quickstart, {"defense.lr": 5e-3})
    assert nested.defense.defended == "all" and nested.defense.embedding_lr == quickstart.defense.embedding_lr


@pytest.mark.parametrize("override", [
    {"phases.0.attacks.0.params.steps": 10**8},
    {"defense.attack_steps": 10**8},
    {"defense.updates_per_round": 10**6},
    {"dataset.seed": -1},
    {"dataset.seed": 2**70},
    {"dataset.root": "/data"},  # shapes is generated: root used to be a TypeError from load_shapes
    {"dataset.name": "coco-captions"},  # reads files: root required
])
def test_values_that_hang_or_fail_later_are_refused_when_validated(override):
    key = next(iter(override)).split(".")[-1]
    with pytest.raises(ScenarioError, match=key):
        apply_overrides(load_scenario("quickstart"), override)


def test_a_negative_randomization_seed_is_refused():
    with pytest.raises(ScenarioError, match=r"randomization.seed .*greater than or equal to 0"):
        apply_overrides(load_scenario("randomized_training"), {"randomization.seed": -5})


def test_what_the_embedding_fidelity_cannot_play_is_refused_when_validated():
    quickstart = load_scenario("quickstart")
    with pytest.raises(ScenarioError, match=r"defense.updates_per_round = 2: the embedding fidelity runs one"):
        apply_overrides(quickstart, {"fidelity": "embedding", "defense.updates_per_round": 2})
    assert apply_overrides(quickstart, {"fidelity": "pixel", "defense.updates_per_round": 2}).defense.updates_per_round == 2
    with pytest.raises(ScenarioError, match=r"phases.0.attacks.0.name = 'transfer': 'transfer' has no embedding-fidelity counterpart"):
        apply_overrides(quickstart, {"fidelity": "embedding", "phases.0.attacks": [{"name": "transfer"}]})


def test_the_first_vector_reset_must_reset_every_environment():
    from cmai_env.vector_env import CMAIVectorEnv

    envs = CMAIVectorEnv(2, "quickstart", fidelity="embedding", batch_size=16, **{"dataset.train_n": 128, "dataset.probe_n": 32})
    with pytest.raises(RuntimeError, match="the first reset"):
        envs.reset(seed=0, options={"reset_mask": np.array([True, False])})
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 68)


def test_make_vector_env_checks_pixel_arguments_too():
    from cmai_env.vector_env import make_vector_env

    with pytest.raises(ValueError, match="num_envs must be a positive integer"):
        make_vector_env(0, "quickstart", fidelity="pixel")
    with pytest.raises(ValueError, match="autoreset_mode must be one of"):
        make_vector_env(1, "quickstart", fidelity="pixel", autoreset_mode="sometimes")


def test_a_hyperparameter_file_with_a_key_given_twice_is_refused(tmp_path):
    from agents.train import load_hyperparams

    path = write(tmp_path, "default:\n  n_steps: 64\n  learning_rate: 3e-4\n  n_steps: 128\n", "hp.yml")
    with pytest.raises(ValueError, match=r"(?s)hp.yml: invalid YAML: .*duplicate key 'n_steps' \(first given on line 2\)"):
        load_hyperparams("ppo", "quickstart", path)
