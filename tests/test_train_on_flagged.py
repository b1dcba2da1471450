"""``defense.train_on_flagged``: whether flagged adversarial traffic joins ``L_adv``, at both fidelities."""

from __future__ import annotations

import numpy as np
import pytest

from cmai_env.fidelity.embedding import EmbeddingFidelity
from cmai_env.fidelity.pixel import PixelFidelity
from cmai_env.scenario import DefenseSpec, ScenarioError, apply_overrides, load_scenario
from cmai_env.stream import AttackStream

SMALL = {"batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}
#: β_adv below crafting's 0.1 threshold: L_adv is the flagged traffic alone, so the field decides it
BETAS = np.array([0.95, 0.0, 0.05])


def _attacked_plan(scenario):
    return next(plan for plan in AttackStream(scenario, np.random.default_rng(0)) if plan.mixture)


@pytest.mark.parametrize("fidelity", [EmbeddingFidelity, PixelFidelity], ids=["embedding", "pixel"])
def test_flagged_traffic_joins_l_adv_only_when_the_field_is_on(fidelity):
    scenario = apply_overrides(load_scenario("stationary_pgd"), SMALL)
    off = apply_overrides(scenario, {"defense.train_on_flagged": False})
    assert scenario.defense.train_on_flagged and not off.defense.train_on_flagged
    plan = _attacked_plan(scenario)
    results = {}
    for label, spec, flag in (("on", scenario, True), ("off", off, True), ("on, nothing flagged", scenario, False)):
        world = fidelity(spec)
        traffic = world.incoming(plan, np.random.default_rng(1))
        flags = np.full(spec.batch_size, flag)
        results[label] = world.update(traffic, BETAS, flags, np.random.default_rng(2))
    assert results["on"].l_adv > 0.0  # the flagged adversarial pairs were trained on
    assert results["off"].l_adv == 0.0 and results["on, nothing flagged"].l_adv == 0.0
    # off with every pair flagged is the same update as on with none flagged
    assert results["off"].l_task == pytest.approx(results["on, nothing flagged"].l_task, rel=1e-6)
    assert results["off"].l_total == pytest.approx(results["on, nothing flagged"].l_total, rel=1e-6)


def test_the_field_is_a_validated_bool_and_not_a_trainer_argument():
    assert DefenseSpec().train_on_flagged is True
    assert "train_on_flagged" not in DefenseSpec().trainer_fields()
    with pytest.raises(ScenarioError, match="train_on_flagged"):
        apply_overrides(load_scenario("quickstart"), {"defense.train_on_flagged": "sometimes"})


def test_flagged_pairs_chooses_between_the_true_positives_and_every_flag():
    from cmai_env.round import observed_adversarial

    is_adv = np.array([True, True, False, False])
    flagged = np.array([True, False, True, False])
    assert observed_adversarial(is_adv, flagged, True).tolist() == [True, False, False, False]  # the oracle default
    assert observed_adversarial(is_adv, flagged, True, "all").tolist() == [True, False, True, False]
    assert not observed_adversarial(is_adv, flagged, False, "all").any()
    with pytest.raises(ValueError, match="flagged_pairs 'some': allowed adversarial, all"):
        observed_adversarial(is_adv, flagged, True, "some")


@pytest.mark.parametrize("fidelity", [EmbeddingFidelity, PixelFidelity], ids=["embedding", "pixel"])
def test_false_positives_join_l_adv_only_with_flagged_pairs_all(fidelity):
    scenario = apply_overrides(load_scenario("stationary_pgd"), SMALL)
    every_flag = apply_overrides(scenario, {"defense.flagged_pairs": "all"})
    plan = _attacked_plan(scenario)
    results = {}
    for label, spec in (("adversarial", scenario), ("all", every_flag)):
        world = fidelity(spec)
        traffic = world.incoming(plan, np.random.default_rng(1))
        assert (~traffic.is_adv).any()
        false_positives = ~traffic.is_adv  # the detector flags exactly the clean pairs
        results[label] = world.update(traffic, BETAS, false_positives, np.random.default_rng(2))
    assert results["adversarial"].l_adv == 0.0  # the oracle drops every false positive
    assert results["all"].l_adv > 0.0  # a deployed defender trains on them too


def test_flagged_pairs_is_validated_and_not_a_trainer_argument():
    assert DefenseSpec().flagged_pairs == "adversarial"
    assert "flagged_pairs" not in DefenseSpec().trainer_fields()
    with pytest.raises(ScenarioError, match="flagged_pairs"):
        apply_overrides(load_scenario("quickstart"), {"defense.flagged_pairs": "true_positives"})
