"""What every attack shares: the batch it perturbs, the task it attacks, and the registry.

Conventions (all attacks follow them; tests check them):

* images are float tensors in ``[0, 1]``; attacks clamp to that range;
* text is token ids plus, after a continuous text attack, perturbed input token embeddings
  (``PairBatch.token_embeds``); discrete attacks return new token ids;
* the task is zero-shot classification against class-prompt embeddings (:class:`ZeroShotTask`):
  the image modality is classified by ``s·e_v·Cᵀ``, the text modality by ``s·e_t·Cᵀ``;
* randomness comes from an explicit ``torch.Generator``;
* an attack never changes the model's parameters or its train/eval mode, and leaves no
  gradients behind on them.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, fields, replace
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F

from cmai_env.attacks.specs import (
    AttackDeclaration,
    EmbeddingCounterpart,
    EmbeddingFamily,
    Knowledge,
    Modality,
    ThreatModel,
    available_attacks,
    declaration,
)
from cmai_env.consistency import consistency_terms
from cmai_env.data import CaptionedDataset
from cmai_env.models import Backbone


@dataclass
class PairBatch:
    """A batch of matched image–text pairs.

    :param images: (N, 3, S, S) in [0, 1].
    :param tokens: (N, L) token ids.
    :param labels: (N,) class indices.
    :param token_embeds: (N, L, W) input token embeddings when the text was perturbed
        continuously; ``None`` means "embed ``tokens``".
    """

    images: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    token_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # cross_entropy needs int64 class indices; int32/int16 labels (numpy, hand-made) are cast.
        if self.labels.dtype != torch.long:
            if self.labels.is_floating_point() or self.labels.is_complex() or self.labels.dtype == torch.bool:
                raise ValueError(f"PairBatch labels must be integer class indices, got dtype {self.labels.dtype}")
            self.labels = self.labels.long()

    @classmethod
    def from_dataset(cls, backbone: Backbone, data: CaptionedDataset) -> "PairBatch":
        return cls(data.images.to(backbone.device), backbone.tokenize(data.captions), data.labels.to(backbone.device))

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(
            self.images.to(device),
            self.tokens.to(device),
            self.labels.to(device),
            None if self.token_embeds is None else self.token_embeds.to(device),
        )

    def subset(self, index: torch.Tensor | slice) -> "PairBatch":
        return PairBatch(
            self.images[index],
            self.tokens[index],
            self.labels[index],
            None if self.token_embeds is None else self.token_embeds[index],
        )

    def detach(self) -> "PairBatch":
        return PairBatch(
            self.images.detach(),
            self.tokens,
            self.labels,
            None if self.token_embeds is None else self.token_embeds.detach(),
        )

    @staticmethod
    def cat(batches: list["PairBatch"]) -> "PairBatch":
        """Concatenate batches; continuous text perturbations are kept (clean ones are embedded)."""
        if any(b.token_embeds is not None for b in batches):
            raise ValueError("PairBatch.cat of batches with token_embeds: embed them first with TaskOutputs")
        return PairBatch(
            torch.cat([b.images for b in batches]),
            torch.cat([b.tokens for b in batches]),
            torch.cat([b.labels for b in batches]),
        )


@dataclass(frozen=True)
class TaskOutputs:
    """Embeddings and class logits of both modalities for one batch."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_logits: torch.Tensor
    text_logits: torch.Tensor


