"""N embedding-fidelity worlds advanced as one batched torch computation.

Every environment owns a pair of residual adapters (image, text) and its AdamW state; here they
are *stacked*: each parameter is one tensor with a leading environment dimension, every forward
pass is a batched matmul over ``(envs, rows, D)``, and one optimiser step updates all
environments. AdamW is element-wise, and the loss that is back-propagated is the *sum* of the
environments' ``L_total``, so the stacked update is exactly N independent updates; only the
step count (for the bias correction) must be per environment, because environments reset at
different times. :class:`StackedAdamW` keeps it so.

The single-environment :class:`cmai_env.fidelity.embedding.EmbeddingFidelity` is this world with
one environment, and :class:`cmai_env.vector_env.CMAIVectorEnv` is it with N: one code path,
hence the same numbers. Loss terms, crafting objective and ascent steps come from
:mod:`cmai_env.round`; how each attack is played here is declared by the attack itself
(:class:`cmai_env.attacks.base.EmbeddingCounterpart`).

Methods take ``envs``: ``None`` for all environments (no gathering), or a ``LongTensor`` of
environment indices; the tensors passed with it are those environments' rows, in that order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmai_env.attacks import attack_class
from cmai_env.corruptions import corrupted_split
from cmai_env.data import load_dataset
from cmai_env.fidelity.base import ProbeResult, UpdateResult, assign_attacks, corrupted_pairs, defended_backbone, entry_key
from cmai_env.fidelity.travel import (
    ReplayCaptions,
    TrainingTravel,
    TravelCache,
    TravelRadii,
    clean_embeddings,
    entry_attack,
    pixel_travel,
    replay_captions,
    training_travel,
    travel_radii,
)
from cmai_env.models.backbone import ResidualAdapter
from cmai_env.round import (
    AttackOutcome,
    bridging_objective,
    crafted_adv_loss,
    crafting_steps,
    default_step_size,
    defence_terms,
    l2_ascent,
    mixture_asr,
    observed_adversarial,
    pair_ce,
    pair_consistency,
    prediction_entropy,
    probe_split,
    total_loss,
)
from cmai_env.scenario import Scenario
from cmai_env.stream import RoundPlan, attack_views

#: The L2 radius every family had at its default budget before the per-family calibration (r ∝ budget).
#: It put every default-budget attack beyond what an adapter can resist; kept importable, no longer used.
RADIUS = 0.5
#: Per embedding family, ``(scale, γ)`` of ``r = scale · (budget / default budget)^γ`` on a unit
#: embedding. Found by ``python benchmarks/fidelity_calibration.py --calibrate`` on quickstart's
#: data (shapes, cmai-tiny, 128 attacked + 128 calibration probe pairs, 3 steps, step 2.5·budget/steps,
#: undefended model): per family a grid search (scale 0.025…1.0 step 0.025, γ ∈ {2, 1.5, 1, ¾, ½, ⅜,
#: ¼, ⅛}) minimising the largest |embedding − pixel| of ASR and detector TPR over the family's attacks
#: at 3 budgets each (ℓ∞ 2, 4, 8/255; bridge_image 4, 8, 16/255; ℓ2 0.125, 0.25, 0.5; text 0.05, 0.1,
#: 0.2). γ < 1: pixel ASR saturates with the budget (pgd_linf 0.60, 0.88, 0.96) while the embedding
#: ASR jumps from ≈0 to ≈1 between r ≈ 0.25 and 0.5, so the radius grows slowly with the budget.
#: Largest |Δ| per family: bridge_image 0.09, both 0.09, aware_image 0.10, bridge_text 0.10,
#: universal 0.11, text 0.14, aware_rewrite 0.34 (its pixel TPR stays ≈0.5, the embedding one falls
#: from 0.93 to 0.24), image 0.15 (pgd_linf and fgsm), image_l2 0.21 (pgd_l2: at ℓ2 0.125 the pixel
#: attack flips 16% of pairs while the detector flags only 57%; an embedding step that flips as many
#: is flagged ~90% of the time). The old single RADIUS: 4/30 cells within ±0.10, this table: 13/30.
#: Until 2026-11-27 pgd_l2 was played in the ``image`` family, whose law fits pgd_linf; at small ℓ2
#: budgets that made it far stronger than the pixel attack (ASR +0.32 and +0.41 at 0.125 and 0.25,
#: largest |Δ| 0.43). ``image`` kept its law, so no scenario without pgd_l2 changed.
FAMILY_RADIUS_LAW: dict[str, tuple[float, float]] = {
    "image": (0.65, 0.375),
    "image_l2": (1.0, 1.5),
    "text": (0.425, 1.0),
    "universal": (0.95, 2.0),
    "bridge_image": (0.55, 0.125),
    "bridge_text": (0.425, 1.5),
    "both": (0.5, 0.125),
    "aware_image": (0.775, 0.375),
    "aware_rewrite": (0.625, 0.25),
}
#: Crafting steps are the attack's ``steps`` parameter, capped here.
MAX_STEPS = 3
#: Bottleneck width of the residual adapters.
ADAPTER_HIDDEN = 64
#: AdamW weight decay of the adapters (``torch.optim.AdamW``'s default, which this world always used).
WEIGHT_DECAY = 1e-2

# Crafting modes per modality and row: 0 untouched, 1 up the zero-shot CE, 2 toward the nearest
# wrong class prompt c*, 3 (image) detector-aware: up min(margin, κ) − λ·L_consistency with the
# row's caption, 4 (image) down L_consistency + μ·CE(·, c*) with the rewritten caption;
# text mode 3: the caption is replaced by the rewritten caption of c* (no ascent); text mode 4
# (``pixel_travel``, declarations with ``replay``): the caption is replaced by the worst of its
# attack's cached candidate captions under the current text adapter (no ascent).
_MODES = {
    "image": (1, 0),
    "image_l2": (1, 0),
    "universal": (1, 0),
    "text": (0, 1),
    "bridge_image": (2, 0),
    "bridge_text": (0, 2),
    "both": (1, 1),
    "aware_image": (3, 0),
    "aware_rewrite": (4, 3),
}
#: Detector-aware objective parameters (the pixel attacks' names) and their defaults.
AWARE_PARAMS = {"lam": 1.0, "kappa": 5.0, "ce_weight": 0.0}

EnvIndex = torch.Tensor | None


# ---------------------------------------------------------------------------- attacks
def embedding_radius(family: str, relative_budget: float, law: tuple[float, float] | None = None) -> float:
    """L2 radius on a unit embedding of a ``family`` attack at ``budget / default budget``:
    ``r = scale · relative_budget^γ`` with ``(scale, γ) = law``, by default ``FAMILY_RADIUS_LAW[family]``
    (a scenario's ``embedding_radius_laws`` give others).

    :raises ValueError: an unknown family, or a negative or non-finite relative budget.
    """
    if family not in FAMILY_RADIUS_LAW:
        raise ValueError(f"unknown embedding family {family!r}; families: {', '.join(FAMILY_RADIUS_LAW)}")
    if not (relative_budget >= 0 and relative_budget < float("inf")):
        raise ValueError(f"embedding family {family!r}: budget / default budget must be finite and ≥ 0, got {relative_budget}")
    scale, exponent = FAMILY_RADIUS_LAW[family] if law is None else law
    return scale * relative_budget**exponent


@dataclass(frozen=True)
class EmbeddingAttack:
    """A scenario attack as the embedding fidelity plays it: family, L2 radius and steps.

    Built from the attack's own declaration (:attr:`cmai_env.attacks.base.Attack.embedding`):
    ``radius = embedding_radius(family, params[budget] / default[budget])``, ``steps = min(params[steps], MAX_STEPS)``.
    """

    name: str
    family: str
    radius: float
    steps: int
    modality: str
    lam: float = AWARE_PARAMS["lam"]
    kappa: float = AWARE_PARAMS["kappa"]
    ce_weight: float = AWARE_PARAMS["ce_weight"]

    @classmethod
    def from_entry(cls, entry, laws: Mapping[str, tuple[float, float]] | None = None) -> "EmbeddingAttack":
        """:param laws: per family, ``(scale, γ)`` in place of ``FAMILY_RADIUS_LAW``'s (a scenario's ``embedding_radius_laws``)."""
        attack = attack_class(entry.name)
        counterpart = attack.embedding
        if counterpart is None:
            raise ValueError(
                f"attack {entry.name!r} declares no embedding-fidelity counterpart (its declaration in "
                "cmai_env/attacks/specs.py sets no `embedding=EmbeddingCounterpart(...)`); run this scenario with fidelity: pixel"
            )
        defaults = attack.parameters()
        target = entry.params.get("target", defaults.get("target", "nearest"))
        if target != "nearest":
            # The embedding families pick c* as the nearest wrong class prompt; a random target is not played there.
            raise ValueError(
                f"attack {entry.name!r}: params.target = {target!r} is played at pixel fidelity only; "
                "the embedding fidelity supports target: nearest"
            )
        default_budget = float(defaults.get(counterpart.budget, 1.0) or 1.0)
        budget = float(entry.params.get(counterpart.budget, default_budget))
        steps = 1 if counterpart.steps is None else int(entry.params.get(counterpart.steps, defaults.get(counterpart.steps, 1)))
        aware = {key: float(entry.params.get(key, defaults.get(key, value))) for key, value in AWARE_PARAMS.items()}
        return cls(
            entry.name, counterpart.family, embedding_radius(counterpart.family, budget / default_budget, (laws or {}).get(counterpart.family)),
            max(1, min(steps, MAX_STEPS)),
            counterpart.modality, **aware,
        )


@dataclass
class RowAttacks:
    """Per-row crafting orders for a ``(E, R)`` block of pairs (numpy, filled on the host).

    :param mode_v: crafting mode per row for the image side (see ``_MODES``); ``mode_t`` for the text side.
    :param radius: L2 radius per row. :param steps: PGD steps per row (0: untouched).
    :param group: universal-perturbation group per row (-1: own δ); rows of one env and group share δ.
    :param aware: ``(E, R, 3)`` detector-aware parameters ``λ, κ, μ`` per row (modes 3 and 4).
    :param radius_t: L2 radius per row for the text side when it differs from the image side's;
        ``None`` (the radius laws): ``radius`` for both sides. ``embedding_attack_radius:
        pixel_travel`` and ``benchmarks/fidelity_calibration.py --pixel-travel`` set it: each side
        gets the distance the pixel attack moved that side's embedding.
    :param replay: per row, its row of the replayed candidate captions (text mode 4, see
        :meth:`StackedEmbeddingWorld.craft`); −1 elsewhere.
    """

    mode_v: np.ndarray
    mode_t: np.ndarray
    radius: np.ndarray
    steps: np.ndarray
    group: np.ndarray
    aware: np.ndarray
    radius_t: np.ndarray | None = None
    replay: np.ndarray | None = None

    @classmethod
    def empty(cls, shape: tuple[int, int], per_side: bool = False) -> "RowAttacks":
        """No row attacked; ``per_side``: with a text-side ``radius_t`` of its own (filled like ``radius``)."""
        zeros = np.zeros(shape, dtype=np.int64)
        aware = np.broadcast_to(np.array(list(AWARE_PARAMS.values()), dtype=np.float32), (*shape, 3)).copy()
        radius_t = np.zeros(shape, dtype=np.float32) if per_side else None
        return cls(
            zeros, zeros.copy(), np.zeros(shape, dtype=np.float32), zeros.copy(), np.full(shape, -1, dtype=np.int64), aware, radius_t,
            np.full(shape, -1, dtype=np.int64),
        )

    def fill(self, env: int, rows: slice | np.ndarray, attack: EmbeddingAttack, group: int) -> None:
        mode_v, mode_t = _MODES[attack.family]
        self.mode_v[env, rows], self.mode_t[env, rows] = mode_v, mode_t
        self.radius[env, rows], self.steps[env, rows] = attack.radius, attack.steps
        if self.radius_t is not None:
            self.radius_t[env, rows] = attack.radius
        self.aware[env, rows] = (attack.lam, attack.kappa, attack.ce_weight)
        if attack.family == "universal":
            self.group[env, rows] = group

    def replay_from(self, env: int, rows: slice | np.ndarray, candidates: np.ndarray) -> None:
        """Make ``rows`` of ``env`` replay caption candidates (text mode 4) from these rows of the candidate table."""
        self.mode_v[env, rows], self.mode_t[env, rows] = 0, 4
        self.replay[env, rows] = candidates


# ---------------------------------------------------------------------------- stacked parameters
class StackedAdapters:
    """N :class:`ResidualAdapter` s (``e ↦ e + W₂·gelu(W₁·e)``) as stacked tensors.

    :param adapter: the initial adapter every environment starts from.
    :param n: number of environments.
    """

    def __init__(self, adapter: ResidualAdapter, n: int, device: torch.device) -> None:
        def stack(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device).unsqueeze(0).repeat(n, *([1] * t.dim())).contiguous().requires_grad_(True)

        self.down_w = stack(adapter.down.weight.T)  # (N, D, H)
        self.down_b = stack(adapter.down.bias.unsqueeze(0))  # (N, 1, H)
        self.up_w = stack(adapter.up.weight.T)  # (N, H, D)
        self.up_b = stack(adapter.up.bias.unsqueeze(0))  # (N, 1, D)
        self.initial = [p.detach()[0].clone() for p in self.params]

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.down_w, self.down_b, self.up_w, self.up_b]

    def __call__(self, x: torch.Tensor, envs: EnvIndex = None) -> torch.Tensor:
        """``x`` (E, R, D) → adapted (E, R, D), env ``e`` through its own adapter."""
        dw, db, uw, ub = self.params if envs is None else [p[envs] for p in self.params]
        hidden = F.gelu(torch.baddbmm(db, x, dw))
        return x + torch.baddbmm(ub, hidden, uw)

    def reset(self, envs: EnvIndex) -> None:
        with torch.no_grad():
            for p, init in zip(self.params, self.initial):
                if envs is None:
                    p.copy_(init.expand_as(p))
                else:
                    p[envs] = init


class StackedAdamW:
    """AdamW over stacked per-environment parameters with one step count per environment.

    Hand-written because ``torch.optim.AdamW`` keeps one step count per tensor, and the bias
    correction ``1 − β^t`` must restart when a single environment resets. The update is
    torch's AdamW formula, element-wise:
    ``p ← p·(1 − lr·λ) − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)``.
    """

    def __init__(self, params: Sequence[torch.Tensor], n: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = WEIGHT_DECAY) -> None:
        self.params = list(params)
        self.lr, self.beta1, self.beta2, self.eps, self.weight_decay = lr, betas[0], betas[1], eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.steps = np.zeros(n, dtype=np.int64)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self, envs: EnvIndex) -> None:
        with torch.no_grad():
            for state in (*self.exp_avg, *self.exp_avg_sq):
                if envs is None:
                    state.zero_()
                else:
                    state[envs] = 0
        if envs is None:
            self.steps[:] = 0
        else:
            self.steps[envs.cpu().numpy()] = 0

    @torch.no_grad()
    def step(self, envs: EnvIndex) -> None:
        """One AdamW step for ``envs`` (``None``: all); the other environments do not move."""
        n = len(self.steps)
        if envs is None:
            mask_np = np.ones(n, dtype=bool)
        else:
            mask_np = np.zeros(n, dtype=bool)
            mask_np[envs.cpu().numpy()] = True
        self.steps[mask_np] += 1
        t = np.maximum(self.steps, 1).astype(np.float64)
        device = self.params[0].device
        step_size = torch.as_tensor(self.lr / (1.0 - self.beta1**t), dtype=torch.float32, device=device)
        bias2_sqrt = torch.as_tensor(np.sqrt(1.0 - self.beta2**t), dtype=torch.float32, device=device)
        mask = None if envs is None else torch.as_tensor(mask_np, device=device)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            view = (-1,) + (1,) * (p.dim() - 1)
            new_p = p * (1.0 - self.lr * self.weight_decay)
            new_m = m.lerp(grad, 1.0 - self.beta1)
            new_v = v * self.beta2 + (1.0 - self.beta2) * grad * grad
            denom = (new_v.sqrt() / bias2_sqrt.view(view)).add_(self.eps)
            new_p = new_p - step_size.view(view) * new_m / denom
            if mask is None:
                p.copy_(new_p), m.copy_(new_m), v.copy_(new_v)
            else:
                keep = mask.view(view)
                p.copy_(torch.where(keep, new_p, p)), m.copy_(torch.where(keep, new_m, m)), v.copy_(torch.where(keep, new_v, v))


# ---------------------------------------------------------------------------- results
@dataclass
class StackedTraffic:
    """The incoming pairs of E environments: clean originals, what arrived, and who perturbed what."""

    raw_v: torch.Tensor  #: (E, B, D) clean image embeddings
    raw_t: torch.Tensor  #: (E, B, D) clean caption embeddings
    adv_v: torch.Tensor  #: (E, B, D) received image embeddings
    adv_t: torch.Tensor  #: (E, B, D) received caption embeddings
    labels: torch.Tensor  #: (E, B)
    attack_index: np.ndarray  #: (E, B) mixture entry per pair, -1 clean
    attack_ms: float
    #: (E, B, 1) image- and caption-side radius of each pair's ``L_adv`` example under
    #: ``defense.embedding_train_radius: pixel_travel`` (:attr:`StackedEmbeddingWorld.train_travel`); else None
    train_radii: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StackedStats:
    """Hidden-state statistics of the received pairs, per environment."""

    image_embeds: torch.Tensor  #: (E, B, D) normalised
    text_embeds: torch.Tensor  #: (E, B, D)
    consistency: torch.Tensor  #: (E, B) L_consistency (the detector's score)
    cosine: torch.Tensor  #: (E, B)


@dataclass
class StackedUpdate:
    """Per-environment loss terms (before the step) and crafting steps of one update."""

    l_task: np.ndarray
    l_consistency: np.ndarray
    l_adv: np.ndarray
    l_total: np.ndarray
    attack_steps_used: np.ndarray
    attack_ms: float
    update_ms: float

    def row(self, k: int, max_attack_steps: int) -> UpdateResult:
        """Row ``k``'s update as one environment's :class:`UpdateResult` (``max_attack_steps``: the defence's)."""
        return UpdateResult(
            l_task=float(self.l_task[k]),
            l_consistency=float(self.l_consistency[k]),
            l_adv=float(self.l_adv[k]),
            l_total=float(self.l_total[k]),
            attack_steps_used=int(self.attack_steps_used[k]),
            max_attack_steps=max_attack_steps,
            attack_ms=self.attack_ms,
            update_ms=self.update_ms,
        )


@dataclass
class StackedProbe:
    """Per-environment probe metrics after the update."""

    clean_acc: np.ndarray  #: (E,)
    consistency_score: np.ndarray  #: (E,)
    clean_consistency: np.ndarray  #: (E, P − n) clean L_consistency of the calibration split
    asr: np.ndarray  #: (E,) mixture-weighted ASR
    prediction_entropy: np.ndarray  #: (E,) mean normalised entropy of the clean image predictions
    asr_per_attack: list[dict[str, float]]
    probe_ms: float
    eval_clean_consistency: np.ndarray  #: (E, n) clean L_consistency of the evaluation split
    eval_clean_correct: np.ndarray  #: (E, n) clean image prediction correct
    outcomes: list[list[AttackOutcome]]  #: per env, per active attack, its outcome on the evaluation split

    def row(self, k: int) -> ProbeResult:
        """Row ``k``'s probe as one environment's :class:`ProbeResult`."""
        return ProbeResult(
            clean_acc=float(self.clean_acc[k]),
            consistency_score=float(self.consistency_score[k]),
            clean_consistency=self.clean_consistency[k],
            asr=float(self.asr[k]),
            prediction_entropy=float(self.prediction_entropy[k]),
            asr_per_attack=self.asr_per_attack[k],
            probe_ms=self.probe_ms,
            eval_clean_consistency=self.eval_clean_consistency[k],
            eval_clean_correct=self.eval_clean_correct[k],
            outcomes=self.outcomes[k],
        )


# ---------------------------------------------------------------------------- the world
class StackedEmbeddingWorld:
    """The embedding fidelity for ``n_envs`` environments at once (module docstring).

    :param scenario: the (validated) scenario; every environment shares its data and defence.
    :param n_envs: number of stacked environments.
    :param device: torch device of the cached embeddings and the adapters.
    """

    def __init__(self, scenario: Scenario, n_envs: int = 1, device: str | torch.device = "cpu") -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be ≥ 1, got {n_envs}")
        self.scenario = scenario
        self.n_envs = n_envs
        self.device = torch.device(device)
        spec = scenario.dataset
        backbone = defended_backbone(scenario, device=str(self.device))
        size = backbone.image_size
        pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=size, root=spec.root)
        probe = load_dataset(spec.name, split="val", n=spec.probe_n, seed=spec.seed, image_size=size, root=spec.root)
        # One cached view of the images per corruption the scenario's phases name (index 0: clean).
        self.corruptions: list[tuple[str, int] | None] = [None, *scenario.corruptions_used()]
        with torch.no_grad():
            pooled_pool = [_embed_images(backbone, corrupted_split(pool.images, key, spec.seed, "train"), normalize=False) for key in self.corruptions]
            self.pool_views = F.normalize(torch.stack(pooled_pool), dim=-1)
            self.probe_views = torch.stack([_embed_images(backbone, corrupted_split(probe.images, key, spec.seed, "val")) for key in self.corruptions])
            self.pool_v, self.probe_v = self.pool_views[0], self.probe_views[0]  # the clean data
            pooled_captions = backbone.encode_text(backbone.tokenize(pool.captions), normalize=False)
            self.pool_t = F.normalize(pooled_captions, dim=-1)
            #: what the adapters' unit inputs are multiplied by, image and caption side
            #: (``defense.embedding_adapter_input``: 1, or the towers' mean pooled norm on the clean pool)
            self.adapter_input_scale = (1.0, 1.0)
            if scenario.defense.embedding_adapter_input == "pooled_norm":
                self.adapter_input_scale = (float(pooled_pool[0].norm(dim=-1).mean()), float(pooled_captions.norm(dim=-1).mean()))
            self.probe_t = backbone.encode_text(backbone.tokenize(probe.captions))
            self.class_raw = backbone.class_text_embeddings(pool.class_names, pool.templates)
            # What aware_caption_rewrite sends: the first template filled with the target class.
            self.rewrite_raw = backbone.encode_text(backbone.tokenize([pool.templates[0].format(name) for name in pool.class_names]))
        self.pool_y = pool.labels.to(self.device)
        self.probe_y = probe.labels.to(self.device)
        self.logit_scale = float(backbone.logit_scale.detach())
        self.kl_weight = 1.0
        dim = int(self.pool_v.shape[-1])
        generator = torch.Generator().manual_seed(spec.seed)
        self.image = StackedAdapters(ResidualAdapter(dim, ADAPTER_HIDDEN, generator), n_envs, self.device)
        self.text = StackedAdapters(ResidualAdapter(dim, ADAPTER_HIDDEN, generator), n_envs, self.device)
        self.optimizer = StackedAdamW(self.image.params + self.text.params, n_envs, scenario.defense.adapter_lr)
        # Training budgets map to radii the way attack budgets do (defense.embedding_train_radius:
        # law): relative to the default budget of the image (pgd_linf) and text (text_embedding_pgd)
        # attacks, times the scenario's embedding_train_radius_scale (DefenseSpec: how much farther
        # pixel attacks travel), the image side's own where embedding_image_train_radius_scale gives
        # one. Under pixel_travel the same scales multiply each pair's own travel (train_travel).
        defense = scenario.defense
        scale = defense.embedding_train_radius_scale
        laws = scenario.embedding_radius_laws
        self.train_radius_v = defense.image_train_radius_scale * embedding_radius("image", defense.eps_v / float(attack_class("pgd_linf").parameters()["eps"]), laws.get("image"))
        self.train_radius_t = scale * embedding_radius("text", defense.eps_t / float(attack_class("text_embedding_pgd").parameters()["eps"]), laws.get("text"))
        #: ``defense.embedding_train_radius: pixel_travel``: per view, the (N,) image- and caption-side
        #: training radius of every pool pair, the scales times the pixel trainer's travel; else empty
        self.train_travel: list[tuple[torch.Tensor, torch.Tensor]] = []
        if defense.embedding_train_radius == "pixel_travel" and defense.attack_steps > 0:
            crafting = ("joint_pgd", float(defense.eps_v), float(defense.eps_t), float(defense.alpha), int(defense.attack_steps))
            slots = [(crafting, view) for view in range(len(self.corruptions))]
            cache = TravelCache(record=TrainingTravel)
            digest = cache.key(backbone, (pool, probe), spec.seed, self.corruptions, slots, str(self.device))
            table = cache.get_or_compute(digest, slots, lambda: self._training_travel(backbone, pool, slots))
            as_radii = lambda travel, side_scale: side_scale * torch.as_tensor(np.array(travel), device=self.device)  # noqa: E731
            self.train_travel = [(as_radii(table[slot].pool_v, defense.image_train_radius_scale), as_radii(table[slot].pool_t, scale)) for slot in slots]
        self._attacks: dict[tuple, EmbeddingAttack] = {}
        self._classes: tuple[tuple[int, ...], torch.Tensor] | None = None  # see classes()
        for phase in scenario.phases:  # unplayable attacks fail at construction, not mid-episode
            for attack in phase.attacks:
                self.attack(attack)
        #: ``embedding_attack_radius: pixel_travel``: per (attack configuration, view), the image- and
        #: caption-side radius of every pool and probe pair (:mod:`cmai_env.fidelity.travel`); else empty
        self.travel: dict[tuple[tuple, int], TravelRadii] = {}
        #: ``pixel_travel``'s replayed caption candidates (declarations with ``replay``): every
        #: configuration's distinct captions' candidates stacked, (M, T, D) unit embeddings and (M, T)
        #: which are real, and per (configuration, ``"pool"``/``"probe"``) each pair's row; none at ``law``
        self.replay_captions: torch.Tensor | None = None
        self.replay_valid: torch.Tensor | None = None
        self._replay_rows: dict[tuple[tuple, str], np.ndarray] = {}
        if scenario.embedding_attack_radius == "pixel_travel":
            entries = {entry_key(entry): entry for phase in scenario.phases for entry in phase.attacks}
            # only the pairings a round can send: a phase's attacks on its own images, and across a
            # gradual transition on the next phase's (on abrupt_shift, half of every attack on every view)
            reachable = attack_views(scenario)
            slots = [(key, view) for view, corruption in enumerate(self.corruptions) for key in sorted(entries, key=repr) if (key, corruption) in reachable]
            cache = TravelCache()
            digest = cache.key(backbone, (pool, probe), spec.seed, self.corruptions, slots, str(self.device), scenario.pixel_travel_laws)
            self.travel = cache.get_or_compute(digest, slots, lambda: self._pixel_travel(backbone, pool, probe, entries, slots))
            replayed = [(key, "captions") for key in sorted(entries, key=repr) if attack_class(entries[key].name).embedding.replay]
            if replayed:
                cache = TravelCache(record=ReplayCaptions)
                digest = cache.key(backbone, (pool, probe), spec.seed, [], replayed, str(self.device))
                self._load_replay(cache.get_or_compute(digest, replayed, lambda: self._replay_captions(backbone, pool, probe, entries, replayed)))

    def _training_travel(self, backbone, pool, slots: Sequence[tuple[tuple, int]]) -> dict[tuple[tuple, int], TrainingTravel]:
        """How far the pixel trainer's crafted examples move every pool pair on each view of
        ``slots``, on the undefended backbone (:func:`cmai_env.fidelity.travel.training_travel`)."""
        from cmai_env.attacks import PairBatch, ZeroShotTask

        spec = self.scenario.dataset
        task = ZeroShotTask.from_dataset(backbone, pool)
        pairs = PairBatch.from_dataset(backbone, pool)
        table = {}
        for slot in slots:
            view = corrupted_pairs(pairs, self.corruptions[slot[1]], spec.seed, "train")
            travel = training_travel(task, view, self.scenario.defense, torch.Generator().manual_seed(spec.seed))
            table[slot] = TrainingTravel(*(side.astype(np.float32) for side in travel))
        return table

    def _replay_captions(self, backbone, pool, probe, entries: dict[tuple, object], slots: Sequence[tuple[tuple, str]]) -> dict[tuple, ReplayCaptions]:
        """Each configuration of ``slots`` as its pixel attack's candidate captions for every pool and
        probe caption, on the undefended backbone (:func:`cmai_env.fidelity.travel.replay_captions`)."""
        from cmai_env.attacks import PairBatch, ZeroShotTask

        task = ZeroShotTask.from_dataset(backbone, pool)
        pool_pairs, probe_pairs = PairBatch.from_dataset(backbone, pool), PairBatch.from_dataset(backbone, probe)
        tokens, labels = torch.cat([pool_pairs.tokens, probe_pairs.tokens]), torch.cat([pool_pairs.labels, probe_pairs.labels])
        table = {}
        for slot in slots:
            entry = entries[slot[0]]
            attack = entry_attack(entry.name, entry.params, task, pool_pairs, torch.Generator().manual_seed(self.scenario.dataset.seed))
            captions, valid, row = replay_captions(task, tokens, labels, attack)
            table[slot] = ReplayCaptions(captions, valid, row[: len(pool_pairs)], row[len(pool_pairs) :])
        return table

    def _load_replay(self, table: dict[tuple, ReplayCaptions]) -> None:
        """Stack every configuration's candidates into one table (:attr:`replay_captions`), padded to the widest T."""
        top = max(entry.captions.shape[1] for entry in table.values())
        parts, valid, self._replay_rows, start = [], [], {}, 0
        for (key, _), entry in table.items():
            pad = top - entry.captions.shape[1]
            parts.append(np.pad(entry.captions, ((0, 0), (0, pad), (0, 0))))
            valid.append(np.pad(entry.valid, ((0, 0), (0, pad))))
            for split in ("pool", "probe"):
                self._replay_rows[(key, split)] = start + getattr(entry, split)
            start += len(entry.captions)
        self.replay_captions = torch.as_tensor(np.concatenate(parts), device=self.device)
        self.replay_valid = torch.as_tensor(np.concatenate(valid), device=self.device)

    def _pixel_travel(self, backbone, pool, probe, entries: dict[tuple, object], slots: Sequence[tuple[tuple, int]]) -> dict[tuple[tuple, int], "TravelRadii"]:
        """Each ``(attack configuration, view)`` of ``slots`` as a pixel attack on the undefended
        backbone over that view's pool and probe images: each pair's radius is ``c · travel^γ``
        (:mod:`cmai_env.fidelity.travel`)."""
        from cmai_env.attacks import PairBatch, ZeroShotTask

        spec = self.scenario.dataset
        task = ZeroShotTask.from_dataset(backbone, pool)
        pool_pairs, probe_pairs = PairBatch.from_dataset(backbone, pool), PairBatch.from_dataset(backbone, probe)
        table: dict[tuple[tuple, int], TravelRadii] = {}
        for view, corruption in enumerate(self.corruptions):
            keys = [key for key, slot_view in slots if slot_view == view]
            if not keys:
                continue
            pool_view = corrupted_pairs(pool_pairs, corruption, spec.seed, "train")
            probe_view = corrupted_pairs(probe_pairs, corruption, spec.seed, "val")
            pool_clean, probe_clean = clean_embeddings(task, pool_view), clean_embeddings(task, probe_view)  # once per view
            for key in keys:
                entry = entries[key]
                generator = torch.Generator().manual_seed(spec.seed)
                attack = entry_attack(entry.name, entry.params, task, pool_view, generator)
                family = self.attack(entry).family
                law = self.scenario.pixel_travel_laws.get(family)
                radii = (*travel_radii(family, pixel_travel(task, pool_view, attack, generator, pool_clean), law),
                         *travel_radii(family, pixel_travel(task, probe_view, attack, generator, probe_clean), law))
                table[(key, view)] = TravelRadii(*radii)
        return table

    def _travel_rows(self, orders: RowAttacks, env: int, columns: np.ndarray | slice, entry, view: int, pairs: np.ndarray, pool: bool) -> None:
        """Set ``orders``' radii of ``columns`` of ``env`` to the travel radii of pool (or probe) ``pairs``."""
        radii = self.travel.get((entry_key(entry), view))
        if radii is None:  # stream.attack_views and the stream disagree: a bug, not bad input
            raise RuntimeError(f"no pixel_travel radii for attack {entry_key(entry)} on view {self.corruptions[view]}; "
                               "cmai_env.stream.attack_views must list every pairing the stream sends")
        image, text = (radii.pool_v, radii.pool_t) if pool else (radii.probe_v, radii.probe_t)
        orders.radius[env, columns], orders.radius_t[env, columns] = image[pairs], text[pairs]
        replay_rows = self._replay_rows.get((entry_key(entry), "pool" if pool else "probe"))
        if replay_rows is not None:
            orders.replay_from(env, columns, replay_rows[pairs])

    @property
    def embed_dim(self) -> int:
        return int(self.pool_v.shape[-1])

    def attack(self, entry) -> EmbeddingAttack:
        """The embedding counterpart of a mixture entry (cached per configuration)."""
        key = entry_key(entry)
        if key not in self._attacks:
            self._attacks[key] = EmbeddingAttack.from_entry(entry, self.scenario.embedding_radius_laws)
        return self._attacks[key]

    def reset(self, envs: EnvIndex = None) -> None:
        """Restore the adapters and optimiser state of ``envs`` (``None``: all) to the start."""
        self.image.reset(envs)
        self.text.reset(envs)
        self.optimizer.reset(envs)
        self._classes = None

    def views(self, plans: Sequence[RoundPlan]) -> torch.Tensor:
        """Index into ``pool_views``/``probe_views`` of each plan's corruption, (E,)."""
        return torch.as_tensor(self._view_indices(plans), device=self.device)

    def _view_indices(self, plans: Sequence[RoundPlan]) -> list[int]:
        return [self.corruptions.index(plan.corruption) for plan in plans]

    # ------------------------------------------------------------------ model
    def _size(self, envs: EnvIndex) -> int:
        return self.n_envs if envs is None else len(envs)

    def _image(self, raw_v: torch.Tensor, envs: EnvIndex) -> torch.Tensor:
        return F.normalize(self.image(raw_v * self.adapter_input_scale[0], envs), dim=-1)

    def _text(self, raw_t: torch.Tensor, envs: EnvIndex) -> torch.Tensor:
        return F.normalize(self.text(raw_t * self.adapter_input_scale[1], envs), dim=-1)

    def classes(self, envs: EnvIndex = None) -> torch.Tensor:
        """Class-prompt embeddings through each environment's text adapter, (E, C, D).

        Without gradients and for all environments they are computed once per state of the text
        adapters (the probe, the next round's crafting and its observation share them): the
        cache is dropped by :meth:`update` and :meth:`reset`, and keyed on the parameters'
        in-place version counters so that an outside write to them is seen too.
        """
        if envs is not None or torch.is_grad_enabled():
            return self._text(self.class_raw.unsqueeze(0).expand(self._size(envs), -1, -1), envs)
        key = tuple(p._version for p in self.text.params)
        if self._classes is None or self._classes[0] != key:
            self._classes = (key, self._text(self.class_raw.unsqueeze(0).expand(self.n_envs, -1, -1), None))
        return self._classes[1]

    def _logits(self, embeds: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * torch.bmm(embeds, classes.transpose(1, 2))

    def forward(self, raw_v: torch.Tensor, raw_t: torch.Tensor, classes: torch.Tensor, envs: EnvIndex):
        """``e_v, e_t, logits_v, logits_t`` for (E, R, D) inputs."""
        e_v, e_t = self._image(raw_v, envs), self._text(raw_t, envs)
        return e_v, e_t, self._logits(e_v, classes), self._logits(e_t, classes)

    def _consistency(self, e_v, e_t, lv, lt) -> torch.Tensor:
        return pair_consistency(e_v, e_t, lv, lt, self.kl_weight)

    def _embed_changed(self, embed, raw, changed: np.ndarray, embeds: torch.Tensor, logits: torch.Tensor, classes, envs: EnvIndex):
        """Embeddings and logits of (E, R) rows of which only ``changed`` (numpy bool) differ from
        the rows whose ``embeds`` / ``logits`` are given: only those rows pass the adapter."""
        counts = changed.sum(1)
        width = int(counts.max(initial=0))
        if width == 0:
            return embeds, logits
        if width == changed.shape[1]:
            e = embed(raw, envs)
            return e, self._logits(e, classes)
        order = torch.as_tensor(np.argsort(~changed, axis=1, kind="stable")[:, :width], device=raw.device)
        rows = lambda x: order.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # noqa: E731
        e = embed(torch.gather(raw, 1, rows(raw)), envs)
        return embeds.scatter(1, rows(e), e), logits.scatter(1, rows(logits), self._logits(e, classes))

    # ------------------------------------------------------------------ crafting
    def craft(
        self, envs: EnvIndex, raw_v: torch.Tensor, raw_t: torch.Tensor, labels: torch.Tensor, orders: RowAttacks, classes: torch.Tensor,
        clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        replay: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Perturbed ``(raw_v, raw_t)`` for (E, R) rows, each row by its own order (:class:`RowAttacks`).

        Rows are independent (every objective is a per-row sum), so one batched L2-PGD per side
        plays every attack of every environment: per row, ``δ ← Π_{‖δ‖≤r}(δ + a·∇/‖∇‖)`` with
        ``a = 2.5·r/steps`` for that row's ``steps`` (:func:`cmai_env.round.l2_ascent`); the image
        side climbs ``CE(s·e_v·Cᵀ, y)`` (mode 1) or ``cos(e_v, C_{c*})`` toward the nearest wrong
        class prompt ``c*`` (mode 2), the text side likewise; universal rows share one δ per
        environment and mixture entry (their gradients are summed). Each side only touches the
        rows it perturbs (packed per environment).

        Detector-aware rows read the row's caption: mode 3 climbs ``min(margin, κ) − λ·L_consistency``
        of the image against its own (trusted) caption; for mode 4 the caption is first replaced
        by the rewritten caption of ``c*`` (text mode 3, ``rewrite_raw``) and the image descends
        ``L_consistency + μ·CE(z, c*)`` against it, as ``aware_caption_rewrite`` does in pixels.

        Replay rows (text mode 4, ``pixel_travel``) take, of their pixel attack's candidate captions
        and their own caption, the one with the highest ``CE(s·e_t·Cᵀ, y)`` under the current text
        adapter: ``token_substitution``'s verify step, played against this environment's defence on
        the flips the attack ranked best on the undefended backbone (:meth:`_replay`,
        :data:`cmai_env.fidelity.travel.REPLAY_WIDTH` of them).

        :param clean: ``e_v, e_t, logits_v, logits_t`` of the unperturbed rows under the current
            adapters when the caller has them (the probe): ``c*`` and the captions' embeddings are
            then read from them instead of embedding the rows again.
        :param replay: the candidate table the rows' ``orders.replay`` index, ``(captions, valid)``;
            default the world's (:attr:`replay_captions`, :attr:`replay_valid`).
        """
        classes = classes.detach()
        target_v = target_t = None
        rewrite_np = orders.mode_t == 3
        replay_np = orders.mode_t == 4
        with torch.no_grad():
            if bool(((orders.mode_v == 2) | (orders.mode_v == 4)).any()):
                target_v = _nearest_wrong_class(clean[0] if clean else self._image(raw_v, envs), classes, labels)
            if clean and bool((orders.mode_t == 2).any()):
                target_t = _nearest_wrong_class(clean[1], classes, labels)
            if bool(rewrite_np.any()):
                rewrite = torch.as_tensor(rewrite_np, device=raw_t.device).unsqueeze(-1)
                raw_t = torch.where(rewrite, self.rewrite_raw[target_v], raw_t)
            if bool(replay_np.any()):
                raw_t = self._replay(envs, raw_t, labels, orders.replay, replay_np, classes, replay or (self.replay_captions, self.replay_valid))
            partner = None
            if bool((orders.mode_v >= 3).any()):
                if clean:  # only the rewritten and replayed captions differ from the clean ones
                    partner = self._embed_changed(self._text, raw_t, rewrite_np | replay_np, clean[1], clean[3], classes, envs)
                else:
                    e_p = self._text(raw_t, envs)
                    partner = (e_p, self._logits(e_p, classes))
        new_v = self._craft_side(
            envs, raw_v, labels, orders.mode_v, orders, orders.radius, classes, self._image, shared=True, target_class=target_v, partner=partner
        )
        text_orders = np.where(rewrite_np | replay_np, 0, orders.mode_t)
        radius_t = orders.radius if orders.radius_t is None else orders.radius_t
        new_t = self._craft_side(envs, raw_t, labels, text_orders, orders, radius_t, classes, self._text, shared=False, target_class=target_t)
        return new_v, new_t

    def _replay(
        self, envs: EnvIndex, raw_t: torch.Tensor, labels: torch.Tensor, table_rows: np.ndarray, replay_np: np.ndarray, classes: torch.Tensor,
        table: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``raw_t`` with each replay row's caption swapped for its worst candidate (see :meth:`craft`).

        Only the replay rows are scored (packed per environment); a row keeps its own caption when
        no candidate raises its CE, as ``token_substitution`` keeps a caption no flip improves.
        """
        captions, valid = table
        width = int(replay_np.sum(1).max())
        order = np.argsort(~replay_np, axis=1, kind="stable")[:, :width]
        active = np.take_along_axis(replay_np, order, axis=1)
        index = torch.as_tensor(np.where(active, np.take_along_axis(table_rows, order, axis=1), 0), device=raw_t.device)
        source = torch.as_tensor(order, device=raw_t.device)
        rows = source.unsqueeze(-1).expand(-1, -1, raw_t.shape[-1])
        own = torch.gather(raw_t, 1, rows)
        options = torch.cat([own.unsqueeze(2), captions[index]], 2)  # (E, W, 1 + T, D): own caption first
        allowed = torch.cat([torch.ones_like(valid[index][..., :1]), valid[index]], 2)
        e, w, t, d = options.shape
        logits = self._logits(self._text(options.view(e, w * t, d), envs), classes)
        targets = torch.gather(labels, 1, source).repeat_interleave(t, dim=1)
        ce = F.cross_entropy(logits.reshape(-1, classes.shape[1]), targets.reshape(-1), reduction="none").view(e, w, t)
        best = ce.masked_fill(~allowed, -float("inf")).argmax(-1)  # ties keep the first: the own caption
        chosen = torch.gather(options, 2, best.view(e, w, 1, 1).expand(-1, -1, 1, d)).squeeze(2)
        chosen = torch.where(torch.as_tensor(active, device=raw_t.device).unsqueeze(-1), chosen, own)
        return raw_t.scatter(1, rows, chosen)

    def _craft_side(
        self, envs: EnvIndex, raw: torch.Tensor, labels: torch.Tensor, mode_np: np.ndarray, orders: RowAttacks, radius_np: np.ndarray, classes,
        embed, shared: bool, target_class: torch.Tensor | None = None, partner: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """L2-PGD on one modality's rows whose ``mode_np`` > 0 (see :meth:`craft`), ``radius_np`` (E, R) per row.

        :param target_class: ``c*`` per row (E, R) for modes 2 and 4; ``None``: the nearest wrong class.
        :param partner: the other modality's normalised embeddings and logits (E, R, ·), for modes 3 and 4.
        """
        active_np = (mode_np > 0) & (orders.steps > 0)
        counts = active_np.sum(1)
        width = int(counts.max(initial=0))
        if width == 0:
            return raw
        device = raw.device
        source = None
        if width < mode_np.shape[1]:
            # Pack each environment's perturbed rows first, padded with untouched ones (all distinct).
            order = np.argsort(~active_np, axis=1, kind="stable")[:, :width]
            source = torch.as_tensor(order, device=device)
            pick = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
            mode_np, radius_np, steps_np, group_np = pick(mode_np), pick(radius_np), pick(orders.steps), pick(orders.group)
            aware_np = np.take_along_axis(orders.aware, order[..., None], axis=1)
            full = raw
            rows = lambda x: torch.gather(x, 1, source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
            raw = rows(full)
            labels = torch.gather(labels, 1, source)
            if target_class is not None:
                target_class = torch.gather(target_class, 1, source)
            if partner is not None:
                partner = (rows(partner[0]), rows(partner[1]))
        else:
            steps_np, group_np, aware_np = orders.steps, orders.group, orders.aware
        mode = torch.as_tensor(mode_np, device=device)
        steps = torch.as_tensor(steps_np, device=device)
        radius = torch.as_tensor(radius_np, dtype=torch.float32, device=device).unsqueeze(-1)
        step_size = default_step_size(radius, steps.clamp_min(1).unsqueeze(-1).to(torch.float32))
        target = None
        if bool(((mode == 2) | (mode == 4)).any()):
            if target_class is None:
                with torch.no_grad():
                    target_class = _nearest_wrong_class(embed(raw, envs), classes, labels)
            target = torch.gather(classes, 1, target_class.unsqueeze(-1).expand(-1, -1, classes.shape[-1]))
        aware = bool((mode >= 3).any())
        if aware:
            lam, kappa, ce_weight = torch.as_tensor(aware_np, device=device).unbind(-1)
        group = torch.as_tensor(group_np, device=device)
        universal = group >= 0
        share = shared and bool(universal.any())
        moving = (mode > 0).unsqueeze(-1)
        delta = torch.zeros_like(raw)
        for s in range(int(steps_np.max())):
            delta.requires_grad_(True)
            with torch.enable_grad():
                e = embed(raw + delta, envs)
                logits = self._logits(e, classes)
                ce = F.cross_entropy(logits.reshape(-1, classes.shape[1]), labels.reshape(-1), reduction="none")
                per_row = torch.where(mode == 1, ce.reshape(labels.shape), torch.zeros_like(labels, dtype=e.dtype))
                if target is not None:
                    per_row = torch.where(mode == 2, (e * target).sum(-1), per_row)
                if aware:
                    consistency = self._consistency(e, partner[0], logits, partner[1])
                    true_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                    margin = logits.scatter(-1, labels.unsqueeze(-1), -float("inf")).amax(-1) - true_logit
                    per_row = torch.where(mode == 3, torch.minimum(margin, kappa) - lam * consistency, per_row)
                    if target_class is not None:
                        target_ce = F.cross_entropy(logits.reshape(-1, classes.shape[1]), target_class.reshape(-1), reduction="none")
                        per_row = torch.where(mode == 4, -(consistency + ce_weight * target_ce.reshape(labels.shape)), per_row)
                (grad,) = torch.autograd.grad(per_row.sum(), [delta])
            with torch.no_grad():
                if share:
                    grad = _share_within_groups(grad, group, universal)
                moved = l2_ascent(delta.detach(), grad, step_size, radius)
                delta = torch.where(moving & (steps > s).unsqueeze(-1), moved, delta.detach())
        crafted = (raw + delta).detach()
        if source is None:
            return crafted
        return full.scatter(1, source.unsqueeze(-1).expand(-1, -1, full.shape[-1]), crafted)

    # ------------------------------------------------------------------ round
    def incoming(self, envs: EnvIndex, plans: Sequence[RoundPlan], rngs: Sequence[np.random.Generator]) -> StackedTraffic:
        """Each environment draws ``batch_size`` pairs from its own generator and perturbs
        ``round(adversarial_share·B)`` of them by its plan's mixture (crafted against its adapters)."""
        n = self.scenario.batch_size
        rows = np.stack([rng.choice(len(self.pool_y), size=n, replace=False) for rng in rngs])
        attack_index = np.stack([assign_attacks(plan, n, rng) for plan, rng in zip(plans, rngs)])
        index = torch.as_tensor(rows, device=self.device)
        raw_v, raw_t, labels = self.pool_views[self.views(plans).unsqueeze(1), index], self.pool_t[index], self.pool_y[index]
        start = time.perf_counter()
        adv_v, adv_t = raw_v, raw_t
        counts = (attack_index >= 0).sum(1)
        if counts.max(initial=0) > 0:
            # Pack each environment's adversarial pairs into the first columns of an (E, R) block,
            # padded with its clean pairs (untouched orders), so every written position is distinct.
            width = int(counts.max())
            source = np.zeros((len(plans), width), dtype=np.int64)
            orders = RowAttacks.empty((len(plans), width), per_side=bool(self.travel))
            views = self._view_indices(plans)
            for e, plan in enumerate(plans):
                positions = np.flatnonzero(attack_index[e] >= 0)
                source[e] = np.concatenate([positions, np.flatnonzero(attack_index[e] < 0)[: width - len(positions)]])
                for k, entry in enumerate(plan.mixture):
                    picked = np.flatnonzero(attack_index[e, positions] == k)
                    if len(picked):
                        orders.fill(e, picked, self.attack(entry), k)
                        if self.travel:
                            self._travel_rows(orders, e, picked, entry, views[e], rows[e, positions[picked]], pool=True)
            src = torch.as_tensor(source, device=self.device)
            gather = lambda x: torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
            with torch.no_grad():
                classes = self.classes(envs)
            crafted_v, crafted_t = self.craft(envs, gather(raw_v), gather(raw_t), torch.gather(labels, 1, src), orders, classes)
            scatter_index = src.unsqueeze(-1).expand(-1, -1, raw_v.shape[-1])
            adv_v, adv_t = raw_v.scatter(1, scatter_index, crafted_v), raw_t.scatter(1, scatter_index, crafted_t)
        attack_ms = (time.perf_counter() - start) * 1000
        train_radii = None
        if self.train_travel:  # each pair's L_adv radii, from its view's table
            views = self._view_indices(plans)
            train_radii = tuple(torch.stack([self.train_travel[view][side][index[e]] for e, view in enumerate(views)]).unsqueeze(-1) for side in (0, 1))
        return StackedTraffic(raw_v, raw_t, adv_v, adv_t, labels, attack_index, attack_ms, train_radii)

    @torch.no_grad()
    def observe(self, envs: EnvIndex, adv_v: torch.Tensor, adv_t: torch.Tensor) -> StackedStats:
        """Hidden states, ``L_consistency`` and cosine of the received pairs."""
        e_v, e_t, lv, lt = self.forward(adv_v, adv_t, self.classes(envs), envs)
        return StackedStats(e_v, e_t, self._consistency(e_v, e_t, lv, lt), (e_v * e_t).sum(-1))

    def update(
        self,
        envs: EnvIndex,
        traffic: StackedTraffic,
        betas: np.ndarray,
        flagged: np.ndarray,
    ) -> StackedUpdate:
        """One AdamW step per environment on ``L_total = β·[L_task, L_consistency, L_adv]``.

        Crafting for ``L_adv`` runs :func:`cmai_env.round.crafting_steps` (β_adv) joint L2-PGD
        steps on ``(e_v, e_t)`` of the clean pairs up ``CE_v + CE_t + α·L_consistency``, scored by
        :func:`cmai_env.round.crafted_adv_loss` (``defense.adv_loss``); the received pairs
        :func:`cmai_env.round.observed_adversarial` picks from the flags join ``L_adv`` with their
        CE (``L_consistency`` is on the clean pairs).

        :param betas: (E, 3) loss weights. :param flagged: (E, B) detector flags of the traffic.
        :raises FloatingPointError: a loss is NaN/inf (the parameters are left untouched).
        """
        defense = self.scenario.defense
        size = self._size(envs)
        steps = np.array([crafting_steps(float(b[2]), defense.attack_steps) for b in betas], dtype=np.int64)
        raw_v, raw_t, labels = traffic.raw_v, traffic.raw_t, traffic.labels
        crafting = bool(steps.max(initial=0) > 0)
        start = time.perf_counter()
        classes = self.classes(envs)
        # One clean forward serves L_task, L_consistency and the first PGD step of L_adv's crafting
        # (δ = 0 there): with the inputs as leaves, ∂objective/∂δ at δ = 0 comes from the same graph.
        x_v, x_t = (raw_v.detach().requires_grad_(True), raw_t.detach().requires_grad_(True)) if crafting else (raw_v, raw_t)
        e_v, e_t, lv, lt = self.forward(x_v, x_t, classes, envs)
        clean_ce, clean_cons = pair_ce(lv, lt, labels), self._consistency(e_v, e_t, lv, lt)
        update_s = time.perf_counter() - start
        start = time.perf_counter()
        crafted = None
        if crafting:
            objective = bridging_objective(clean_ce, clean_cons, defense.alpha).sum()
            first = torch.autograd.grad(objective, [x_v, x_t], retain_graph=True)
            radii = traffic.train_radii
            if radii is None:  # defense.embedding_train_radius: law, one radius per side
                radii = tuple(torch.full((size, 1, 1), radius, dtype=raw_v.dtype, device=self.device) for radius in (self.train_radius_v, self.train_radius_t))
            crafted = self._craft_training(envs, raw_v, raw_t, labels, steps, classes.detach(), defense.alpha, first, radii)
        attack_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        observed = observed_adversarial(traffic.attack_index >= 0, flagged, defense.train_on_flagged, defense.flagged_pairs)
        parts_v, parts_t, parts_y, weights = [], [], [], []
        if crafted is not None:
            parts_v.append(crafted[0]), parts_t.append(crafted[1]), parts_y.append(labels)
            weights.append(np.repeat((steps > 0)[:, None], labels.shape[1], axis=1))
        width = int(observed.sum(1).max(initial=0))
        if width:
            # Only the observed pairs (packed per environment, padded with masked-out ones) join L_adv.
            order = torch.as_tensor(np.argsort(~observed, axis=1, kind="stable")[:, :width], device=self.device)
            rows = order.unsqueeze(-1).expand(-1, -1, traffic.adv_v.shape[-1])
            parts_v.append(torch.gather(traffic.adv_v, 1, rows)), parts_t.append(torch.gather(traffic.adv_t, 1, rows))
            parts_y.append(torch.gather(labels, 1, order))
            weights.append(np.arange(width)[None, :] < observed.sum(1)[:, None])
        adv_per_pair = weight = None
        if parts_v:
            _, _, a_lv, a_lt = self.forward(torch.cat(parts_v, 1), torch.cat(parts_t, 1), classes, envs)
            # The crafted pairs come first, row for row with the clean ones; the observed ones follow.
            crafted_n = labels.shape[1] if crafted is not None else 0
            pieces = [crafted_adv_loss(defense.adv_loss, defense.trades_beta, (lv, lt), (a_lv[:, :crafted_n], a_lt[:, :crafted_n]), labels)] if crafted_n else []
            if width:  # the observed pairs, last of parts_y
                pieces.append(pair_ce(a_lv[:, crafted_n:], a_lt[:, crafted_n:], parts_y[-1]))
            adv_per_pair = torch.cat(pieces, 1)
            weight = torch.as_tensor(np.concatenate(weights, 1), dtype=adv_per_pair.dtype, device=self.device)
        terms = defence_terms(clean_ce, clean_cons, adv_per_pair, weight)
        beta = torch.as_tensor(np.asarray(betas), dtype=clean_ce.dtype, device=self.device)
        l_total = total_loss(beta, terms)
        values = torch.stack([terms["task"], terms["consistency"], terms["adv"], l_total]).detach().cpu().numpy().astype(np.float64)
        if not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values).all(0))
            raise FloatingPointError(
                f"non-finite loss in the embedding-fidelity update of env(s) {bad.tolist()}: "
                f"L_task={values[0, bad].tolist()}, L_consistency={values[1, bad].tolist()}, "
                f"L_adv={values[2, bad].tolist()}, betas={np.asarray(betas)[bad].tolist()}"
            )
        self.optimizer.zero_grad()
        l_total.sum().backward(inputs=self.optimizer.params)
        self.optimizer.step(envs)
        self.optimizer.zero_grad()
        self._classes = None
        update_ms = (update_s + time.perf_counter() - start) * 1000
        return StackedUpdate(values[0], values[1], values[2], values[3], steps, attack_ms, update_ms)

    def _craft_training(
        self, envs, raw_v, raw_t, labels, steps: np.ndarray, classes, alpha: float, first: tuple[torch.Tensor, torch.Tensor],
        radii: tuple[torch.Tensor, torch.Tensor],
    ):
        """Joint L2-PGD on (e_v, e_t) up the bridging objective, ``steps[e]`` steps for env ``e``.

        :param first: the objective's gradients at δ = 0 (from :meth:`update`'s clean forward).
        :param radii: the image- and caption-side radius, (E, 1, 1) or per pair (E, B, 1).
        """
        device = raw_v.device
        steps_t = torch.as_tensor(steps, device=device).view(-1, 1, 1)
        per_env = steps_t.clamp_min(1).to(torch.float32)
        radius_v, radius_t = radii
        step_v, step_t = default_step_size(radius_v, per_env), default_step_size(radius_t, per_env)
        delta_v, delta_t = torch.zeros_like(raw_v), torch.zeros_like(raw_t)
        for s in range(int(steps.max())):
            # Only the environments still climbing at step s are computed (rows are independent).
            climbing = steps > s
            sub = None if climbing.all() else torch.as_tensor(np.flatnonzero(climbing), device=device)
            take = (lambda x: x) if sub is None else (lambda x: x[sub])  # noqa: E731
            d_v, d_t = take(delta_v), take(delta_t)
            if s == 0:
                grad_v, grad_t = take(first[0]), take(first[1])
            else:
                d_v.requires_grad_(True), d_t.requires_grad_(True)
                sub_envs = envs if sub is None else (sub if envs is None else envs[sub])
                with torch.enable_grad():
                    e_v, e_t, lv, lt = self.forward(take(raw_v) + d_v, take(raw_t) + d_t, take(classes), sub_envs)
                    objective = bridging_objective(pair_ce(lv, lt, take(labels)), self._consistency(e_v, e_t, lv, lt), alpha)
                    grad_v, grad_t = torch.autograd.grad(objective.sum(), [d_v, d_t])
            with torch.no_grad():
                new_v = l2_ascent(d_v.detach(), grad_v, take(step_v), take(radius_v))
                new_t = l2_ascent(d_t.detach(), grad_t, take(step_t), take(radius_t))
                if sub is None:
                    delta_v, delta_t = new_v, new_t
                else:
                    delta_v, delta_t = delta_v.index_copy(0, sub, new_v), delta_t.index_copy(0, sub, new_t)
        return (raw_v + delta_v).detach(), (raw_t + delta_t).detach()

    def probe(self, envs: EnvIndex, plans: Sequence[RoundPlan]) -> StackedProbe:
        """Clean accuracy, consistency and mixture-weighted ASR of each environment on the probe set.

        The clean metrics use the whole probe set; every active attack of an environment's plan
        perturbs the evaluation split (the first :func:`~cmai_env.round.probe_split` pairs), and
        the rest is returned for the detector's calibration.
        """
        start = time.perf_counter()
        size = self._size(envs)
        with torch.no_grad():
            classes = self.classes(envs)
            expand = lambda x: x.unsqueeze(0).expand(size, *x.shape)  # noqa: E731
            probe_v = self.probe_views[self.views(plans)]  # (E, P, D): each env's phase's images
            e_v, e_t, lv, lt = self.forward(probe_v, expand(self.probe_t), classes, envs)
            clean_consistency = self._consistency(e_v, e_t, lv, lt)
            labels = expand(self.probe_y)
            image_ok, text_ok = lv.argmax(-1) == labels, lt.argmax(-1) == labels
            clean_acc = image_ok.float().mean(-1)
            entropy = prediction_entropy(lv).mean(-1)
            consistency_score = (e_v * e_t).sum(-1).mean(-1)
        n = probe_split(len(self.probe_y))
        width = max((len(plan.mixture) for plan in plans), default=0)
        asr_per_attack: list[dict[str, float]] = [{} for _ in plans]
        outcomes: list[list[AttackOutcome]] = [[] for _ in plans]
        asr = np.zeros(size)
        if width:
            orders = RowAttacks.empty((size, width * n), per_side=bool(self.travel))
            modality = np.zeros((size, width), dtype=np.int64)  # 0 image, 1 text, 2 both
            views = self._view_indices(plans)
            for e, plan in enumerate(plans):
                for k, entry in enumerate(plan.mixture):
                    attack = self.attack(entry)
                    orders.fill(e, slice(k * n, (k + 1) * n), attack, k)
                    if self.travel:
                        self._travel_rows(orders, e, slice(k * n, (k + 1) * n), entry, views[e], np.arange(n), pool=False)
                    modality[e, k] = ("image", "text", "both").index(attack.modality)
            tile = lambda x: x[:n].repeat(width, *([1] * (x.dim() - 1))).unsqueeze(0).expand(size, *([-1] * x.dim()))  # noqa: E731
            tiled_v = probe_v[:, :n].repeat(1, width, 1)
            # A side an attack leaves untouched is the clean pair's, already embedded above.
            clean = tuple(x[:, :n].repeat(1, width, 1) for x in (e_v, e_t, lv, lt))
            adv_v, adv_t = self.craft(envs, tiled_v, tile(self.probe_t), tile(self.probe_y), orders, classes, clean)
            with torch.no_grad():
                changed_v = (orders.mode_v > 0) & (orders.steps > 0)
                changed_t = ((orders.mode_t > 0) & (orders.steps > 0)) | (orders.mode_t >= 3)
                aev, alv = self._embed_changed(self._image, adv_v, changed_v, clean[0], clean[2], classes, envs)
                aet, alt = self._embed_changed(self._text, adv_t, changed_t, clean[1], clean[3], classes, envs)
                adv_consistency = self._consistency(aev, aet, alv, alt).view(size, width, n).cpu().numpy()
                adv_labels = tile(self.probe_y)
                adv_image_ok = (alv.argmax(-1) == adv_labels).view(size, width, n)
                adv_text_ok = (alt.argmax(-1) == adv_labels).view(size, width, n)
                clean_image = image_ok[:, :n].unsqueeze(1)
                clean_text = text_ok[:, :n].unsqueeze(1)
                pick = torch.as_tensor(modality, device=self.device).unsqueeze(-1)
                clean_ok = torch.where(pick == 0, clean_image, torch.where(pick == 1, clean_text, clean_image & clean_text))
                adv_ok = torch.where(pick == 0, adv_image_ok, torch.where(pick == 1, adv_text_ok, adv_image_ok & adv_text_ok))
                flipped = clean_ok & ~adv_ok
                clean_ok_np, flipped_np = clean_ok.expand_as(flipped).cpu().numpy(), flipped.cpu().numpy()
            for e, plan in enumerate(plans):
                outcomes[e] = [AttackOutcome(clean_ok_np[e, k], flipped_np[e, k], adv_consistency[e, k]) for k in range(len(plan.mixture))]
                rates = [outcome.asr for outcome in outcomes[e]]
                asr_per_attack[e] = {entry.name: rate for entry, rate in zip(plan.mixture, rates)}
                asr[e] = mixture_asr([entry.weight for entry in plan.mixture], rates)
        all_consistency = clean_consistency.cpu().numpy()
        return StackedProbe(
            clean_acc.double().cpu().numpy(),
            consistency_score.double().cpu().numpy(),
            all_consistency[:, n:],
            asr,
            entropy.double().cpu().numpy(),
            asr_per_attack,
            (time.perf_counter() - start) * 1000,
            all_consistency[:, :n],
            image_ok[:, :n].cpu().numpy(),
            outcomes,
        )


def _nearest_wrong_class(embeds: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the wrong class whose prompt is most similar to ``embeds`` (E, R) (the bridge attacks' ``c*``)."""
    sims = torch.bmm(embeds, classes.transpose(1, 2))
    sims.scatter_(-1, labels.unsqueeze(-1), -float("inf"))
    return sims.argmax(-1)


def _share_within_groups(grad: torch.Tensor, group: torch.Tensor, universal: torch.Tensor) -> torch.Tensor:
    """Replace each universal row's gradient by the sum over its (env, group): one shared δ per group."""
    groups = int(group.max()) + 1
    index = group.clamp_min(0).unsqueeze(-1).expand(-1, -1, grad.shape[-1])
    summed = grad.new_zeros(grad.shape[0], groups, grad.shape[-1]).scatter_add_(1, index, grad * universal.unsqueeze(-1))
    return torch.where(universal.unsqueeze(-1), torch.gather(summed, 1, index), grad)


def _embed_images(backbone, images: torch.Tensor, batch_size: int = 512, normalize: bool = True) -> torch.Tensor:
    return torch.cat([backbone.encode_image(images[i : i + batch_size].to(backbone.device), normalize=normalize) for i in range(0, len(images), batch_size)])
