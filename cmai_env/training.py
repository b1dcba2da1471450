"""Modality-bridging adversarial training (CMAI mechanism 2).

The defender fine-tunes a chosen set of the backbone's parameters θ (:class:`TrainerConfig`
``defended``) on image–text batches ``(x_v, x_t, y)`` with

    L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv

where the weights ``β = (β_task, β_consist, β_adv)`` come from the caller (in CMAI: the agent's
action, one vector per defence round), and

* ``L_task = CE(s·e_v·Cᵀ, y) + CE(s·e_t·Cᵀ, y)`` on the *clean* pair (zero-shot heads of both
  modalities, ``C`` the class-prompt embeddings, ``s`` the logit scale);
* ``L_adv`` is the same two-modality CE on the adversarial pairs: the pair crafted below plus,
  when given, the adversarial traffic the environment observed this round;
* ``L_consistency`` (:mod:`cmai_env.consistency`) is the mean over the clean pairs: it tightens
  the detector's τ (:func:`cmai_env.round.defence_terms` says why not on adversarial pairs).

**Inner maximisation** (the "bridging" part: one joint perturbation of both modalities). For a
batch the trainer finds

    δ_v*, δ_t* = argmax  L_task(f_θ(x_v + δ_v, x_t + δ_t), y) + α·L_consistency(f_θ(x_v + δ_v, x_t + δ_t))
                 s.t.   ‖δ_v‖∞ ≤ ε_v,  x_v + δ_v ∈ [0, 1],  ‖δ_t,i‖₂ ≤ ε_t per real token position i

by joint PGD from a random start: ``δ_v ← Π(δ_v + a_v·sign ∇_{δ_v})`` and
``δ_t,i ← Π(δ_t,i + a_t·g_i/‖g_i‖₂)`` on the input token embeddings (start-of-text through
end-of-text; padding never moves), with θ frozen. The update then takes one optimizer step on θ
with δ fixed (alternation per batch). Maximising ``L_task + α·L_consistency`` finds pairs
whose modalities are pulled apart *and* misclassified; training on them teaches the model to
keep the two modalities bridged under attack.

**Compute saving.** Crafting costs ``steps`` forward–backward passes, so it follows β_adv:
skipped when ``β_adv < skip_adv_below`` (0.1), else ``max(1, round(attack_steps·min(1,
β_adv/full_steps_at)))`` steps (full length from β_adv = 0.5). :func:`crafting_steps` is that rule.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmai_env.attacks.base import PairBatch, TaskOutputs, ZeroShotTask, frozen_model
from cmai_env.attacks.image import normal_noise, uniform_noise
from cmai_env.attacks.text import token_masks
from cmai_env.data import CaptionedDataset
from cmai_env.models import Backbone
from cmai_env.round import TERMS, crafted_adv_loss, crafting_steps, default_step_size, defence_terms, l2_ascent, linf_ascent, pair_ce, total_loss
from cmai_env.round import bridging_objective as _objective
from cmai_env.scenario import ADV_LOSSES

DefendedSet = Literal["adapter", "projection", "last_blocks", "all"]
DEFENDED_SETS: tuple[str, ...] = ("adapter", "projection", "last_blocks", "all")


# ---------------------------------------------------------------------------- configuration
@dataclass
class TrainerConfig:
    """What the trainer updates and how it crafts ``L_adv``'s examples.

    The first eight fields match :class:`cmai_env.scenario.DefenseSpec`'s but the embedding fidelity's own two (a scenario's ``defense``
    block builds one with ``TrainerConfig(**spec.trainer_fields())``).

    :param defended: parameters θ the optimizer updates; everything else is frozen:
        ``adapter`` (residual adapters on the pooled embeddings, identity at start),
        ``projection`` (``visual.proj`` and ``text_projection``), ``last_blocks`` (the last
        ``last_blocks`` transformer blocks of both towers + projections + final norms), ``all``.
        Adapters already on the backbone are always defended.
    :param last_blocks: N for ``last_blocks``.
    :param lr: AdamW learning rate.
    :param eps_v: ℓ∞ pixel budget ``ε_v`` of the crafted pairs (pixels in [0, 1]).
    :param eps_t: L2 budget ``ε_t`` per input token embedding of the crafted pairs.
    :param alpha: ``α``, weight of ``L_consistency`` in the inner maximisation.
    :param attack_steps: PGD steps at full length (0: never craft).
    :param updates_per_round: craft-then-update repeats per :meth:`ModalityBridgingTrainer.step`.
    :param adapter_hidden: bottleneck width of the adapters (``adapter`` mode).
    :param step_size_v: PGD step ``a_v`` for δ_v (None: ``2.5·ε_v/steps``, Madry et al.'s rule).
    :param step_size_t: PGD step ``a_t`` for δ_t (None: ``2.5·ε_t/steps``).
    :param weight_decay: AdamW weight decay (0: pretrained weights are not pulled towards 0).
    :param skip_adv_below: crafting is skipped when ``β_adv`` is below this.
    :param full_steps_at: ``β_adv`` from which crafting runs all ``attack_steps``.
    :param track_grad_norms: report ‖∇_θ L_term‖ per term (for GradNorm-style baselines; costs
        three extra backward passes).
    :param adv_loss: what ``L_adv`` scores on the crafted pairs, ``ce`` or ``trades``
        (:func:`cmai_env.round.crafted_adv_loss`; observed pairs always score their CE).
    :param trades_beta: the KL term's weight with ``adv_loss="trades"``.
    """

    defended: DefendedSet = "adapter"
    last_blocks: int = 1
    lr: float = 1e-3
    eps_v: float = 4 / 255
    eps_t: float = 0.2
    alpha: float = 1.0
    attack_steps: int = 3
    updates_per_round: int = 1
    adapter_hidden: int = 64
    step_size_v: float | None = None
    step_size_t: float | None = None
    weight_decay: float = 0.0
    skip_adv_below: float = 0.1
    full_steps_at: float = 0.5
    track_grad_norms: bool = False
    adv_loss: str = "ce"
    trades_beta: float = 1.0

    def __post_init__(self) -> None:
        if self.defended not in DEFENDED_SETS:
            raise ValueError(f"defended must be one of {DEFENDED_SETS}, got {self.defended!r}")
        if self.adv_loss not in ADV_LOSSES:
            raise ValueError(f"adv_loss must be one of {ADV_LOSSES}, got {self.adv_loss!r}")
        positive_ints = {"last_blocks": self.last_blocks, "updates_per_round": self.updates_per_round, "adapter_hidden": self.adapter_hidden}
        for key, value in positive_ints.items():
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if int(self.attack_steps) != self.attack_steps or self.attack_steps < 0:
            raise ValueError(f"attack_steps must be an integer ≥ 0, got {self.attack_steps!r}")
        non_negative = {
            "eps_v": self.eps_v, "eps_t": self.eps_t, "alpha": self.alpha,
            "weight_decay": self.weight_decay, "skip_adv_below": self.skip_adv_below,
        }
        for key, value in non_negative.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number ≥ 0, got {value!r}")
        for key, value in {"lr": self.lr, "full_steps_at": self.full_steps_at, "trades_beta": self.trades_beta}.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        for key, value in {"step_size_v": self.step_size_v, "step_size_t": self.step_size_t}.items():
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{key} must be None or a finite number > 0, got {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def validate_weights(weights: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(β_task, β_consist, β_adv)`` as floats; anything but 3 finite numbers ≥ 0 is a ValueError."""
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights must be 3 numbers (β_task, β_consist, β_adv), got {weights!r}") from exc
    if values.shape != (3,):
        raise ValueError(f"weights must be 3 numbers (β_task, β_consist, β_adv), got shape {values.shape}: {weights!r}")
    for name, value in zip(("β_task", "β_consist", "β_adv"), values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weights must be finite and ≥ 0, got {name}={value} in {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


# ---------------------------------------------------------------------------- defended parameters
def _tower_of(name: str) -> str:
    """``image``, ``text`` or ``shared`` for a Backbone parameter name."""
    if name.startswith(("clip.visual.", "image_adapter.", "lm_visual.")):  # lm_visual: a generative model's own tower
        return "image"
    if name == "clip.logit_scale" or name == "clip.logit_bias":
        return "shared"
    return "text"


def defended_parameters(backbone: Backbone, defended: str, last_blocks: int = 1, adapter_hidden: int = 64) -> dict[str, nn.Parameter]:
    """Name → parameter of the set θ that ``defended`` selects (adds adapters in ``adapter`` mode).

    Does not change ``requires_grad``; :class:`ModalityBridgingTrainer` does.
    """
    if defended not in DEFENDED_SETS:
        raise ValueError(f"defended must be one of {DEFENDED_SETS}, got {defended!r}")
    if defended == "adapter":
        backbone.add_adapters(adapter_hidden)
    named = dict(backbone.named_parameters())
    clip = backbone.clip
    chosen: set[str] = {n for n in named if n.startswith(("image_adapter.", "text_adapter."))}
    if defended == "all":
        chosen = set(named)
    elif defended in ("projection", "last_blocks"):
        chosen |= {"clip.visual.proj", "clip.text_projection"} & set(named)
        # Linear projections (some open_clip configs) carry weight/bias instead of a bare matrix.
        chosen |= {n for n in named if n.startswith(("clip.visual.proj.", "clip.text_projection."))}
        if defended == "last_blocks":
            n_visual = len(clip.visual.transformer.resblocks)
            n_text = len(clip.transformer.resblocks)
            if last_blocks > min(n_visual, n_text):
                raise ValueError(f"last_blocks={last_blocks} but the towers have {n_visual} (image) and {n_text} (text) blocks")
            prefixes = tuple(
                [f"clip.visual.transformer.resblocks.{i}." for i in range(n_visual - last_blocks, n_visual)]
                + [f"clip.transformer.resblocks.{i}." for i in range(n_text - last_blocks, n_text)]
                + ["clip.visual.ln_post.", "clip.ln_final."]
            )
            chosen |= {n for n in named if n.startswith(prefixes)}
    if not chosen:
        raise ValueError(f"defended={defended!r} selects no parameters of {backbone.name}")
    return {n: named[n] for n in named if n in chosen}


# ---------------------------------------------------------------------------- inner maximisation
@dataclass(frozen=True)
class CraftedPair:
    """The joint adversarial pair and the perturbations that made it.

    :param batch: images ``x_v + δ_v`` and token embeddings ``E⁰ + δ_t`` (``token_embeds``).
    :param delta_t: ``δ_t`` (N, L, W), zero outside the real token positions.
    """

    batch: PairBatch
    delta_t: torch.Tensor


def _pair_outputs(
    task: ZeroShotTask, images: torch.Tensor, tokens: torch.Tensor, token_embeds: torch.Tensor | None, class_embeds: torch.Tensor
) -> TaskOutputs:
    """Both modalities' embeddings and zero-shot logits against ``class_embeds`` (maybe in θ's graph)."""
    backbone = task.backbone
    image_embeds = backbone.encode_image(images)
    text_embeds = backbone.encode_text(tokens) if token_embeds is None else backbone.encode_text_embeddings(token_embeds, tokens)
    return TaskOutputs(
        image_embeds,
        text_embeds,
        backbone.zero_shot_logits(image_embeds, class_embeds),
        backbone.zero_shot_logits(text_embeds, class_embeds),
    )


def bridging_objective(task: ZeroShotTask, out: TaskOutputs, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample ``CE_v + CE_t + α·L_consistency`` (what the inner maximisation climbs; :mod:`cmai_env.round`)."""
    return _objective(pair_ce(out.image_logits, out.text_logits, labels), task.consistency(out), alpha)


def joint_pgd(
    task: ZeroShotTask,
    batch: PairBatch,
    eps_v: float,
    eps_t: float,
    alpha: float,
    steps: int,
    step_size_v: float | None = None,
    step_size_t: float | None = None,
    generator: torch.Generator | None = None,
) -> CraftedPair:
    """Joint PGD on pixels and input token embeddings (see the module docstring).

    Maximises ``Σ_n CE_v + CE_t + α·L_consistency`` (a per-sample sum: the sign step for δ_v and
    the per-token normalised step for δ_t make the scale irrelevant and keep samples
    independent) with the model's parameters frozen and its train/eval mode restored.

    :param eps_v: ℓ∞ budget ``ε_v`` on pixels (images stay in [0, 1]).
    :param eps_t: L2 budget ``ε_t`` per real token position of the input token embeddings.
    :param alpha: ``α``.
    :param steps: PGD steps (≥ 1).
    :param step_size_v: ``a_v`` (None: ``2.5·ε_v/steps``).
    :param step_size_t: ``a_t`` (None: ``2.5·ε_t/steps``).
    :param generator: draws the random start.
    """
    if steps < 1:
        raise ValueError(f"joint_pgd needs steps ≥ 1, got {steps}")
    backbone = task.backbone
    labels, tokens = batch.labels, batch.tokens
    class_embeds = task.class_embeds.detach()
    # enable_grad: crafting needs input gradients even when the caller is under torch.no_grad.
    with frozen_model(backbone), torch.enable_grad():
        with torch.no_grad():
            e0 = batch.token_embeds.detach() if batch.token_embeds is not None else backbone.token_embeddings(tokens)
        real, _ = token_masks(backbone, tokens)
        objective = lambda x, e: bridging_objective(task, _pair_outputs(task, x, tokens, e, class_embeds), labels, alpha)  # noqa: E731
        x, delta_t = joint_ascent(objective, batch.images.detach(), e0, real, eps_v, eps_t, steps, step_size_v, step_size_t, generator)
    return CraftedPair(PairBatch(x, tokens, labels, (e0 + delta_t).detach()), delta_t)


def joint_ascent(
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    e0: torch.Tensor,
    real: torch.Tensor,
    eps_v: float,
    eps_t: float,
    steps: int,
    step_size_v: float | None = None,
    step_size_t: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint PGD loop of :func:`joint_pgd` for any per-sample ``objective(x, E⁰ + δ_t)``: ``(x + δ_v, δ_t)``.

    Random start (uniform in the ℓ∞ box for pixels, a random direction with radius U(0, 1)·ε_t
    per token where ``real`` (N, L) is true), then ``steps`` ascents of ``Σ_n objective``. The
    caller freezes the model and enables gradients; the generative round
    (:mod:`cmai_env.fidelity.generative`) climbs its own objective with the same loop.
    """
    a_v = step_size_v if step_size_v is not None else default_step_size(eps_v, steps)
    a_t = step_size_t if step_size_t is not None else default_step_size(eps_t, steps)
    lo = (x0 - eps_v).clamp(min=0.0)
    hi = (x0 + eps_v).clamp(max=1.0)
    keep = real.unsqueeze(-1).to(e0.dtype)
    x = torch.minimum(torch.maximum(x0 + (uniform_noise(x0.shape, x0, generator) * 2 - 1) * eps_v, lo), hi)
    delta_t = normal_noise(e0.shape, e0, generator)
    radius = uniform_noise(e0.shape[:2], e0, generator).unsqueeze(-1) * eps_t
    delta_t = delta_t.mul_(radius / delta_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(keep)
    for _ in range(steps):
        x.requires_grad_(True)
        delta_t.requires_grad_(True)
        grad_v, grad_t = torch.autograd.grad(objective(x, e0 + delta_t).sum(), [x, delta_t])
        with torch.no_grad():
            x = linf_ascent(x.detach(), grad_v, a_v, lo, hi)
            delta_t = l2_ascent(delta_t.detach(), grad_t.mul_(keep), a_t, eps_t)
    return x.detach(), delta_t.detach()


# ---------------------------------------------------------------------------- results / state
@dataclass(frozen=True)
class StepResult:
    """Losses and cost of one :meth:`ModalityBridgingTrainer.step` (means over its updates).

    Losses are the values *before* each optimizer step. ``grad_norms`` (``task``,
    ``consistency``, ``adv`` → ‖∇_θ L_term‖₂ of the unweighted term) only with
    ``track_grad_norms``.
    """

    l_task: float
    l_consistency: float
    l_adv: float
    l_total: float
    betas: tuple[float, float, float]
    attack_steps_used: int
    attack_ms: float
    update_ms: float
    grad_norms: dict[str, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainerState:
    """A snapshot of θ and the optimizer (in memory; see :meth:`ModalityBridgingTrainer.snapshot`)."""

    params: tuple[torch.Tensor, ...]
    optimizer: dict


@dataclass
class FitSummary:
    """What :meth:`ModalityBridgingTrainer.fit` did."""

    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    stopped_by: str = "epochs"  #: ``epochs`` or ``budget``
    history: list[StepResult] = field(default_factory=list)

    def last(self, n: int = 20) -> dict[str, float]:
        """Mean losses of the last ``n`` steps (empty dict before any step)."""
        tail = self.history[-n:]
        if not tail:
            return {}
        keys = ("l_task", "l_consistency", "l_adv", "l_total")
        return {k: float(np.mean([getattr(r, k) for r in tail])) for k in keys}


def _clone_tree(obj):
    """Deep copy with tensors cloned (optimizer state dicts alias their tensors otherwise)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return copy.copy(obj)


# ---------------------------------------------------------------------------- trainer
class ModalityBridgingTrainer:
    """Adversarial fine-tuning with agent-given loss weights (module docstring: the formulas).

    The constructor freezes every backbone parameter outside θ (``config.defended``) and builds
    AdamW on θ. :meth:`step` is one defence round's update; :meth:`fit` a plain training loop.

    :param task: the zero-shot task; its backbone is the defended model (updated in place) and
        its class-prompt embeddings are refreshed after updates that touch the text tower.
    :param config: :class:`TrainerConfig` (defaults when None).
    :param generator: seeds the PGD random starts (and :meth:`fit`'s shuffling); the environment
        may replace ``trainer.generator`` every round.
    """

    def __init__(self, task: ZeroShotTask, config: TrainerConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.task = task
        self.config = config if config is not None else TrainerConfig()
        self.backbone = task.backbone
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        cfg = self.config
        self.named_params = self._select_parameters()
        self.params: list[nn.Parameter] = list(self.named_params.values())
        chosen = {id(p) for p in self.params}
        for p in self.backbone.parameters():
            p.requires_grad_(id(p) in chosen)
        self.text_defended = any(_tower_of(n) == "text" for n in self.named_params)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        prompts = [t.format(c) for c in task.class_names for t in task.templates]
        self._prompt_tokens = self.backbone.tokenize(prompts)
        # The class embeddings may have been computed before adapters were added (identity, so
        # equal) or before a restore elsewhere: start from the current model.
        task.refresh()

    # ------------------------------------------------------------------ parameters
    def _select_parameters(self) -> dict[str, nn.Parameter]:
        """θ, name → parameter: :func:`defended_parameters` of ``config.defended`` (the generative round overrides it)."""
        cfg = self.config
        return defended_parameters(self.backbone, cfg.defended, cfg.last_blocks, cfg.adapter_hidden)

    @property
    def num_defended(self) -> int:
        """Number of scalar parameters in θ."""
        return sum(p.numel() for p in self.params)

    def snapshot(self) -> TrainerState:
        """θ and the optimizer state, cloned in memory (no file I/O; fast enough per episode)."""
        return TrainerState(tuple(p.detach().clone() for p in self.params), _clone_tree(self.optimizer.state_dict()))

    def restore(self, state: TrainerState) -> None:
        """Put θ and the optimizer back exactly as :meth:`snapshot` found them (the state stays reusable)."""
        if len(state.params) != len(self.params):
            raise ValueError(f"snapshot holds {len(state.params)} tensors, the trainer defends {len(self.params)}")
        with torch.no_grad():
            for p, saved in zip(self.params, state.params):
                p.copy_(saved)
        self.optimizer.load_state_dict(_clone_tree(state.optimizer))
        self.optimizer.zero_grad(set_to_none=True)
        if self.text_defended:
            self.task.refresh()

    # ------------------------------------------------------------------ inner maximisation
    #: the inner maximisation, ``(task, batch, ε_v, ε_t, α, steps, a_v, a_t, generator) → CraftedPair``
    #: (the generative round sets its own, :func:`cmai_env.fidelity.generative.generative_joint_pgd`)
    crafting: Callable[..., CraftedPair] = staticmethod(joint_pgd)

    def craft(self, batch: PairBatch, steps: int | None = None) -> CraftedPair:
        """The joint adversarial pair for ``batch`` against the current θ (``steps`` default: full)."""
        cfg = self.config
        return self.crafting(
            self.task, batch, cfg.eps_v, cfg.eps_t, cfg.alpha, steps if steps is not None else max(cfg.attack_steps, 1),
            cfg.step_size_v, cfg.step_size_t, self.generator,
        )

    # ------------------------------------------------------------------ losses
    def _class_embeds(self) -> torch.Tensor:
        """Class-prompt embeddings ``C``, differentiable when the text tower is defended.

        Recomputing them inside the graph (C·T prompts through the small text tower) lets
        ``L_task``/``L_adv`` move the prompts and captions together instead of chasing stale targets.
        """
        if not self.text_defended:
            return self.task.class_embeds.detach()
        n_classes, n_templates = len(self.task.class_names), len(self.task.templates)
        embeds = self.backbone.encode_text(self._prompt_tokens).view(n_classes, n_templates, -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)

    def losses(
        self, batch: PairBatch, crafted: CraftedPair | None = None, observed_adv: PairBatch | None = None
    ) -> dict[str, torch.Tensor]:
        """``L_task``, ``L_consistency``, ``L_adv`` (scalar tensors in the graph of θ)."""
        class_embeds = self._class_embeds()
        clean_out = _pair_outputs(self.task, batch.images, batch.tokens, batch.token_embeds, class_embeds)
        clean_ce = pair_ce(clean_out.image_logits, clean_out.text_logits, batch.labels)

        adv_terms: list[torch.Tensor] = []
        if crafted is not None:
            # δ_t is fixed; re-embedding the tokens lets θ ∋ token_embedding (``all``) learn from it too.
            embeds = self.backbone.token_embeddings(crafted.batch.tokens) + crafted.delta_t
            out = _pair_outputs(self.task, crafted.batch.images, crafted.batch.tokens, embeds, class_embeds)
            adv_terms.append(crafted_adv_loss(self.config.adv_loss, self.config.trades_beta, (clean_out.image_logits, clean_out.text_logits),
                                              (out.image_logits, out.text_logits), crafted.batch.labels))
        if observed_adv is not None and len(observed_adv):
            out = _pair_outputs(self.task, observed_adv.images, observed_adv.tokens, observed_adv.token_embeds, class_embeds)
            adv_terms.append(pair_ce(out.image_logits, out.text_logits, observed_adv.labels))
        return defence_terms(clean_ce, self.task.consistency(clean_out), torch.cat(adv_terms) if adv_terms else None)

    # ------------------------------------------------------------------ one round
    def step(
        self, batch: PairBatch, weights: Sequence[float] | np.ndarray, observed_adv: PairBatch | None = None
    ) -> StepResult:
        """``updates_per_round`` × (craft with θ frozen, then one AdamW step on L_total with δ fixed).

        ``L_total = β_task·L_task + β_consist·L_consistency + β_adv·L_adv``, ``(β_task, β_consist,
        β_adv) = weights``. Crafting runs :func:`crafting_steps` (β_adv) PGD steps.

        :raises ValueError: ``weights`` are not 3 finite numbers ≥ 0.
        :raises FloatingPointError: a loss term (or the gradient) is NaN/inf; θ and the optimizer
            are left untouched.
        """
        betas = validate_weights(weights)
        cfg = self.config
        steps = crafting_steps(betas[2], cfg.attack_steps, cfg.skip_adv_below, cfg.full_steps_at)
        records = [self._update(batch, betas, steps, observed_adv) for _ in range(cfg.updates_per_round)]
        mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
        grad_norms = None
        if cfg.track_grad_norms:
            grad_norms = {t: float(np.mean([r["grad_norms"][t] for r in records])) for t in TERMS}
        return StepResult(
            l_task=mean("task"),
            l_consistency=mean("consistency"),
            l_adv=mean("adv"),
            l_total=mean("total"),
            betas=betas,
            attack_steps_used=steps * len(records),
            attack_ms=sum(r["attack_ms"] for r in records),
            update_ms=sum(r["update_ms"] for r in records),
            grad_norms=grad_norms,
        )

    def _update(self, batch: PairBatch, betas: tuple[float, float, float], steps: int, observed_adv: PairBatch | None) -> dict:
        start = time.perf_counter()
        crafted = self.craft(batch, steps) if steps else None
        attack_ms = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        terms = self.losses(batch, crafted, observed_adv)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise FloatingPointError(f"L_{name} is {float(value.detach())} (β = {list(betas)}); the defended parameters were not updated")
        total = total_loss(betas, terms)
        record = {name: float(value.detach()) for name, value in terms.items()}
        record["total"] = float(total.detach())
        if self.config.track_grad_norms:
            record["grad_norms"] = {name: self._grad_norm(terms[name]) for name in TERMS}
        if sum(betas) > 0:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            bad = [n for n, p in self.named_params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"non-finite gradient of L_total on {bad[:3]}; the defended parameters were not updated")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.text_defended:
                self.task.refresh()
        record["attack_ms"] = attack_ms
        record["update_ms"] = (time.perf_counter() - start) * 1000
        return record

    def _grad_norm(self, term: torch.Tensor) -> float:
        if not term.requires_grad:
            return 0.0
        grads = torch.autograd.grad(term, self.params, retain_graph=True, allow_unused=True)
        squares = [g.pow(2).sum() for g in grads if g is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    # ------------------------------------------------------------------ loops
    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (schedules call this before a step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(
        self,
        data: CaptionedDataset | PairBatch,
        weights: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
        batch_size: int = 64,
        deadline: float | None = None,
        callback: Callable[[StepResult], None] | None = None,
        before_step: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> list[StepResult]:
        """One shuffled pass (order from ``self.generator``); stops early once ``clock() ≥ deadline``.

        ``before_step`` runs before every batch (e.g. a learning-rate schedule), ``callback``
        after it with its :class:`StepResult`.
        """
        pairs = data if isinstance(data, PairBatch) else PairBatch.from_dataset(self.backbone, data)
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        order = torch.randperm(len(pairs), generator=self.generator).to(pairs.labels.device)
        results = []
        for start in range(0, len(pairs), batch_size):
            if deadline is not None and clock() >= deadline:
                break
            if before_step is not None:
                before_step()
            results.append(self.step(pairs.subset(order[start : start + batch_size]), weights))
            if callback is not None:
                callback(results[-1])
        return results

    def fit(
        self,
        dataset: CaptionedDataset | PairBatch,
        budget_seconds: float | None = None,
        batch_size: int = 64,
        weights: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
        progress: bool = False,
        epochs: int | None = None,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        warmup_fraction: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> FitSummary:
        """Train for ``epochs`` passes and/or until ``budget_seconds`` have passed on ``clock``.

        With neither given, one epoch. The budget is checked before each batch, so a run
        overshoots it by at most one step. ``clock`` is wall time by default;
        ``time.process_time`` budgets CPU time instead, which gives the same amount of training
        on a busy shared machine as on an idle one.

        ``lr_schedule="cosine"``: ``lr(p) = lr·min(1, p/warmup_fraction)·½(1 + cos πp)`` with ``p``
        the elapsed share of the run (of the time budget when given, else of the steps). A large
        peak rate moves a pretrained model into the robust regime quickly; annealing it to zero
        lets clean accuracy recover before the budget ends. The rate is reset to ``config.lr``
        afterwards (environment rounds use the constant rate).
        """
        validate_weights(weights)
        if budget_seconds is not None and budget_seconds < 0:
            raise ValueError(f"budget_seconds must be ≥ 0, got {budget_seconds}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if epochs is None and budget_seconds is None:
            epochs = 1
        pairs = dataset if isinstance(dataset, PairBatch) else PairBatch.from_dataset(self.backbone, dataset)
        if len(pairs) == 0:
            raise ValueError("fit needs at least one training pair, got an empty dataset")
        batches_per_epoch = math.ceil(len(pairs) / batch_size)
        start = clock()
        deadline = start + budget_seconds if budget_seconds is not None else None
        summary = FitSummary()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None if epochs is None else epochs * batches_per_epoch, desc="adv-train", unit="batch")

        def progress_share() -> float:
            if budget_seconds:
                return min(1.0, (clock() - start) / budget_seconds)
            return min(1.0, len(summary.history) / max(1, (epochs or 1) * batches_per_epoch))

        def schedule() -> None:
            if lr_schedule == "constant":
                return
            p = progress_share()
            warm = min(1.0, p / warmup_fraction) if warmup_fraction > 0 else 1.0
            self.set_lr(self.config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * p)))

        def on_step(result: StepResult) -> None:
            summary.history.append(result)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task=f"{result.l_task:.3f}", cons=f"{result.l_consistency:.3f}", adv=f"{result.l_adv:.3f}")

        epoch = 0
        try:
            while (epochs is None or epoch < epochs) and (deadline is None or clock() < deadline):
                self.train_epoch(pairs, weights, batch_size, deadline, on_step, schedule, clock)
                epoch += 1
        finally:
            self.set_lr(self.config.lr)
            if bar is not None:
                bar.close()
        summary.steps = len(summary.history)
        summary.epochs = summary.steps / batches_per_epoch
        summary.seconds = clock() - start
        completed = epochs is not None and summary.steps >= epochs * batches_per_epoch
        summary.stopped_by = "epochs" if completed else "budget"
        return summary


def save_checkpoint(backbone: Backbone, path: str | Path) -> Path:
    """Write the fine-tuned backbone (:meth:`Backbone.checkpoint_state_dict`) to ``path`` atomically.

    The state dict goes to a temp file in the same folder that is then renamed over ``path``
    (``os.replace`` is atomic on one filesystem): an interrupted or failing write never leaves a
    truncated checkpoint, and an existing one stays intact. Load it back with
    ``load_backbone(name, pretrained=path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(backbone.checkpoint_state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = [
    "CraftedPair",
    "DEFENDED_SETS",
    "FitSummary",
    "ModalityBridgingTrainer",
    "StepResult",
    "TrainerConfig",
    "TrainerState",
    "bridging_objective",
    "crafting_steps",
    "defended_parameters",
    "joint_ascent",
    "joint_pgd",
    "save_checkpoint",
    "validate_weights",
]
