"""``transfer``: a black-box transfer attack, crafted on a surrogate model and applied to the target.

The attacker of the transfer tables in the VLP literature (SGA, Lu et al. 2023; Co-Attack,
Zhang et al. 2022; and I2V's image-to-video setting) never touches the defended model: it runs
a white-box attack (``inner``, any registered attack) against a *surrogate* CLIP model of its
own, and sends the resulting inputs to the target:

    x_adv = inner(surrogate, x, y)        then the target sees x_adv

**Threat model.** Black-box, no queries: no gradients, scores or detector of the defended model
reach the attacker, and the defender's updates (adapters, adversarial training) are invisible to
it. It controls exactly the inputs the inner attack controls (the image for ``pgd_linf``, the
caption for ``token_substitution``, both for ``co_attack``), under the inner attack's budget, and
knows the task (class names and prompt templates) — as in SGA's and Co-Attack's transfer tables.

**Surrogates.** ``surrogate`` is any name :func:`cmai_env.models.load_backbone` accepts (default
the embedded convolutional ``cmai-tiny-rn``, a different architecture than the default target
``cmai-tiny``, trained on the same data); ``surrogate_pretrained`` a checkpoint path or open_clip
tag (default: the embedded weights). The surrogate is loaded on first use, on the target's
device, and cached with its class-prompt embeddings.

**What crosses from surrogate to target** is only what a black-box attacker can send:

* pixels. When the two image sizes differ, images are resized (antialiased bilinear) for the
  surrogate and the perturbation ``δ = x_adv − x`` is resized back and added to the target's
  clean image, then clamped to [0, 1]. Each resized pixel is a weighted average of ``δ``, so an
  ℓ∞ budget still holds; ℓ2 budgets hold when the surrogate's resolution is at least the target's;
* text, as token ids. The surrogate must share the target's tokenizer vocabulary; ids are
  zero-padded or cut to its context length (cut positions must be padding). A continuous text
  perturbation of the surrogate's *input token embeddings* (``text_embedding_pgd``, ``co_attack``,
  ``bridge_text_to_image``) does not exist in the target's embedding space, so each perturbed
  position is replaced by the surrogate-vocabulary token nearest to its perturbed embedding
  (special tokens excluded): the attacker sends that text.

The inner attack's budget parameters ``eps``, ``steps``, ``step_size`` and ``k`` are forwarded
when set (``None`` keeps the inner attack's default); setting one the inner attack lacks is an
error. ``transfer`` declares no embedding-fidelity counterpart: every counterpart there is a
white-box ascent against the *current* adapters, which would credit the attacker with the
defended model's gradients, so the embedding fidelity refuses it (use ``fidelity: pixel``).

    attack = make_attack("transfer", inner="pgd_linf", surrogate="cmai-tiny-rn", eps=8 / 255)
    adv = attack(task, batch, torch.Generator().manual_seed(0)).batch   # task: the target's
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cmai_env.attacks.base import Attack, AttackResult, Modality, PairBatch, ThreatModel, ZeroShotTask, attack_class, register_attack
from cmai_env.attacks.specs import DEFAULT_INNER, FORWARDED, declaration, transfer_inner_params
from cmai_env.models import Backbone, load_backbone


class _FromInner:
    """A class attribute of :class:`Transfer` read from its inner attack's declaration.

    On an instance it is the inner attack's value; on the class (``cmai attack list``), that of
    the default inner attack (as ``transfer``'s own declaration states).
    """

    def __init__(self, read) -> None:
        self.read = read

    def __get__(self, obj: "Transfer | None", owner: type) -> Any:
        return self.read(declaration(DEFAULT_INNER if obj is None else obj.inner))


@register_attack
@dataclass
class Transfer(Attack):
    """Black-box transfer: ``inner`` crafted on ``surrogate``, the result sent to the target.

    :param inner: the registered attack run on the surrogate (default ``pgd_linf``).
    :param surrogate: the surrogate's architecture (default ``cmai-tiny-rn``).
    :param surrogate_pretrained: its weights: a checkpoint path or open_clip tag (default: embedded).
    :param eps: forwarded to the inner attack when set (its budget).
    :param steps: forwarded when set.
    :param step_size: forwarded when set.
    :param k: forwarded when set (tokens substituted by ``token_substitution``).
    """

    name = "transfer"
    modality: ClassVar[Modality] = _FromInner(lambda inner: inner.modality)  # type: ignore[assignment]
    threat_model: ClassVar[ThreatModel] = _FromInner(lambda inner: inner.threat_model.black_box())  # type: ignore[assignment]

    _inner_attack: Attack | None = field(default=None, init=False, repr=False, compare=False)
    _surrogate: Backbone | None = field(default=None, init=False, repr=False, compare=False)
    _tasks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()  # inner, surrogate, forwarded parameters and the inner attack's ranges
        params = transfer_inner_params({key: getattr(self, key) for key in self.parameters()})
        for key, value in params.items():
            setattr(self, key, value)
        self._inner_attack = attack_class(self.inner)(**params)

    # ------------------------------------------------------------------ the surrogate side
    @property
    def inner_attack(self) -> Attack:
        """The inner attack as configured (with the forwarded parameters)."""
        assert self._inner_attack is not None  # set by __post_init__
        return self._inner_attack

    def surrogate_backbone(self, device: torch.device | str = "cpu") -> Backbone:
        """The surrogate model (loaded once, on first use), frozen in eval mode."""
        if self._surrogate is None:
            self._surrogate = load_backbone(self.surrogate, self.surrogate_pretrained, device=device).eval()
        return self._surrogate.to(device)

    def surrogate_task(self, task: ZeroShotTask) -> ZeroShotTask:
        """The target task's zero-shot problem (classes, templates, λ) posed to the surrogate."""
        key = (tuple(task.class_names), tuple(task.templates), task.kl_weight)
        if key not in self._tasks:
            surrogate = self.surrogate_backbone(task.backbone.device)
            if surrogate.vocab_size != task.backbone.vocab_size or surrogate.eot_token_id != task.backbone.eot_token_id:
                raise ValueError(
                    f"transfer: surrogate {self.surrogate} has a tokenizer vocabulary of {surrogate.vocab_size} "
                    f"(end-of-text id {surrogate.eot_token_id}) but target {task.backbone.name} has {task.backbone.vocab_size} "
                    f"({task.backbone.eot_token_id}); a transferred caption must mean the same tokens to both"
                )
            self._tasks[key] = ZeroShotTask(surrogate, task.class_names, task.templates, task.kl_weight)
        return self._tasks[key]

    def to_surrogate(self, batch: PairBatch, surrogate: Backbone) -> PairBatch:
        """``batch`` as the surrogate reads it: resized images, token ids at its context length."""
        if batch.token_embeds is not None:
            raise ValueError("transfer: the clean batch already carries continuous token embeddings; pass token ids")
        return PairBatch(
            _resize(batch.images, surrogate.image_size),
            _fit_context(batch.tokens, surrogate.context_length, surrogate.name),
            batch.labels,
        )

    def fit(self, task: ZeroShotTask, data: PairBatch, generator: torch.Generator | None = None) -> None:
        """Fit the inner attack on the surrogate when it is fitted (``universal``); otherwise nothing to do."""
        inner = self.inner_attack
        if hasattr(inner, "fit"):
            surrogate_task = self.surrogate_task(task)
            inner.fit(surrogate_task, self.to_surrogate(data, surrogate_task.backbone), generator)

    # ------------------------------------------------------------------ the attack
    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        target = task.backbone
        surrogate_task = self.surrogate_task(task)
        surrogate = surrogate_task.backbone
        clean = self.to_surrogate(batch, surrogate)
        crafted = self.inner_attack(surrogate_task, clean, generator)
        adv = crafted.batch
        if surrogate.image_size == target.image_size:
            images = adv.images.detach()
        else:
            delta = _resize(adv.images.detach() - clean.images, target.image_size)
            images = (batch.images + delta).clamp_(0.0, 1.0)
        tokens = adv.tokens
        if adv.token_embeds is not None:
            tokens = nearest_tokens(surrogate, adv.tokens, adv.token_embeds.detach())
        tokens = _fit_context(tokens, target.context_length, target.name)
        return AttackResult(PairBatch(images, tokens, batch.labels), crafted.modality)


# ---------------------------------------------------------------------------- helpers
def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _fit_context(tokens: torch.Tensor, length: int, model: str) -> torch.Tensor:
    """Token ids zero-padded or cut to ``length`` (cut positions must be padding, id 0)."""
    have = tokens.shape[-1]
    if have == length:
        return tokens
    if have < length:
        return F.pad(tokens, (0, length - have))
    if bool((tokens[:, length:] != 0).any()):
        raise ValueError(f"transfer: a caption is longer than {model}'s context of {length} tokens")
    return tokens[:, :length]


@torch.no_grad()
def nearest_tokens(backbone: Backbone, tokens: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """Discretise a continuous text perturbation: each changed position becomes its nearest token.

    Positions whose input embedding differs from that of ``tokens`` take the id of the token
    embedding (of ``backbone``'s table, start/end-of-text excluded) nearest in L2 to the perturbed one.
    """
    table = backbone.clip.token_embedding.weight
    changed = (token_embeds - backbone.token_embeddings(tokens)).abs().amax(dim=-1) > 0
    if not bool(changed.any()):
        return tokens
    distances = torch.cdist(token_embeds[changed].float(), table.float())
    eot = backbone.eot_token_id
    distances[:, [eot - 1, eot]] = float("inf")  # open_clip's start- and end-of-text ids are adjacent
    out = tokens.clone()
    out[changed] = distances.argmin(dim=-1).to(tokens.dtype)
    return out


__all__ = ["FORWARDED", "Transfer", "nearest_tokens"]
