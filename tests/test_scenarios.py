"""Scenario files, their schema and the attack stream (``cmai_env/scenario.py``, ``cmai_env/stream.py``)."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmai_env.attacks import attack_class, available_attacks
from cmai_env.cli.main import main as cmai_main
from cmai_env.scenario import (
    Scenario,
    ScenarioError,
    apply_overrides,
    load_scenario,
    scenario_hash,
    scenarios_available,
    validate_scenario,
)
from cmai_env.stream import AttackStream

REPO = Path(__file__).resolve().parents[1]
SHIPPED = scenarios_available()
TRAINING = scenarios_available(include_evaluation_only=False)
PIXEL_ATTACKS = {"fgsm", "pgd_linf", "bridge_image_to_text", "universal", "co_attack"}  # eps is an ℓ∞ pixel budget


def stream(scenario: Scenario | str, seed: int = 0) -> AttackStream:
    scenario = load_scenario(scenario) if isinstance(scenario, str) else scenario
    return AttackStream(scenario, np.random.default_rng(seed))


def scenario_from(data: dict) -> Scenario:
    return validate_scenario({"name": "test", **data})


def pgd(share: float = 0.5, **extra) -> dict:
    return {"adversarial_share": share, "attacks": [{"name": "pgd_linf", "params": {"eps": "8/255", "steps": 2}}], **extra}


# ----------------------------------------------------------------------------- shipped files
def test_the_shipped_scenarios():
    assert set(SHIPPED) == {"quickstart", "stationary_pgd", "abrupt_shift", "gradual_drift", "periodic",
                            "mixed_modalities", "detector_evasion", "shift_evasion", "randomized_training", "unseen_attacks",
                            "flamingo_shift"}
    assert set(SHIPPED) - set(TRAINING) == {"unseen_attacks"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_loads_and_is_cheap(name):
    scenario = load_scenario(name)
    assert scenario.name == name
    text = (REPO / "scenarios" / f"{name}.yaml").read_text()
    assert text.startswith("# "), "each shipped file opens with a comment header saying what it tests"
    rounds = scenario.episode_length()
    assert (20 if name == "quickstart" else 30) <= rounds <= 90  # shift_evasion: 2 cycles of 3 × 15
    for phase in scenario.phases:
        for attack in phase.attacks:
            params = {**attack_class(attack.name).parameters(), **attack.params}
            assert params.get("steps", 1) <= 5 and params.get("text_steps", 1) <= 5, (phase.name, attack.name)
            if attack.name in PIXEL_ATTACKS:
                assert 4 / 255 - 1e-9 <= params["eps"] <= 16 / 255 + 1e-9, (phase.name, attack.name)
    plans = list(stream(scenario))
    assert len(plans) == rounds
    for plan in plans:
        if plan.mixture:
            assert sum(e.weight for e in plan.mixture) == pytest.approx(1.0)
        else:
            assert plan.adversarial_share == 0.0


def test_quickstart_is_small():
    scenario = load_scenario("quickstart")
    assert scenario.batch_size == 32 and scenario.dataset.probe_n == 128 and scenario.defense.attack_steps == 3
    assert len(scenario.phases) == 3 and scenario.total_rounds() == 36
    # its caption phase on noisy images is where attacks pass the detector (issue 10, point 4)
    noisy = scenario.phases[-1]
    assert noisy.corruption is not None and noisy.attacks[0].name == "text_embedding_pgd"


def test_embedding_lr_sets_the_adapters_rate_and_leaves_the_pixel_model_on_lr():
    """quickstart defends the whole pixel model at lr 1e-3 and the embedding adapters at 1e-2;
    without ``embedding_lr`` both worlds take ``lr``."""
    scenario = load_scenario("quickstart")
    assert scenario.defense.lr == 1e-3 and scenario.defense.adapter_lr == 1e-2
    assert "embedding_lr" not in scenario.defense.trainer_fields() and scenario.defense.trainer_fields()["lr"] == 1e-3
    plain = apply_overrides(scenario, {"defense.embedding_lr": None})
    assert plain.defense.adapter_lr == 1e-3
    with pytest.raises(ScenarioError, match=r"defense.embedding_lr.*-0.1"):
        apply_overrides(scenario, {"defense.embedding_lr": -0.1})


def test_held_out_attacks_never_reach_training():
    unseen = load_scenario("unseen_attacks")
    assert unseen.evaluation_only
    held_out = set(unseen.attacks_used())
    assert held_out >= {"co_attack", "universal"}
    for name in TRAINING:
        scenario = load_scenario(name)
        assert not scenario.evaluation_only
        assert held_out <= set(scenario.held_out_attacks), name
        assert not held_out & set(scenario.attacks_used()), name


#: Registered attacks no shipped scenario uses, and why (each reason is checked below).
NOT_IN_SCENARIOS = {
    # evaluation-grade: 100 iterations x restarts x targets (5,000 queries for square) per batch,
    # far beyond a defence round; cmai attack eval and adv-train report them
    "apgd_ce": "evaluation-grade",
    "apgd_t": "evaluation-grade",
    "fab_t": "evaluation-grade",
    "square": "evaluation-grade",
    "autoattack": "evaluation-grade",
    # no embedding-fidelity counterpart: every embedding attack is white-box against the current adapters
    "transfer": "no embedding counterpart",
}


def test_scenarios_cover_the_attack_registry():
    used = {a for name in SHIPPED for a in load_scenario(name).attacks_used()}
    assert used == set(available_attacks()) - set(NOT_IN_SCENARIOS)
    for name, reason in NOT_IN_SCENARIOS.items():
        counterpart = attack_class(name).embedding
        if reason == "no embedding counterpart":
            assert counterpart is None, f"{name} has an embedding counterpart now: use it in a shipped scenario"
        else:
            assert attack_class(name).parameters().get("steps", 100) >= 100 or "n_queries" in attack_class(name).parameters()


def test_fractions_are_parsed():
    scenario = load_scenario("quickstart")
    params = next(p for p in scenario.phases if p.name == "image_pgd").attacks[0].params
    assert params["eps"] == pytest.approx(8 / 255) and params["step_size"] == pytest.approx(3 / 255)
    assert isinstance(params["steps"], int)
    defense = scenario_from({"defense": {"eps_v": "4/255", "eps_t": "1/2"}, "phases": [{"name": "a", "rounds": 1}]}).defense
    assert defense.eps_v == pytest.approx(4 / 255) and defense.eps_t == 0.5


def test_scenario_hash_is_the_file_sha256(tmp_path):
    shipped = REPO / "scenarios" / "quickstart.yaml"
    assert scenario_hash("quickstart") == hashlib.sha256(shipped.read_bytes()).hexdigest()
    copy = tmp_path / "q.yaml"
    copy.write_bytes(shipped.read_bytes() + b"\n# edited\n")
    assert scenario_hash(copy) != scenario_hash("quickstart")


def test_shipped_files_are_package_resources():
    names = sorted(p.name for p in importlib.resources.files("cmai_env.scenarios").iterdir() if p.name.endswith(".yaml"))
    assert names == sorted(f"{n}.yaml" for n in SHIPPED)


def test_non_editable_install_finds_the_scenarios(tmp_path):
    """Build a wheel from a copy of the sources and import the package from its unpacked files."""
    setuptools = pytest.importorskip("setuptools")  # --no-build-isolation: the venv's own, offline
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")  # older setuptools build wheels through the wheel package
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pt", "runs", "build", "*.egg-info")
    for folder in ("cmai_env", "scenarios", "agents"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, src / file)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "dist").glob("cmai-*.whl"))) as wheel:
        wheel.extractall(site)
    probe = (
        "import importlib.resources as r, cmai_env.scenario as s;"
        "d = r.files('cmai_env.scenarios');"
        "print(str(d)); print(sorted(p.name for p in d.iterdir() if p.name.endswith('.yaml')));"
        "print(s.scenarios_available(include_evaluation_only=False)[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    where, listed, loaded = run.stdout.strip().splitlines()
    assert where.startswith(str(site))
    assert eval(listed) == sorted(f"{n}.yaml" for n in SHIPPED)  # noqa: S307 (our own subprocess's repr)
    assert loaded == TRAINING[0]


# ----------------------------------------------------------------------------- streams
def test_sequential_timeline_and_shifts():
    s = stream("abrupt_shift")
    assert len(s) == 66
    assert s.timeline == [(0, 6, "quiet"), (6, 26, "image_pgd"), (26, 46, "text"), (46, 66, "cross_modal")]
    assert s.shift_rounds == [6, 26, 46]
    assert [s.plan(t).phase_index for t in (0, 5, 6, 25, 26, 65)] == [0, 0, 1, 1, 2, 3]
    assert s.plan(0).mixture == () and s.plan(0).adversarial_share == 0.0
    assert {e.name for e in s.plan(30).mixture} == {"text_embedding_pgd", "token_substitution"}
    assert {e.name: e.weight for e in s.plan(30).mixture} == pytest.approx({"text_embedding_pgd": 0.6, "token_substitution": 0.4})
    assert s.plan(0).corruption == ("gaussian_noise", 4) and s.plan(30).corruption == ("gaussian_noise", 4)
    assert s.plan(25).corruption is None and s.plan(46).corruption is None
    assert stream("stationary_pgd").shift_rounds == []
    with pytest.raises(IndexError):
        s.plan(66)


def test_episode_rounds_truncates_or_extends_the_last_phase():
    base = load_scenario("abrupt_shift")
    short = stream(apply_overrides(base, {"episode_rounds": 31}))
    assert len(short) == 31 and short.timeline == [(0, 6, "quiet"), (6, 26, "image_pgd"), (26, 31, "text")]
    long = stream(apply_overrides(base, {"episode_rounds": 76}))
    assert len(long) == 76 and long.timeline[-1] == (46, 76, "cross_modal")


def test_periodic_repeats_the_phases():
    scenario = load_scenario("periodic")
    assert scenario.repeat >= 2
    s = stream(scenario)
    cycle = [name for _, _, name in s.timeline[:3]]
    assert [name for _, _, name in s.timeline] == cycle * scenario.repeat
    assert len(s) == scenario.total_rounds() == 22 * scenario.repeat
    assert s.shift_rounds == [start for start, _, _ in s.timeline[1:]]
    first, second = s.plan(0), s.plan(22)
    assert (first.phase, first.mixture, first.adversarial_share) == (second.phase, second.mixture, second.adversarial_share)
    assert second.shift and not first.shift


def test_random_schedule_is_seeded():
    scenario = load_scenario("randomized_training")
    low, high = scenario.randomization.rounds
    a, b = stream(scenario, seed=1), stream(scenario, seed=1)
    assert a.timeline == b.timeline and list(a) == list(b)
    timelines = {tuple(stream(scenario, seed=seed).timeline) for seed in range(6)}
    assert len(timelines) == 6, "different seeds draw different timelines"
    for timeline in timelines:
        assert timeline[-1][1] == scenario.episode_length()
        assert len(timeline) >= scenario.randomization.n_phases
        for (start, end, name), (_, _, following) in zip(timeline, timeline[1:]):
            assert low <= end - start <= high and name != following
    a.reset(np.random.default_rng(2))
    assert a.timeline == stream(scenario, seed=2).timeline


def test_random_schedule_seed_pins_the_timeline():
    scenario = apply_overrides(load_scenario("randomized_training"), {"randomization.seed": 7})
    assert stream(scenario, seed=0).timeline == stream(scenario, seed=1).timeline


def test_gradual_transition_blends_linearly():
    scenario = scenario_from({"phases": [
        {"name": "image", "rounds": 4, **pgd()},
        {"name": "text", "rounds": 6, "adversarial_share": 0.5, "transition": {"type": "gradual", "rounds": 3},
         "attacks": [{"name": "text_embedding_pgd", "params": {"steps": 2}}]},
    ]})
    s = stream(scenario)
    assert s.shift_rounds == [4]
    for t, b in [(3, 1.0), (4, 0.25), (5, 0.5), (6, 0.75), (7, 1.0)]:
        plan = s.plan(t)
        weights = {e.name: e.weight for e in plan.mixture}
        assert plan.blend == pytest.approx(b)
        assert weights.get("text_embedding_pgd", 0.0) == pytest.approx(b if t >= 4 else 0.0)
        assert weights.get("pgd_linf", 0.0) == pytest.approx(1 - b if t >= 4 else 1.0)
        assert plan.adversarial_share == pytest.approx(0.5)


def test_gradual_transition_from_quiet_ramps_the_share():
    s = stream("gradual_drift")
    start = s.timeline[1][0]
    shares = [s.plan(t).adversarial_share for t in range(start - 1, start + 7)]
    assert shares == pytest.approx([0.0] + [0.5 * i / 7 for i in range(1, 7)] + [0.5])
    assert all(e.name == "pgd_linf" and e.weight == 1.0 for t in range(start, start + 6) for e in s.plan(t).mixture)


def test_abrupt_transition_switches_at_once():
    s = stream("quickstart")
    assert [e.name for e in s.plan(11).mixture] == ["bridge_text_to_image"]
    assert [e.name for e in s.plan(12).mixture] == ["pgd_linf"] and s.plan(12).blend == 1.0


@pytest.mark.parametrize("name", scenarios_available())
def test_attack_views_are_exactly_the_pairings_the_stream_sends(name):
    """``attack_views`` (which pixel_travel radii a world computes) against the streams themselves."""
    from cmai_env.stream import attack_views

    scenario = load_scenario(name)
    sent = set()
    for seed in range(12 if scenario.schedule == "random" else 1):  # random schedules: many draws
        s = stream(scenario, seed)
        sent |= {(entry.key, s.plan(t).corruption) for t in range(len(s)) for entry in s.plan(t).mixture}
    reachable = attack_views(scenario)
    assert sent <= reachable  # every pairing sent has its radii
    if scenario.schedule != "random":
        assert sent == reachable  # and none computed that no round sends


def test_attack_views_follow_gradual_transitions_only():
    from cmai_env.stream import attack_views

    noisy = {"corruption": {"name": "gaussian_noise", "severity": 2}}
    text = {"attacks": [{"name": "text_embedding_pgd"}]}
    abrupt = scenario_from({"phases": [{"name": "a", "rounds": 4, **pgd()}, {"name": "b", "rounds": 4, **noisy, **text}]})
    views = {(key[0], images) for key, images in attack_views(abrupt)}
    assert views == {("pgd_linf", None), ("text_embedding_pgd", ("gaussian_noise", 2))}
    gradual = scenario_from({"phases": [{"name": "a", "rounds": 4, **pgd()},
                                        {"name": "b", "rounds": 4, **noisy, **text, "transition": {"type": "gradual", "rounds": 2}}]})
    views = {(key[0], images) for key, images in attack_views(gradual)}
    assert views == {("pgd_linf", None), ("pgd_linf", ("gaussian_noise", 2)), ("text_embedding_pgd", ("gaussian_noise", 2))}
    wrapped = scenario_from({"schedule": "periodic", "repeat": 2, "phases": [
        {"name": "a", "rounds": 4, **pgd(), "transition": {"type": "gradual", "rounds": 2}}, {"name": "b", "rounds": 4, **noisy, **text}]})
    assert ("text_embedding_pgd", None) in {(key[0], images) for key, images in attack_views(wrapped)}  # b → a on the second pass


# ----------------------------------------------------------------------------- errors
GOOD = """\
name: tiny
held_out_attacks: [co_attack]
phases:
  - name: first
    rounds: 3
    adversarial_share: 0.5
    attacks:
      - name: pgd_linf
        params: {eps: 8/255, steps: 2}
  - name: second
    rounds: 3
    attacks: []