class ZeroShotTask:
    """Zero-shot classification with a backbone and class-prompt embeddings.

    ``L_task`` per modality is cross-entropy of ``logit_scale · e · Cᵀ`` against the label.

    :param backbone: the (defended) backbone.
    :param class_names: class names of the dataset.
    :param templates: prompt templates (``"a photo of a {}."``).
    :param kl_weight: λ of ``L_consistency``.
    """

    def __init__(self, backbone: Backbone, class_names: list[str], templates: list[str], kl_weight: float = 1.0) -> None:
        self.backbone = backbone
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.kl_weight = kl_weight
        self.class_embeds = backbone.class_text_embeddings(self.class_names, self.templates)

    @classmethod
    def from_dataset(cls, backbone: Backbone, data: CaptionedDataset, kl_weight: float = 1.0) -> "ZeroShotTask":
        return cls(backbone, data.class_names, data.templates, kl_weight)

    def refresh(self) -> None:
        """Recompute class embeddings (after the text tower was updated)."""
        self.class_embeds = self.backbone.class_text_embeddings(self.class_names, self.templates)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode_text(self, batch: PairBatch) -> torch.Tensor:
        if batch.token_embeds is not None:
            return self.backbone.encode_text_embeddings(batch.token_embeds, batch.tokens)
        return self.backbone.encode_text(batch.tokens)

    def image_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.zero_shot_logits(self.backbone.encode_image(images), self.class_embeds)

    def forward(self, batch: PairBatch) -> TaskOutputs:
        image_embeds = self.backbone.encode_image(batch.images)
        text_embeds = self.encode_text(batch)
        return TaskOutputs(
            image_embeds,
            text_embeds,
            self.backbone.zero_shot_logits(image_embeds, self.class_embeds),
            self.backbone.zero_shot_logits(text_embeds, self.class_embeds),
        )

    def consistency(self, out: TaskOutputs) -> torch.Tensor:
        """Per-sample ``L_consistency`` of a forward pass."""
        return consistency_terms(
            [out.image_embeds, out.text_embeds], [out.image_logits, out.text_logits], self.kl_weight
        ).loss

    @staticmethod
    def correct(out: TaskOutputs, labels: torch.Tensor, modality: Modality) -> torch.Tensor:
        """Bool (N,): the prediction of ``modality`` is right (``both``: both modalities are)."""
        image_ok = out.image_logits.argmax(-1) == labels
        text_ok = out.text_logits.argmax(-1) == labels
        return {"image": image_ok, "text": text_ok, "both": image_ok & text_ok}[modality]


@dataclass(frozen=True)
class AttackResult:
    """The perturbed batch and which modality the attack perturbed."""

    batch: PairBatch
    modality: Modality


