"""The ``pixel`` round on a generative backbone (``cmai-tiny-flamingo``): captions attacked, captions defended.

:class:`GenerativePixelFidelity` is :class:`~cmai_env.fidelity.pixel.PixelFidelity` with the
generative task (:class:`~cmai_env.models.flamingo_task.GenerativeTask`) in place of CLIP
zero-shot; the environment picks it for a scenario with ``backbone: {name: cmai-tiny-flamingo}``
at pixel fidelity. What changes in a round:

* **pairs** are an image and the prompt the model continues (``[BOS] a photo of a``), not an
  image and its caption;
* **traffic** is attacked by each scenario attack's generative version
  (:func:`~cmai_env.models.flamingo_task.generative_attack`: image attacks ascend the language
  model's class distribution ``p_LM(c | x, P)``, text attacks perturb the prompt; attacks with no
  generative version are refused when the fidelity is built);
* **observe**: ``e_v`` (CLIP image embedding), ``e_ĉ`` (CLIP text embedding of the generated
  caption) and ``L_consistency = 2·(1 − cos(e_v, e_ĉ)) + λ·(KL(p_CLIP ‖ p_LM) + KL(p_LM ‖ p_CLIP))``,
  the detector's score (:meth:`GenerativeTask.consistency`);
* **probe**: clean accuracy is caption accuracy (the generated caption names the right class),
  ASR the share of originally correct generations whose class changes (:meth:`GenerativeTask.correct`),
  the consistency score the mean ``cos(e_v, e_ĉ)`` of clean probe pairs;
* **update** (:class:`GenerativeRoundTrainer`): θ is the language model's own copy of the vision
  tower (251,040 parameters; :meth:`FlamingoBackbone.defended_parameters`, FARE's choice, the
  parameters ``cmai adv-train --backbone cmai-tiny-flamingo`` tunes). An image perturbation reaches
  the caption only through the tower's tokens, and the CLIP head keeps the original frozen tower,
  so the consistency check's reference does not move while the round defends. Defending the
  perceiver resampler instead would save only the small tower's backward pass (the backward pass
  runs through the language model either way), and PGD-AT of the resampler and cross-attention
  left PGD-10 ASR at 1.000 (README, "Generative backbone").
  The loss is the contrastive round's, one definition (:func:`cmai_env.round.defence_terms`,
  :func:`~cmai_env.round.total_loss`) with the generative task's heads::

      L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv
      L_task        = mean [CE_v + CE_t]   on the clean pairs; both heads are p_LM(· | x, P), so 2·CE(p_LM, y)
      L_consistency = mean L_consistency   on the clean pairs (its gradient reaches θ through p_LM:
                                           the KL terms pull the captions' distribution toward CLIP's)
      L_adv         = mean [CE_v + CE_t]   on the crafted pairs and the flagged observed traffic

  The crafted pairs come from the same joint PGD (:func:`cmai_env.training.joint_ascent`: pixels
  in the ℓ∞ ball ``ε_v``, prompt word embeddings in an L2 ball ``ε_t`` per word) climbing
  ``CE_v + CE_t + α·L_consistency`` with the clean pair's caption embedding ``e_ĉ`` held fixed
  (a caption is discrete; it is generated once before crafting). Crafting follows ``β_adv``
  (:func:`cmai_env.round.crafting_steps`) and ``updates_per_round`` as in the contrastive round.

A scenario's ``defense.defended`` / ``last_blocks`` do not apply and are refused at validation;
``lr``, ``eps_v``, ``eps_t``, ``alpha``, ``attack_steps`` and ``updates_per_round`` do. There is no
embedding-fidelity version: no faithful embedding proxy of a generative round exists, and a
scenario asking for one is refused at validation. Cost on one CPU thread: the shipped
``flamingo_shift`` scenario's comment states the measured seconds per round and per episode.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cmai_env.attacks import Attack, PairBatch, make_attack
from cmai_env.attacks.base import frozen_model
from cmai_env.fidelity.pixel import PixelFidelity
from cmai_env.models.flamingo_task import GenerativeTask, _prompt_mask, generative_attack
from cmai_env.round import crafted_adv_loss, defence_terms, pair_ce
from cmai_env.scenario import Scenario
from cmai_env.training import CraftedPair, ModalityBridgingTrainer, TrainerConfig, bridging_objective, joint_ascent

__all__ = ["GenerativePixelFidelity", "GenerativeRoundTrainer", "generative_joint_pgd"]


def generative_joint_pgd(
    task: GenerativeTask,
    batch: PairBatch,
    eps_v: float,
    eps_t: float,
    alpha: float,
    steps: int,
    step_size_v: float | None = None,
    step_size_t: float | None = None,
    generator: torch.Generator | None = None,
) -> CraftedPair:
    """Joint PGD on pixels and the prompt's word embeddings against the generative task (θ frozen).

    Maximises ``Σ_n CE_v + CE_t + α·L_consistency`` (both heads ``p_LM``; ``e_ĉ`` of the clean
    pair's generated caption held fixed) with :func:`cmai_env.training.joint_ascent`; ``[BOS]``
    never moves. Budgets and steps as :func:`cmai_env.training.joint_pgd`.
    """
    if steps < 1:
        raise ValueError(f"generative_joint_pgd needs steps ≥ 1, got {steps}")
    backbone, labels = task.backbone, batch.labels
    with frozen_model(backbone), torch.enable_grad():
        with torch.no_grad():
            e0 = task.prompt_embeds(batch).detach()
            clean = task.forward(batch)  # the caption and its CLIP embedding e_ĉ: generated once

        def objective(x: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
            e_v, vision_tokens = backbone.visual_features(x)
            lm = backbone.continuation_log_likelihoods(backbone.resample(vision_tokens), embeds, task.cont_ids, task.cont_mask)
            out = dataclasses.replace(
                clean, image_embeds=e_v, image_logits=lm, text_logits=lm, clip_logits=backbone.zero_shot_logits(e_v, task.class_embeds)
            )
            return bridging_objective(task, out, labels, alpha)

        real = _prompt_mask(batch, include_special=False)
        x, delta_t = joint_ascent(objective, batch.images.detach(), e0, real, eps_v, eps_t, steps, step_size_v, step_size_t, generator)
    return CraftedPair(PairBatch(x, batch.tokens, labels, (e0 + delta_t).detach()), delta_t)


class GenerativeRoundTrainer(ModalityBridgingTrainer):
    """:class:`ModalityBridgingTrainer` on a :class:`GenerativeTask` (the module docstring's update).

    θ is the language model's own vision tower, whatever ``config.defended`` says; the step,
    snapshot/restore, crafting schedule and gradient-norm reporting are the contrastive trainer's.
    """

    task: GenerativeTask
    crafting = staticmethod(generative_joint_pgd)

    def __init__(self, task: GenerativeTask, config: TrainerConfig | None = None, generator: torch.Generator | None = None) -> None:
        if not isinstance(task, GenerativeTask):
            raise TypeError(f"GenerativeRoundTrainer needs a GenerativeTask, got {type(task).__name__}")
        super().__init__(task, config, generator)

    def _select_parameters(self) -> dict[str, nn.Parameter]:
        self.backbone.defended_parameters()  # splits off the LM's tower (idempotent)
        return {f"lm_visual.{name}": p for name, p in self.backbone.lm_visual.named_parameters()}

    def losses(
        self, batch: PairBatch, crafted: CraftedPair | None = None, observed_adv: PairBatch | None = None
    ) -> dict[str, torch.Tensor]:
        """``L_task``, ``L_consistency``, ``L_adv`` (scalar tensors in the graph of θ)."""
        task = self.task
        clean = task.forward(batch)
        clean_ce = pair_ce(clean.image_logits, clean.text_logits, batch.labels)
        adv_terms = []
        if crafted is not None:
            lm = task.lm_logits(crafted.batch.images, task.prompt_embeds(crafted.batch))
            # TRADES's KL compares the language model's answers; its clean ones cost one more forward.
            clean_lm = task.lm_logits(batch.images, task.prompt_embeds(batch)) if self.config.adv_loss != "ce" else lm
            adv_terms.append(crafted_adv_loss(self.config.adv_loss, self.config.trades_beta, (clean_lm, clean_lm), (lm, lm), crafted.batch.labels))
        if observed_adv is not None and len(observed_adv):
            lm = task.lm_logits(observed_adv.images, task.prompt_embeds(observed_adv))
            adv_terms.append(pair_ce(lm, lm, observed_adv.labels))
        return defence_terms(clean_ce, task.consistency(clean), torch.cat(adv_terms) if adv_terms else None)


class GenerativePixelFidelity(PixelFidelity):
    """Pixel fidelity on a generative backbone (module docstring): the task, pairs, attacks and trainer differ."""

    name = "pixel"
    generative = True

    def __init__(self, scenario: Scenario, device: str = "cpu") -> None:
        for i, phase in enumerate(scenario.phases):
            for j, entry in enumerate(phase.attacks):
                try:
                    generative_attack(make_attack(entry.name, **entry.params))
                except ValueError as exc:
                    raise ValueError(f"scenario {scenario.name!r}: phases.{i}.attacks.{j}.name = {entry.name!r}: {exc}") from None
        super().__init__(scenario, device)

    def _make_task(self) -> GenerativeTask:
        return GenerativeTask.from_dataset(self.backbone, self.pool)

    def _pairs(self, data) -> PairBatch:
        return self.task.pairs(data)

    def _make_trainer(self, config: TrainerConfig) -> GenerativeRoundTrainer:
        return GenerativeRoundTrainer(self.task, config)

    def _make_attack(self, entry) -> Attack:
        return generative_attack(make_attack(entry.name, **entry.params))

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.lm_token_embeddings(tokens)
