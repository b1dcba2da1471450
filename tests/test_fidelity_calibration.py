"""The embedding fidelity's per-family radii and the calibration benchmark that measured them."""

from __future__ import annotations

import math

import pytest

from benchmark_scripts import load_benchmark
from cmai_env.attacks.specs import DECLARATIONS
from cmai_env.fidelity import stacked
from cmai_env.fidelity.stacked import FAMILY_RADIUS_LAW, EmbeddingAttack, embedding_radius
from cmai_env.scenario import AttackSpec, DefenseSpec, ScenarioError, apply_overrides, load_scenario, scenarios_available


def test_every_family_has_a_radius_and_an_exponent():
    families = set(stacked._MODES)
    assert set(FAMILY_RADIUS_LAW) == families
    declared = {d.embedding.family for d in DECLARATIONS.values() if d.embedding is not None}
    assert declared <= families
    for family in families:
        scale, exponent = FAMILY_RADIUS_LAW[family]
        assert 0.0 < scale <= 1.0 and exponent > 0
        assert embedding_radius(family, 1.0) == pytest.approx(scale)
        # a bigger budget is a bigger radius, and a zero budget none
        assert embedding_radius(family, 0.5) < embedding_radius(family, 1.0) < embedding_radius(family, 2.0)
        assert embedding_radius(family, 0.0) == 0.0


def test_radius_errors_name_the_family_and_the_budget():
    with pytest.raises(ValueError, match="no_such_family"):
        embedding_radius("no_such_family", 1.0)
    with pytest.raises(ValueError, match="-0.5"):
        embedding_radius("image", -0.5)


def test_from_entry_uses_the_family_law():
    attack = EmbeddingAttack.from_entry(AttackSpec(name="pgd_linf", params={"eps": 2 / 255, "steps": 3}))
    assert attack.family == "image"
    scale, exponent = FAMILY_RADIUS_LAW["image"]
    assert attack.radius == pytest.approx(scale * 0.25**exponent)
    text = EmbeddingAttack.from_entry(AttackSpec(name="text_embedding_pgd", params={"eps": 0.1}))
    scale, exponent = FAMILY_RADIUS_LAW["text"]
    assert text.radius == pytest.approx(scale * 0.5**exponent)


def test_pgd_l2_has_its_own_family_and_is_weak_at_small_l2_budgets():
    # At ℓ2 0.125 the pixel pgd_l2 flips 16% of quickstart's pairs, pgd_linf at 2/255 60%
    # (fidelity_calibration.py); in one shared family both got radius 0.386.
    l2 = EmbeddingAttack.from_entry(AttackSpec(name="pgd_l2", params={"eps": 0.125, "steps": 3}))
    linf = EmbeddingAttack.from_entry(AttackSpec(name="pgd_linf", params={"eps": 2 / 255, "steps": 3}))
    assert (l2.family, linf.family) == ("image_l2", "image")
    assert l2.modality == "image" and l2.radius < 0.5 * linf.radius


def test_quick_run_prints_both_fidelities(capsys):
    benchmark = load_benchmark("fidelity_calibration")
    benchmark.main(["--quick"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("pgd_linf ", "text_embedding_pgd ", "aware_caption_rewrite "))]
    assert [r[0] for r in rows] == ["pgd_linf", "text_embedding_pgd", "aware_caption_rewrite"]
    for row in rows:
        # attack family budget r | asr tpr sys | asr tpr sys | Δasr Δtpr Δsys ok
        pixel_asr, pixel_tpr, pixel_sys, emb_asr, emb_tpr, emb_sys, d_asr, d_tpr = (float(row[i]) for i in (5, 6, 7, 9, 10, 11, 13, 14))
        for value in (pixel_asr, pixel_tpr, pixel_sys, emb_asr, emb_tpr, emb_sys):
            assert 0.0 <= value <= 1.0
        assert d_asr == pytest.approx(emb_asr - pixel_asr, abs=0.011) and d_tpr == pytest.approx(emb_tpr - pixel_tpr, abs=0.011)
        assert row[-1] == ("yes" if abs(d_asr) <= 0.10 and abs(d_tpr) <= 0.10 else "NO")
    # 8/255 PGD-ℓ∞ flips nearly every pair of the undefended cmai-tiny at both fidelities
    assert float(rows[0][5]) >= 0.8 and float(rows[0][9]) >= 0.8
    assert "within ±0.10 on both ASR and TPR" in out


