"""``embedding_attack_radius: pixel_travel``: each attacked pair at the distance its own pixel attack moved it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cmai_env.fidelity import travel
from cmai_env.fidelity.base import entry_key
from cmai_env.fidelity.embedding import EmbeddingFidelity
from cmai_env.fidelity.stacked import FAMILY_RADIUS_LAW, StackedEmbeddingWorld
from cmai_env.scenario import ScenarioError, apply_overrides, load_scenario
from cmai_env.stream import AttackStream, attack_views

SMALL = {"fidelity": "embedding", "batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}
TRAVEL = {**SMALL, "embedding_attack_radius": "pixel_travel"}


#: each test its own cache folder (conftest.own_cache): the radii are computed here, not read from another run
pytestmark = pytest.mark.usefixtures("own_cache")


def test_the_field_is_validated_and_law_by_default():
    assert load_scenario("quickstart").embedding_attack_radius == "law"
    assert set(travel.PIXEL_TRAVEL_LAW) == set(FAMILY_RADIUS_LAW)
    with pytest.raises(ScenarioError, match="embedding_attack_radius") as error:
        apply_overrides(load_scenario("quickstart"), {"embedding_attack_radius": "replay"})
    assert "pixel_travel" in str(error.value)
    with pytest.raises(ScenarioError, match="embedding_attack_radius") as error:
        apply_overrides(load_scenario("flamingo_shift"), {"embedding_attack_radius": "pixel_travel"})
    assert "generative backbone" in str(error.value)


def test_every_phase_attack_gets_per_pair_radii_from_its_own_pixel_attack():
    scenario = apply_overrides(load_scenario("quickstart"), TRAVEL)
    world = StackedEmbeddingWorld(scenario, 1)
    # every pairing of a configuration with a view that a round can send (quickstart: abrupt, so each
    # phase's attacks on its own images only), and nothing else: the pixel attacks are the build's cost
    assert set(world.travel) == {(key, world.corruptions.index(images)) for key, images in attack_views(scenario)}
    assert len(world.corruptions) == 2  # quickstart has a clean and a noisy view
    assert len(world.travel) < len(world._attacks) * len(world.corruptions)
    for (key, view), radii in world.travel.items():
        attack = world._attacks[key]
        assert radii.pool_v.shape == radii.pool_t.shape == (64,) and radii.probe_v.shape == (16,)
        moved = (radii.pool_v > 0).mean(), (radii.pool_t > 0).mean()
        assert moved[0] == (1.0 if attack.modality in ("image", "both") else 0.0), attack
        assert moved[1] == (1.0 if attack.modality in ("text", "both") else 0.0), attack
        assert radii.pool_v.std() > 0 or radii.pool_t.std() > 0  # per pair, not one radius for all
    assert StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), SMALL), 1).travel == {}  # law: none

    # The radii are c · the pixel attack's travel, as fidelity_calibration.py --pixel-travel measures it.
    (key, view), radii = next((k, r) for k, r in world.travel.items() if world._attacks[k[0]].family == "image")
    phase = next(p for p in scenario.phases for e in p.attacks if entry_key(e) == key)
    entry = next(e for e in phase.attacks if entry_key(e) == key)
    from cmai_env.attacks import PairBatch, ZeroShotTask
    from cmai_env.corruptions import corrupted_split
    from cmai_env.data import load_dataset
    from cmai_env.fidelity.base import defended_backbone

    spec = scenario.dataset
    backbone = defended_backbone(scenario)
    pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=backbone.image_size, root=spec.root)
    pairs = PairBatch.from_dataset(backbone, pool)
    corruption = world.corruptions[view]
    pairs = PairBatch(corrupted_split(pairs.images, corruption, spec.seed, "train"), pairs.tokens, pairs.labels)
    task = ZeroShotTask.from_dataset(backbone, pool)
    generator = torch.Generator().manual_seed(spec.seed)
    moved_v, _ = travel.pixel_travel(task, pairs, travel.entry_attack(entry.name, entry.params, task, pairs, generator), generator)
    scale, exponent = travel.PIXEL_TRAVEL_LAW["image"]
    np.testing.assert_allclose(radii.pool_v, scale * moved_v**exponent, rtol=1e-5)


def test_the_travel_law_is_a_power_of_the_travel_per_family():
    moved = (np.array([0.0, 0.1, 0.5, 1.0], dtype=np.float32), np.zeros(4, dtype=np.float32))
    image_v, image_t = travel.travel_radii("image", moved)
    np.testing.assert_allclose(image_v, travel.PIXEL_TRAVEL_LAW["image"][0] * moved[0], rtol=1e-6)  # γ = 1
    assert image_v.dtype == image_t.dtype == np.float32 and not image_t.any()
    # universal: γ = 2, so a short travel (a δ that is mostly not adversarial) buys much less radius
    scale, exponent = travel.PIXEL_TRAVEL_LAW["universal"]
    assert exponent == 2.0
    universal_v, _ = travel.travel_radii("universal", moved)
    np.testing.assert_allclose(universal_v, scale * moved[0] ** 2, rtol=1e-6)
    assert universal_v[1] / universal_v[3] == pytest.approx(0.01)
    given_v, _ = travel.travel_radii("universal", moved, (1.0, 0.5))  # the calibration benchmark's other laws
    np.testing.assert_allclose(given_v, np.sqrt(moved[0]), rtol=1e-6)


def test_incoming_and_probe_play_each_pair_at_its_travel_radius(monkeypatch):
    scenario = apply_overrides(load_scenario("quickstart"), TRAVEL)
    fidelity = EmbeddingFidelity(scenario)
    world = fidelity.world
    calls = []
    craft = StackedEmbeddingWorld.craft

    def recording(self, envs, raw_v, raw_t, labels, orders, classes, clean=None):
        calls.append((raw_v.detach().clone(), orders))
        return craft(self, envs, raw_v, raw_t, labels, orders, classes, clean)

    monkeypatch.setattr(StackedEmbeddingWorld, "craft", recording)
    plan = next(plan for plan in AttackStream(scenario, np.random.default_rng(0)) if plan.mixture)
    view = world.corruptions.index(plan.corruption)
    [radii] = [world.travel[(entry_key(entry), view)] for entry in plan.mixture]

    fidelity.incoming(plan, np.random.default_rng(1))
    [(raw_v, orders)] = calls
    attacked = np.flatnonzero((orders.mode_v[0] > 0) | (orders.mode_t[0] > 0))
    assert len(attacked)
    # which pool pair each crafted row is: its clean image embedding in the view the phase serves
    pool_rows = torch.cdist(raw_v[0, attacked], world.pool_views[view]).argmin(-1).numpy()
    np.testing.assert_array_equal(orders.radius[0, attacked], radii.pool_v[pool_rows])
    np.testing.assert_array_equal(orders.radius_t[0, attacked], radii.pool_t[pool_rows])

    calls.clear()
    fidelity.probe(plan, np.random.default_rng(2))
    [(_, orders)] = calls
    n = orders.radius.shape[1]
    np.testing.assert_array_equal(orders.radius[0], radii.probe_v[:n])
    np.testing.assert_array_equal(orders.radius_t[0], radii.probe_t[:n])


def test_worlds_built_alike_read_one_table_of_read_only_radii_from_the_cache(own_cache, monkeypatch):
    scenario = apply_overrides(load_scenario("quickstart"), TRAVEL)
    first = StackedEmbeddingWorld(scenario, 1)
    [stored] = own_cache.glob("*.npz")
    with monkeypatch.context() as patch:
        patch.setattr(StackedEmbeddingWorld, "_pixel_travel", lambda *args: pytest.fail("ran the pixel attacks again"))
        second = StackedEmbeddingWorld(scenario, 2)  # in this process or another: the file, not the attacks
    assert second.travel.keys() == first.travel.keys()
    for slot, radii in first.travel.items():
        for field in travel.TravelCache().fields:
            np.testing.assert_array_equal(getattr(second.travel[slot], field), getattr(radii, field))
    radii = next(iter(second.travel.values()))
    with pytest.raises(ValueError, match="read-only"):
        radii.pool_v[0] = 0.0

    other = apply_overrides(scenario, {"dataset.seed": scenario.dataset.seed + 1})
    StackedEmbeddingWorld(other, 1)  # other images, other radii: a second file
    assert len(list(own_cache.glob("*.npz"))) == 2

    stored.write_bytes(b"not an npz")  # a damaged file is a miss: computed again and rewritten
    calls = []
    original = StackedEmbeddingWorld._pixel_travel
    with monkeypatch.context() as patch:
        patch.setattr(StackedEmbeddingWorld, "_pixel_travel", lambda *args: calls.append(1) or original(*args))
        again = StackedEmbeddingWorld(scenario, 1)
    assert calls == [1] and again.travel.keys() == first.travel.keys()
    np.testing.assert_array_equal(next(iter(again.travel.values())).pool_v, next(iter(first.travel.values())).pool_v)


def test_the_cache_misses_on_other_slots_and_never_fails_a_build(tmp_path):
    radii = travel.TravelRadii(*(np.arange(3, dtype=np.float32) + k for k in range(4)))
    slots = [(("pgd_linf", (("eps", 0.03),)), 0)]
    cache = travel.TravelCache(tmp_path / "travel")
    cache.put("k", {slots[0]: radii}, slots)
    [loaded] = cache.get("k", slots).values()
    np.testing.assert_array_equal(loaded.probe_t, radii.probe_t)
    assert cache.get("k", [(slots[0][0], 1)]) is None  # the same key for other slots: not this table
    assert cache.get("missing", slots) is None
    os.utime(cache.directory / "k.npz", (1000, 1000))  # the oldest file: the first to go
    for n in range(1, travel.CACHE_FILES + 1):
        cache.put(f"k{n}", {slots[0]: radii}, slots)
    assert len(list(cache.directory.glob("*.npz"))) == travel.CACHE_FILES  # the most recently written only
    assert cache.get("k", slots) is None and cache.get(f"k{travel.CACHE_FILES}", slots) is not None
    blocked = tmp_path / "file"
    blocked.write_text("")
    travel.TravelCache(blocked / "travel").put("k", {slots[0]: radii}, slots)  # cannot be written: skipped, no error
    assert list(tmp_path.glob("travel/*.tmp")) == []


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's cache file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cache_file_that_carries_a_pickle_is_a_miss_and_runs_no_code(tmp_path):
    slots = [(("pgd_linf", (("eps", 0.03),)), 0)]
    cache = travel.TravelCache(tmp_path / "travel")
    cache.directory.mkdir(parents=True)
    marker = tmp_path / "ran"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    fields = {f"0.{field}": payload for field in travel.TravelCache().fields}
    np.savez(cache.directory / "k.npz", slots=np.array([repr(slots[0])]), **fields)
    assert cache.get("k", slots) is None
    assert not marker.exists()
