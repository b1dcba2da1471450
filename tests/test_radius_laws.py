"""A scenario's own radius laws (``embedding_radius_laws``, ``pixel_travel_laws``): validated at
the edge, then the only laws its embedding world plays (no module constant is changed)."""

from __future__ import annotations

import numpy as np
import pytest

from cmai_env.fidelity import stacked, travel
from cmai_env.fidelity.stacked import FAMILY_RADIUS_LAW, StackedEmbeddingWorld
from cmai_env.scenario import ScenarioError, apply_overrides, load_scenario

SMALL = {"fidelity": "embedding", "batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}


pytestmark = pytest.mark.usefixtures("own_cache")  # each test its own cache folder (conftest)


def _radii(world: StackedEmbeddingWorld) -> dict[str, float]:
    return {attack.name: attack.radius for attack in (world.attack(e) for phase in world.scenario.phases for e in phase.attacks)}


def test_bad_laws_are_refused_naming_the_field_the_value_and_what_is_allowed():
    quickstart = load_scenario("quickstart")
    cases = [
        ({"embedding_radius_laws": {"pixels": [0.3, 1]}}, "embedding_radius_laws.pixels", "families: image, image_l2, text"),
        ({"embedding_radius_laws.image": [0, 1]}, "embedding_radius_laws.image.0 = 0", "greater than 0"),
        ({"embedding_radius_laws.image": [0.3, 9]}, "embedding_radius_laws.image.1 = 9", "less than or equal to 4"),
        ({"embedding_radius_laws.image": [0.3]}, "embedding_radius_laws.image.1", "missing"),
        ({"pixel_travel_laws.image": [1, 1]}, "pixel_travel_laws", "only used with embedding_attack_radius: pixel_travel"),
        ({"embedding_attack_radius": "pixel_travel", "pixel_travel_laws.image": [1, 0]}, "pixel_travel_laws.image.1 = 0", "greater than 0"),
    ]
    for overrides, field, allowed in cases:
        with pytest.raises(ScenarioError) as error:
            apply_overrides(quickstart, overrides)
        assert field in str(error.value) and allowed in str(error.value), str(error.value)
    with pytest.raises(ScenarioError, match="embedding_radius_laws.*generative backbone"):
        apply_overrides(load_scenario("flamingo_shift"), {"embedding_radius_laws.image": [0.3, 1]})


def test_a_scenario_law_sizes_its_attacks_and_its_training_examples_and_nothing_else():
    before = dict(FAMILY_RADIUS_LAW)
    shipped = StackedEmbeddingWorld(apply_overrides(load_scenario("abrupt_shift"), SMALL), 1)
    own = StackedEmbeddingWorld(apply_overrides(load_scenario("abrupt_shift"), {**SMALL, "embedding_radius_laws": {"image": [0.3, 1]}}), 1)
    assert FAMILY_RADIUS_LAW == before  # the module's table is untouched
    for name, radius in _radii(own).items():
        family = own.attack(next(e for p in own.scenario.phases for e in p.attacks if e.name == name)).family
        if family == "image":
            entry = next(e for p in own.scenario.phases for e in p.attacks if e.name == name)
            relative = float(entry.params["eps"]) / (8 / 255)
            assert radius == pytest.approx(0.3 * relative) and radius != pytest.approx(_radii(shipped)[name])
        else:
            assert radius == _radii(shipped)[name], name
    # L_adv's image examples follow the image law; the caption side keeps the text law
    relative = own.scenario.defense.eps_v / (8 / 255)
    ratio = stacked.embedding_radius("image", relative, (0.3, 1.0)) / stacked.embedding_radius("image", relative)
    assert own.train_radius_v / shipped.train_radius_v == pytest.approx(ratio, rel=1e-6) and ratio != pytest.approx(1.0)
    assert own.train_radius_t == shipped.train_radius_t
    assert stacked.embedding_radius("image", 0.5, (0.3, 1.0)) == pytest.approx(0.15)


def test_pixel_travel_laws_scale_the_per_pair_radii_and_key_their_own_cache_file(own_cache):
    travel_small = {**SMALL, "embedding_attack_radius": "pixel_travel"}
    scale, exponent = travel.PIXEL_TRAVEL_LAW["image"]
    shipped = StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), travel_small), 1)
    doubled = StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), {**travel_small, "pixel_travel_laws.image": [2 * scale, exponent]}), 1)
    assert set(shipped.travel) == set(doubled.travel)
    image_slots = 0
    for slot, radii in shipped.travel.items():
        other = doubled.travel[slot]
        if shipped._attacks[slot[0]].family == "image":
            image_slots += 1
            np.testing.assert_allclose(other.pool_v, 2 * radii.pool_v, rtol=1e-5)
            np.testing.assert_allclose(other.probe_v, 2 * radii.probe_v, rtol=1e-5)
        else:
            np.testing.assert_array_equal(other.pool_v, radii.pool_v)
            np.testing.assert_array_equal(other.pool_t, radii.pool_t)
    assert image_slots > 0
    assert len(list(own_cache.glob("*.npz"))) == 2  # one table per law, neither read for the other
