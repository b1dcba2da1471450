"""``defense.adv_loss: trades``: TRADES's objective on the crafted pairs, at every fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmai_env.fidelity.embedding import EmbeddingFidelity
from cmai_env.fidelity.generative import GenerativePixelFidelity
from cmai_env.fidelity.pixel import PixelFidelity
from cmai_env.round import crafted_adv_loss, pair_ce
from cmai_env.scenario import DefenseSpec, ScenarioError, apply_overrides, load_scenario
from cmai_env.stream import AttackStream
from cmai_env.training import TrainerConfig

SMALL = {"batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}
#: β_adv ≥ 0.5: crafting runs all its steps
BETAS = np.array([0.4, 0.0, 0.6])


def test_trades_is_the_clean_ce_plus_beta_times_each_modality_s_kl():
    generator = torch.Generator().manual_seed(0)
    clean = tuple(torch.randn(2, 5, 4, generator=generator) for _ in range(2))
    crafted = tuple(torch.randn(2, 5, 4, generator=generator) for _ in range(2))
    labels = torch.randint(0, 4, (2, 5), generator=generator)

    def kl(p_logits, q_logits):  # Σ p·(log p − log q), written out
        log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    by_hand = pair_ce(*clean, labels) + 2.5 * (kl(clean[0], crafted[0]) + kl(clean[1], crafted[1]))
    torch.testing.assert_close(crafted_adv_loss("trades", 2.5, clean, crafted, labels), by_hand)
    torch.testing.assert_close(crafted_adv_loss("ce", 2.5, clean, crafted, labels), pair_ce(*crafted, labels))
    # a crafted pair the model answers exactly as the clean one costs only the clean CE
    torch.testing.assert_close(crafted_adv_loss("trades", 2.5, clean, clean, labels), pair_ce(*clean, labels))
    with pytest.raises(ValueError, match="adv_loss must be one of \\('ce', 'trades'\\), got 'hinge'"):
        crafted_adv_loss("hinge", 1.0, clean, crafted, labels)


def _first_updates(world_class, scenario_name: str, small: dict, settings: list[dict]) -> list:
    """The first update of a fresh world per setting, on the same traffic, nothing flagged (L_adv is the crafted pairs alone)."""
    results = []
    for extra in settings:
        scenario = apply_overrides(load_scenario(scenario_name), {**small, **extra})
        plan = next(plan for plan in AttackStream(scenario, np.random.default_rng(0)) if plan.mixture)
        world = world_class(scenario)
        traffic = world.incoming(plan, np.random.default_rng(1))
        results.append(world.update(traffic, BETAS, np.zeros(scenario.batch_size, dtype=bool), np.random.default_rng(2)))
    return results


@pytest.mark.parametrize("fidelity", [EmbeddingFidelity, PixelFidelity], ids=["embedding", "pixel"])
def test_trades_scores_the_same_crafted_pairs_by_their_kl_to_the_clean_ones(fidelity):
    ce, trades, trades_2 = _first_updates(fidelity, "stationary_pgd", SMALL, [
        {}, {"defense.adv_loss": "trades"}, {"defense.adv_loss": "trades", "defense.trades_beta": 2.0},
    ])
    assert ce.l_task == pytest.approx(trades.l_task, rel=1e-6) == pytest.approx(trades_2.l_task, rel=1e-6)
    kl = trades.l_adv - trades.l_task  # L_adv = L_task + β·KL on the crafted pairs
    assert kl > 1e-4
    assert trades_2.l_adv - trades_2.l_task == pytest.approx(2 * kl, rel=1e-4)  # the same crafted pairs, β doubled
    assert ce.l_adv != pytest.approx(trades.l_adv, rel=1e-3)


def test_trades_on_the_generative_backbone_compares_the_language_model_s_answers():
    small = {"batch_size": 8, "dataset.train_n": 64, "dataset.probe_n": 16, "episode_rounds": 3}
    ce, trades, trades_2 = _first_updates(GenerativePixelFidelity, "flamingo_shift", small, [
        {}, {"defense.adv_loss": "trades"}, {"defense.adv_loss": "trades", "defense.trades_beta": 2.0},
    ])
    kl = trades.l_adv - trades.l_task
    assert kl > 0 and ce.l_task == pytest.approx(trades.l_task, rel=1e-6)
    assert trades_2.l_adv - trades_2.l_task == pytest.approx(2 * kl, rel=1e-4)


def test_the_fields_are_validated_at_the_edge_and_reach_the_trainer():
    assert DefenseSpec().adv_loss == "ce" and DefenseSpec().trades_beta == 1.0
    fields = DefenseSpec(adv_loss="trades", trades_beta=3.0).trainer_fields()
    assert TrainerConfig(**fields).adv_loss == "trades" and TrainerConfig(**fields).trades_beta == 3.0
    with pytest.raises(ScenarioError, match="adv_loss"):
        apply_overrides(load_scenario("quickstart"), {"defense.adv_loss": "mart"})
    with pytest.raises(ScenarioError, match="trades_beta"):
        apply_overrides(load_scenario("quickstart"), {"defense.trades_beta": 0})
    with pytest.raises(ValueError, match="adv_loss must be one of"):
        TrainerConfig(adv_loss="mart")
    with pytest.raises(ValueError, match="trades_beta must be a finite number > 0"):
        TrainerConfig(trades_beta=-1.0)
