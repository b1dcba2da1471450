"""Scenario files: what the defended model faces, as typed and validated data.

A scenario is a YAML file (``scenarios/*.yaml`` ship with the package) read with
``yaml.safe_load`` and validated once, here, into a :class:`Scenario`. Everything downstream
(the attack stream, the environment, the fidelities) receives the validated object, never the
raw mapping. Every model forbids unknown fields, so a typo is an error, not a silently ignored
setting.

    from cmai_env.scenario import load_scenario
    scenario = load_scenario("abrupt_shift")            # a shipped name ...
    scenario = load_scenario("my_runs/drift.yaml")      # ... or a file
    scenario.total_rounds()

A file without ``name:`` takes its file name's stem. Budgets (``defense.eps_v``, ``defense.eps_t`` and every float attack parameter such as ``eps``
or ``step_size``) may be written as fractions: ``eps: 8/255``.

Errors say what to fix: a :class:`ScenarioError` (a ``ValueError``) names the file, each bad
field as a dotted path (``phases.1.attacks.0.name``) with its line, the bad value and what is
allowed there.

Held-out attacks: a training scenario lists the attacks reserved for evaluation in
``held_out_attacks``; validation rejects the scenario if a phase uses one. Scenarios marked
``evaluation_only: true`` (e.g. ``unseen_attacks``) are the only ones allowed to use them, and
the environment refuses them unless it is built for evaluation.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.resources
import math
import reprlib
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmai_env.data import GENERATED_DATASETS, available_datasets
from cmai_env.keyvalue import UniqueKeyLoader

SCENARIO_SUFFIXES = (".yaml", ".yml")

# Resource limits, checked when a scenario is validated so that a typo (or a hostile file) is an
# error naming the field, never an out-of-memory or a hang later on.
#: largest scenario file read, in bytes
MAX_FILE_BYTES = 256 * 1024
#: YAML aliases (``*name``) allowed in one file: a few anchors are convenient, thousands expand
#: exponentially ("billion laughs")
MAX_YAML_ALIASES = 64
#: rounds in one episode (a whole schedule pass, or ``episode_rounds``)
MAX_EPISODE_ROUNDS = 100_000
#: pairs in the incoming pool / the probe set (a 32×32 image pool of 50,000 is ~0.6 GB of pixels)
MAX_TRAIN_N = 50_000
MAX_PROBE_N = 10_000
#: incoming pairs per round
MAX_BATCH_SIZE = 4_096
#: iterations of one attack (``steps``, ``text_steps`` of an attack; ``defense.attack_steps``):
#: a round runs them for every crafted batch, so 10**8 is a hang, not a strong attack
MAX_ATTACK_STEPS = 1_000
#: any other integer attack parameter (``n_queries``, ``n_restarts``, ``candidate_vocab``, ...)
MAX_ATTACK_COUNT = 100_000
#: trainer updates per round
MAX_UPDATES_PER_ROUND = 100
#: largest seed (``dataset.seed``, ``randomization.seed``): numpy's generators refuse negative
#: seeds and torch's (which corrupted images and probe splits use, at ``seed + 1``) 64-bit overflow
MAX_SEED = 2**32 - 1


class ScenarioError(ValueError):
    """A scenario file (or override) that cannot be read or does not validate."""


class _Issues(ValueError):
    """Problems found by a cross-field validator, each at a path relative to the model."""

    def __init__(self, issues: list[tuple[tuple[str | int, ...], Any, str]]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"{_dotted(path)} = {value!r}: {message}" for path, value, message in issues))


# ----------------------------------------------------------------------------- fractions
def parse_fraction(value: Any) -> Any:
    """``"8/255"`` → 0.0313…; numbers and non-strings pass through (pydantic checks them)."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}") from None
    return value


#: A budget: a non-negative float that YAML may spell as a fraction (``8/255``).
Budget = Annotated[float, BeforeValidator(parse_fraction), Field(ge=0, allow_inf_nan=False)]
ParamValue = Union[bool, int, float, str]
#: ``[scale, γ]`` of a radius law ``r = scale · (budget / default budget)^γ`` (``embedding_radius_laws``)
RadiusLaw = tuple[Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)], Annotated[float, Field(ge=0, le=4, allow_inf_nan=False)]]
#: ``[c, γ]`` of a ``pixel_travel`` radius ``c · travel^γ`` (``pixel_travel_laws``; γ > 0: a side the
#: pixel attack leaves alone travels 0 and must stay at radius 0)
TravelLaw = tuple[Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)], Annotated[float, Field(gt=0, le=4, allow_inf_nan=False)]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- schema
class DatasetSpec(_Model):
    """Where the incoming pairs and the probe set come from."""

    name: str = "shapes"
    #: file or folder for real-format datasets (coco-captions, medmnist, folder)
    root: str | None = None
    #: pool the incoming batches are drawn from
    train_n: int = Field(2000, gt=0, le=MAX_TRAIN_N)
    #: held-out pairs the round's metrics are measured on
    # ≥ 2: the probe is split into an attacked evaluation half and a detector-calibration half.
    probe_n: int = Field(256, ge=2, le=MAX_PROBE_N)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in available_datasets():
            raise ValueError(f"unknown dataset; available: {', '.join(available_datasets())}")
        return name

    @model_validator(mode="after")
    def _root_where_read(self) -> "DatasetSpec":
        if self.name in GENERATED_DATASETS and self.root is not None:
            raise _Issues([(("root",), self.root, f"{self.name} is generated and reads no files; remove root "
                            f"(root is for {', '.join(sorted(set(available_datasets()) - set(GENERATED_DATASETS)))})")])
        if self.name not in GENERATED_DATASETS and self.root is None:
            raise _Issues([(("root",), None, f"dataset {self.name} reads files: give root (its file or folder)")])
        return self


