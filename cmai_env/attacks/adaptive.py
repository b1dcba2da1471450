"""Detector-aware (adaptive) attacks: ``aware_pgd_linf`` and ``aware_caption_rewrite``.

A detector is only evaluated honestly against an attacker who knows it (Carlini & Wagner 2017,
"Adversarial examples are not easily detected"; Tramèr et al. 2020, "On adaptive attacks to
adversarial example defenses"). The consistency detector flags a pair when
``L_consistency(x, t) > τ`` (:mod:`cmai_env.consistency`); what the attacker wins is a flipped
*and* unflagged pair. Two threat models decide whether that is possible:

**Image only, caption trusted** (``aware_pgd_linf``, counterpart ``pgd_linf``). PGD-ℓ∞ on the
image maximising, per pair,

    J(x) = min(max_{j≠y} z_j(x) − z_y(x), κ) − λ · L_consistency(x, t)

(``z = s·norm(f_v(x))·Cᵀ`` the image's zero-shot logits). The capped margin (Carlini & Wagner's
``f₆`` with confidence ``κ``) stops rewarding a flip once it is ``κ`` logits deep, so the rest of
the gradient goes into agreeing with the caption; plain CE keeps growing and fights the
consistency term. The attack keeps, per pair, the iterate that is misclassified with the
lowest ``L_consistency`` (else the last one). While the caption names the true class, any
misclassified image disagrees with it: issue 10 measured a lower bound of 1.66 on
``L_consistency`` for misclassified test pairs against ``τ = 0.366``, so this attack is *expected*
to fail against the detector; it is the evidence that the image-only threat model is covered.

**Image and caption** (``aware_caption_rewrite``, counterpart ``bridge_image_to_text``). The
attacker replaces the caption by a caption of a wrong target class ``c*`` (the task's first
prompt template filled with ``c*``'s name: ``t* = template.format(name(c*))``) and runs
targeted PGD-ℓ∞ on the image to minimise

    L_consistency(x, t*) + μ · CE(z(x), c*)

so image and caption agree on ``c*``. Issue 10 measured this evading the detector (TPR 0.066,
AUROC 0.159, 93 % of attacks undetected). The scored prediction is the image's (``modality =
"image"``): a success is an image no longer classified as its true class.

Both are white-box: they use gradients of the defended model and of ``L_consistency``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack
from cmai_env.attacks.bridge import choose_wrong_class
from cmai_env.attacks.image import uniform_noise
from cmai_env.consistency import consistency_terms

#: per-sample objective to maximise, and per-sample (success, L_consistency) of the same forward pass
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def best_iterate_pgd_linf(
    objective: Objective,
    images: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """PGD-ℓ∞ ascent on ``Σ objective`` that returns, per sample, the best iterate seen.

    ``objective(x)`` gives per-sample ``(J, success, L_consistency)``. The best iterate is a
    successful one with the lowest ``L_consistency``; a sample that never succeeds keeps its last
    iterate. Hand-written rather than :func:`cmai_env.attacks.image.pgd_linf_ascent` because the
    adaptive attacks need this per-sample choice, which no library attack offers for a custom
    detector loss.
    """
    x0 = images.detach()
    lo = (x0 - eps).clamp_(min=0.0)
    hi = (x0 + eps).clamp_(max=1.0)
    x = x0.clone()
    if random_start and eps > 0:
        x = torch.minimum(torch.maximum(x0 + (uniform_noise(x0.shape, x0, generator) * 2.0 - 1.0) * eps, lo), hi)
    best = x0.clone()
    best_score = torch.full((len(x0),), float("inf"), device=x0.device)
    for step in range(steps + 1):
        x.requires_grad_(step < steps)
        with torch.set_grad_enabled(step < steps):
            value, success, consistency = objective(x)
        with torch.no_grad():
            score = torch.where(success, consistency.detach(), torch.full_like(best_score, float("inf")))
            better = score < best_score
            best[better] = x.detach()[better]
            best_score = torch.minimum(best_score, score)
            never = torch.isinf(best_score)
            best[never] = x.detach()[never]  # not yet successful: the latest iterate
        if step == steps:
            break
        (grad,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            x = x.detach().add_(grad.sign_(), alpha=step_size)
            x = torch.minimum(torch.maximum(x, lo), hi)
    return best.detach()


@register_attack
@dataclass
class AwarePGDLinf(Attack):
    """Image-only PGD-ℓ∞ against classifier *and* detector: ``max min(margin, κ) − λ·L_consistency``.

    See the module docstring. Same budget as ``pgd_linf`` by default.

    :param eps: ℓ∞ budget ``ε_v`` (default 8/255).
    :param steps: PGD steps (default 10, as ``pgd_linf``).
    :param step_size: ``α`` (default 2/255).
    :param lam: ``λ``, the weight of ``L_consistency`` (default 1).
    :param kappa: ``κ``, the margin (in logits) beyond which a flip earns nothing more (default 5).
    :param random_start: start from ``x + U(−ε, ε)`` (default True).
    """

    name = "aware_pgd_linf"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        backbone, labels = task.backbone, batch.labels
        with torch.no_grad():
            text = task.encode_text(batch)
            text_logits = backbone.zero_shot_logits(text, task.class_embeds)
        rows = torch.arange(len(labels), device=labels.device)

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            image = backbone.encode_image(x)
            logits = backbone.zero_shot_logits(image, task.class_embeds)
            other = logits.clone()
            other[rows, labels] = -float("inf")
            margin = other.amax(-1) - logits[rows, labels]
            consistency = consistency_terms([image, text], [logits, text_logits], task.kl_weight).loss
            return margin.clamp(max=self.kappa) - self.lam * consistency, margin > 0, consistency

        images = best_iterate_pgd_linf(objective, batch.images, self.eps, self.steps, self.step_size, self.random_start, generator)
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)


@register_attack
@dataclass
class AwareCaptionRewrite(Attack):
    """The attacker rewrites the caption to a wrong class ``c*`` and makes the image agree with it.

    Targeted PGD-ℓ∞ minimising ``L_consistency(x, t*) + μ·CE(z(x), c*)``; see the module docstring.

    :param eps: ℓ∞ budget ``ε_v`` (default 8/255).
    :param steps: PGD steps (default 10).
    :param step_size: ``α`` (default 2/255).
    :param ce_weight: ``μ``, weight of the targeted image CE (default 0: consistency only, as issue 10).
    :param target: ``nearest`` wrong class (highest clean image–prompt similarity) or ``random`` (default nearest).
    :param random_start: start from ``x + U(−ε, ε)`` (default True).
    """

    name = "aware_caption_rewrite"

    def rewrite(self, task: ZeroShotTask, targets: torch.Tensor) -> torch.Tensor:
        """Token ids of the rewritten captions: the task's first template filled with each target class."""
        template = task.templates[0]
        return task.backbone.tokenize([template.format(task.class_names[int(c)]) for c in targets.tolist()])

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        backbone, labels = task.backbone, batch.labels
        with torch.no_grad():
            similarity = backbone.encode_image(batch.images) @ task.class_embeds.T
        targets = choose_wrong_class(similarity, labels, self.target, generator)
        tokens = self.rewrite(task, targets).to(batch.tokens.device)
        with torch.no_grad():
            text = backbone.encode_text(tokens)
            text_logits = backbone.zero_shot_logits(text, task.class_embeds)

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            image = backbone.encode_image(x)
            logits = backbone.zero_shot_logits(image, task.class_embeds)
            consistency = consistency_terms([image, text], [logits, text_logits], task.kl_weight).loss
            loss = consistency
            if self.ce_weight > 0:
                loss = loss + self.ce_weight * torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            return -loss, logits.argmax(-1) != labels, consistency

        images = best_iterate_pgd_linf(objective, batch.images, self.eps, self.steps, self.step_size, self.random_start, generator)
        return AttackResult(PairBatch(images, tokens, labels, None), self.modality)


__all__ = ["AwareCaptionRewrite", "AwarePGDLinf", "best_iterate_pgd_linf"]