@dataclass
class Attack:
    """Base class: subclasses are dataclasses that implement :meth:`perturb` for one declared attack.

    What an attack *is* — its modality, description, threat model, non-adaptive counterpart,
    embedding-fidelity counterpart and its parameters with their defaults and allowed ranges — is
    declared once, without torch, in :mod:`cmai_env.attacks.specs` (``cmai attack list`` and
    scenario validation read only that). A subclass names its declaration and implements the
    attack::

        @register_attack
        @dataclass
        class PGDLinf(Attack):
            name = "pgd_linf"          # → DECLARATIONS["pgd_linf"]
            def perturb(self, task, batch, generator=None): ...

    Class creation (:meth:`__init_subclass__`, before ``@dataclass`` runs) copies the declared
    ``modality``, ``description``, ``threat_model``, ``counterpart`` and ``embedding`` onto the
    class and adds one dataclass field per declared parameter, with its declared default, ahead
    of the class's own (``init=False``) state fields; ``__post_init__`` checks the values against
    the declared ranges. A class body that restates a parameter, or sets one of those attributes
    to something else than the declaration, is an error at import time.

    ``modality`` says which prediction is scored (and perturbed); ``threat_model.controls`` may
    be wider (an attacker who rewrites the caption and perturbs the image to flip the image's
    prediction). ``embedding = None`` makes the embedding fidelity refuse scenarios that use the
    attack with a clear error; the pixel fidelity runs every attack.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[Modality] = "image"
    description: ClassVar[str] = ""
    embedding: ClassVar[EmbeddingCounterpart | None] = None
    threat_model: ClassVar[ThreatModel] = ThreatModel(("image",))
    #: the registered non-adaptive attack this one adapts (detector-aware attacks), else None
    counterpart: ClassVar[str | None] = None
    #: this attack's declaration (:mod:`cmai_env.attacks.specs`); None on abstract bases
    declaration: ClassVar[AttackDeclaration | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return  # an abstract base, or a view of a declared class (flamingo_task.GenerativeAttack)
        declared = declaration(name)
        for attr in ("modality", "description", "threat_model", "counterpart", "embedding"):
            value = getattr(declared, attr)
            if attr not in cls.__dict__:
                setattr(cls, attr, value)
            elif getattr(cls, attr) != value:  # e.g. transfer's inner-dependent descriptors agree at class level
                raise TypeError(f"{cls.__name__}.{attr} = {getattr(cls, attr)!r} differs from the declaration of {name!r} ({value!r})")
        own = dict(cls.__dict__.get("__annotations__", {}))
        restated = [p.name for p in declared.params if p.name in own]
        if restated:
            raise TypeError(f"{cls.__name__}: parameter(s) {restated} of {name!r} are declared in cmai_env/attacks/specs.py; do not restate them")
        cls.__annotations__ = {**{p.name: p.annotation for p in declared.params}, **own}
        for p in declared.params:
            setattr(cls, p.name, p.default)
        cls.declaration = declared

    def __post_init__(self) -> None:
        if self.declaration is not None:
            self.declaration.check({key: getattr(self, key) for key in self.parameters()})

    def counterpart_params(self) -> dict[str, object]:
        """Parameters of :attr:`counterpart` at this attack's budget (shared parameter names)."""
        if self.counterpart is None:
            return {}
        allowed = attack_class(self.counterpart).parameters()
        return {key: getattr(self, key) for key in self.parameters() if key in allowed}

    def perturb(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        raise NotImplementedError

    def __call__(self, task: ZeroShotTask, batch: PairBatch, generator: torch.Generator | None = None) -> AttackResult:
        """Run :meth:`perturb` with the model's parameters frozen and its mode restored afterwards."""
        with frozen_model(task.backbone):
            return self.perturb(task, batch, generator)

    @classmethod
    def parameters(cls) -> dict[str, object]:
        """Parameter name → default value (what ``cmai attack list`` prints).

        Only constructor fields count: state a subclass keeps (``init=False`` fields, e.g. a fitted
        universal perturbation) is not a parameter.
        """
        return {f.name: f.default for f in fields(cls) if f.init}

    def with_params(self, **params) -> "Attack":
        return replace(self, **params)


@contextlib.contextmanager
def frozen_model(backbone: Backbone) -> Iterator[None]:
    """Freeze parameters (no grads accumulate on them), restore ``requires_grad`` and train/eval mode after."""
    was_training = backbone.training
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        backbone.train(was_training)


# ---------------------------------------------------------------------------- registry
# Names come from the declarations (available_attacks, torch-free); a class is imported on first
# use from its declared entry point and registers itself there.
_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under ``cls.name`` (which must be declared).

    :raises ValueError: no name, a name registered twice, or a class other than the declared entry point.
    """
    if not cls.name or cls.declaration is None:
        raise ValueError(f"{cls.__name__} has no name (declare it in cmai_env/attacks/specs.py)")
    if cls.name in _REGISTRY:
        raise ValueError(f"attack {cls.name!r} registered twice")
    if f"{cls.__module__}:{cls.__qualname__}" != cls.declaration.entry_point:
        raise ValueError(f"attack {cls.name!r} is declared at {cls.declaration.entry_point}, not {cls.__module__}:{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def attack_class(name: str) -> type[Attack]:
    """The class of a registered attack (its module is imported on first use)."""
    declared = declaration(name)
    if name not in _REGISTRY:
        importlib.import_module(declared.entry_point.partition(":")[0])
    return _REGISTRY[name]


def make_attack(name: str, **params) -> Attack:
    """Build a registered attack; unknown parameters fail with the allowed ones listed."""
    cls = attack_class(name)
    allowed = cls.parameters()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**params)


def task_loss(out: TaskOutputs, labels: torch.Tensor, modality: Modality, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the perturbed modality's zero-shot logits (``both``: the sum of the two)."""
    image = lambda: F.cross_entropy(out.image_logits, labels, reduction=reduction)  # noqa: E731
    text = lambda: F.cross_entropy(out.text_logits, labels, reduction=reduction)  # noqa: E731
    losses: dict[str, Callable[[], torch.Tensor]] = {"image": image, "text": text, "both": lambda: image() + text()}
    return losses[modality]()


__all__ = [
    "Attack",
    "AttackResult",
    "EmbeddingCounterpart",
    "EmbeddingFamily",
    "Knowledge",
    "Modality",
    "ThreatModel",
    "PairBatch",
    "TaskOutputs",
    "ZeroShotTask",
    "attack_class",
    "attack_success_rate",
    "available_attacks",
    "frozen_model",
    "make_attack",
    "register_attack",
    "task_loss",
]


def attack_success_rate(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """ASR as the VLP papers define it: the share of originally correct predictions the attack flips.

    0.0 when nothing was correct to begin with (there was nothing to flip).
    """
    n_correct = int(clean_correct.sum())
    if n_correct == 0:
        return 0.0
    return int((clean_correct & ~adv_correct).sum()) / n_correct
