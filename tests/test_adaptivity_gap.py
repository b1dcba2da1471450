"""benchmarks/adaptivity_gap.py on a tiny quickstart: the search never loses to its start, metrics stay in range."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load_benchmark, usage_error

TINY = {"episode_rounds": 6, "phases.0.rounds": 3, "phases.1.rounds": 3, "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}


def test_search_and_report_on_a_tiny_scenario():
    gap = load_benchmark("adaptivity_gap")
    best_fixed, schedule, played = gap.search("quickstart", [0, 1], TINY, passes=1)
    scores = gap.play("quickstart", [best_fixed, schedule], [0, 1], gap.SEARCH_SEED_OFFSET, TINY)
    assert scores.returns[1].mean() >= scores.returns[0].mean() - 1e-9  # coordinate ascent only accepts improvements
    assert played >= 10 * 2
    assert np.all((scores.system_asr >= 0) & (scores.system_asr <= scores.asr + 1e-12))
    result = gap.report("quickstart", [0], [0, 1], TINY)
    assert set(result["rows"]) == {"task-only", "best fixed", "best schedule", "reactive"}
    assert result["reactive_gap"].n == 2
    for row in result["rows"].values():
        assert 0.0 <= row["system_asr"].mean <= 1.0 and 0.0 <= row["clean_acc"].mean <= 1.0


def test_defence_per_phase_report_on_a_tiny_scenario():
    module = load_benchmark("defence_per_phase")
    figures = module.play_fixed("quickstart", [0], TINY)
    names, system, clean = figures.names, figures.system, figures.clean
    assert names == ["text_bridge", "image_pgd", "noisy_text"] and system.shape == clean.shape == figures.model.shape == figures.tpr.shape == (10, 1, 3)
    assert np.isnan(system[:, :, 2]).all()  # six rounds end the episode before its third phase
    assert np.all(np.isnan(clean[:, :, 2])) and np.all((clean[:, :, :2] >= 0) & (clean[:, :, :2] <= 1))
    for rates in (system, figures.model, figures.tpr):
        assert np.all(np.isnan(rates) | ((rates >= 0) & (rates <= 1)))
        assert np.isnan(rates[:, :, 2]).all() and not np.isnan(rates[:, :, :2]).any()
    # a flipped pair that gets through is a flipped pair: the system never lets through more than the model flips
    assert np.all(system[:, :, :2] <= figures.model[:, :, :2] + 1e-9)
    result = module.report("quickstart", [0], TINY)
    for phase in result["phases"]:
        best = phase["best"]
        if best is not None:  # the chosen β respects the clean-accuracy allowance and its drop is measured against task-only
            assert best["clean_cost"] <= module.CLEAN_ALLOWANCE + 1e-9
            assert best["drop"].mean == pytest.approx(phase["task_system_asr"].mean - best["system_asr"])
            b, k = next(i for i, betas in enumerate(module.DISCRETE_BETAS) if np.array_equal(betas, best["betas"])), names.index(phase["phase"])
            assert (best["model_asr"], best["detector_tpr"]) == pytest.approx((figures.model[b, 0, k], figures.tpr[b, 0, k]))
            assert phase["task_model_asr"] == pytest.approx(figures.model[module.TASK_ONLY, 0, k])
    assert result["met"] == any(p["best"] is not None and p["best"]["drop"].mean >= module.TARGET_DROP for p in result["phases"])


def test_defence_per_phase_plays_single_environments_like_the_batched_one_and_at_pixel_fidelity():
    module = load_benchmark("defence_per_phase")
    figures = module.play_fixed("quickstart", [0, 1], TINY)
    names, system, clean = figures.names, figures.system, figures.clean
    for b in (0, 2, 7):  # the single-environment path (pixel's) tallies an episode as the batched path does
        for j, seed in enumerate([0, 1]):
            one = module._play_one(("quickstart", names, b, seed, TINY, "embedding")).means()
            for field, batched in (("system_asr", system), ("clean_acc", clean), ("asr", figures.model), ("detector_tpr", figures.tpr)):
                np.testing.assert_allclose(one[field], batched[b, j], equal_nan=True)
    pixel_names, pixel_system, pixel_clean, _, _ = module.play_fixed("quickstart", [0], TINY, fidelity="pixel")
    assert pixel_names == names and pixel_system.shape == pixel_clean.shape == (10, 1, 3)
    assert np.isnan(pixel_system[:, :, 2]).all() and np.all((pixel_clean[:, :, :2] >= 0) & (pixel_clean[:, :, :2] <= 1))
    assert not np.allclose(pixel_clean[:, 0, :2], clean[:, 0, :2])  # pixel fidelity really played: its own figures


def test_each_environment_plays_its_own_random_timeline():
    # randomized_training draws a phase order per seed: a schedule (one β per phase name) must follow
    # each environment's own timeline, which the vector env exposes after reset.
    import gymnasium as gym

    from cmai_env.env import action_from_betas

    gap = load_benchmark("adaptivity_gap")
    tiny = {"episode_rounds": 8, "randomization.rounds": [2, 3], "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}
    envs = gym.make_vec(gap.ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", scenario="randomized_training",
                        fidelity="embedding", **tiny)
    envs.reset(seed=[1, 2])
    names = gap.phase_names(gap.load_spec("randomized_training", tiny))
    per_round = [[names[slot] for slot in gap.slot_per_round(timeline, 8, names)] for timeline in envs.unwrapped.timelines()]
    assert per_round[0] != per_round[1]
    actions = np.stack([action_from_betas((1.0, 0.0, 0.0))] * 2).astype(np.float32)
    for t in range(8):
        infos = envs.step(actions)[4]
        assert [str(phase) for phase in infos["phase"]] == [per_round[0][t], per_round[1][t]]
    envs.close()
    assert gap.phase_names(gap.load_spec("randomized_training", tiny)) == ["image_pgd", "image_l2", "text", "bridge", "quiet"]


def test_scores_rank_by_system_asr_among_admissible_schedules():
    gap = load_benchmark("adaptivity_gap")
    episodes = gap.Episodes(returns=np.array([[5.0, 5.0], [9.0, 9.0], [1.0, 1.0]]), asr=np.full((3, 2), 0.9),
                            system_asr=np.array([[0.4, 0.4], [0.1, 0.1], [0.2, 0.3]]),
                            clean_acc=np.array([[0.90, 0.90], [0.85, 0.85], [0.89, 0.89]]))
    assert list(gap.scores(episodes, "return", 0.90, 0.02)) == [5.0, 9.0, 1.0]
    by_system = gap.scores(episodes, "system_asr", 0.90, 0.02)
    # the second schedule has the lowest system ASR but drops 0.05 clean accuracy: inadmissible
    assert by_system[1] == -np.inf and by_system[0] == pytest.approx(-0.4) and by_system[2] == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="objective 'asr': allowed return, system_asr"):
        gap.search("quickstart", [0], TINY, objective="asr")


def test_system_asr_search_runs_on_the_evaluation_only_scenario():
    # unseen_attacks is refused by the training env ID; the search for the schedule with the lowest system ASR there
    # plays it through the evaluation ID, on the search seeds.
    gap = load_benchmark("adaptivity_gap")
    tiny = {"phases.0.rounds": 1, "phases.1.rounds": 2, "phases.2.rounds": 2, "phases.3.rounds": 2, "batch_size": 16,
            "dataset.train_n": 128, "dataset.probe_n": 32}
    result = gap.report("unseen_attacks", [0], [0], tiny, objective="system_asr", clean_allowance=0.02)
    rows = result["rows"]
    assert result["phases"] == ["clean", "universal", "co_attack", "mixed_unseen"] and result["objective"] == "system_asr"
    assert result["system_gap"].n == 1
    assert rows["best schedule"]["clean_acc"].mean >= 0.0 and 0.0 <= rows["best schedule"]["system_asr"].mean <= 1.0
    fixed, schedule, _ = gap.search("unseen_attacks", [0], tiny, passes=1, objective="system_asr")
    searched = gap.play("unseen_attacks", [(0,) * 4, fixed, schedule], [0], gap.SEARCH_SEED_OFFSET, tiny)
    # on the search seed the schedule never has a higher system ASR than its start, and both are admissible
    assert searched.system_asr[2].mean() <= searched.system_asr[1].mean() + 1e-12
    assert searched.clean_acc[1:].mean(axis=1).min() >= searched.clean_acc[0].mean() - 0.02 - 1e-12


def test_defence_per_phase_plays_the_evaluation_only_scenario_on_both_paths():
    # unseen_attacks is refused by the training env ID: both the batched and the single-environment path
    # play it through the evaluation ID, and agree on it.
    module = load_benchmark("defence_per_phase")
    tiny = {"phases.0.rounds": 1, "phases.1.rounds": 1, "phases.2.rounds": 1, "phases.3.rounds": 1, "batch_size": 16,
            "dataset.train_n": 128, "dataset.probe_n": 32}
    figures = module.play_fixed("unseen_attacks", [0], tiny)
    assert figures.names == ["clean", "universal", "co_attack", "mixed_unseen"] and figures.system.shape == (10, 1, 4)
    assert np.isnan(figures.system[:, :, 0]).all() and not np.isnan(figures.system[:, :, 1:]).any()  # the clean phase has no attack
    one = module._play_one(("unseen_attacks", figures.names, 0, 0, tiny, "embedding")).means()
    np.testing.assert_allclose(one["system_asr"], figures.system[0, 0], equal_nan=True)
    # point 4 is asked of the training scenarios: the report says which kind it played
    assert module.report("unseen_attacks", [0], tiny)["evaluation_only"] and not module.report("quickstart", [0], TINY)["evaluation_only"]


def test_segments_split_each_phase_stretch_into_equal_parts():
    gap = load_benchmark("adaptivity_gap")
    timeline = [(0, 3, "a"), (3, 9, "b"), (9, 12, "a")]
    assert gap.slot_per_round(timeline, 12, ["a", "b"]) == [0] * 3 + [1] * 6 + [0] * 3
    # two parts per name: a's slots 0-1, b's 2-3; the second stretch of "a" restarts at its first part;
    # rounds past the timeline stay in its last part
    assert gap.slot_per_round(timeline, 14, ["a", "b"], segments=2) == [0, 0, 1, 2, 2, 2, 3, 3, 3, 0, 0, 1, 1, 1]
    assert gap.slot_labels(["a", "b"], 2) == ["a[1/2]", "a[2/2]", "b[1/2]", "b[2/2]"]
    best_fixed, schedule, _ = gap.search("quickstart", [0], TINY, passes=1, segments=2)
    assert len(best_fixed) == len(schedule) == 2 * 3 and len(set(best_fixed)) == 1


def test_held_out_regimes_builds_each_regime_from_unseen_attacks_and_measures_it():
    module = load_benchmark("held_out_regimes")
    source = module.load_scenario(module.SOURCE)
    attacks = module.attack_entries(source)
    assert [a["label"] for a in attacks] == ["universal", "co_attack"]  # each distinct entry once, mixtures included
    pgd = {"name": "pgd_linf", "params": {"eps": 2 / 255}}
    twice = module.validate_scenario({"name": "t", "phases": [{"name": "a", "rounds": 1, "attacks": [pgd, {**pgd, "params": {"eps": 8 / 255}}]},
                                                            {"name": "b", "rounds": 1, "attacks": [pgd]}]})
    assert [a["label"] for a in module.attack_entries(twice)] == ["pgd_linf", "pgd_linf2"]  # one name at two budgets
    co_attack = module.regime(source, attacks[1], 2.0, ("gaussian_noise", 2))
    played = co_attack.phases[1]
    assert not co_attack.evaluation_only and co_attack.defense == source.defense and co_attack.batch_size == source.batch_size
    assert [p.name for p in co_attack.phases] == ["quiet", "attack"] and played.corruption.severity == 2
    assert played.attacks[0].params["eps"] == pytest.approx(2 * attacks[1]["params"]["eps"])
    assert played.attacks[0].params["text_eps"] == pytest.approx(2 * attacks[1]["params"]["text_eps"])
    assert played.attacks[0].params["steps"] == attacks[1]["params"]["steps"]  # only budgets and step sizes scale
    tiny = {"phases.0.rounds": 1, "phases.1.rounds": 2, "batch_size": 16, "dataset.train_n": 128, "dataset.probe_n": 32}
    row = module.measure(module.regime(source, attacks[1], 1.0, None), [0, 1], tiny)
    assert 0.0 <= row["best_system_asr"] <= row["task_system_asr"].mean + 1e-12  # task-only is always admissible
    assert row["drop"].mean == pytest.approx(row["task_system_asr"].mean - row["best_system_asr"])
    assert module.defends({**row, "ratio": 0.5}) == (row["drop"].low is not None and row["drop"].low > 0)


def test_held_out_regimes_refuses_an_attack_the_scenario_does_not_have(monkeypatch, capsys):
    err = usage_error("held_out_regimes.py", ["--attacks", "pgd_linf"], monkeypatch, capsys)
    assert "--attacks pgd_linf: not an attack entry of unseen_attacks; its entries: universal, co_attack" in err


def test_defence_per_phase_every_beta_prints_the_grid_it_chose_from(monkeypatch, capsys):
    # --every-beta prints each β's per-phase figures: the same means the report chose its best β from
    module = load_benchmark("defence_per_phase")
    tiny = [f"{key}:{value}" for key, value in TINY.items()]
    monkeypatch.setattr("sys.argv", ["defence_per_phase.py", "--scenarios", "quickstart", "--seeds", "0", "--every-beta", "--env-kwargs", *tiny])
    module.main()
    out = capsys.readouterr().out
    grid = out.split("every fixed β")[1].splitlines()[2 : 2 + len(module.DISCRETE_BETAS)]
    result = module.report("quickstart", [0], TINY)
    first = result["phases"][0]
    for b, line in enumerate(grid):
        row = first["every_beta"][b]
        assert line.split(")")[0].strip() == "(" + ", ".join(f"{x:.2f}" for x in module.DISCRETE_BETAS[b])
        system, model, tpr, clean = line.split(")")[1].split()[:4]
        assert (float(system), float(model), float(tpr), float(clean.rstrip("×"))) == pytest.approx(
            (row["system_asr"], row["model_asr"], row["detector_tpr"], row["clean_acc"]), abs=0.006)
        assert clean.endswith("×") == (first["task_clean_acc"] - row["clean_acc"] > module.CLEAN_ALLOWANCE) == (not row["admissible"])
        assert line.rstrip().endswith("— — — —")  # the third phase, which six rounds never reach
    best = first["best"]
    if best is not None:  # the best β is the admissible row with the lowest system ASR
        assert best["system_asr"] == pytest.approx(min(r["system_asr"] for r in first["every_beta"] if r["admissible"]))
