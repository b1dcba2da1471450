"""What a simulation fidelity provides to the environment.

A *fidelity* owns the defended model and everything that touches it: it draws the round's
incoming traffic (crafting adversarial pairs against the current model), measures the traffic's
hidden states, runs the trainer update with the agent's loss weights, and measures robustness on
the probe set. ``pixel`` does this through the real backbone in input space; ``embedding`` does
it on cached frozen embeddings with bounded embedding-space perturbations, trading realism for
speed. The environment composes a fidelity with the attack stream, detector and latency tracker
and never needs to know which one it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmai_env.attacks import PairBatch
from cmai_env.corruptions import corrupted_split
from cmai_env.round import AttackOutcome
from cmai_env.scenario import Scenario
from cmai_env.stream import RoundPlan


@dataclass
class RoundTraffic:
    """One round's incoming pairs.

    :param payload: fidelity-specific tensors (a PairBatch for pixel, embeddings for embedding).
    :param attack_index: int (N,), the mixture entry that perturbed each pair, -1 for clean pairs.
    :param attack_names: name of each mixture entry of the round's plan.
    :param attack_ms: wall-clock spent crafting the adversarial pairs.
    """

    payload: Any
    attack_index: np.ndarray
    attack_names: list[str]
    attack_ms: float

    @property
    def is_adv(self) -> np.ndarray:
        return self.attack_index >= 0


@dataclass
class TrafficStats:
    """Hidden-state statistics of the incoming pairs under the current defended model."""

    image_embeds: torch.Tensor  #: (N, D) normalised
    text_embeds: torch.Tensor  #: (N, D) normalised
    consistency: torch.Tensor  #: (N,) L_consistency per pair (the detector's score)
    cosine: torch.Tensor  #: (N,) cos(e_v, e_t)


@dataclass
class UpdateResult:
    """Loss terms and cost of the round's trainer update(s)."""

    l_task: float
    l_consistency: float
    l_adv: float
    l_total: float
    attack_steps_used: int  #: crafting steps for L_adv actually run (0 when skipped)
    max_attack_steps: int  #: crafting steps a full-β_adv update would run
    attack_ms: float
    update_ms: float
    grad_norms: dict[str, float] | None = None


@dataclass
class ProbeResult:
    """Robustness of the defended model on the probe set after the update.

    The probe set is split once (:func:`cmai_env.round.probe_split`): the first pairs are the
    evaluation split (attacked; ASR and false rejections), the rest calibrate the detector.
    """

    clean_acc: float  #: image zero-shot accuracy on clean probe pairs
    consistency_score: float  #: mean cos of matched clean probe embeddings
    clean_consistency: np.ndarray  #: clean L_consistency of the calibration split (τ is calibrated on it)
    asr: float  #: mixture-weighted ASR of the round's active attacks (0 in quiet rounds)
    #: mean normalised entropy of the clean probe images' predictions (:func:`cmai_env.round.prediction_entropy`)
    prediction_entropy: float
    asr_per_attack: dict[str, float] = field(default_factory=dict)
    probe_ms: float = 0.0
    #: clean L_consistency of the evaluation split (the pairs that are attacked), for false rejections
    eval_clean_consistency: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: whether each evaluation pair's clean image prediction is correct
    eval_clean_correct: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: per active attack (mixture order), its per-pair outcome on the evaluation split
    outcomes: list[AttackOutcome] = field(default_factory=list)


class Fidelity(ABC):
    """Interface the environment drives once per round (see module docstring)."""

    name: str = ""

    def __init__(self, scenario: Scenario, device: str = "cpu") -> None:
        self.scenario = scenario
        self.device = torch.device(device)

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @abstractmethod
    def reset(self) -> None:
        """Restore the defended parameters and optimiser to their state at construction."""

    @abstractmethod
    def incoming(self, plan: RoundPlan, rng: np.random.Generator) -> RoundTraffic:
        """Draw ``batch_size`` pairs; perturb ``round(adversarial_share·N)`` of them by the mixture."""

    @abstractmethod
    def observe(self, traffic: RoundTraffic) -> TrafficStats:
        """Hidden states and consistency of the incoming pairs (no gradients)."""

    @abstractmethod
    def update(
        self, traffic: RoundTraffic, betas: np.ndarray, flagged: np.ndarray, rng: np.random.Generator
    ) -> UpdateResult:
        """Train with ``L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv``.

        The clean originals of the round's pairs are the defender's training batch; the incoming
        pairs :func:`cmai_env.round.observed_adversarial` picks from the detector's flags (by
        ``defense.train_on_flagged`` and ``defense.flagged_pairs``) are added to L_adv as observed
        adversarial traffic (L_consistency is trained on the clean pairs only).
        """

    @abstractmethod
    def probe(self, plan: RoundPlan, rng: np.random.Generator) -> ProbeResult:
        """Clean accuracy, consistency and per-attack ASR on the probe set."""


