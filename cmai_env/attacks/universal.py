"""``universal``: one image perturbation for every input (a universal adversarial perturbation).

Moosavi-Dezfooli et al. (2017) search one ``δ`` that fools a model on most images. We learn it by
iterated sign-gradient ascent on the batch-mean zero-shot CE of the image modality:

    δ ← clip_{[−ε_v, ε_v]}( δ + α · sign ∇_δ (1/|B|) Σ_{i∈B} CE(s·norm(f_v(clip₀¹(x_i + δ)))·Cᵀ, y_i) )

for ``steps`` passes over the fitting data in shuffled minibatches ``B`` of ``batch_size`` (the
shuffle comes from the generator). :meth:`Universal.perturb` then adds the same ``δ`` to unseen
images: ``x_adv = clip₀¹(x + δ)``, so ``‖x_adv − x‖∞ ≤ ε_v`` for every image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, frozen_model, register_attack
from cmai_env.attacks.image import uniform_noise


@register_attack
@dataclass
class Universal(Attack):
    """A universal ℓ∞ perturbation fitted once, then added to every image.

    Fit it explicitly with :meth:`fit` on a data split (e.g. the training pool) and apply it to
    unseen images with :meth:`perturb`. **If it is not fitted when** :meth:`perturb` **is called,
    it fits on that first batch** and keeps that ``δ`` for later calls; :attr:`fitted_on` tells how
    many pairs the current ``δ`` was learned on (None: not fitted yet). Changing a parameter with
    :meth:`with_params` gives an unfitted copy.

    :param eps: ℓ∞ budget ``ε_v`` (default 8/255).
    :param steps: passes over the fitting data (default 10).
    :param step_size: ``α`` per minibatch update (default 1/255).
    :param batch_size: fitting minibatch size (default 128).
    :param random_start: start from ``δ ~ U(−ε, ε)`` instead of 0 (default False).
    """

    name = "universal"

    #: number of pairs the current δ was fitted on (None until :meth:`fit` ran)
    fitted_on: int | None = field(default=None, init=False, compare=False)
    _delta: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def delta(self) -> torch.Tensor | None:
        """The fitted perturbation (1, 3, S, S), or None."""
        return self._delta

    def fit(self, task: ZeroShotTask, data: PairBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Learn ``δ`` on ``data`` (see the module docstring); returns it and sets :attr:`fitted_on`.

        The model's parameters are frozen and its mode restored, as for a call of the attack.
        """
        images, labels = data.images.detach(), data.labels
        n = len(labels)
        if n == 0:
            raise ValueError(f"{self.name}: cannot fit a universal perturbation on an empty batch")
        with frozen_model(task.backbone):
            shape = (1, *images.shape[1:])
            if self.random_start:
                delta = (uniform_noise(shape, images, generator) * 2.0 - 1.0) * self.eps
            else:
                delta = images.new_zeros(shape)
            for _ in range(int(self.steps)):
                order = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu").to(images.device)
                for start in range(0, n, int(self.batch_size)):
                    rows = order[start : start + int(self.batch_size)]
                    delta.requires_grad_(True)
                    logits = task.image_logits((images[rows] + delta).clamp(0.0, 1.0))
                    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels[rows]), delta)
                    with torch.no_grad():
                        delta = delta.detach().add_(grad.sign_(), alpha=self.step_size).clamp_(-self.eps, self.eps)
        self._delta = delta.detach()
        self.fitted_on = n
        return self._delta

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        """``x_adv = clip₀¹(x + δ)``; fits ``δ`` on this batch first if :meth:`fit` never ran."""
        if self._delta is None:
            self.fit(task, batch, generator)
        delta = self._delta.to(batch.images.device)
        images = (batch.images + delta).clamp(0.0, 1.0)
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)