class BackboneSpec(_Model):
    """The defended model: an architecture name and an optional open_clip tag or checkpoint path."""

    name: str = "cmai-tiny"
    pretrained: str | None = None

    @property
    def generative(self) -> bool:
        """A generative (captioning) backbone such as ``cmai-tiny-flamingo``: pixel fidelity only."""
        from cmai_env.model_configs import is_generative_backbone  # torch-free: validation stays cheap

        return is_generative_backbone(self.name)


#: ``defense.flagged_pairs``'s values: which flagged received pairs join ``L_adv``
#: (:func:`cmai_env.round.observed_adversarial`).
FLAGGED_PAIRS = ("adversarial", "all")
#: ``defense.adv_loss``'s values: what ``L_adv`` scores on the crafted pairs
#: (:func:`cmai_env.round.crafted_adv_loss`).
ADV_LOSSES = ("ce", "trades")
#: The defense fields only the embedding fidelity reads, each with what a pixel-only (generative)
#: round uses instead: the pixel trainer never takes them, and a generative scenario may not set them.
EMBEDDING_ONLY_DEFENSE_FIELDS = {
    "embedding_lr": " (defense.lr sets its rate)",
    "embedding_train_radius_scale": " (its L_adv examples are pixel attacks at eps_v / eps_t)",
    "embedding_image_train_radius_scale": "",
    "embedding_train_radius": "",
    "embedding_adapter_input": "",
}


class DefenseSpec(_Model):
    """What the trainer may update and how it crafts ``L_adv``'s examples.

    ``defended`` applies to the pixel fidelity; the embedding fidelity always trains residual
    adapters on its cached embeddings (with :attr:`adapter_lr`, these budgets and steps).
    """

    defended: Literal["adapter", "projection", "last_blocks", "all"] = "adapter"
    #: number of transformer blocks updated when ``defended`` is ``last_blocks``
    last_blocks: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    #: learning rate of the embedding fidelity's residual adapters (None: ``lr``). Small adapters
    #: on cached embeddings stand a far higher rate than a whole pixel model (``defended: all``)
    #: does; this lets one scenario give each world its own (``quickstart``: 1e-3 pixel, 1e-2 here).
    embedding_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: ℓ∞ image budget ``ε_v`` of the adversarial-training examples
    eps_v: Budget = 4 / 255
    #: L2 per-token budget ``ε_t`` of the text adversarial-training examples
    eps_t: Budget = 0.2
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    #: PGD steps crafting ``L_adv``'s examples (0: no adversarial term)
    attack_steps: int = Field(3, ge=0, le=MAX_ATTACK_STEPS)
    updates_per_round: int = Field(1, ge=1, le=MAX_UPDATES_PER_ROUND)
    #: the embedding fidelity crafts ``L_adv``'s examples at this multiple of the radius its
    #: attacks get for ``eps_v`` / ``eps_t`` (radii calibrated to the *undefended* model's ASR and
    #: TPR). Pixel attacks move the unit image embedding 1.3–1.9× that radius for the same success
    #: (``benchmarks/fidelity_calibration.py --displacement``), so pixel adversarial training trains
    #: on points farther out. The default 2 makes the baselines rank as at pixel fidelity (README,
    #: issue 10's point 3: Spearman ρ 0.900 on ``abrupt_shift`` and on ``quickstart`` against its
    #: pixel run defending the same adapters; 0.850 and −0.033 at 1). ``shift_evasion``, ``mixed_modalities``,
    #: ``randomized_training`` and ``stationary_pgd`` pin 1, the scale they were designed and measured at.
    #: At most 4: a unit embedding is never more than 2 away from any other.
    embedding_train_radius_scale: float = Field(2.0, gt=0, le=4, allow_inf_nan=False)
    #: the image side's own training scale (None: :attr:`embedding_train_radius_scale` for both
    #: sides). The pixel trainer's crafted images move the unit image embedding by a median 0.80
    #: (clean) and 0.59 (severity-4 noise), its captions the caption embedding by 0.84 and 1.01,
    #: against radii 1.00 and 0.85 at scale 2; yet a smaller image radius alone brings a defended
    #: detector closer to pixel fidelity's (README, Known limits; docs/measurements.md).
    embedding_image_train_radius_scale: float | None = Field(None, gt=0, le=4, allow_inf_nan=False)
    #: what the two training scales multiply at the embedding fidelity: ``law``, one radius for every
    #: pair, the one its attacks get for ``eps_v`` / ``eps_t`` (``embedding_radius_laws``), or
    #: ``pixel_travel``, each crafted pair's own distance: how far the pixel trainer's joint PGD
    #: (``eps_v``, ``eps_t``, ``alpha``, ``attack_steps``) moved that pair's unit image and caption
    #: embedding on the undefended backbone, on the view (clean or corrupted images) the round
    #: draws it from (:func:`cmai_env.fidelity.travel.training_travel`). Pixel training examples of
    #: noisy images move less than those of clean ones, which one radius cannot follow. With it, a
    #: scale of 1 trains as far out as pixel fidelity does.
    embedding_train_radius: Literal["law", "pixel_travel"] = "law"
    #: what the embedding fidelity's residual adapters receive: ``unit``, the unit embeddings its
    #: attacks perturb (every shipped scenario), or ``pooled_norm``, those times their tower's mean
    #: pooled-embedding norm on the pool (cmai-tiny: 13.5 image, 11.1 caption), the size of what the
    #: pixel fidelity's adapters receive (:meth:`cmai_env.models.backbone.Backbone.encode_image`).
    #: Adapters' biases act on unit inputs 11–13× more strongly: without ``β_task`` they flatten the
    #: predictions toward uniform (``info["prediction_entropy"]``) far more than pixel fidelity's do,
    #: which blinds the defended detector; issue 10's point 4 holds on 8 of 8 scenarios with ``unit``
    #: and 5 of 8 with ``pooled_norm`` (README, Known limits; docs/measurements.md). Attack and
    #: training radii keep their meaning: they move the unit embedding before it is scaled.
    embedding_adapter_input: Literal["unit", "pooled_norm"] = "unit"
    #: whether the received pairs that are adversarial and that the detector flagged join
    #: ``L_adv`` beside the crafted examples (both fidelities). Training the model to classify the
    #: flagged attacks also makes their image and caption agree, which can hide the same attack
    #: from the detector in later rounds: on ``unseen_attacks``' Co-Attack phase at embedding
    #: fidelity, fixed β = (⅔, 0, ⅓) flags 0.455 of the attacks with it and 0.643 without
    #: (docs/measurements.md). Every shipped scenario was designed and measured with it.
    train_on_flagged: bool = True
    #: which of the flagged received pairs join ``L_adv`` (with ``train_on_flagged``): ``adversarial``,
    #: the ones that truly are, so the defender is told which flags were right (an oracle a deployed
    #: system lacks), or ``all``, false positives included (what a deployed system knows). Every
    #: shipped scenario was designed and measured with ``adversarial``; with ``all`` point 4 of issue
    #: 10 fails on ``detector_evasion`` (docs/measurements.md).
    flagged_pairs: Literal[FLAGGED_PAIRS] = "adversarial"
    #: what ``L_adv`` scores on the pairs crafted for it (both fidelities): ``ce``, their CE with the
    #: true labels (Madry et al.'s adversarial training; every shipped scenario), or ``trades``,
    #: TRADES's objective (Zhang et al. 2019): the clean pair's CE plus ``trades_beta``·KL(p_clean ‖
    #: p_crafted) per modality, which asks the prediction to stay put rather than the crafted pair to
    #: be classified, and is the field's answer to adversarial training's clean-accuracy cost. The
    #: crafting is the bridging objective either way, and flagged received pairs, whose clean twin a
    #: deployed defender does not have, keep their CE.
    adv_loss: Literal[ADV_LOSSES] = "ce"
    #: TRADES's β (``1/λ``), the KL term's weight with ``adv_loss: trades``. TRADES used 6 on
    #: CIFAR-10; here adapters learning at 1e-2 on noisy images lost clean accuracy and robustness
    #: from 2 on (docs/measurements.md), hence 1.
    trades_beta: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)

    @property
    def image_train_radius_scale(self) -> float:
        """The embedding fidelity's image-side training scale: ``embedding_image_train_radius_scale``, else ``embedding_train_radius_scale``."""
        return self.embedding_train_radius_scale if self.embedding_image_train_radius_scale is None else self.embedding_image_train_radius_scale

    @property
    def adapter_lr(self) -> float:
        """The embedding fidelity's adapter learning rate: ``embedding_lr``, else ``lr``."""
        return self.lr if self.embedding_lr is None else self.embedding_lr

    def trainer_fields(self) -> dict[str, Any]:
        """The fields the pixel-fidelity trainer takes (:class:`cmai_env.training.TrainerConfig`)."""
        return self.model_dump(exclude={*EMBEDDING_ONLY_DEFENSE_FIELDS, "train_on_flagged", "flagged_pairs"})