def defended_backbone(scenario: Scenario, device: str = "cpu", generative: bool = False):
    """The scenario's backbone, loaded once for a fidelity that defends a ``generative`` one or not.

    A contrastive round (zero-shot task, CLIP consistency) would silently defend a generative
    backbone's CLIP head instead of its captions; the generative round
    (:mod:`cmai_env.fidelity.generative`) needs captions. Only pixel fidelity has a generative
    round: no faithful embedding proxy of one exists (a caption is generated from the vision
    tokens, not from one pooled embedding).

    :raises ValueError: the backbone's kind does not match ``generative`` (naming the scenario
        field, the value and what is allowed).
    """
    from cmai_env.models import load_backbone

    backbone = load_backbone(scenario.backbone.name, scenario.backbone.pretrained, device=device)
    if getattr(backbone, "generative", False) and not generative:
        raise ValueError(
            f"scenario {scenario.name!r}: backbone.name = {scenario.backbone.name!r} is a generative backbone; fidelity "
            f"{scenario.fidelity!r} defends contrastive (CLIP) backbones only (e.g. cmai-tiny, cmai-tiny-rn, any open_clip "
            "architecture). Run a generative backbone with fidelity: pixel (cmai_env.fidelity.generative)."
        )
    if generative and not getattr(backbone, "generative", False):
        raise ValueError(
            f"scenario {scenario.name!r}: backbone.name = {scenario.backbone.name!r} is not a generative backbone; "
            "the generative round needs one (e.g. cmai-tiny-flamingo)"
        )
    return backbone


def assign_attacks(plan: RoundPlan, n: int, rng: np.random.Generator) -> np.ndarray:
    """Which mixture entry perturbs each of ``n`` pairs (int array, -1 for clean pairs).

    Exactly ``round(adversarial_share · n)`` pairs are adversarial; each picks a mixture entry
    with probability equal to its weight. Positions are shuffled so adversarial pairs are not
    always first.
    """
    if not plan.mixture:
        return np.full(n, -1, dtype=np.int64)
    n_adv = int(round(plan.adversarial_share * n))
    weights = np.asarray([entry.weight for entry in plan.mixture], dtype=np.float64)
    picks = rng.choice(len(plan.mixture), size=n_adv, p=weights / weights.sum())
    labels = np.concatenate([picks, np.full(n - n_adv, -1)]).astype(np.int64)
    return labels[rng.permutation(n)]


#: Training pairs a universal perturbation is fitted on before it is applied to unseen pairs.
UNIVERSAL_FIT_N = 256


def universal_fit_pairs(pool):
    """The first :data:`UNIVERSAL_FIT_N` pairs of a pool (a ``PairBatch``): what an attack that
    learns one perturbation for every image (``universal``) is fitted on, at both fidelities."""
    return pool.subset(slice(0, min(len(pool), UNIVERSAL_FIT_N)))


def corrupted_pairs(batch, key: tuple[str, int] | None, dataset_seed: int, split: str):
    """``batch`` (a ``PairBatch``) with its images replaced by their view under corruption ``key``
    (:func:`cmai_env.corruptions.corrupted_split`): the pairs a phase with that corruption serves."""
    return PairBatch(corrupted_split(batch.images, key, dataset_seed, split), batch.tokens, batch.labels)


def entry_key(entry) -> tuple:
    """Hashable identity of a mixture entry's attack configuration."""
    return (entry.name, tuple(sorted(entry.params.items())))