def test_displacement_compares_pixel_travel_with_the_embedding_radius(capsys):
    benchmark = load_benchmark("fidelity_calibration")
    benchmark.main(["--quick", "--attacks", "pgd_linf,text_embedding_pgd", "--displacement"])
    out = capsys.readouterr().out.split("how far each image-side attack moves")[1]
    assert "L_adv's training examples" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("pgd_linf ")]
    assert len(rows) == 1 and not [line for line in out.splitlines() if line.startswith("text_embedding_pgd ")]
    # attack budget | median p90 | radius ratio
    median, p90, radius, ratio = (float(rows[0][i]) for i in (3, 4, 6, 7))
    assert 0.0 < median <= p90 <= 2.0 and radius == pytest.approx(embedding_radius("image", 1.0), abs=1e-3)
    assert ratio == pytest.approx(median / radius, abs=0.01)


def test_embedding_train_radius_scale_moves_l_adv_examples_out():
    """``defense.embedding_train_radius_scale`` multiplies both training radii; bad values are refused."""
    benchmark = load_benchmark("fidelity_calibration")
    small = {"fidelity": "embedding", "dataset.train_n": 64, "dataset.probe_n": 16}
    # 2 is the default since 2026-12-06; the shipped scenarios designed and measured at 1 pin it
    assert DefenseSpec().embedding_train_radius_scale == 2
    pinned = {name for name in scenarios_available() if load_scenario(name).defense.embedding_train_radius_scale == 1}
    assert pinned == {"shift_evasion", "mixed_modalities", "randomized_training", "stationary_pgd"}
    # quickstart ships scale 2 (its YAML); an override replaces it
    assert load_scenario("quickstart").defense.embedding_train_radius_scale == 2
    plain = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), {**small, "defense.embedding_train_radius_scale": 1.0}), 1)
    scaled = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), {**small, "defense.embedding_train_radius_scale": 3.0}), 1)
    assert scaled.train_radius_v == pytest.approx(3 * plain.train_radius_v) and scaled.train_radius_t == pytest.approx(3 * plain.train_radius_t)
    with pytest.raises(ScenarioError, match="embedding_train_radius_scale"):
        apply_overrides(load_scenario("quickstart"), {"defense.embedding_train_radius_scale": 5})
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--train-radius-scale", "0"])
    # quickstart defends the whole pixel model at 1e-3: the like-for-like run defends the adapters.
    assert benchmark.pixel_defence_like_embedding("quickstart") == {"defense.defended": "adapter", "defense.lr": 1e-2}
    assert benchmark.pixel_defence_like_embedding("abrupt_shift") is None


