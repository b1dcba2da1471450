"""AutoAttack-grade robustness evaluation (Croce & Hein, ICML 2020): ``apgd_ce``, ``apgd_t``,
``fab_t``, ``square`` and the chain ``autoattack``.

PGD-10 with a fixed step size overstates robustness: on the adversarially trained cmai-tiny it
reported ASR 0.480 where APGD-T found 0.602 (issue 10). The field's standard is AutoAttack's
*standard* ℓ∞ version, a chain of four parameter-free attacks at their published counts:

=============  ==========================================================  ====================
component      what it does                                                standard budget
=============  ==========================================================  ====================
``apgd_ce``    APGD (adaptive step size, momentum, restarts from the best   100 iterations
               point) on the cross-entropy
``apgd_t``     targeted APGD on the targeted DLR loss, once per target:     9 × 100 iterations
               the 9 classes with the highest clean logits after ``y``
``fab_t``      targeted FAB (minimal-distortion boundary attack), the same  9 × 100 iterations
               9 targets; a success counts only inside ``ε``
``square``     Square Attack: score-based random search on the margin,      5,000 queries
               *black-box* (no gradients), a check for gradient masking
=============  ==========================================================  ====================

The chain is **worst case per example**: each component attacks only the examples still
classified correctly after the ones before it, and an example's adversarial image is the first
one (inside the budget) that flips it. So its ASR is the share of originally correct examples
that *any* component flips.

We compose torchattacks' ``APGD``, ``APGDT``, ``FAB`` and ``Square`` (a well-kept reference
implementation) instead of its ``AutoAttack`` class, because that class runs APGD at 10 steps and
derives the targets from ``n_classes=10``. Here the number of target classes is
``min(n_target_classes, C − 1)`` for a task with ``C`` classes (cmai-tiny/shapes: C = 30).

torchattacks reseeds torch's *global* generator; every call runs inside
:func:`torch.random.fork_rng` with a seed drawn from the attack's explicit generator, so the
caller's global random state is untouched and a seeded generator gives the same result.

Threat model: the attacker controls the image only (ℓ∞ or ℓ2 ball of radius ``eps`` around it,
within ``[0, 1]``); the caption is trusted. All components are white-box except ``square``,
which only queries the class scores. None of them knows the consistency detector (see
:mod:`cmai_env.attacks.adaptive` for detector-aware attacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from cmai_env.attacks.base import Attack, AttackResult, PairBatch, ZeroShotTask, register_attack
from cmai_env.attacks.specs import COMPONENTS, autoattack_chain
from cmai_env.models import ZeroShotClassifier


TorchattacksFactory = Callable[[torch.nn.Module, int, int], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - torchattacks is a runtime dependency
        raise ImportError("the AutoAttack-grade attacks need torchattacks (pip install 'torchattacks>=3.5')") from exc
    return torchattacks


def _distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def _seed(generator: torch.Generator | None) -> int:
    """A seed for torchattacks, drawn from the explicit generator (0 without one)."""
    if generator is None:
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def run_chain(
    task: ZeroShotTask,
    batch: PairBatch,
    components: list[tuple[str, TorchattacksFactory]],
    eps: float,
    norm: str,
    generator: torch.Generator | None,
    model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Worst case over ``components`` per example (see the module docstring).

    :param components: (name, factory) pairs; ``factory(model, n_classes, seed)`` builds a
        torchattacks attack called as ``attack(images, labels)``.
    :param model: images → (N, C) class scores under attack (default: the task's CLIP zero-shot
        head; a generative task passes its language model's class distribution).
    :return: the adversarial images and, per component, how many examples it flipped first.
    """
    model = ZeroShotClassifier(task.backbone, task.class_embeds) if model is None else model
    images, labels = batch.images.detach(), batch.labels
    adversarial = images.clone()
    with torch.no_grad():
        robust = model(images).argmax(-1) == labels
    broken_by = {name: 0 for name, _ in components}
    devices = [images.device] if images.device.type == "cuda" else []
    for name, factory in components:
        index = robust.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        seed = _seed(generator)
        with torch.random.fork_rng(devices=devices):
            attack = factory(model, task.num_classes, seed)
            candidate = attack(images[index], labels[index]).detach()
        with torch.no_grad():
            flipped = model(candidate).argmax(-1) != labels[index]
        # A success counts only inside the budget (FAB reports points outside it too).
        flipped &= _distance(candidate - images[index], norm) <= eps * (1 + 1e-5) + 1e-7
        adversarial[index[flipped]] = candidate[flipped].clamp_(0.0, 1.0)
        robust[index[flipped]] = False
        broken_by[name] = int(flipped.sum())
    return adversarial, broken_by


def _apgd_ce(eps: float, norm: str, steps: int, n_restarts: int) -> TorchattacksFactory:
    return lambda model, n_classes, seed: _torchattacks().APGD(
        model, norm=norm, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, loss="ce"
    )


def _apgd_t(eps: float, norm: str, steps: int, n_restarts: int, n_target_classes: int) -> TorchattacksFactory:
    def build(model, n_classes: int, seed: int):
        attack = _torchattacks().APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, n_classes=n_classes)
        attack.n_target_classes = min(n_target_classes, n_classes - 1)
        return attack

    return build