class DetectorSpec(_Model):
    """Consistency detector and the change detector run on its flag rate."""

    #: false-positive rate the detector's threshold is calibrated to on clean pairs
    target_fpr: float = Field(0.05, gt=0, lt=1)
    change_detector: Literal["adwin", "page_hinkley", "none"] = "adwin"
    #: flag rate counted as "shift detected" (None: a multiple of target_fpr, set by the env)
    flag_rate_threshold: float | None = Field(None, gt=0, le=1)


class RewardWeights(_Model):
    """``r = w_clean·acc − w_asr·ASR + w_consistency·score + w_detection·(tpr − fpr) − w_compute·cost``.

    ``metrics`` says whose ``acc`` and ``ASR`` these are: ``system`` (default) scores the defended
    system end to end, the model *and* its detector, which rejects flagged inputs
    (``acc`` = clean pairs classified correctly and not rejected, ``ASR`` = ``system_asr``: attacks
    that flip the prediction and are not flagged); ``model`` scores the model alone (``clean_acc``,
    ``asr``). At least one weight must be positive (with all zero every round's reward is 0).
    """

    metrics: Literal["system", "model"] = "system"
    clean_acc: float = Field(1.0, ge=0, allow_inf_nan=False)
    asr: float = Field(1.0, ge=0, allow_inf_nan=False)
    consistency: float = Field(0.25, ge=0, allow_inf_nan=False)
    detection: float = Field(0.25, ge=0, allow_inf_nan=False)
    compute: float = Field(0.05, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _not_all_zero(self) -> "RewardWeights":
        if not any((self.clean_acc, self.asr, self.consistency, self.detection, self.compute)):
            raise _Issues([((), self.model_dump(), "at least one reward weight must be positive (all 0 makes every reward 0)")])
        return self


class RandomSpec(_Model):
    """Domain randomisation for ``schedule: random``.

    ``n_phases`` phases are drawn from ``phases`` (never the same one twice in a row when there
    is a choice), each lasting a uniform random number of rounds in ``rounds`` (inclusive);
    if they fall short of the episode length, more are drawn until it is filled, and the last
    one is cut at the episode's end.
    ``seed`` fixes the drawn timeline across resets; ``None`` draws it from the episode's
    generator, so every reset sees a different one.
    """

    n_phases: int = Field(ge=1)
    rounds: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _ordered(self) -> "RandomSpec":
        if self.rounds[0] > self.rounds[1]:
            raise _Issues([(("rounds",), list(self.rounds), "must be [min, max] with min ≤ max")])
        return self


class Transition(_Model):
    """How a phase takes over from the previous one.

    ``abrupt``: at once. ``gradual``: the mixture and adversarial share move linearly from the
    previous phase's over the first ``rounds`` rounds of this phase.
    """

    type: Literal["abrupt", "gradual"] = "abrupt"
    rounds: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Transition":
        if self.type == "abrupt" and self.rounds != 0:
            raise _Issues([(("rounds",), self.rounds, "an abrupt transition takes 0 rounds (use type: gradual)")])
        if self.type == "gradual" and self.rounds < 1:
            raise _Issues([(("rounds",), self.rounds, "a gradual transition needs rounds ≥ 1")])
        return self


class AttackSpec(_Model):
    """One attack of a phase's mixture: a registered attack, its weight and its parameters."""

    name: str
    #: relative frequency in the phase's mixture (weights are normalised to sum to 1)
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    #: parameters of the attack (``cmai attack list``); fractions like 8/255 become floats
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        registered = _registered_attacks()
        if name not in registered:
            raise ValueError(f"unknown attack; registered attacks: {', '.join(registered)}")
        return name

    @model_validator(mode="after")
    def _known_params(self) -> "AttackSpec":
        from cmai_env.attacks.specs import declaration  # torch-free: validation never imports the attack code

        declared = declaration(self.name)
        defaults = declared.defaults()
        issues: list[tuple[tuple[str | int, ...], Any, str]] = []
        params: dict[str, ParamValue] = {}
        for key, value in self.params.items():
            if key not in defaults:
                issues.append((("params", key), value, f"{self.name} has no such parameter; parameters: {', '.join(defaults)}"))
                continue
            try:
                params[key] = _coerce_param(value, defaults[key])
            except ValueError as exc:
                issues.append((("params", key), value, str(exc)))
                continue
            limit = MAX_ATTACK_STEPS if key in ("steps", "text_steps") else MAX_ATTACK_COUNT
            number = params[key]
            if isinstance(number, (int, float)) and not isinstance(number, bool) and number > limit and (
                    isinstance(defaults[key], int) or key in ("steps", "text_steps")):
                issues.append((("params", key), value, f"at most {limit:,} (a round crafts with it for every attacked batch)"))
        if not issues:
            try:  # the attack's own checks (negative budgets, zero steps, ...), as its constructor runs them
                declared.check({**defaults, **params})
            except (ValueError, TypeError) as exc:
                message = str(exc)
                # point at the parameter the attack's message names, if it names one
                # ("<attack>: <key> must ..."; not a bare "eps must", which "steps must" contains)
                named = [k for k in params if f": {k} must" in message or f"{k!r}" in message]
                path: tuple[str | int, ...] = ("params", named[0]) if named else ("params",)
                issues.append((path, params[named[0]] if named else params, message))
        if issues:
            raise _Issues(issues)
        self.params = params
        return self


class Corruption(_Model):
    """A natural distribution shift applied to a phase's clean images (:mod:`cmai_env.corruptions`)."""

    name: str
    severity: int = Field(3, ge=1, le=5)

    @field_validator("name")
    @classmethod
    def _known_corruption(cls, name: str) -> str:
        from cmai_env.corruptions import CORRUPTIONS

        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption; available: {', '.join(CORRUPTIONS)}")
        return name

    @property
    def key(self) -> tuple[str, int]:
        """``(name, severity)``: how round plans and the fidelities name this corruption."""
        return (self.name, self.severity)


class Phase(_Model):
    """A stretch of rounds with one attack pattern (``attacks: []`` is a quiet phase).

    ``corruption`` (optional) serves the phase's clean images, traffic and probe set alike,
    corrupted (ImageNet-C ``gaussian_noise`` or ``contrast``, severity 1–5).
    """

    name: str
    rounds: int = Field(ge=1)
    #: share of each incoming batch that is adversarial (0 in quiet phases)
    adversarial_share: float = Field(0.5, ge=0, le=1)
    transition: Transition = Field(default_factory=Transition)
    attacks: list[AttackSpec] = Field(default_factory=list)
    #: natural distribution shift of the phase's images (None: the clean data)
    corruption: Corruption | None = None

    @model_validator(mode="after")
    def _quiet_means_clean(self) -> "Phase":
        if not self.attacks:
            if "adversarial_share" in self.model_fields_set and self.adversarial_share > 0:
                raise _Issues([(("adversarial_share",), self.adversarial_share,
                                "a quiet phase (attacks: []) must have adversarial_share 0")])
            self.adversarial_share = 0.0
        if self.transition.rounds > self.rounds:
            raise _Issues([(("transition", "rounds"), self.transition.rounds,
                            f"the transition cannot outlast its phase ({self.rounds} rounds)")])
        return self

    @property
    def quiet(self) -> bool:
        return not self.attacks or self.adversarial_share == 0


class Scenario(_Model):
    """A validated scenario file. See the module docstring and ``scenarios/*.yaml``."""

    name: str
    description: str = ""
    #: uses held-out attacks: only evaluation code may run it
    evaluation_only: bool = False
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    fidelity: Literal["pixel", "embedding"] = "pixel"
    #: how the embedding fidelity sizes each attacked pair's perturbation: ``law``, one L2 radius per
    #: attack configuration from its family's calibrated law (``FAMILY_RADIUS_LAW``; every shipped
    #: scenario was measured with it), or ``pixel_travel``, each pair at a radius set by how far its own
    #: pixel attack moved it on the undefended model (:mod:`cmai_env.fidelity.travel`: closer to the pixel
    #: fidelity on issue 10's calibration cells; the world runs the phases' pixel attacks once when built,
    #: and replays ``token_substitution``'s own word swaps instead of giving it a radius)
    embedding_attack_radius: Literal["law", "pixel_travel"] = "law"
    #: per embedding family, ``[scale, γ]`` of its radius law ``r = scale · (budget / default budget)^γ``
    #: in place of the calibrated one (``FAMILY_RADIUS_LAW``, fitted for ``cmai-tiny`` on ``shapes``):
    #: ``benchmarks/fidelity_calibration.py --scenario S --calibrate`` fits them for a scenario's own
    #: backbone and data and prints this field. Families not named keep theirs. The ``image`` and
    #: ``text`` laws also size ``L_adv``'s training examples, with either ``embedding_attack_radius``.
    embedding_radius_laws: dict[str, RadiusLaw] = Field(default_factory=dict)
    #: per embedding family, ``[c, γ]`` of its ``pixel_travel`` radius ``c · travel^γ`` in place of
    #: ``PIXEL_TRAVEL_LAW`` (``--pixel-travel --calibrate`` prints this field); ``pixel_travel`` only
    pixel_travel_laws: dict[str, TravelLaw] = Field(default_factory=dict)
    #: incoming pairs per round
    batch_size: int = Field(64, gt=0, le=MAX_BATCH_SIZE)
    #: rounds per episode (None: the schedule's total; shorter truncates, longer extends the last phase)
    episode_rounds: int | None = Field(None, ge=1, le=MAX_EPISODE_ROUNDS)
    defense: DefenseSpec = Field(default_factory=DefenseSpec)
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    reward: RewardWeights = Field(default_factory=RewardWeights)
    #: recovery after a shift = ASR back under this
    asr_target: float = Field(0.3, ge=0, le=1)
    schedule: Literal["sequential", "periodic", "random"] = "sequential"
    #: periodic: cycles through the phases
    repeat: int = Field(1, ge=1)
    randomization: RandomSpec | None = None
    phases: list[Phase] = Field(min_length=1, max_length=1_000)
    #: attacks reserved for evaluation; a training scenario may not use them
    held_out_attacks: list[str] = Field(default_factory=list)

    @field_validator("embedding_radius_laws", "pixel_travel_laws")
    @classmethod
    def _known_families(cls, laws: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        from cmai_env.attacks.specs import EMBEDDING_FAMILIES  # torch-free

        unknown = [family for family in laws if family not in EMBEDDING_FAMILIES]
        if unknown:
            raise _Issues([((family,), list(laws[family]), f"unknown embedding family; families: {', '.join(EMBEDDING_FAMILIES)}") for family in unknown])
        return laws

    @field_validator("held_out_attacks")
    @classmethod
    def _held_out_registered(cls, names: list[str]) -> list[str]:
        registered = _registered_attacks()
        unknown = [n for n in names if n not in registered]
        if unknown:
            raise _Issues([((names.index(n),), n, f"unknown attack; registered attacks: {', '.join(registered)}") for n in unknown])
        return names

    @model_validator(mode="after")
    def _cross_checks(self) -> "Scenario":
        issues: list[tuple[tuple[str | int, ...], Any, str]] = []
        seen: dict[str, int] = {}
        for i, phase in enumerate(self.phases):
            if phase.name in seen:
                issues.append((("phases", i, "name"), phase.name, f"phase names must be unique (phases.{seen[phase.name]} has it too)"))
            seen.setdefault(phase.name, i)
            if not self.evaluation_only:
                for j, attack in enumerate(phase.attacks):
                    if attack.name in self.held_out_attacks:
                        issues.append((("phases", i, "attacks", j, "name"), attack.name,
                                       f"held out for evaluation (held_out_attacks: {self.held_out_attacks}); "
                                       "only an evaluation_only scenario may use it"))
        if self.schedule == "random" and self.randomization is None:
            issues.append((("randomization",), None, "schedule random needs randomization: {n_phases, rounds: [min, max]}"))
        if self.schedule != "random" and self.randomization is not None:
            issues.append((("randomization",), self.randomization.model_dump(), f"only used by schedule random (schedule is {self.schedule})"))
        if self.schedule != "periodic" and self.repeat != 1:
            issues.append((("repeat",), self.repeat, f"only used by schedule periodic (schedule is {self.schedule})"))
        rounds = 0 if self.schedule == "random" and self.randomization is None else max(self.episode_length(), self.total_rounds())
        if rounds > MAX_EPISODE_ROUNDS:
            field = ("episode_rounds",) if self.episode_rounds is not None else (("repeat",) if self.schedule == "periodic" else ("phases",))
            issues.append((field, rounds, f"an episode of {rounds:,} rounds exceeds the limit of {MAX_EPISODE_ROUNDS:,} rounds"))
        if self.pixel_travel_laws and self.embedding_attack_radius != "pixel_travel":
            issues.append((("pixel_travel_laws",), {k: list(v) for k, v in self.pixel_travel_laws.items()},
                           f"only used with embedding_attack_radius: pixel_travel (it is {self.embedding_attack_radius})"))
        if self.backbone.generative:
            issues.extend(_generative_issues(self))
        elif self.fidelity == "embedding":
            issues.extend(_embedding_issues(self))
        if self.batch_size > self.dataset.train_n:
            issues.append((("batch_size",), self.batch_size, f"must be at most dataset.train_n ({self.dataset.train_n}), the pool batches are drawn from"))
        if issues:
            raise _Issues(issues)
        return self

    def total_rounds(self) -> int:
        """Rounds in one pass of the schedule (an episode's length unless ``episode_rounds`` is set).

        ``random``: ``n_phases`` × the mean of ``randomization.rounds`` (rounded up); the drawn
        timeline is truncated or its last phase extended to this length.
        """
        if self.schedule == "random":
            assert self.randomization is not None
            low, high = self.randomization.rounds
            return self.randomization.n_phases * math.ceil((low + high) / 2)
        cycle = sum(phase.rounds for phase in self.phases)
        return cycle * (self.repeat if self.schedule == "periodic" else 1)

    def episode_length(self) -> int:
        """``episode_rounds`` if set, else :meth:`total_rounds`."""
        return self.episode_rounds if self.episode_rounds is not None else self.total_rounds()

    def attacks_used(self) -> list[str]:
        """Names of every attack some phase uses, sorted."""
        return sorted({attack.name for phase in self.phases for attack in phase.attacks})

    def corruptions_used(self) -> list[tuple[str, int]]:
        """``(name, severity)`` of every corruption some phase applies, sorted."""
        return sorted({phase.corruption.key for phase in self.phases if phase.corruption is not None})

    def to_yaml(self) -> str:
        """The validated scenario (defaults filled in, fractions as floats) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _generative_issues(scenario: Scenario) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """What a scenario on a generative backbone may not ask for (:mod:`cmai_env.fidelity.generative`)."""
    issues: list[tuple[tuple[str | int, ...], Any, str]] = []
    name = scenario.backbone.name
    if scenario.fidelity == "embedding":
        issues.append((("backbone", "name"), name,
                       "is a generative (captioning) backbone, which runs at fidelity: pixel only: no faithful embedding "
                       "proxy of a generative round exists (the caption is generated from the vision tokens, so bounded "
                       "moves of one pooled embedding do not say what the generated class becomes). Set fidelity: pixel, "
                       "or at embedding fidelity a contrastive backbone. Allowed: cmai-tiny, cmai-tiny-rn or any open_clip architecture"))
    defaults = DefenseSpec.model_fields
    for key in ("defended", "last_blocks"):
        if getattr(scenario.defense, key) != defaults[key].default:
            issues.append((("defense", key), getattr(scenario.defense, key),
                           f"not used with the generative backbone {name!r}: its round always defends the language model's "
                           f"own copy of the vision tower (FARE's choice); remove defense.{key}"))
    from cmai_env.model_configs import GENERATIVE_ATTACKS

    issues.extend(_unplayable_attacks(scenario, lambda attack: attack in GENERATIVE_ATTACKS,
                                      lambda attack: f"{attack!r} has no generative version for {name!r}; "
                                                     f"allowed: {', '.join(sorted(GENERATIVE_ATTACKS))}"))
    for key, instead in EMBEDDING_ONLY_DEFENSE_FIELDS.items():
        value = getattr(scenario.defense, key)
        if value != defaults[key].default:
            issues.append((("defense", key), value, f"not used with the generative backbone {name!r}, which runs at "
                                                    f"pixel fidelity only{instead}; remove defense.{key}"))
    if scenario.embedding_radius_laws:
        issues.append((("embedding_radius_laws",), {k: list(v) for k, v in scenario.embedding_radius_laws.items()},
                       f"not used with the generative backbone {name!r}, which runs at pixel fidelity only; remove embedding_radius_laws"))
    if scenario.embedding_attack_radius != Scenario.model_fields["embedding_attack_radius"].default:
        issues.append((("embedding_attack_radius",), scenario.embedding_attack_radius,
                       f"not used with the generative backbone {name!r}, which runs at pixel fidelity only (its attacks "
                       "are the pixel attacks themselves); remove embedding_attack_radius"))
    return issues


def _embedding_issues(scenario: Scenario) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """What the embedding fidelity cannot play (:mod:`cmai_env.fidelity.stacked`): refused here, not
    ignored (``updates_per_round``) or found when the environment is built (an attack without an
    embedding counterpart)."""
    from cmai_env.attacks.specs import declaration

    issues: list[tuple[tuple[str | int, ...], Any, str]] = []
    if scenario.defense.updates_per_round != 1:
        issues.append((("defense", "updates_per_round"), scenario.defense.updates_per_round,
                       "the embedding fidelity runs one adapter update per round; set 1 (or fidelity: pixel)"))
    issues.extend(_unplayable_attacks(scenario, lambda attack: declaration(attack).embedding is not None,
                                      lambda attack: f"{attack!r} has no embedding-fidelity counterpart; run this scenario with fidelity: pixel"))
    return issues


def _unplayable_attacks(scenario: Scenario, playable, why) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """An issue at ``phases.i.attacks.j.name`` for every attack name that is not ``playable``, saying ``why(name)``."""
    return [(("phases", i, "attacks", j, "name"), attack.name, why(attack.name))
            for i, phase in enumerate(scenario.phases) for j, attack in enumerate(phase.attacks) if not playable(attack.name)]


# ----------------------------------------------------------------------------- loading
def _registered_attacks() -> list[str]:
    from cmai_env.attacks.specs import available_attacks  # the declarations: no torch

    return available_attacks()


def _coerce_param(value: Any, default: Any) -> ParamValue:
    """Check ``value`` against the type of the parameter's default; fractions become floats."""
    if not isinstance(value, (bool, int, float, str)):
        raise ValueError("expected a number, a fraction like 8/255, true/false or a string")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError("expected a number or a fraction like 8/255")
        number = float(parse_fraction(value))
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"expected a string (default {default!r})")
        return value
    return value  # None or other defaults: no type to check against


def _shipped_entries() -> list[Any]:
    """The files of the ``cmai_env.scenarios`` package (wherever it is installed)."""
    try:
        return list(importlib.resources.files("cmai_env.scenarios").iterdir())
    except (NotADirectoryError, TypeError):
        # A stale editable install can expose the package as a namespace whose __path__ holds a
        # non-directory placeholder, which importlib.resources rejects: read its directories.
        package = importlib.import_module("cmai_env.scenarios")
        return [entry for p in package.__path__ if Path(p).is_dir() for entry in sorted(Path(p).iterdir())]


def _shipped_files() -> dict[str, Any]:
    files: dict[str, Any] = {}
    for entry in _shipped_entries():
        if entry.is_file() and entry.name.endswith(SCENARIO_SUFFIXES):
            files.setdefault(Path(entry.name).stem, entry)
    return files


def scenarios_available(include_evaluation_only: bool = True, fidelity: str | None = None) -> list[str]:
    """Names of the scenario files shipped with the package.

    :param include_evaluation_only: also list scenarios marked ``evaluation_only`` (held-out attacks).
    :param fidelity: only those that run at this fidelity (``embedding`` leaves out scenarios on a
        generative backbone, which run at ``pixel`` only); ``None``: all.
    """
    from cmai_env.model_configs import is_generative_backbone

    names = []
    for name, entry in sorted(_shipped_files().items()):
        raw = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        raw = raw if isinstance(raw, dict) else {}
        if not include_evaluation_only and raw.get("evaluation_only", False):
            continue
        backbone = raw.get("backbone") if isinstance(raw.get("backbone"), dict) else {}
        if fidelity == "embedding" and is_generative_backbone(str(backbone.get("name", ""))):
            continue
        names.append(name)
    return names


def _resolve(name_or_path: str | Path) -> tuple[str, bytes]:
    """(label used in messages, file bytes) of a shipped name or a path."""
    text = str(name_or_path)
    shipped = _shipped_files()
    if not isinstance(name_or_path, Path) and text in shipped:
        return f"{text} ({shipped[text]})", shipped[text].read_bytes()
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix not in SCENARIO_SUFFIXES:
            raise ScenarioError(f"{path}: a scenario file must end in .yaml or .yml")
        return str(path), path.read_bytes()
    raise FileNotFoundError(
        f"no scenario file {str(path)!r} (and no shipped scenario of that name); "
        f"shipped scenarios: {', '.join(sorted(shipped))}"
    )


def scenario_bytes(name_or_path: str | Path) -> bytes:
    """The scenario file's bytes, exactly as on disk (saved beside runs so they can be replayed).

    :raises FileNotFoundError: neither a shipped name nor an existing file.
    """
    return _resolve(name_or_path)[1]


def scenario_hash(name_or_path: str | Path) -> str:
    """sha256 of the scenario file's bytes (recorded with evaluation results)."""
    return hashlib.sha256(scenario_bytes(name_or_path)).hexdigest()


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read and validate a scenario: a shipped name (:func:`scenarios_available`) or a YAML path.

    :raises FileNotFoundError: neither a shipped name nor an existing file (lists the shipped names).
    :raises ScenarioError: YAML syntax errors (with the line) and schema violations (every bad
        field as a dotted path with its value and what is allowed).
    """
    label, data = _resolve(name_or_path)
    text = _checked_text(label, data)
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass: a key given twice is an error)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{label}{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{label}: a scenario file must be a YAML mapping of fields, got {type(raw).__name__}")
    if "name" not in raw and isinstance(name_or_path, (str, Path)):
        raw["name"] = Path(str(name_or_path)).stem
    return validate_scenario(raw, label, _line_index(text))


def distinct_scenario_names(scenarios: Sequence[str | Path], option: str = "--scenarios", overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Load every scenario and return their names, refusing two that share one.

    Reports, output folders, run folders and the frozen protocol are keyed by a scenario's
    ``name``, so a copy of ``quickstart.yaml`` that kept ``name: quickstart`` would overwrite (or be
    taken for) the shipped one's results. Commands that take several scenarios call this before
    running any, so a file that does not load is refused before the ones before it ran.

    :param overrides: scenario overrides the command will apply (``--env-kwargs``), checked on each too.
    :raises ScenarioError: two scenarios with one name (naming both), or one that does not validate.
    :raises FileNotFoundError: a scenario that is neither a shipped name nor a file.
    """
    seen: dict[str, str] = {}
    for scenario in scenarios:
        loaded = load_scenario(scenario)
        name = (apply_overrides(loaded, overrides) if overrides else loaded).name
        if name in seen:
            raise ScenarioError(
                f"{option}: {seen[name]} and {scenario} are both named {name!r}; results are kept per scenario name, "
                "so give each scenario once, and a copied scenario file its own `name:`"
            )
        seen[name] = str(scenario)
    return list(seen)


def scenario_option(parser: "argparse.ArgumentParser", scenarios: Sequence[str | Path], option: str = "--scenarios",
                    overrides: Mapping[str, Any] | None = None) -> list[str]:
    """For scripts: :func:`distinct_scenario_names` with a bad, missing or clashing scenario (or
    override) a usage error (exit 2) naming ``option``, before anything runs."""
    try:
        return distinct_scenario_names(scenarios, option, overrides)
    except (ScenarioError, FileNotFoundError) as error:
        parser.error(f"{option}: {error}" if not str(error).startswith(option) else str(error))


def _checked_text(label: str, data: bytes) -> str:
    """The file as text, after the size, encoding and alias limits (cheap checks before parsing).

    :raises ScenarioError: too large, not UTF-8 text, or too many YAML aliases.
    """
    if len(data) > MAX_FILE_BYTES:
        raise ScenarioError(f"{label}: {len(data):,} bytes; a scenario file may have at most {MAX_FILE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{label}: not a UTF-8 text file (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); a scenario is a YAML text file") from None
    if "\x00" in text:
        raise ScenarioError(f"{label}: contains NUL bytes; a scenario is a YAML text file")
    aliases = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: aliases are not expanded
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise ScenarioError(
                        f"{label}, line {event.start_mark.line + 1}: more than {MAX_YAML_ALIASES} YAML aliases (*name); "
                        "write the repeated parts out (deeply nested aliases expand exponentially)"
                    )
    except yaml.YAMLError:
        pass  # syntax errors are reported by the full parse, with their line
    return text


def validate_scenario(raw: Mapping[str, Any], source: str = "<scenario>", lines: dict[tuple, int] | None = None) -> Scenario:
    """Validate a mapping into a :class:`Scenario`; :class:`ScenarioError` names every bad field."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(exc, source, lines or {})) from None


def apply_overrides(scenario: Scenario, overrides: Mapping[str, Any]) -> Scenario:
    """A new, re-validated scenario with ``overrides`` applied.

    Keys are field names, dotted for nested ones (``dataset.train_n``, ``defense.lr``,
    ``phases.0.rounds``); ``None`` restores an optional field's default (``episode_rounds=None``).

    :raises ScenarioError: an unknown field or a value the schema rejects.
    """
    data = scenario.model_dump(mode="python", exclude_unset=False)
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = data
        try:
            for part in parts[:-1]:
                if isinstance(node, list):
                    node = node[int(part)]
                else:
                    if node.get(part) is None:  # an unset optional section (randomization)
                        node[part] = {}
                    node = node[part]
                if not isinstance(node, (dict, list)):
                    raise KeyError(part)
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                # a nested dict overrides the fields it names (defense={"lr": 1e-3}), as the dotted
                # keys do; the section's other fields keep the scenario's values
                _merge(node, {parts[-1]: value})
        except (KeyError, IndexError, ValueError, TypeError):
            raise ScenarioError(f"override {key}={value!r} of scenario {scenario.name!r}: no such field") from None
    return validate_scenario(data, f"scenario {scenario.name!r} with overrides {dict(overrides)}")


def _merge(target: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` into ``target``, recursing where both hold a mapping."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


# ----------------------------------------------------------------------------- messages
def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _line_index(text: str) -> dict[tuple, int]:
    """Path of every node of the YAML document → its 1-based line (for error messages)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    index: dict[tuple, int] = {}
    walked: set[int] = set()

    def walk(node, path: tuple) -> None:
        index[path] = node.start_mark.line + 1
        # An alias is the anchored node itself: walk it once, at its first path. Following it again
        # would visit 2^k paths for k nested aliases (and never end for a recursive one).
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                walk(value_node, path + (str(key_node.value),))
                index[path + (str(key_node.value),)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The schema model a (validated) path points into, to list its allowed fields."""
    model: Any = Scenario
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``list[Phase]`` / ``Phase | None`` → ``Phase``."""
    for _ in range(3):
        origin = get_origin(annotation)
        if origin is None:
            return annotation
        args = [a for a in get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        annotation = models[0] if models else (args[0] if args else annotation)
    return annotation


def _normalise_loc(loc: tuple) -> tuple:
    # pydantic adds the union member / validator name to the location of some errors
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"function-after", "function-before"})))