def test_the_image_side_can_train_at_its_own_scale():
    """``defense.embedding_image_train_radius_scale`` scales only the image radius; unset, both follow the shared scale."""
    small = {"fidelity": "embedding", "dataset.train_n": 64, "dataset.probe_n": 16}
    assert DefenseSpec().embedding_image_train_radius_scale is None and DefenseSpec().image_train_radius_scale == 2
    assert "embedding_image_train_radius_scale" not in DefenseSpec().trainer_fields()
    shared = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), small), 1)
    own = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), {**small, "defense.embedding_image_train_radius_scale": 1.0}), 1)
    assert own.train_radius_v == pytest.approx(shared.train_radius_v / 2) and own.train_radius_t == shared.train_radius_t
    for bad in (0, 5):
        with pytest.raises(ScenarioError, match="embedding_image_train_radius_scale"):
            apply_overrides(load_scenario("quickstart"), {"defense.embedding_image_train_radius_scale": bad})
    with pytest.raises(ScenarioError, match="embedding_image_train_radius_scale.*pixel fidelity only"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.embedding_image_train_radius_scale": 1.0})


def test_calibration_grid_finds_a_planted_scale():
    """The grid search recovers the (scale, γ) that produced its "pixel" targets."""
    benchmark = load_benchmark("fidelity_calibration")

    class FakeProbe:
        def rates(self, attack):  # ASR and TPR rise linearly with the radius, capped at 1
            return benchmark.Rates(min(attack.radius, 1.0), min(2 * attack.radius, 1.0), 0.0)

    cells = []
    for budget in (2 / 255, 4 / 255, 8 / 255):
        params = benchmark.attack_params("pgd_linf", budget, 3)
        relative = benchmark.relative_budget("pgd_linf", params)
        truth = 0.6 * relative**0.5
        cells.append(benchmark.Cell("pgd_linf", "image", budget, params, benchmark.Rates(truth, min(2 * truth, 1.0), 0.0)))
    chosen = benchmark.calibrate(cells, FakeProbe(), benchmark.EXPONENTS)
    scale, exponent, worst, _ = chosen["image"]
    assert (scale, exponent) == (0.6, 0.5) and math.isclose(worst, 0.0, abs_tol=1e-9)


def test_rank_correlation_plays_each_run_with_its_overrides(monkeypatch, capsys):
    """--rank's wiring: which fidelity and overrides each run gets, and ρ against both pixel runs."""
    import agents.baselines
    import agents.evaluation

    benchmark = load_benchmark("fidelity_calibration")
    names = ["no_defense", "uniform", "static_adversarial"]
    monkeypatch.setattr(agents.baselines, "available_baselines", lambda: list(names))
    calls = []

    class FakeResult:
        def __init__(self, value):
            self.value = value

        def per_seed(self, metric):
            return [self.value]

    def fake_evaluate(policy, scenario, *, seeds, episodes, fidelity, env_kwargs, **_):
        calls.append((fidelity, env_kwargs))
        # pixel ranks no_defense > uniform > static_adversarial; scale-1 embedding the reverse
        base = {"no_defense": 3.0, "uniform": 2.0, "static_adversarial": 1.0}[policy.name]
        flip = fidelity == "embedding" and not env_kwargs
        return FakeResult(-base if flip else base)

    monkeypatch.setattr(agents.evaluation, "evaluate_policy", fake_evaluate)
    returns = benchmark.rank_correlation("quickstart", [0], 1, other_law=(0.5, 1.0), train_scale=2.0, like_for_like=True, travel=True, train_travel=True)
    assert list(returns) == [
        "pixel", "pixel, adapters", "embedding", "embedding r=0.5·b^1", "embedding L_adv r×2", "embedding, pixel travel",
        "embedding, pixel travel, L_adv r×2", "embedding, travel + L_adv travel",
    ]
    kwargs = [calls[i * len(names)] for i in range(8)]
    assert kwargs == [
        ("pixel", None),
        ("pixel", {"defense.defended": "adapter", "defense.lr": 1e-2}),
        ("embedding", None),
        # another law for every family is the scenario's own field, not a patched module constant
        ("embedding", {"embedding_radius_laws": {family: [0.5, 1.0] for family in FAMILY_RADIUS_LAW}}),
        ("embedding", {"defense.embedding_train_radius_scale": 2.0}),
        ("embedding", {"embedding_attack_radius": "pixel_travel"}),
        # --pixel-travel with --train-radius-scale: both
        ("embedding", {"embedding_attack_radius": "pixel_travel", "defense.embedding_train_radius_scale": 2.0}),
        # --train-travel: both distances from pixel fidelity, no scale fitted
        ("embedding", {"embedding_attack_radius": "pixel_travel", "defense.embedding_train_radius": "pixel_travel", "defense.embedding_train_radius_scale": 1.0}),
    ]
    out = capsys.readouterr().out
    assert "embedding vs pixel: -1.000" in out and "embedding vs pixel, adapters: -1.000" in out
    assert "embedding L_adv r×2 vs pixel: 1.000" in out and "embedding L_adv r×2 vs pixel, adapters: 1.000" in out
    assert "pixel, adapters vs pixel" not in out
    with pytest.raises(SystemExit):  # it adds a run to --rank's episodes: alone it would do nothing
        benchmark.main(["--quick", "--train-travel"])


def test_corruption_attacks_both_fidelities_on_the_images_a_corrupted_phase_serves(capsys):
    """``--corruption``: the pixel side and the embedding side see the copy the environment serves."""
    import torch

    from cmai_env.corruptions import corrupted_split

    benchmark = load_benchmark("fidelity_calibration")
    key = ("gaussian_noise", 4)  # quickstart's own noisy phase: its world caches this view
    clean = benchmark.load_setup("quickstart", 16)
    noisy = benchmark.load_setup("quickstart", 16, corruption=key)
    seed = noisy.scenario.dataset.seed
    assert noisy.corruption == key and clean.corruption is None
    # pixel: the attacked and calibration halves are the corrupted probe images, in order
    whole_probe = torch.cat([clean.attacked.images, clean.calibration.images])
    assert torch.equal(torch.cat([noisy.attacked.images, noisy.calibration.images]), corrupted_split(whole_probe, key, seed, "val"))
    assert not torch.equal(noisy.attacked.images, clean.attacked.images)
    # embedding: the same cached view StackedEmbeddingWorld serves a phase with that corruption
    view = noisy.world.probe_views[noisy.world.corruptions.index(key)]
    assert torch.allclose(noisy.probe_v, view, atol=1e-6) and torch.equal(clean.probe_v, clean.world.probe_v)
    assert benchmark.EmbeddingProbe(noisy).probe_v is noisy.probe_v

    benchmark.main(["--quick", "--attacks", "pgd_linf", "--corruption", "gaussian_noise:2"])
    out = capsys.readouterr().out
    assert "images under gaussian_noise severity 2" in out and "within ±0.10 on both ASR and TPR" in out
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--corruption", "fog:2"])
    assert "unknown corruption" in capsys.readouterr().err


def test_radius_spread_and_given_laws(capsys):
    """``--radius-spread``: a per-pair radius factor exp(σ·z); ``--calibrate`` prints its laws as a
    ``--laws`` argument that plays them back; bad laws are refused naming the item."""
    import numpy as np

    benchmark = load_benchmark("fidelity_calibration")
    setup = benchmark.load_setup("quickstart", 16)
    assert np.all(benchmark.EmbeddingProbe(setup).radius_factor == 1.0)  # the environment's model: none
    factor = benchmark.EmbeddingProbe(setup, spread=0.5, seed=3).radius_factor
    assert factor.shape == (setup.n,) and factor.std() > 0 and np.all(factor > 0)
    np.testing.assert_array_equal(factor, benchmark.EmbeddingProbe(setup, spread=0.5, seed=3).radius_factor)

    benchmark.main(["--quick", "--attacks", "pgd_linf", "--calibrate", "--radius-spread", "0.5"])
    out = capsys.readouterr().out
    assert "each pair's radius × exp(0.5·z)" in out
    laws = out.split("as --laws: ")[-1].split()
    [law] = [item for item in laws if item.startswith("image=")]
    scale, exponent = (float(x) for x in law.removeprefix("image=").split(","))
    benchmark.main(["--quick", "--attacks", "pgd_linf", "--laws", law])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pgd_linf "))
    relative = benchmark.relative_budget("pgd_linf", benchmark.attack_params("pgd_linf", 8 / 255, 3))
    assert float(row.split()[3]) == pytest.approx(scale * relative**exponent, abs=5e-4)  # the r column
    # ... and as the scenario field that plays them in the environment
    import yaml

    from cmai_env.fidelity.stacked import StackedEmbeddingWorld

    field = yaml.safe_load(out.split("in a scenario: ")[-1].splitlines()[0])
    assert field["embedding_radius_laws"]["image"] == [scale, exponent]
    small = {"fidelity": "embedding", "batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}
    world = StackedEmbeddingWorld(apply_overrides(load_scenario("abrupt_shift"), {**small, **field}), 1)
    pgd = next(e for p in world.scenario.phases for e in p.attacks if e.name == "pgd_linf")
    assert world.attack(pgd).radius == pytest.approx(scale * (float(pgd.params["eps"]) / (8 / 255)) ** exponent)

    for bad, needle in (("fog=1,1", "unknown family 'fog'"), ("image=1", "two numbers"), ("image=0,1", "positive"),):
        with pytest.raises(SystemExit):
            benchmark.main(["--quick", "--laws", bad])
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--laws", "image=1,1", "image=1,2"])
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--radius-spread", "-1"])
    assert "--radius-spread" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--radius-spread", "0.5", "--rank"])
    assert "--rank plays the environment's radii" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before the table is computed
        benchmark.main(["--quick", "--rank", "--rank-seeds", "0,0"])
    assert "--rank-seeds must be distinct" in capsys.readouterr().err


def test_pixel_travel_gives_each_pair_the_distance_its_pixel_attack_moved_it(capsys):
    """``--pixel-travel``: per-pair radii ``c · travel^γ`` from the pixel attack's own examples, per side."""
    import numpy as np

    benchmark = load_benchmark("fidelity_calibration")
    setup = benchmark.load_setup("quickstart", 16)
    params = benchmark.attack_params("pgd_linf", 4 / 255, 3)
    moved_v, moved_t = benchmark.pixel_travel(setup, "pgd_linf", params, 0)
    assert moved_v.shape == (setup.n,) and np.all(moved_v > 0) and np.all(moved_v <= 2.0)
    assert np.all(moved_t == 0)  # an image attack leaves the caption alone
    again = benchmark.pixel_travel(setup, "pgd_linf", params, 0)
    np.testing.assert_array_equal(moved_v, again[0])  # the same seed replays the same examples
    text_v, text_t = benchmark.pixel_travel(setup, "text_embedding_pgd", benchmark.attack_params("text_embedding_pgd", 0.2, 3), 0)
    assert np.all(text_v == 0) and np.all(text_t > 0)
    # measured from the examples the rates score (one attack pass), as the environment measures it
    # (cmai_env.fidelity.travel.pixel_travel runs the attack itself), and without changing the rates
    import torch

    from cmai_env.fidelity import travel

    generator = torch.Generator().manual_seed(0)
    attack = travel.entry_attack("pgd_linf", params, setup.task, setup.pool, generator)
    world_v, _ = travel.pixel_travel(setup.task, setup.attacked, attack, generator)
    np.testing.assert_allclose(moved_v, world_v, rtol=1e-5, atol=1e-6)
    rates, none = benchmark.pixel_rates(setup, "pgd_linf", params, 0)
    assert none is None and rates == benchmark.pixel_rates(setup, "pgd_linf", params, 0, travel=True)[0]

    probe = benchmark.EmbeddingProbe(setup)
    attack = benchmark.embedding_attack("pgd_linf", params, None)
    same = np.full(setup.n, attack.radius, dtype=np.float32)
    assert probe.rates(attack, (same, same)) == probe.rates(attack)  # per-pair radii equal to the law's: the same rates
    nothing = np.zeros(setup.n, dtype=np.float32)
    assert probe.rates(attack, (nothing, same)).asr == 0.0  # a zero image radius moves no image

    benchmark.main(["--quick", "--attacks", "pgd_linf,text_embedding_pgd", "--pixel-travel", "--calibrate"])
    out = capsys.readouterr().out
    assert "(c, γ) = PIXEL_TRAVEL_LAW" in out and "grid search of (c, γ) per family" in out and "(c, γ) fitted" in out
    fitted = {line.split()[0]: (float(line.split()[2]), float(line.split()[4])) for line in out.splitlines() if line.startswith("  ") and " c " in line}
    assert set(fitted) == {"image", "text"}
    import yaml

    field = yaml.safe_load(out.split("in a scenario (with embedding_attack_radius: pixel_travel): ")[-1].splitlines()[0])
    assert {family: tuple(law) for family, law in field["pixel_travel_laws"].items()} == fitted
    assert all(c in benchmark.TRAVEL_GRID and g in benchmark.TRAVEL_EXPONENTS for c, g in fitted.values())
    assert set(benchmark.PIXEL_TRAVEL_LAW) == set(FAMILY_RADIUS_LAW)
    for extra in (["--laws", "image=1,1"], ["--radius", "0.5"], ["--radius-spread", "0.5"]):
        with pytest.raises(SystemExit):
            benchmark.main(["--quick", "--pixel-travel", *extra])
        assert "--pixel-travel" in capsys.readouterr().err


def test_a_text_radius_of_its_own_moves_only_the_caption_side():
    """``RowAttacks.radius_t`` (used by ``--pixel-travel``): the text side's radius when it differs from the image side's."""
    import numpy as np
    import torch

    from cmai_env.fidelity.stacked import RowAttacks, StackedEmbeddingWorld

    scenario = apply_overrides(load_scenario("quickstart"), {"fidelity": "embedding", "dataset.probe_n": 16})
    world = StackedEmbeddingWorld(scenario, 1)
    attack = EmbeddingAttack.from_entry(AttackSpec(name="co_attack", params={}))
    n = 8
    raw_v, raw_t, labels = world.probe_v[None, :n], world.probe_t[None, :n], world.probe_y[None, :n]
    with torch.no_grad():
        classes = world.classes(None)

    def crafted(radius_t):
        orders = RowAttacks.empty((1, n))
        orders.fill(0, slice(0, n), attack, 0)
        orders.radius_t = radius_t
        return world.craft(None, raw_v, raw_t, labels, orders, classes)

    both_v, both_t = crafted(None)
    assert (both_v - raw_v).norm(dim=-1).max() > 0 and (both_t - raw_t).norm(dim=-1).max() > 0
    image_only_v, image_only_t = crafted(np.zeros((1, n), dtype=np.float32))
    assert torch.equal(image_only_t, raw_t) and torch.allclose(image_only_v, both_v)


def test_a_scenario_with_its_own_laws_is_tabled_at_them(tmp_path, capsys):
    """The table's "environment's radii" are the scenario's: its ``embedding_radius_laws`` where it sets them."""
    from cmai_env.scenario import scenario_bytes

    benchmark = load_benchmark("fidelity_calibration")
    path = tmp_path / "own_laws.yaml"
    path.write_bytes(scenario_bytes("quickstart") + b"\nembedding_radius_laws: {image: [0.2, 1]}\n")
    benchmark.main(["--scenario", str(path), "--quick", "--attacks", "pgd_linf,text_embedding_pgd"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("pgd_linf ", "text_embedding_pgd "))}
    relative = benchmark.relative_budget("pgd_linf", benchmark.attack_params("pgd_linf", 8 / 255, 3))
    assert float(rows["pgd_linf"][3]) == pytest.approx(0.2 * relative, abs=5e-4)  # the r column: the scenario's law
    text_relative = benchmark.relative_budget("text_embedding_pgd", benchmark.attack_params("text_embedding_pgd", 0.2, 3))
    assert float(rows["text_embedding_pgd"][3]) == pytest.approx(embedding_radius("text", text_relative), abs=5e-4)  # not named: shipped


def test_token_substitution_is_measured_only_when_named(capsys):
    """The scenarios' token swap is outside issue 10's 30 cells: ``--attacks`` names it, the default table does not."""
    benchmark = load_benchmark("fidelity_calibration")
    assert len([b for case in benchmark.CASES for b in case.budgets]) == 30
    assert "token_substitution" not in {case.attack for case in benchmark.CASES}
    benchmark.main(["--attacks", "token_substitution", "--budgets", "1", "--probe-n", "16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("token_substitution ")]
    assert len(rows) == 1 and rows[0][1] == "text" and rows[0][2] == "3"  # family, budget k (the last of 1, 2, 3)
    assert 0.0 <= float(rows[0][5]) <= 1.0 and 0.0 <= float(rows[0][9]) <= 1.0


def test_pixel_travel_replays_token_substitution_s_own_captions(capsys):
    """With ``--pixel-travel`` the swap is played as the environment plays it there (its candidate
    captions, ``EmbeddingCounterpart.replay``): on the undefended model, a wider search of the pixel
    attack's own flips, so within the cells' tolerance of it."""
    benchmark = load_benchmark("fidelity_calibration")
    benchmark.main(["--attacks", "token_substitution", "--budgets", "1", "--probe-n", "16", "--pixel-travel"])
    out = capsys.readouterr().out
    travel_table = out[out.index("c · travel^γ"):]
    [row] = [line.split() for line in travel_table.splitlines() if line.startswith("token_substitution ")]
    pixel, embedding = row[5:8], row[9:12]
    assert float(row[5]) > 0.5 and all(abs(float(e) - float(p)) <= 0.1 for e, p in zip(embedding, pixel))  # asr, tpr, sys


def test_adapters_can_receive_the_towers_pooled_norm():
    """``defense.embedding_adapter_input: pooled_norm`` feeds the adapters unit embeddings times their
    tower's mean pooled norm (what pixel fidelity's adapters see); ``unit`` (default) leaves them as they are."""
    import torch
    import torch.nn.functional as F

    small = {"fidelity": "embedding", "dataset.train_n": 64, "dataset.probe_n": 16}
    assert DefenseSpec().embedding_adapter_input == "unit" and "embedding_adapter_input" not in DefenseSpec().trainer_fields()
    unit = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), small), 1)
    pooled = stacked.StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), {**small, "defense.embedding_adapter_input": "pooled_norm"}), 1)
    assert unit.adapter_input_scale == (1.0, 1.0)
    scale_v, scale_t = pooled.adapter_input_scale
    assert scale_v > 5 and scale_t > 5  # cmai-tiny's pooled embeddings: about 13 and 11
    torch.testing.assert_close(pooled.pool_v, unit.pool_v)  # the cached unit embeddings and so every radius are unchanged
    with torch.no_grad():  # a non-identity adapter sees the scaled input
        for world in (unit, pooled):
            world.image.up_b.fill_(0.5)
        x = pooled.probe_v[:4].unsqueeze(0)
        torch.testing.assert_close(pooled._image(x, None), F.normalize(pooled.image(x * scale_v), dim=-1))
        assert not torch.allclose(pooled._image(x, None), unit._image(x, None), atol=1e-3)
    with pytest.raises(ScenarioError, match="embedding_adapter_input"):
        apply_overrides(load_scenario("quickstart"), {"defense.embedding_adapter_input": "raw"})
    with pytest.raises(ScenarioError, match="embedding_adapter_input.*pixel fidelity only"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.embedding_adapter_input": "pooled_norm"})