def _fab_t(eps: float, norm: str, steps: int, n_restarts: int, n_target_classes: int) -> TorchattacksFactory:
    def build(model, n_classes: int, seed: int):
        attack = _torchattacks().FAB(
            model, norm=norm, eps=eps, steps=steps, n_restarts=n_restarts, seed=seed, multi_targeted=True, n_classes=n_classes
        )
        attack.n_target_classes = min(n_target_classes, n_classes - 1)
        return attack

    return build


def _square(eps: float, norm: str, n_queries: int, n_restarts: int, p_init: float) -> TorchattacksFactory:
    return lambda model, n_classes, seed: _torchattacks().Square(
        model, norm=norm, eps=eps, n_queries=n_queries, n_restarts=n_restarts, p_init=p_init, seed=seed, loss="margin"
    )


@dataclass
class _ChainAttack(Attack):
    """Shared ``perturb`` of the torchattacks-backed attacks: a worst-case chain of components.

    :attr:`broken_by` counts, over all calls since construction, how many examples each
    component flipped first (state, not a parameter).
    """

    broken_by: dict[str, int] = field(default_factory=dict, init=False, compare=False, repr=False)

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        raise NotImplementedError

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        images, broken_by = run_chain(task, batch, self._components(), self.eps, self.norm, generator)
        for name, count in broken_by.items():
            self.broken_by[name] = self.broken_by.get(name, 0) + count
        return AttackResult(PairBatch(images, batch.tokens, batch.labels, batch.token_embeds), self.modality)


@register_attack
@dataclass
class APGDCE(_ChainAttack):
    """APGD on the cross-entropy (AutoAttack's first component), via torchattacks' ``APGD``.

    :param eps: budget ``ε_v`` (default 8/255, ℓ∞).
    :param steps: iterations (default 100, AutoAttack's standard).
    :param n_restarts: restarts (default 1).
    :param norm: ``Linf`` (default) or ``L2``.
    """

    name = "apgd_ce"

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        return [("apgd_ce", _apgd_ce(self.eps, self.norm, self.steps, self.n_restarts))]


@dataclass
class _TargetedChain(_ChainAttack):
    """Fields shared by the two targeted components (APGD-T and FAB-T).

    :param eps: budget ``ε_v`` (default 8/255, ℓ∞).
    :param steps: iterations per target class (default 100).
    :param n_target_classes: targets: the classes with the highest clean logits after the label
        (default 9, capped at C − 1).
    :param n_restarts: restarts per target (default 1).
    :param norm: ``Linf`` (default) or ``L2``.
    """


@register_attack
@dataclass
class APGDT(_TargetedChain):
    """Targeted APGD on the targeted DLR loss, once per target class (AutoAttack's second component).

    Parameters as :class:`_TargetedChain`.
    """

    name = "apgd_t"

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        return [("apgd_t", _apgd_t(self.eps, self.norm, self.steps, self.n_restarts, self.n_target_classes))]


@register_attack
@dataclass
class FABT(_TargetedChain):
    """Targeted FAB (Croce & Hein 2020), a minimal-distortion attack; success counts inside ``eps`` only.

    Parameters as :class:`_TargetedChain`.
    """

    name = "fab_t"

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        return [("fab_t", _fab_t(self.eps, self.norm, self.steps, self.n_restarts, self.n_target_classes))]


@register_attack
@dataclass
class Square(_ChainAttack):
    """Square Attack (Andriushchenko et al. 2020): black-box random search on the margin loss.

    It only queries class scores, so it is blind to gradient masking: a white-box attack that does
    worse than it is a sign of masked gradients.

    :param eps: budget ``ε_v`` (default 8/255, ℓ∞).
    :param n_queries: queries per example (default 5,000, AutoAttack's standard).
    :param p_init: initial share of pixels per square (default 0.8).
    :param n_restarts: restarts (default 1).
    :param norm: ``Linf`` (default) or ``L2``.
    """

    name = "square"

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        return [("square", _square(self.eps, self.norm, self.n_queries, self.n_restarts, self.p_init))]


@register_attack
@dataclass
class AutoAttack(_ChainAttack):
    """AutoAttack's standard chain APGD-CE → APGD-T → FAB-T → Square, worst case per example.

    See the module docstring. ``components`` picks a sub-chain (comma-separated, in the standard
    order), e.g. ``apgd_ce,apgd_t`` for a cheaper evaluation; the full chain is the default.

    :param eps: budget ``ε_v`` (default 8/255, ℓ∞).
    :param steps: APGD-CE, APGD-T (per target) and FAB-T (per target) iterations (default 100).
    :param n_target_classes: APGD-T and FAB-T targets (default 9, capped at C − 1).
    :param n_queries: Square's queries (default 5,000).
    :param components: the components to run (default all four).
    :param norm: ``Linf`` (default) or ``L2``.
    """

    name = "autoattack"

    @property
    def chain(self) -> list[str]:
        """The component names, in the standard order."""
        return autoattack_chain(self.components)

    def _components(self) -> list[tuple[str, TorchattacksFactory]]:
        build = {
            "apgd_ce": lambda: _apgd_ce(self.eps, self.norm, self.steps, 1),
            "apgd_t": lambda: _apgd_t(self.eps, self.norm, self.steps, 1, self.n_target_classes),
            "fab_t": lambda: _fab_t(self.eps, self.norm, self.steps, 1, self.n_target_classes),
            "square": lambda: _square(self.eps, self.norm, self.n_queries, 1, 0.8),
        }
        return [(name, build[name]()) for name in self.chain]


__all__ = ["APGDCE", "APGDT", "AutoAttack", "COMPONENTS", "FABT", "Square", "run_chain"]
