"""``co_attack``: a collaborative multimodal attack (Co-Attack, Zhang et al., ACM MM 2022, adapted).

Co-Attack perturbs the text first and then the image *given* the perturbed text, so the two
perturbations reinforce rather than cancel. Here:

1. text: PGD on the caption's input token embeddings (L2 per token, word positions), maximising
   the caption's zero-shot CE, exactly as ``text_embedding_pgd`` → ``E'`` with ``e_t' = g_t(E')``;
2. image: PGD-ℓ∞ maximising

       L_img(x) = CE(s·norm(f_v(x))·Cᵀ, y) − w · [cos(f_v(x), e_t) + cos(f_v(x), e_t')]

   i.e. raise the image's task loss while pushing its embedding away from both the clean and
   the perturbed caption embeddings (``w = embed_weight``).

Both modalities come back perturbed (``modality = "both"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack
from cmai_env.attacks.image import pgd_linf_ascent
from cmai_env.attacks.text import clean_token_embeddings, pgd_token_ascent, text_ce_loss, token_masks


@register_attack
@dataclass
class CoAttack(Attack):
    """Text embedding PGD, then image PGD-ℓ∞ away from both caption embeddings (see module docstring).

    :param eps: image ℓ∞ budget ``ε_v`` (default 8/255).
    :param steps: image PGD steps (default 10).
    :param step_size: image step ``α`` (default 2/255).
    :param text_eps: L2 budget ``ε_t`` per token (default 0.2).
    :param text_steps: text PGD steps (default 10).
    :param text_step_size: text step (default 0.05).
    :param embed_weight: ``w``, the weight of the cross-modal push-away terms (default 1.0).
    :param random_start: random starts for both PGD stages (default True).
    """

    name = "co_attack"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        backbone = task.backbone
        tokens, labels = batch.tokens, batch.labels
        _, content = token_masks(backbone, tokens)
        clean_embeds = clean_token_embeddings(task, batch)
        embeds = pgd_token_ascent(
            text_ce_loss(task, tokens, labels),
            clean_embeds,
            content,
            self.text_eps,
            self.text_steps,
            self.text_step_size,
            self.random_start,
            generator,
        )
        with torch.no_grad():
            # Both caption embeddings are unit vectors; their sum turns two cosines into one dot product.
            text_pair = backbone.encode_text_embeddings(clean_embeds, tokens) + backbone.encode_text_embeddings(embeds, tokens)

        def loss(x: torch.Tensor) -> torch.Tensor:
            e_v = backbone.encode_image(x)
            ce = F.cross_entropy(backbone.zero_shot_logits(e_v, task.class_embeds), labels, reduction="sum")
            return ce - self.embed_weight * (e_v * text_pair).sum()

        images = pgd_linf_ascent(loss, batch.images, self.eps, self.steps, self.step_size, self.random_start, generator)
        return AttackResult(PairBatch(images, tokens, labels, embeds), self.modality)
