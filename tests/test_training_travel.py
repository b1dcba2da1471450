"""``defense.embedding_train_radius: pixel_travel``: each ``L_adv`` example as far out as the pixel trainer's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmai_env.fidelity import travel
from cmai_env.fidelity.stacked import StackedEmbeddingWorld
from cmai_env.scenario import DefenseSpec, ScenarioError, apply_overrides, load_scenario
from cmai_env.stream import AttackStream
from cmai_env.vector_env import _subset, _write_rows

SMALL = {"fidelity": "embedding", "batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 16}
TRAINING = {**SMALL, "defense.embedding_train_radius": "pixel_travel"}

#: each test its own cache folder (conftest.own_cache): the travel is computed here, not read from another run
pytestmark = pytest.mark.usefixtures("own_cache")


def test_the_field_is_validated_law_by_default_and_embedding_only():
    assert DefenseSpec().embedding_train_radius == "law"
    assert "embedding_train_radius" not in DefenseSpec().trainer_fields()  # the pixel trainer crafts its own
    with pytest.raises(ScenarioError, match="defense.embedding_train_radius") as error:
        apply_overrides(load_scenario("quickstart"), {"defense.embedding_train_radius": "per_pair"})
    assert "pixel_travel" in str(error.value)
    with pytest.raises(ScenarioError, match="defense.embedding_train_radius.*pixel fidelity only"):
        apply_overrides(load_scenario("flamingo_shift"), {"defense.embedding_train_radius": "pixel_travel"})


def _pixel_trainer_travel(scenario, corruption):
    """What the world's table should hold for one view, computed here from the pieces."""
    from cmai_env.attacks import PairBatch, ZeroShotTask
    from cmai_env.corruptions import corrupted_split
    from cmai_env.data import load_dataset
    from cmai_env.fidelity.base import defended_backbone

    spec = scenario.dataset
    backbone = defended_backbone(scenario)
    pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=backbone.image_size, root=spec.root)
    pairs = PairBatch.from_dataset(backbone, pool)
    pairs = PairBatch(corrupted_split(pairs.images, corruption, spec.seed, "train"), pairs.tokens, pairs.labels)
    return travel.training_travel(ZeroShotTask.from_dataset(backbone, pool), pairs, scenario.defense, torch.Generator().manual_seed(spec.seed))


def test_every_view_gets_each_pool_pairs_own_pixel_trainer_travel_times_the_scales():
    scenario = apply_overrides(load_scenario("quickstart"), {**TRAINING, "defense.embedding_train_radius_scale": 1.0})
    world = StackedEmbeddingWorld(scenario, 1)
    assert len(world.train_travel) == len(world.corruptions) == 2  # quickstart: clean and noisy images
    for radius_v, radius_t in world.train_travel:
        assert radius_v.shape == radius_t.shape == (64,)
        assert (radius_v > 0).all() and (radius_t > 0).all() and radius_v.std() > 0  # per pair
    # noisy images' crafted examples move less than clean ones': one radius for both cannot say so
    assert world.train_travel[1][0].median() < world.train_travel[0][0].median()
    moved_v, moved_t = _pixel_trainer_travel(scenario, world.corruptions[1])
    np.testing.assert_allclose(world.train_travel[1][0].numpy(), moved_v, rtol=1e-5)
    np.testing.assert_allclose(world.train_travel[1][1].numpy(), moved_t, rtol=1e-5)

    # the scales multiply each side's travel as they multiply the law's radius
    scaled = StackedEmbeddingWorld(apply_overrides(scenario, {"defense.embedding_train_radius_scale": 2.0,
                                                              "defense.embedding_image_train_radius_scale": 0.5}), 1)
    torch.testing.assert_close(scaled.train_travel[0][0], 0.5 * world.train_travel[0][0])
    torch.testing.assert_close(scaled.train_travel[0][1], 2.0 * world.train_travel[0][1])
    assert StackedEmbeddingWorld(apply_overrides(load_scenario("quickstart"), SMALL), 1).train_travel == []  # law: none
    assert StackedEmbeddingWorld(apply_overrides(scenario, {"defense.attack_steps": 0}), 1).train_travel == []  # no L_adv


def test_each_crafted_pair_trains_within_its_own_radius():
    scenario = apply_overrides(load_scenario("quickstart"), TRAINING)
    world = StackedEmbeddingWorld(scenario, 2)
    stream = AttackStream(scenario, np.random.default_rng(0))
    plans = [stream.plan(0), stream.plan(len(stream) - 1)]  # the clean and the noisy phase
    views = world._view_indices(plans)
    assert views == [0, 1]
    traffic = world.incoming(None, plans, [np.random.default_rng(1), np.random.default_rng(2)])
    radius_v, radius_t = traffic.train_radii
    assert radius_v.shape == radius_t.shape == (2, 16, 1)
    # each pair's radius is its pool row's on its environment's view: find the rows by the clean embeddings
    for e, view in enumerate(views):
        rows = torch.cdist(traffic.raw_v[e], world.pool_views[view]).argmin(-1)
        torch.testing.assert_close(radius_v[e, :, 0], world.train_travel[view][0][rows])
        torch.testing.assert_close(radius_t[e, :, 0], world.train_travel[view][1][rows])

    crafted = []
    original = StackedEmbeddingWorld._craft_training

    def recording(self, *args):
        crafted.append((original(self, *args), args[-1]))
        return crafted[-1][0]

    world._craft_training = recording.__get__(world)
    world.update(None, traffic, np.array([[0.0, 0.0, 1.0]] * 2), np.zeros((2, 16), dtype=bool))
    [((adv_v, adv_t), radii)] = crafted
    assert radii is traffic.train_radii
    moved_v, moved_t = (adv_v - traffic.raw_v).norm(dim=-1), (adv_t - traffic.raw_t).norm(dim=-1)
    assert (moved_v <= radius_v[..., 0] + 1e-5).all() and (moved_t <= radius_t[..., 0] + 1e-5).all()
    assert (moved_v / radius_v[..., 0]).max() > 0.99  # PGD at 2.5·r/steps reaches the boundary

    # the vector environment's partial steps carry each environment's radii with its traffic
    one = torch.tensor([1])
    part = _subset(traffic, one, np.array([1]))
    torch.testing.assert_close(part.train_radii[0], radius_v[1:])
    part.train_radii[0].fill_(0.25)
    _write_rows(traffic, part, one, np.array([1]))
    assert (traffic.train_radii[0][1] == 0.25).all() and (traffic.train_radii[0][0] == radius_v[0]).all()


def test_worlds_built_alike_read_the_travel_from_the_cache(monkeypatch, tmp_path):
    scenario = apply_overrides(load_scenario("quickstart"), TRAINING)
    first = StackedEmbeddingWorld(scenario, 1)
    assert len(list((tmp_path / "cache" / "training_travel").glob("*.npz"))) == 1
    monkeypatch.setattr(StackedEmbeddingWorld, "_training_travel", lambda *args: pytest.fail("ran the pixel trainer's PGD again"))
    second = StackedEmbeddingWorld(scenario, 1)
    for (first_v, first_t), (second_v, second_t) in zip(first.train_travel, second.train_travel):
        torch.testing.assert_close(first_v, second_v)
        torch.testing.assert_close(first_t, second_t)