def format_validation_error(exc: ValidationError, source: str, lines: Mapping[tuple, int] | None = None) -> str:
    """One line per problem: ``dotted.path (line N) = value: what is wrong / allowed``."""
    lines = lines or {}
    problems: list[tuple[int, str]] = []
    for error in exc.errors():
        loc = _normalise_loc(tuple(error["loc"]))
        inner = (error.get("ctx") or {}).get("error")
        if isinstance(inner, _Issues):
            entries = [(loc + tuple(path), value, message) for path, value, message in inner.issues]
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                model = _model_at(loc[:-1])
                allowed = ", ".join(model.model_fields) if model is not None else "?"
                message = f"unknown field; allowed fields here: {allowed}"
            value: Any = error.get("input")
            if error["type"] == "missing":
                entries = [(loc, _MISSING, "required field is missing")]
            else:
                entries = [(loc, value, message)]
        for path, value, message in entries:
            line = _nearest_line(path, lines)
            where = f" (line {line})" if line is not None else ""
            shown = "" if value is _MISSING else f" = {_short(value)}"
            problems.append((line or 0, f"  {_dotted(path) or '<top level>'}{where}{shown}: {message}"))
    problems.sort(key=lambda p: p[0])  # stable: file order, then pydantic's order
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{source}: invalid scenario ({count}):\n" + "\n".join(text for _, text in problems)


_MISSING = object()


def _nearest_line(path: tuple, lines: Mapping[tuple, int]) -> int | None:
    if not path:
        return lines.get(())
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut at ``limit`` characters. :mod:`reprlib` stops at a depth and a width, so
    a value made of nested YAML aliases (or a recursive one), whose full ``repr`` is exponentially
    long (or endless), costs at most ``maxlist ** maxlevel`` steps."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxtuple, shortener.maxdict = 5, 8, 8, 8
    shortener.maxstring = shortener.maxother = limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "AttackSpec",
    "BackboneSpec",
    "Budget",
    "DatasetSpec",
    "DefenseSpec",
    "DetectorSpec",
    "Phase",
    "RandomSpec",
    "RewardWeights",
    "Scenario",
    "ScenarioError",
    "Transition",
    "apply_overrides",
    "distinct_scenario_names",
    "format_validation_error",
    "load_scenario",
    "parse_fraction",
    "scenario_hash",
    "scenario_option",
    "scenarios_available",
    "validate_scenario",
]
