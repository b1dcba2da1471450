"""``token_substitution`` at ``embedding_attack_radius: pixel_travel``: the pixel attack's own candidate
captions, verified against the current adapters (``EmbeddingCounterpart.replay``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmai_env.attacks import PairBatch, ZeroShotTask, attack_class, make_attack
from cmai_env.attacks.specs import available_attacks, declaration
from cmai_env.data import load_dataset
from cmai_env.fidelity import travel
from cmai_env.fidelity.base import defended_backbone, entry_key
from cmai_env.fidelity.stacked import RowAttacks, StackedEmbeddingWorld
from cmai_env.round import probe_split
from cmai_env.scenario import apply_overrides, load_scenario
from cmai_env.stream import RoundPlan

SMALL = {"fidelity": "embedding", "batch_size": 16, "dataset.train_n": 64, "dataset.probe_n": 32}
TRAVEL = {**SMALL, "embedding_attack_radius": "pixel_travel"}

pytestmark = pytest.mark.usefixtures("own_cache")


def _text_phase(scenario):
    phase = next(p for p in scenario.phases if any(e.name == "token_substitution" for e in p.attacks))
    return phase, next(e for e in phase.attacks if e.name == "token_substitution")


def test_only_caption_attacks_with_a_candidate_method_declare_replay():
    replayed = [name for name in available_attacks() if declaration(name).embedding and declaration(name).embedding.replay]
    assert replayed == ["token_substitution"]
    for name in replayed:
        assert declaration(name).modality == "text" and callable(getattr(attack_class(name), "replay_candidates", None))


@pytest.mark.parametrize("k", [1, 2])
def test_verifying_the_candidates_on_the_ranking_model_gives_the_attack_s_own_output(k):
    """Against the model the candidates were ranked on, the replay's choice is ``perturb``'s caption."""
    scenario = load_scenario("abrupt_shift")
    backbone = defended_backbone(scenario)
    data = load_dataset("shapes", split="val", n=48, seed=0, image_size=backbone.image_size)
    task, pairs = ZeroShotTask.from_dataset(backbone, data), PairBatch.from_dataset(backbone, data)
    attack = make_attack("token_substitution", k=k)
    produced = attack(task, pairs, torch.Generator().manual_seed(0)).batch.tokens
    candidates, valid = attack.replay_candidates(task, pairs)
    assert candidates.shape[:2] == valid.shape == (48, attack.verify_top) and valid.all()
    assert ((candidates != pairs.tokens[:, None]).sum(-1) <= k).all()  # at most k tokens changed
    with torch.no_grad():
        own_and_candidates = torch.cat([pairs.tokens[:, None], candidates], 1)  # replay's own caption first
        logits = backbone.zero_shot_logits(backbone.encode_text(own_and_candidates.flatten(0, 1)), task.class_embeds)
        ce = F.cross_entropy(logits, pairs.labels.repeat_interleave(1 + attack.verify_top), reduction="none").view(48, -1)
    chosen = own_and_candidates[torch.arange(48), ce.argmax(-1)]
    if k == 1:
        assert torch.equal(chosen, produced)
    else:  # the first k − 1 flips are the attack's; its last one is among the candidates
        assert torch.equal(chosen[(ce.argmax(-1) > 0)], produced[(ce.argmax(-1) > 0)])
    assert make_attack("token_substitution", k=0).replay_candidates(task, pairs)[0].shape[1] == 0
    # a wider table (what the embedding fidelity keeps) holds the ones the attack itself verifies, first
    wide, wide_valid = attack.replay_candidates(task, pairs, width=32)
    assert wide.shape[1] == 32 and wide_valid[:, :8].all()
    for row in range(48):
        assert set(map(tuple, wide[row, :8].tolist())) == set(map(tuple, candidates[row].tolist()))


def test_the_world_replays_the_pixel_attack_and_reads_its_candidates_from_the_cache(own_cache, monkeypatch):
    scenario = apply_overrides(load_scenario("abrupt_shift"), TRAVEL)
    world = StackedEmbeddingWorld(scenario, 1)
    phase, entry = _text_phase(scenario)
    key = entry_key(entry)
    assert set(world._replay_rows) == {(key, "pool"), (key, "probe")}
    pool_rows, probe_rows = world._replay_rows[(key, "pool")], world._replay_rows[(key, "probe")]
    assert pool_rows.shape == (64,) and probe_rows.shape == (32,)
    distinct = len(set(map(tuple, torch.cat([world.pool_t, world.probe_t]).tolist())))
    # one row of candidates per distinct caption (pairs sharing a caption share them), REPLAY_WIDTH each
    assert world.replay_captions.shape == (distinct, travel.REPLAY_WIDTH, world.embed_dim) and distinct < 64 + 32

    # On fresh (identity) adapters the replay searches a superset of the pixel attack's flips: as strong.
    plan = RoundPlan(0, phase.name, scenario.phases.index(phase), (entry,), 0.5, False, 1.0, phase.corruption.key if phase.corruption else None)
    result = world.probe(None, [plan])
    backbone = defended_backbone(scenario)
    probe = load_dataset("shapes", split="val", n=32, seed=scenario.dataset.seed, image_size=backbone.image_size)
    task, pairs = ZeroShotTask.from_dataset(backbone, probe), PairBatch.from_dataset(backbone, probe).subset(slice(0, probe_split(32)))
    with torch.no_grad():
        adversarial = make_attack(entry.name, **entry.params)(task, pairs).batch
        before = backbone.zero_shot_logits(backbone.encode_text(pairs.tokens), task.class_embeds).argmax(-1) == pairs.labels
        after = backbone.zero_shot_logits(backbone.encode_text(adversarial.tokens), task.class_embeds).argmax(-1) == pairs.labels
    pixel_asr = float((before & ~after).sum() / before.sum())
    assert abs(result.asr_per_attack[0]["token_substitution"] - pixel_asr) <= 0.1
    assert pixel_asr > 0.8  # a word swap flips the caption; the old radius law reached 0.14 on clean images

    # Rounds replay it too: every attacked caption is one of its pool pair's candidates or its own.
    rng = np.random.default_rng(0)
    traffic = world.incoming(None, [plan], [rng])
    attacked = np.flatnonzero(traffic.attack_index[0] >= 0)
    assert len(attacked)
    for column in attacked:
        sent = traffic.adv_t[0, column]
        own = traffic.raw_t[0, column]
        pair = int(torch.nonzero((world.pool_t == own).all(-1))[0])
        options = torch.cat([own[None], world.replay_captions[pool_rows[pair]]])
        assert (options == sent).all(-1).any()

    with monkeypatch.context() as patch:
        patch.setattr(StackedEmbeddingWorld, "_replay_captions", lambda *args: pytest.fail("ran the caption attack again"))
        again = StackedEmbeddingWorld(scenario, 1)
    assert torch.equal(again.replay_captions, world.replay_captions)
    assert len(list((own_cache.parent / "replay").glob("*.npz"))) == 1

    law = StackedEmbeddingWorld(apply_overrides(load_scenario("abrupt_shift"), SMALL), 1)
    assert law.replay_captions is None and law.attack(entry).family == "text"  # law: the text family's radius


def test_a_replay_row_keeps_its_caption_unless_a_candidate_raises_its_loss():
    scenario = apply_overrides(load_scenario("abrupt_shift"), SMALL)
    world = StackedEmbeddingWorld(scenario, 1)
    raw_t, labels = world.probe_t[None, :4], world.probe_y[None, :4]
    other = world.probe_t[(world.probe_y != world.probe_y[0]).nonzero()[0, 0]]
    # row 0: candidates are its own caption and another class's (which raises CE); rows 1–3: only copies of their own
    captions = torch.stack([torch.stack([raw_t[0, 0], other]), *[torch.stack([raw_t[0, i], raw_t[0, i]]) for i in range(1, 4)]])
    valid = torch.ones(4, 2, dtype=torch.bool)
    valid[3, :] = False  # no real candidate: its own caption
    orders = RowAttacks.empty((1, 4))
    orders.replay_from(0, slice(0, 4), np.arange(4))
    _, sent = world.craft(None, world.probe_v[None, :4], raw_t, labels, orders, world.classes(None), replay=(captions, valid))
    assert torch.equal(sent[0, 0], other)
    assert torch.equal(sent[0, 1:], raw_t[0, 1:])
