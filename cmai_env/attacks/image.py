"""Untargeted pixel-space attacks on the image modality: ``fgsm``, ``pgd_linf``, ``pgd_l2``.

All three maximise the image modality's zero-shot cross-entropy

    L(x) = CE(s · norm(f_v(x)) · Cᵀ, y)

(``task_loss(out, y, "image")``; ``s`` the logit scale, ``C`` the class-prompt embeddings) under
an explicit budget on ``δ = x_adv − x`` and keep ``x_adv`` in ``[0, 1]``:

* FGSM (Goodfellow et al., 2015): ``x_adv = clip₀¹(x + ε_v · sign ∇ₓL)``;
* PGD-ℓ∞ (Madry et al., 2018): ``x ← Π_{‖δ‖∞≤ε_v, [0,1]}(x + α · sign ∇ₓL)`` for ``steps`` steps,
  from a uniform random start in the ε-ball when ``random_start``;
* PGD-ℓ2: ``x ← Π_{‖δ‖₂≤ε_v, [0,1]}(x + α · ∇ₓL / ‖∇ₓL‖₂)`` per sample.

The inner loops do one forward and one backward per step, with the projections done in place
under ``torch.no_grad``; :func:`pgd_linf_ascent` and :func:`pgd_l2_ascent` are the primitives the
bridge, joint and universal attacks reuse with their own losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack

LossFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- randomness
def uniform_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``U[0, 1)`` noise shaped ``shape`` on ``like``'s device/dtype, drawn from ``generator``.

    The draw happens on the generator's own device (a CPU generator drives CUDA attacks too) so
    that a seeded generator gives the same perturbation everywhere.
    """
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def normal_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``N(0, 1)`` noise, drawn like :func:`uniform_noise`."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


# ---------------------------------------------------------------------------- primitives
def pgd_linf_ascent(
    loss_fn: LossFn,
    images: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn(x_adv)`` by PGD-ℓ∞ in the box ``‖x_adv − x‖∞ ≤ ε, x_adv ∈ [0, 1]``.

    ``x ← min(max(x + α·sign(∇ₓ loss), lo), hi)`` with ``lo = max(x₀ − ε, 0)``, ``hi = min(x₀ + ε, 1)``
    (projection and range clamp in one pass). ``loss_fn`` should *sum* per-sample losses: the
    sign step makes the scale irrelevant and a sum keeps samples independent.

    :return: the last iterate, detached.
    """
    x0 = images.detach()
    lo = (x0 - eps).clamp_(min=0.0)
    hi = (x0 + eps).clamp_(max=1.0)
    if random_start and eps > 0:
        x = x0 + (uniform_noise(x0.shape, x0, generator) * 2.0 - 1.0) * eps
        x = torch.minimum(torch.maximum(x, lo, out=x), hi, out=x)
    else:
        x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
        with torch.no_grad():
            x = x.detach().add_(grad.sign_(), alpha=step_size)
            torch.maximum(x, lo, out=x)
            torch.minimum(x, hi, out=x)
    return x.detach()


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each sample's ``δ`` into the ball ``‖δ‖₂ ≤ ε`` (in place)."""
    return delta.mul_((eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp_(max=1.0))


def pgd_l2_ascent(
    loss_fn: LossFn,
    images: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn(x_adv)`` by PGD-ℓ2: ``x ← Π(x + α·g/‖g‖₂)`` per sample.

    ``Π`` projects ``δ`` onto ``‖δ‖₂ ≤ ε`` and then clamps ``x₀ + δ`` to ``[0, 1]`` (clamping only
    shrinks ``|δ|`` coordinate-wise, so the ℓ2 budget still holds). The random start is a
    uniformly random direction with radius ``U(0, 1)·ε``.
    """
    x0 = images.detach()
    if random_start and eps > 0:
        delta = normal_noise(x0.shape, x0, generator)
        radius = uniform_noise((x0.shape[0],), x0, generator).view(-1, *([1] * (x0.ndim - 1))) * eps
        delta.mul_(radius / _per_sample_norm(delta).clamp_min(1e-12))
        x = (x0 + delta).clamp_(0.0, 1.0)
    else:
        x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
        with torch.no_grad():
            grad.div_(_per_sample_norm(grad).clamp_min(1e-12))
            delta = x.detach().add_(grad, alpha=step_size).sub_(x0)
            x = x0 + project_l2(delta, eps)
            x.clamp_(0.0, 1.0)
    return x.detach()


def image_ce_loss(task: ZeroShotTask, labels: torch.Tensor) -> LossFn:
    """``x ↦ Σᵢ CE(s·norm(f_v(xᵢ))·Cᵀ, yᵢ)``: the image modality's task loss, summed."""
    return lambda x: F.cross_entropy(task.image_logits(x), labels, reduction="sum")


# ---------------------------------------------------------------------------- attacks
@register_attack
@dataclass
class FGSM(Attack):
    """One signed-gradient step of size ``ε_v``: ``x_adv = clip₀¹(x + ε_v·sign ∇ₓ CE_image)``.

    :param eps: ℓ∞ budget ``ε_v`` in pixel units of [0, 1] (default 8/255).
    """

    name = "fgsm"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        images = pgd_linf_ascent(image_ce_loss(task, batch.labels), batch.images, self.eps, 1, self.eps, False)
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)


@register_attack
@dataclass
class PGDLinf(Attack):
    """Untargeted PGD-ℓ∞ on the image's zero-shot CE (Madry et al.).

    ``x ← Π_{‖δ‖∞≤ε_v, [0,1]}(x + α·sign ∇ₓ CE_image)``, ``steps`` times.

    :param eps: ℓ∞ budget ``ε_v`` (default 8/255).
    :param steps: number of steps (default 10).
    :param step_size: ``α`` (default 2/255).
    :param random_start: start from ``x + U(−ε, ε)`` (default True).
    """

    name = "pgd_linf"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        images = pgd_linf_ascent(
            image_ce_loss(task, batch.labels), batch.images, self.eps, self.steps, self.step_size, self.random_start, generator
        )
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)


@register_attack
@dataclass
class PGDL2(Attack):
    """Untargeted PGD-ℓ2 on the image's zero-shot CE.

    ``x ← Π_{‖δ‖₂≤ε_v, [0,1]}(x + α·g/‖g‖₂)``, ``g = ∇ₓ CE_image``, per sample.

    :param eps: ℓ2 budget per image over all 3·S·S pixels (default 0.5).
    :param steps: number of steps (default 10).
    :param step_size: ``α`` (default 0.1).
    :param random_start: start from a random point of the ℓ2 ball (default True).
    """

    name = "pgd_l2"

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        images = pgd_l2_ascent(
            image_ce_loss(task, batch.labels), batch.images, self.eps, self.steps, self.step_size, self.random_start, generator
        )
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)
