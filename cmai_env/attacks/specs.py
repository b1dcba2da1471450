"""What every registered attack *is*, without torch: name, modality, threat model, parameters.

This module is the one definition of each attack's facts that do not need a model to state:

* its ``name``, the ``modality`` whose prediction it flips, a one-line ``description``;
* its :class:`ThreatModel` (modalities the attacker controls, white- or black-box, detector-aware);
* its constructor parameters (:class:`ParamSpec`: default, type, allowed range or choices) and the
  cross-parameter checks (AutoAttack's ``components``, ``transfer``'s ``inner``/``surrogate``);
* its non-adaptive ``counterpart`` (detector-aware attacks) and its :class:`EmbeddingCounterpart`
  in the ``embedding`` fidelity (``None``: that fidelity refuses it);
* where its implementation lives (``entry_point``, ``"module:Class"`` as in Gymnasium's registry).

The attack classes (:mod:`cmai_env.attacks.image`, …) take all of these from here: their dataclass
fields and defaults are generated from the declared parameters (:meth:`Attack.__init_subclass__
<cmai_env.attacks.base.Attack>`), and their ``__post_init__`` runs :meth:`AttackDeclaration.check`.
Scenario validation and ``cmai attack list`` read only this module, so they never import torch,
open_clip or the attack code (``benchmarks/listing_speed.py`` times them;
``tests/test_listing_speed.py`` checks that nothing heavy is imported).

    from cmai_env.attacks.specs import declaration
    pgd = declaration("pgd_linf")
    pgd.defaults()                      # {'eps': 0.0313…, 'steps': 10, 'step_size': 0.0078…, 'random_start': True}
    pgd.check({**pgd.defaults(), "steps": 0})   # ValueError: pgd_linf: steps must be a positive integer, got 0

Adding an attack: declare it here (one :class:`AttackDeclaration`), then write its class with the
same ``name`` in the module its ``entry_point`` names.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, get_args

Modality = Literal["image", "text", "both"]
Knowledge = Literal["white-box", "black-box"]
#: How the embedding fidelity plays an attack (see :class:`EmbeddingCounterpart`).
EmbeddingFamily = Literal["image", "image_l2", "text", "universal", "bridge_image", "bridge_text", "both", "aware_image", "aware_rewrite"]
#: the families, in that order
EMBEDDING_FAMILIES: tuple[str, ...] = get_args(EmbeddingFamily)
#: a parameter's value type
Kind = Literal["float", "int", "bool", "str"]
#: a parameter's allowed range: ``nonneg`` (a number ≥ 0), ``positive_int`` (1, 2, …),
#: ``nonneg_int`` (0, 1, …); ``None``: any value of its kind
Rule = Literal["nonneg", "positive_int", "nonneg_int"]

# Choices shared by several attacks (their modules import them from here).
#: wrong-class rules of the bridge and caption-rewrite attacks
TARGETS = ("nearest", "random")
#: what ``bridge_text_to_image`` pulls the caption toward
TARGET_EMBEDDINGS = ("image", "prompt")
#: norms of the torchattacks-backed (AutoAttack-grade) attacks
NORMS = ("Linf", "L2")
#: the components of AutoAttack's standard version, in the order the chain runs them
COMPONENTS: tuple[str, ...] = ("apgd_ce", "apgd_t", "fab_t", "square")
#: inner-attack parameters ``transfer`` forwards when they are set
FORWARDED = ("eps", "steps", "step_size", "k")
#: ``transfer``'s inner attack unless one is given
DEFAULT_INNER = "pgd_linf"


# ---------------------------------------------------------------------------- threat models
@dataclass(frozen=True)
class ThreatModel:
    """Who the attacker is: what it may change and what it knows (Carlini & Wagner 2017; Tramèr et al. 2020).

    :param controls: the modalities the attacker may change (``image``, ``text`` or both); a
        modality it does not control reaches the model as the clean, trusted input.
    :param knowledge: ``white-box`` (gradients of the defended model) or ``black-box`` (only
        queries of its class scores).
    :param detector_aware: the attacker knows the consistency detector and optimises against it
        (an adaptive attack); ``False``: it attacks the classifier only.
    """

    controls: tuple[Literal["image", "text"], ...]
    knowledge: Knowledge = "white-box"
    detector_aware: bool = False

    def __post_init__(self) -> None:
        if not self.controls or not set(self.controls) <= {"image", "text"}:
            raise ValueError(f"ThreatModel.controls must be a non-empty subset of ('image', 'text'), got {self.controls!r}")
        if self.knowledge not in ("white-box", "black-box"):
            raise ValueError(f"ThreatModel.knowledge must be 'white-box' or 'black-box', got {self.knowledge!r}")

    def __str__(self) -> str:
        aware = " · detector-aware" if self.detector_aware else ""
        return f"controls {'+'.join(self.controls)} · {self.knowledge}{aware}"

    def as_dict(self) -> dict[str, object]:
        return {"controls": list(self.controls), "knowledge": self.knowledge, "detector_aware": self.detector_aware}

    @classmethod
    def of_modality(cls, modality: Modality) -> "ThreatModel":
        """The white-box, detector-unaware threat model of an attack that perturbs ``modality``."""
        return cls(("image", "text") if modality == "both" else (modality,))

    def black_box(self) -> "ThreatModel":
        """The same controls without access to the defended model (a transfer attacker)."""
        return ThreatModel(self.controls, "black-box", self.detector_aware)


@dataclass(frozen=True)
class EmbeddingCounterpart:
    """An attack's stand-in in the ``embedding`` fidelity, on the cached input embeddings.

    :param family: what it perturbs and how (L2-PGD within radius ``r``):
        ``image`` (e_v, up the image's zero-shot CE; ``image_l2`` the same crafting with its own
        radius law, for ℓ2 pixel budgets), ``text`` (e_t, up the caption's CE),
        ``universal`` (one δ shared by the attack's pairs of a round, on e_v), ``bridge_image`` /
        ``bridge_text`` (e_v / e_t pulled toward the nearest wrong class prompt), ``both`` (e_t
        and e_v, each up its own CE), ``aware_image`` / ``aware_rewrite`` (detector-aware e_v
        crafting against the trusted / a rewritten caption, :mod:`cmai_env.fidelity.stacked`).
    :param budget: the attack parameter that sets its strength; the radius is
        ``r = scale · (params[budget] / default[budget])^γ`` with ``(scale, γ)`` per family
        (:data:`cmai_env.fidelity.stacked.FAMILY_RADIUS_LAW`).
    :param steps: the attack parameter holding its iteration count (capped at ``MAX_STEPS``);
        ``None``: one step.
    :param replay: under ``embedding_attack_radius: pixel_travel``, play the pixel attack's own
        candidate captions instead of L2-PGD (the attack class's ``replay_candidates``; each round
        keeps the candidate the current adapters classify worst). Only for caption attacks whose
        outputs are discrete and do not depend on the image (``token_substitution``): a word swap
        moves a caption where no small embedding step goes, and the pixel attack's candidates can
        be computed once per caption.
    """

    family: EmbeddingFamily
    budget: str = "eps"
    steps: str | None = "steps"
    replay: bool = False

    @property
    def modality(self) -> Modality:
        """Which prediction the attack flips: ``image``, ``text`` or ``both``."""
        image = ("image", "image_l2", "universal", "bridge_image", "aware_image", "aware_rewrite")
        return "image" if self.family in image else "text" if self.family in ("text", "bridge_text") else "both"


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamSpec:
    """One constructor parameter of an attack.

    :param name: the keyword (``eps``, ``steps``, …).
    :param default: its default (``None`` only where ``optional``).
    :param kind: the type of its values.
    :param rule: the allowed range of a number (see :data:`Rule`); ``None``: any value of its kind.
    :param choices: the allowed strings, for a parameter with a fixed set.
    :param optional: ``None`` is allowed (and means "not set").
    """

    name: str
    default: bool | int | float | str | None
    kind: Kind
    rule: Rule | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False

    @property
    def annotation(self) -> str:
        """The dataclass field annotation of the attack class (``"float"``, ``"int | None"``)."""
        return f"{self.kind} | None" if self.optional else self.kind

    def check(self, attack: str, value: Any) -> None:
        """Raise ``ValueError("<attack>: <name> must …, got <value>")`` if ``value`` is outside the range."""
        if value is None and self.optional:
            return
        problem = None
        if self.rule == "nonneg" and not (_is_number(value) and value >= 0):
            problem = "must be ≥ 0"
        elif self.rule == "positive_int" and not (_is_integral(value) and value >= 1):
            problem = "must be a positive integer" + (" or None" if self.optional else "")
        elif self.rule == "nonneg_int" and not (_is_integral(value) and value >= 0):
            problem = "must be an integer ≥ 0"
        elif self.choices is not None and value not in self.choices:
            problem = f"must be one of {self.choices}"
        if problem is not None:
            raise ValueError(f"{attack}: {self.name} {problem}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _is_integral(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _p(name: str, default: Any, rule: Rule | None = None, **extra: Any) -> ParamSpec:
    """A parameter whose kind is its default's type (``8 / 255`` → float, ``10`` → int)."""
    kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]
    return ParamSpec(name, default, kind, rule, **extra)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class AttackDeclaration:
    """Everything about a registered attack that can be stated without running it.

    :param name: the registry name (``pgd_linf``).
    :param entry_point: ``"module:Class"`` of the implementation.
    :param modality: the prediction it flips (and perturbs): ``image``, ``text`` or ``both``.
    :param description: one line for ``cmai attack list``.
    :param params: constructor parameters, in signature order.
    :param threat_model: ``None``: :meth:`ThreatModel.of_modality` of ``modality``.
    :param counterpart: the registered non-adaptive attack a detector-aware one adapts (same budget).
    :param embedding: its stand-in in the embedding fidelity, or ``None`` (refused there).
    :param extra_check: checks across parameters, run after the per-parameter ones
        (receives the full parameter mapping, raises ``ValueError``).
    """

    name: str
    entry_point: str
    modality: Modality
    description: str
    params: tuple[ParamSpec, ...]
    threat_model: ThreatModel = None  # type: ignore[assignment]  # filled in __post_init__
    counterpart: str | None = None
    embedding: EmbeddingCounterpart | None = None
    extra_check: Callable[[Mapping[str, Any]], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.threat_model is None:
            object.__setattr__(self, "threat_model", ThreatModel.of_modality(self.modality))

    def defaults(self) -> dict[str, Any]:
        """Parameter name → default, in signature order (what ``cmai attack list`` prints)."""
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)

    def check(self, values: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first parameter out of its range (``values``: every parameter)."""
        for spec in self.params:
            spec.check(self.name, values[spec.name])
        if self.extra_check is not None:
            self.extra_check(values)


# ---------------------------------------------------------------------------- cross-parameter checks
def autoattack_chain(components: str) -> list[str]:
    """The component names of a comma-separated ``components`` string, in the standard order."""
    chosen = [c.strip() for c in str(components).split(",") if c.strip()]
    return sorted(chosen, key=lambda c: COMPONENTS.index(c) if c in COMPONENTS else len(COMPONENTS))


def _check_components(values: Mapping[str, Any]) -> None:
    chosen = autoattack_chain(values["components"])
    if not chosen or any(c not in COMPONENTS for c in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"autoattack: components must be distinct names from {list(COMPONENTS)}, comma-separated, got {values['components']!r}"
        )


def _typed_like(attack: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the inner attack's default (fraction strings like ``8/255`` allowed)."""
    if value is None:
        return None
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(value, bool):
            raise TypeError
        if isinstance(default, int):
            number = float(Fraction(str(value)))
            if not number.is_integer():
                raise TypeError
            return int(number)
        if isinstance(default, float):
            return float(Fraction(str(value).strip()))
    except (TypeError, ValueError, ZeroDivisionError):
        kind = {"bool": "true or false", "int": "an integer"}.get(type(default).__name__, "a number (or a fraction like 8/255)")
        raise ValueError(f"transfer: {key} must be {kind}, as the inner attack {attack!r}'s default {default!r}; got {value!r}") from None
    return value


def transfer_inner_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters ``transfer`` forwards to its inner attack, typed like the inner attack's defaults.

    :raises ValueError: a forwarded parameter the inner attack lacks, or of the wrong type.
    """
    inner = values["inner"]
    defaults = declaration(inner).defaults()
    params = {}
    for key in FORWARDED:
        value = values.get(key)
        if value is None:
            continue
        if key not in defaults:
            raise ValueError(f"transfer: inner attack {inner!r} has no parameter {key!r}; its parameters: {sorted(defaults)}")
        params[key] = _typed_like(inner, key, value, defaults[key])
    return params


def _embedded_backbones() -> list[str]:
    # The names of cmai_env/models/configs/*.json, as cmai_env.models.embedded_backbones() lists
    # them, read without importing cmai_env.models (which imports torch and open_clip);
    # tests/test_listing_speed.py checks the two agree.
    spec = importlib.util.find_spec("cmai_env.models")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p.stem for location in spec.submodule_search_locations for p in Path(location, "configs").glob("*.json"))


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _check_transfer(values: Mapping[str, Any]) -> None:
    inner = values["inner"]
    if not isinstance(inner, str) or inner not in DECLARATIONS or inner == "transfer":
        allowed = [a for a in available_attacks() if a != "transfer"]
        raise ValueError(f"transfer: inner must be a registered attack other than 'transfer', got {inner!r}; allowed: {allowed}")
    surrogate = values["surrogate"]
    if surrogate not in _embedded_backbones():
        # Only another architecture (an open_clip one, or a typo) needs open_clip's list.
        from cmai_env.models import available_backbones

        if surrogate not in available_backbones():
            raise ValueError(
                f"transfer: surrogate {surrogate!r} is not a backbone load_backbone knows; "
                f"CMAI's: {[b for b in available_backbones() if b.startswith('cmai')]}, or any open_clip architecture"
            )
    pretrained = values["surrogate_pretrained"]
    if pretrained is not None and _looks_like_path(pretrained):
        if not os.path.isfile(os.path.expanduser(pretrained)):
            raise ValueError(f"transfer: surrogate_pretrained checkpoint {pretrained!r} does not exist")
    inner_declaration = declaration(inner)
    inner_declaration.check({**inner_declaration.defaults(), **transfer_inner_params(values)})


# ---------------------------------------------------------------------------- the attacks
_EPS_8 = 8 / 255
_PGD = (_p("eps", _EPS_8, "nonneg"), _p("steps", 10, "positive_int"), _p("step_size", 2 / 255, "nonneg"), _p("random_start", True))
_TEXT_PGD = (_p("eps", 0.2, "nonneg"), _p("steps", 10, "positive_int"), _p("step_size", 0.05, "nonneg"), _p("random_start", True))
_NORM = _p("norm", "Linf", choices=NORMS)
_TARGET = _p("target", "nearest", choices=TARGETS)
_IMAGE_WHITE_BOX = ThreatModel(("image",), "white-box")


def _declarations() -> dict[str, AttackDeclaration]:
    pgd_linf = AttackDeclaration(
        "pgd_linf", "cmai_env.attacks.image:PGDLinf", "image", "PGD-ℓ∞ on the image's zero-shot CE (untargeted)",
        _PGD, embedding=EmbeddingCounterpart("image", budget="eps"),
    )
    declared = [
        AttackDeclaration(
            "fgsm", "cmai_env.attacks.image:FGSM", "image", "FGSM: one signed-gradient step on the image's zero-shot CE (ℓ∞)",
            (_p("eps", _EPS_8, "nonneg"),), embedding=EmbeddingCounterpart("image", budget="eps", steps=None),
        ),
        pgd_linf,
        AttackDeclaration(
            "pgd_l2", "cmai_env.attacks.image:PGDL2", "image", "PGD-ℓ2 on the image's zero-shot CE (untargeted)",
            (_p("eps", 0.5, "nonneg"), _p("steps", 10, "positive_int"), _p("step_size", 0.1, "nonneg"), _p("random_start", True)),
            embedding=EmbeddingCounterpart("image_l2", budget="eps"),
        ),
        AttackDeclaration(
            "text_embedding_pgd", "cmai_env.attacks.text:TextEmbeddingPGD", "text",
            "PGD on input token embeddings (L2 per token) against the caption's zero-shot CE",
            (*_TEXT_PGD, _p("include_special", False)), embedding=EmbeddingCounterpart("text", budget="eps"),
        ),
        AttackDeclaration(
            "token_substitution", "cmai_env.attacks.text:TokenSubstitution", "text",
            "HotFlip-style gradient-guided substitution of up to k word tokens",
            (
                _p("k", 1, "nonneg_int"),
                ParamSpec("candidate_vocab", 1024, "int", "positive_int", optional=True),
                _p("verify_top", 8, "positive_int"),
                _p("whole_words", True),
            ),
            embedding=EmbeddingCounterpart("text", budget="k", steps=None, replay=True),
        ),
        AttackDeclaration(
            "bridge_image_to_text", "cmai_env.attacks.bridge:BridgeImageToText", "image",
            "CrossFire-style bridge: PGD-ℓ∞ pulls the image embedding onto a wrong class's text embedding",
            (_p("eps", 16 / 255, "nonneg"), *_PGD[1:], _TARGET), embedding=EmbeddingCounterpart("bridge_image", budget="eps"),
        ),
        AttackDeclaration(
            "bridge_text_to_image", "cmai_env.attacks.bridge:BridgeTextToImage", "text",
            "CrossFire-style bridge: token-embedding PGD pulls the caption onto a wrong class's image embedding",
            (*_TEXT_PGD, _TARGET, _p("target_embedding", "image", choices=TARGET_EMBEDDINGS)),
            embedding=EmbeddingCounterpart("bridge_text", budget="eps"),
        ),
        AttackDeclaration(
            "co_attack", "cmai_env.attacks.joint:CoAttack", "both",
            "Co-Attack: text embedding PGD, then image PGD-ℓ∞ away from clean and perturbed caption embeddings",
            (
                *_PGD[:3],
                _p("text_eps", 0.2, "nonneg"),
                _p("text_steps", 10, "nonneg"),  # 0: no text stage
                _p("text_step_size", 0.05, "nonneg"),
                _p("embed_weight", 1.0, "nonneg"),
                _p("random_start", True),
            ),
            embedding=EmbeddingCounterpart("both", budget="eps"),
        ),
        AttackDeclaration(
            "universal", "cmai_env.attacks.universal:Universal", "image",
            "universal ℓ∞ perturbation: one δ fitted by sign-gradient ascent on the mean CE, added to unseen images",
            (*_PGD[:2], _p("step_size", 1 / 255, "nonneg"), _p("batch_size", 128, "positive_int"), _p("random_start", False)),
            embedding=EmbeddingCounterpart("universal", budget="eps"),
        ),
        AttackDeclaration(
            "apgd_ce", "cmai_env.attacks.autoattack:APGDCE", "image",
            "APGD-CE (Croce & Hein 2020), 100 iterations: adaptive-step PGD on the image's zero-shot CE",
            (_PGD[0], _p("steps", 100, "positive_int"), _p("n_restarts", 1, "positive_int"), _NORM),
            threat_model=_IMAGE_WHITE_BOX, embedding=EmbeddingCounterpart("image", budget="eps", steps="steps"),
        ),
        *(
            AttackDeclaration(
                name, f"cmai_env.attacks.autoattack:{cls}", "image", description,
                (_PGD[0], _p("steps", 100, "positive_int"), _p("n_target_classes", 9, "positive_int"), _p("n_restarts", 1, "positive_int"), _NORM),
                threat_model=_IMAGE_WHITE_BOX, embedding=EmbeddingCounterpart("image", budget="eps", steps="steps"),
            )
            for name, cls, description in (
                ("apgd_t", "APGDT", "APGD-T (Croce & Hein 2020): targeted APGD on the DLR loss, 9 target classes × 100 iterations"),
                ("fab_t", "FABT", "FAB-T (Croce & Hein 2020): targeted minimal-distortion boundary attack, 9 targets × 100 iterations"),
            )
        ),
        AttackDeclaration(
            "square", "cmai_env.attacks.autoattack:Square", "image",
            "Square Attack (Andriushchenko et al. 2020): score-based black-box random search, 5,000 queries",
            (_PGD[0], _p("n_queries", 5000, "positive_int"), _p("p_init", 0.8, "nonneg"), _p("n_restarts", 1, "positive_int"), _NORM),
            threat_model=ThreatModel(("image",), "black-box"), embedding=EmbeddingCounterpart("image", budget="eps", steps=None),
        ),
        AttackDeclaration(
            "autoattack", "cmai_env.attacks.autoattack:AutoAttack", "image",
            "AutoAttack standard chain APGD-CE → APGD-T → FAB-T → Square (100 it., 9 targets, 5,000 queries), worst case per example",
            (
                _PGD[0],
                _p("steps", 100, "positive_int"),
                _p("n_target_classes", 9, "positive_int"),
                _p("n_queries", 5000, "positive_int"),
                _p("components", ",".join(COMPONENTS)),
                _NORM,
            ),
            threat_model=_IMAGE_WHITE_BOX, embedding=EmbeddingCounterpart("image", budget="eps", steps="steps"),
            extra_check=_check_components,
        ),
        AttackDeclaration(
            "aware_pgd_linf", "cmai_env.attacks.adaptive:AwarePGDLinf", "image",
            "detector-aware PGD-ℓ∞: image-only, maximises min(margin, κ) − λ·L_consistency (caption trusted)",
            (*_PGD[:3], _p("lam", 1.0, "nonneg"), _p("kappa", 5.0, "nonneg"), _p("random_start", True)),
            threat_model=ThreatModel(("image",), "white-box", detector_aware=True), counterpart="pgd_linf",
            embedding=EmbeddingCounterpart("aware_image", budget="eps", steps="steps"),
        ),
        AttackDeclaration(
            "aware_caption_rewrite", "cmai_env.attacks.adaptive:AwareCaptionRewrite", "image",
            "detector-aware: rewrites the caption to a wrong class c*, targeted PGD-ℓ∞ on the image minimising L_consistency",
            (*_PGD[:3], _p("ce_weight", 0.0, "nonneg"), _TARGET, _p("random_start", True)),
            threat_model=ThreatModel(("image", "text"), "white-box", detector_aware=True), counterpart="bridge_image_to_text",
            embedding=EmbeddingCounterpart("aware_rewrite", budget="eps", steps="steps"),
        ),
        # Modality and controls are the inner attack's (here: those of the default inner, pgd_linf);
        # no embedding counterpart: every one there is white-box against the current adapters.
        AttackDeclaration(
            "transfer", "cmai_env.attacks.transfer:Transfer", pgd_linf.modality,
            "black-box transfer: the inner attack crafted on a surrogate backbone, applied to the target "
            "(modality and controls are the inner attack's; shown for the default pgd_linf)",
            (
                _p("inner", DEFAULT_INNER),
                _p("surrogate", "cmai-tiny-rn"),
                ParamSpec("surrogate_pretrained", None, "str", optional=True),
                ParamSpec("eps", None, "float", optional=True),
                ParamSpec("steps", None, "int", optional=True),
                ParamSpec("step_size", None, "float", optional=True),
                ParamSpec("k", None, "int", optional=True),
            ),
            threat_model=pgd_linf.threat_model.black_box(),
            extra_check=_check_transfer,
        ),
    ]
    return {d.name: d for d in declared}


#: name → declaration of every registered attack
DECLARATIONS: dict[str, AttackDeclaration] = _declarations()


def available_attacks() -> list[str]:
    """Names of the registered attacks, sorted."""
    return sorted(DECLARATIONS)


def declaration(name: str) -> AttackDeclaration:
    """The declaration of a registered attack.

    :raises ValueError: an unknown name (the message lists the registered ones).
    """
    if name not in DECLARATIONS:
        raise ValueError(f"unknown attack {name!r}; registered attacks: {available_attacks()}")
    return DECLARATIONS[name]


__all__ = [
    "COMPONENTS",
    "DECLARATIONS",
    "DEFAULT_INNER",
    "FORWARDED",
    "NORMS",
    "TARGETS",
    "TARGET_EMBEDDINGS",
    "AttackDeclaration",
    "EmbeddingCounterpart",
    "Modality",
    "ParamSpec",
    "ThreatModel",
    "autoattack_chain",
    "available_attacks",
    "declaration",
    "transfer_inner_params",
]
