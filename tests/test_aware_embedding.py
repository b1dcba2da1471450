"""Detector-aware attacks in the embedding fidelity: the caption rewrite evades the detector, the trusted-caption attack does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmai_env.consistency import ConsistencyDetector
from cmai_env.fidelity.stacked import EmbeddingAttack, RowAttacks, StackedEmbeddingWorld
from cmai_env.scenario import apply_overrides, load_scenario


@pytest.fixture(scope="module")
def world():
    scenario = apply_overrides(load_scenario("quickstart"), {"fidelity": "embedding", "dataset.train_n": 128, "dataset.probe_n": 128})
    return StackedEmbeddingWorld(scenario, 1)


def attack_probe(world, family: str, radius: float):
    """(model ASR, system ASR, crafted captions) of ``family`` on the first 64 probe pairs, τ from the other 64."""
    n = 64
    with torch.no_grad():
        classes = world.classes(None)
        e_v, e_t, lv, lt = world.forward(world.probe_v[None], world.probe_t[None], classes, None)
        clean = world._consistency(e_v, e_t, lv, lt)[0].numpy()
    detector = ConsistencyDetector(0.05)
    detector.calibrate(clean[n:])
    correct = (lv.argmax(-1)[0, :n] == world.probe_y[:n]).numpy()
    orders = RowAttacks.empty((1, n))
    orders.fill(0, slice(0, n), EmbeddingAttack("test", family, radius, 3, "image"), 0)
    adv_v, adv_t = world.craft(None, world.probe_v[None, :n], world.probe_t[None, :n], world.probe_y[None, :n], orders, classes)
    with torch.no_grad():
        a_v, a_t, a_lv, a_lt = world.forward(adv_v, adv_t, classes, None)
        score = world._consistency(a_v, a_t, a_lv, a_lt)[0].numpy()
    flipped = correct & (a_lv.argmax(-1)[0].numpy() != world.probe_y[:n].numpy())
    through = flipped & (score <= detector.threshold)
    return flipped.sum() / correct.sum(), through.sum() / correct.sum(), adv_t[0]


def test_caption_rewrite_evades_where_image_only_attacks_are_caught(world):
    radius = 0.75
    for family in ("image", "bridge_image", "aware_image"):
        asr, system_asr, _ = attack_probe(world, family, radius)
        assert system_asr <= 0.05, f"{family}: the detector should catch image-only attacks while the caption is trusted ({system_asr:.3f})"
    asr, system_asr, captions = attack_probe(world, "aware_rewrite", radius)
    assert asr >= 0.9 and system_asr >= 0.8, f"aware_rewrite: ASR {asr:.3f}, system ASR {system_asr:.3f}"
    # The captions sent are the rewritten captions of wrong classes, not the originals.
    matches = (captions.unsqueeze(1) - world.rewrite_raw.unsqueeze(0)).norm(dim=-1).min(1)
    assert bool((matches.values < 1e-5).all())
    assert bool((matches.indices != world.probe_y[:64]).all())


def test_aware_parameters_reach_the_rows():
    attack = EmbeddingAttack("aware", "aware_image", 0.5, 3, "image", lam=2.0, kappa=1.0, ce_weight=0.0)
    orders = RowAttacks.empty((2, 4))
    orders.fill(1, np.array([0, 2]), attack, 0)
    assert orders.mode_v[1].tolist() == [3, 0, 3, 0] and orders.mode_t.sum() == 0
    np.testing.assert_allclose(orders.aware[1, 0], [2.0, 1.0, 0.0])
    np.testing.assert_allclose(orders.aware[0, 0], [1.0, 5.0, 0.0])  # untouched rows keep the defaults


def test_random_target_is_refused_at_embedding_fidelity():
    from cmai_env.scenario import validate_scenario

    scenario = validate_scenario({
        "name": "random_target", "fidelity": "embedding",
        "phases": [{"name": "p", "rounds": 2, "attacks": [{"name": "aware_caption_rewrite", "params": {"target": "random"}}]}],
    })
    with pytest.raises(ValueError, match="target = 'random' is played at pixel fidelity only"):
        EmbeddingAttack.from_entry(scenario.phases[0].attacks[0])
