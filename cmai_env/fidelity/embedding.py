"""``embedding`` fidelity: bounded perturbations of cached frozen embeddings, for fast RL iteration.

The frozen backbone embeds the training pool, the probe set and the class prompts once. The
defended parameters are residual adapters on the pooled embeddings (``e ↦ norm(e + A(e))`` with
:class:`cmai_env.models.backbone.ResidualAdapter`, the same adapter the pixel fidelity trains;
one for images and one for text; class prompts pass the text adapter), trained with AdamW
(weight decay 0.01). Every registered attack declares its embedding-space counterpart on the
*input* embedding (before the adapter) in its declaration (``embedding=EmbeddingCounterpart(family,
budget=...)`` in :mod:`cmai_env.attacks.specs`), under an L2 radius

    r = scale · (attack's budget / that attack's default budget)^γ

with ``(scale, γ)`` per family (:data:`cmai_env.fidelity.stacked.FAMILY_RADIUS_LAW`, calibrated so
the undefended model's ASR and detector TPR match the pixel attacks';
``benchmarks/fidelity_calibration.py``). The shipped attacks declare:

==============================================  ================================================
registered attacks                              embedding-space counterpart (family)
==============================================  ================================================
fgsm, pgd_linf, autoattack and its parts         ``image``: untargeted L2-PGD on e_v (image CE)
pgd_l2                                           ``image_l2``: the same, with a radius law of its own
universal                                        ``universal``: one shared δ per round on e_v
text_embedding_pgd, token_substitution           ``text``: untargeted L2-PGD on e_t (caption CE)
bridge_image_to_text                             ``bridge_image``: e_v toward the nearest wrong class prompt
bridge_text_to_image                             ``bridge_text``: e_t toward the nearest wrong class prompt
co_attack                                        ``both``: e_t and e_v, each up its own CE
aware_pgd_linf                                   ``aware_image``: e_v up min(margin, κ) − λ·L_consistency
aware_caption_rewrite                            ``aware_rewrite``: caption → c*'s, e_v down L_consistency
==============================================  ================================================

Under ``embedding_attack_radius: pixel_travel`` every pair's radius is the distance its own pixel
attack moved it (:mod:`cmai_env.fidelity.travel`), and ``token_substitution`` (its declaration sets
``replay``) is not a radius at all: each attacked caption becomes the worst, under the current text
adapter, of the word swaps the pixel attack ranks best (a word swap moves a caption where no small
embedding step goes; at ``law`` it flipped 0.14 of the clean captions the pixel attack flips 0.99 of).

Steps follow the attack's ``steps`` parameter, capped at ``MAX_STEPS``. The losses, the
crafting objective and the ascent steps are :mod:`cmai_env.round`'s, shared with the pixel
fidelity. This class is :class:`cmai_env.fidelity.stacked.StackedEmbeddingWorld` with one
environment, the same code the batched :class:`cmai_env.vector_env.CMAIVectorEnv` runs with N.
The spaces, metrics and the reward are the same as in ``pixel``; absolute numbers differ (this
is a fast proxy).
"""

from __future__ import annotations

import numpy as np

from cmai_env.fidelity.base import Fidelity, ProbeResult, RoundTraffic, TrafficStats, UpdateResult
from cmai_env.fidelity.stacked import ADAPTER_HIDDEN, MAX_STEPS, RADIUS, EmbeddingAttack, StackedEmbeddingWorld
from cmai_env.round import PROBE_ATTACK_N
from cmai_env.scenario import Scenario
from cmai_env.stream import RoundPlan

__all__ = ["ADAPTER_HIDDEN", "EmbeddingAttack", "EmbeddingFidelity", "MAX_STEPS", "PROBE_ATTACK_N", "RADIUS"]


class EmbeddingFidelity(Fidelity):
    """Cached frozen embeddings + residual adapters: a one-environment :class:`StackedEmbeddingWorld`."""

    name = "embedding"

    def __init__(self, scenario: Scenario, device: str = "cpu") -> None:
        super().__init__(scenario, device)
        self.world = StackedEmbeddingWorld(scenario, 1, device)

    @property
    def embed_dim(self) -> int:
        return self.world.embed_dim

    def reset(self) -> None:
        self.world.reset()

    def incoming(self, plan: RoundPlan, rng: np.random.Generator) -> RoundTraffic:
        traffic = self.world.incoming(None, [plan], [rng])
        return RoundTraffic(traffic, traffic.attack_index[0], [e.name for e in plan.mixture], traffic.attack_ms)

    def observe(self, traffic: RoundTraffic) -> TrafficStats:
        payload = traffic.payload
        stats = self.world.observe(None, payload.adv_v, payload.adv_t)
        return TrafficStats(stats.image_embeds[0], stats.text_embeds[0], stats.consistency[0], stats.cosine[0])

    def update(self, traffic: RoundTraffic, betas: np.ndarray, flagged: np.ndarray, rng: np.random.Generator) -> UpdateResult:
        result = self.world.update(None, traffic.payload, np.asarray(betas, dtype=np.float64)[None], np.asarray(flagged, dtype=bool)[None])
        return result.row(0, self.scenario.defense.attack_steps)

    def probe(self, plan: RoundPlan, rng: np.random.Generator) -> ProbeResult:
        return self.world.probe(None, [plan]).row(0)
