"""Cross-modal bridge attacks (CrossFire-style): move one modality's embedding onto the other
modality's embedding of a *wrong* class, so the pair stops agreeing.

``bridge_image_to_text`` — targeted PGD-ℓ∞ on the image towards the text embedding of a wrong
class ``c*`` (its class-prompt embedding ``C_{c*}``):

    max_δ  cos(f_v(x + δ), C_{c*})   s.t. ‖δ‖∞ ≤ ε_v, x + δ ∈ [0, 1].

``bridge_text_to_image`` — the converse on the caption's input token embeddings (L2 per token,
word positions only) towards an *image-side* embedding of a wrong class:

    max_δ  cos(g_t(E + δ), t_{c*})    s.t. ‖δ_i‖₂ ≤ ε_t,

with ``t_{c*}`` the mean clean image embedding of the batch's images of class ``c*``
(``target_embedding="image"``; classes absent from the batch fall back to the class prompt) or
the class-prompt embedding ``C_{c*}`` (``target_embedding="prompt"``).

The wrong class ``c*`` is ``target="nearest"``: the wrong class whose target embedding is most
similar to the clean embedding of the perturbed modality (the cheapest bridge), or
``target="random"``: a uniformly random wrong class drawn from the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack
from cmai_env.attacks.image import pgd_linf_ascent, uniform_noise
from cmai_env.attacks.text import clean_token_embeddings, pgd_token_ascent, token_masks


def choose_wrong_class(
    similarity: torch.Tensor, labels: torch.Tensor, rule: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Per sample a class ≠ its label: the most ``similar`` one (``nearest``) or a uniformly random one.

    :param similarity: (N, C) similarity of each sample to each class's target embedding.
    :return: (N,) class indices.
    """
    score = similarity if rule == "nearest" else uniform_noise(similarity.shape, similarity, generator)
    score = score.clone()
    score[torch.arange(len(labels), device=labels.device), labels] = -float("inf")
    return score.argmax(-1)


@register_attack
@dataclass
class BridgeImageToText(Attack):
    """Targeted PGD-ℓ∞ pulling the image embedding onto a wrong class's text embedding.

    ``max cos(f_v(x+δ), C_{c*})``, ``‖δ‖∞ ≤ ε_v``; ``c*`` chosen by ``target``.

    :param eps: ℓ∞ budget ``ε_v`` (default 16/255).
    :param steps: number of steps (default 10).
    :param step_size: ``α`` (default 2/255; larger steps overshoot and oscillate on this targeted loss).
    :param random_start: start from ``x + U(−ε, ε)`` (default True).
    :param target: ``nearest`` wrong class prompt (to the clean image) or ``random`` (default nearest).
    """

    name = "bridge_image_to_text"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        backbone = task.backbone
        with torch.no_grad():
            similarity = backbone.encode_image(batch.images) @ task.class_embeds.T
        targets = task.class_embeds[choose_wrong_class(similarity, batch.labels, self.target, generator)]

        def pull(x: torch.Tensor) -> torch.Tensor:
            return (backbone.encode_image(x) * targets).sum()  # Σ cos: both sides are unit vectors

        images = pgd_linf_ascent(pull, batch.images, self.eps, self.steps, self.step_size, self.random_start, generator)
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)


@register_attack
@dataclass
class BridgeTextToImage(Attack):
    """Token-embedding PGD (L2 per token) pulling the caption embedding onto a wrong class's image side.

    ``max cos(g_t(E+δ), t_{c*})``, ``‖δ_i‖₂ ≤ ε_t`` on word positions; see the module docstring
    for ``t_{c*}``.

    :param eps: L2 budget ``ε_t`` per token (default 0.2, as ``text_embedding_pgd``).
    :param steps: number of steps (default 10).
    :param step_size: ``α`` (default 0.05).
    :param random_start: start from a random point of each token's ball (default True).
    :param target: ``nearest`` wrong class (to the clean caption) or ``random`` (default nearest).
    :param target_embedding: ``image`` (mean clean image embedding of the class in the batch,
        prompt when absent) or ``prompt`` (default image).
    """

    name = "bridge_text_to_image"

    @torch.no_grad()
    def _targets(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None) -> torch.Tensor:
        """(N, D) unit target embeddings ``t_{c*}``."""
        backbone = task.backbone
        text = task.encode_text(batch)
        prompts = task.class_embeds
        bank = prompts
        if self.target_embedding == "image":
            image = backbone.encode_image(batch.images)
            sums = image.new_zeros(prompts.shape).index_add_(0, batch.labels, image)
            counts = torch.bincount(batch.labels, minlength=len(prompts))
            bank = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), prompts)
        choice = choose_wrong_class(text @ bank.T, batch.labels, self.target, generator)
        return bank[choice]

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        backbone = task.backbone
        targets = self._targets(task, batch, generator)
        tokens = batch.tokens

        def pull(embeds: torch.Tensor) -> torch.Tensor:
            return (backbone.encode_text_embeddings(embeds, tokens) * targets).sum()

        _, content = token_masks(backbone, tokens)
        embeds = pgd_token_ascent(
            pull, clean_token_embeddings(task, batch), content, self.eps, self.steps, self.step_size, self.random_start, generator
        )
        return AttackResult(PairBatch(batch.images, tokens, batch.labels, embeds), self.modality)