"""

# (edit of GOOD, dotted path, bad value as it appears in the message, a word of what is allowed)
BAD = {
    "unknown_field": (GOOD + "batch_sise: 3\n", "batch_sise", "3", "batch_size"),
    "unknown_attack": (GOOD.replace("name: pgd_linf", "name: pgd_lnf"), "phases.0.attacks.0.name", "'pgd_lnf'", "pgd_linf"),
    "unknown_param": (GOOD.replace("steps: 2", "stepz: 2"), "phases.0.attacks.0.params.stepz", "2", "step_size"),
    "negative_rounds": (GOOD.replace("rounds: 3\n    attacks: []", "rounds: -3\n    attacks: []"), "phases.1.rounds", "-3", "greater than or equal to 1"),
    "share_above_one": (GOOD.replace("adversarial_share: 0.5", "adversarial_share: 1.5"), "phases.0.adversarial_share", "1.5", "less than or equal to 1"),
    "quiet_with_share": (GOOD.replace("rounds: 3\n    attacks: []", "rounds: 3\n    adversarial_share: 0.3\n    attacks: []"), "phases.1.adversarial_share", "0.3", "quiet"),
    "bad_fraction": (GOOD.replace("eps: 8/255", "eps: 8/25x"), "phases.0.attacks.0.params.eps", "'8/25x'", "fraction like 8/255"),
    "held_out_in_training": (GOOD.replace("name: pgd_linf", "name: co_attack").replace("steps: 2", "text_steps: 2"), "phases.0.attacks.0.name", "'co_attack'", "evaluation_only"),
    "empty_phases": ("name: tiny\nphases: []\n", "phases", "[]", "at least 1"),
    "bad_literal": (GOOD + "fidelity: voxel\n", "fidelity", "'voxel'", "'pixel' or 'embedding'"),
    "param_type": (GOOD.replace("steps: 2", "steps: 2.5"), "phases.0.attacks.0.params.steps", "2.5", "integer"),
    "negative_budget": (GOOD.replace("eps: 8/255", "eps: -1"), "phases.0.attacks.0.params.eps", "-1", "≥ 0"),
    "duplicate_phase": (GOOD.replace("name: second", "name: first"), "phases.1.name", "'first'", "unique"),
    "random_without_randomization": (GOOD + "schedule: random\n", "randomization", "None", "n_phases"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_schema_errors_name_file_field_and_value(tmp_path, case):
    text, path, value, allowed = BAD[case]
    file = tmp_path / f"{case}.yaml"
    file.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    message = str(info.value)
    assert str(file) in message
    assert f"{path} (line" in message or f"{path} =" in message, message
    assert f"= {value}" in message, message
    assert allowed in message, message


def test_error_lists_every_problem_with_its_line(tmp_path):
    file = tmp_path / "two.yaml"
    file.write_text(GOOD.replace("name: pgd_linf", "name: pgd_lnf").replace("rounds: 3\n    attacks: []", "rounds: 0\n    attacks: []"))
    message = str(pytest.raises(ScenarioError, load_scenario, file).value)
    assert "(2 problems)" in message
    assert "phases.0.attacks.0.name (line 8)" in message and "phases.1.rounds (line 11)" in message
    assert all(name in message for name in available_attacks())


def test_good_file_loads(tmp_path):
    file = tmp_path / "tiny.yaml"
    file.write_text(GOOD)
    scenario = load_scenario(file)
    assert scenario.total_rounds() == 6 and scenario.phases[1].adversarial_share == 0.0


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("name: broken\nphases: [\n  - a: 1\n")
    with pytest.raises(ScenarioError, match=r"broken\.yaml, line 3") as info:
        load_scenario(file)
    assert isinstance(info.value, ValueError)


def test_not_a_mapping(tmp_path):
    file = tmp_path / "list.yaml"
    file.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="list.yaml.*mapping"):
        load_scenario(file)


def test_missing_file_lists_shipped_names(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(FileNotFoundError) as info:
        load_scenario(missing)
    assert str(missing) in str(info.value) and "quickstart" in str(info.value) and "unseen_attacks" in str(info.value)
    with pytest.raises(FileNotFoundError, match="abrupt_shift"):
        load_scenario("no_such_scenario")


def test_cross_field_rules():
    quiet = {"name": "q", "rounds": 2}
    with pytest.raises(ScenarioError, match=r"repeat = 2: only used by schedule periodic"):
        scenario_from({"repeat": 2, "phases": [quiet]})
    with pytest.raises(ScenarioError, match=r"randomization.rounds = \[5, 2\]"):
        scenario_from({"schedule": "random", "randomization": {"n_phases": 2, "rounds": [5, 2]}, "phases": [quiet]})
    with pytest.raises(ScenarioError, match=r"phases.0.transition.rounds = 3: .*abrupt"):
        scenario_from({"phases": [{**quiet, "transition": {"type": "abrupt", "rounds": 3}}]})
    with pytest.raises(ScenarioError, match=r"phases.0.transition.rounds = 3: .*outlast"):
        scenario_from({"phases": [{**quiet, "transition": {"type": "gradual", "rounds": 3}}]})
    with pytest.raises(ScenarioError, match=r"held_out_attacks.0 = 'nope'"):
        scenario_from({"held_out_attacks": ["nope"], "phases": [quiet]})
    with pytest.raises(ScenarioError, match=r"dataset.name = 'imagenet'.*shapes"):
        scenario_from({"dataset": {"name": "imagenet"}, "phases": [quiet]})
    # an evaluation-only scenario may use its own held-out attacks
    scenario_from({"evaluation_only": True, "held_out_attacks": ["universal"],
                   "phases": [{"name": "u", "rounds": 2, "attacks": [{"name": "universal"}]}]})


def test_overrides_are_dotted_and_validated():
    base = load_scenario("quickstart")
    small = apply_overrides(base, {"batch_size": 16, "dataset.train_n": 128, "phases.0.rounds": 3, "episode_rounds": None})
    assert (small.batch_size, small.dataset.train_n, small.total_rounds()) == (16, 128, 3 + 12 + 12)
    assert base.batch_size == 32, "the original is untouched"
    with pytest.raises(ScenarioError, match=r"batch_size = -3"):
        apply_overrides(base, {"batch_size": -3})
    with pytest.raises(ScenarioError, match="nope"):
        apply_overrides(base, {"nope": 1})
    with pytest.raises(ScenarioError, match="no such field"):
        apply_overrides(base, {"batch_size.x": 1})


# ----------------------------------------------------------------------------- CLI
def test_cli_validate_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD["unknown_attack"][0])
    assert cmai_main(["scenarios", "validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cmai_main(["scenarios", "validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err and "phases.0.attacks.0.name" in err and "'pgd_lnf'" in err
    assert cmai_main(["scenarios", "validate", str(tmp_path / "missing.yaml")]) == 1


def test_cli_list_and_show(capsys):
    assert cmai_main(["scenarios", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED) and "eval-only" in out
    assert cmai_main(["scenarios", "show", "gradual_drift"]) == 0
    out = capsys.readouterr().out
    yaml_part, _, timeline = out.partition("# expanded timeline")
    assert yaml.safe_load(yaml_part)["name"] == "gradual_drift"
    assert validate_scenario(yaml.safe_load(yaml_part)) == load_scenario("gradual_drift"), "show prints a loadable scenario"
    assert "64 rounds" in timeline and timeline.count("*") >= 3 and "~6 rounds" in timeline


def test_readme_scenario_example_validates(tmp_path):
    """The scenario a newcomer copies from the README must load as written."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("#### Writing a scenario\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my_shift.yaml"
    path.write_text(block)
    scenario = load_scenario(path)
    assert scenario.name == "my_shift" and scenario.total_rounds() == 25
    assert [p.corruption.key if p.corruption else None for p in scenario.phases] == [None, None, ("contrast", 3)]


def test_scenario_option_refuses_bad_missing_and_clashing_scenarios_up_front(tmp_path, capsys, monkeypatch):
    """The benchmarks check every scenario (and override) before running any (``scenario_option``)."""
    import argparse

    from benchmark_scripts import usage_error
    from cmai_env.scenario import distinct_scenario_names, scenario_bytes, scenario_option

    assert distinct_scenario_names(["quickstart", "periodic"]) == ["quickstart", "periodic"]
    copy = tmp_path / "copy.yaml"
    copy.write_bytes(scenario_bytes("quickstart"))
    parser = argparse.ArgumentParser(prog="bench")
    for scenarios, overrides, needle in (
        (["quickstart", "nope"], None, "no scenario file 'nope'"),
        (["quickstart", str(copy)], None, "both named 'quickstart'"),
        (["quickstart"], {"episode_rounds": -3}, "episode_rounds"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            scenario_option(parser, scenarios, overrides=overrides)
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    err = usage_error("adaptivity_gap.py", ["--scenarios", "quickstart", "nope"], monkeypatch, capsys)
    assert "--scenarios: no scenario file 'nope'" in err
