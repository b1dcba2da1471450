"""Adversarial fine-tuning of ``cmai-tiny-flamingo``'s vision encoder: FARE (Schlarmann et al., ICML 2024).

FARE ("Robust CLIP: unsupervised adversarial fine-tuning of vision embeddings for robust large
vision-language models") makes the *vision encoder* of a Flamingo-style model robust, so that the
language model, unchanged, reads the same tokens from a perturbed image as from the clean one:

    L_FARE(φ) = E_x max_{‖δ‖∞ ≤ ε_v} ‖φ(x + δ) − φ_orig(x)‖²

``φ`` is the language model's own copy of the vision tower
(:meth:`FlamingoBackbone.defended_parameters` splits it off), ``φ_orig`` cmai-tiny's original,
frozen tower (still the CLIP head's, so the consistency check's reference does not move), and
``‖·‖²`` the squared L2 distance of the 17 CLS+patch tokens the resampler reads (summed over
width, averaged over tokens). The inner max is PGD-ℓ∞ (``pgd_steps`` steps of ``step_size``, random
start) on the same distance against the *current* ``φ``. FARE needs no labels and never runs the
language model, which is what makes it cheap: one step costs a few passes of a 251k-parameter
tower. ``clean_weight`` w adds ``w·‖φ(x) − φ_orig(x)‖²`` (FARE's objective has w = 0; the
default w = 1 keeps the clean tokens where the language model learned to read them).

Why not PGD-AT of the bridge: adversarially fine-tuning the resampler and gated
cross-attention on the caption loss with the tower frozen (the previous version of this module;
README, "Generative backbone") left PGD-10 ASR at 1.000, cost caption accuracy and broke the
detector: the tokens an attack produces were already far from the clean ones.

Threat model of the crafting attack: the attacker controls the image only (ℓ∞ ball ``ε_v``), and
it attacks the embedding, not the caption; it is white-box on the current tower.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from cmai_env.attacks.image import pgd_linf_ascent
from cmai_env.data import load_dataset
from cmai_env.models.flamingo import FlamingoBackbone


@dataclass
class FlamingoAdvTrainConfig:
    """Settings of one FARE run (recorded in the report).

    :param steps: optimiser steps (the run also stops at ``budget_cpu_minutes`` of process CPU time).
    :param batch_size: images per step.
    :param eps: ℓ∞ budget ``ε_v`` of the inner maximisation.
    :param pgd_steps: PGD steps of the inner maximisation.
    :param step_size: PGD step ``α`` (default ``None``: ``2.5·ε_v / pgd_steps``).
    :param lr: peak AdamW learning rate: linear warm-up over the first 5% of the run, then cosine
        decay to 0 (FARE's schedule), the run's progress being the larger of steps done / ``steps``
        and budget used / ``budget_cpu_minutes``.
    :param weight_decay: AdamW weight decay (FARE: 1e-4).
    :param clean_weight: ``w`` of the extra clean term ``w·‖φ(x) − φ_orig(x)‖²`` (FARE: 0; here 1, which
        kept caption accuracy at 1.000 where w = 0 lost 0.26 of it after 40 steps).
    :param pool_size: training images rendered per pool (the ``shapes`` train split).
    :param refresh_every: steps between pool refreshes (fresh renders, new seed).
    :param seed: seed of the pool, batches and PGD starts.
    :param budget_cpu_minutes: stop once the run has used this much process CPU time.
    """

    steps: int = 650
    batch_size: int = 128
    eps: float = 8 / 255
    pgd_steps: int = 5
    step_size: float | None = None
    lr: float = 2e-3
    weight_decay: float = 1e-4
    clean_weight: float = 1.0
    pool_size: int = 8192
    refresh_every: int = 200
    seed: int = 0
    budget_cpu_minutes: float = 10.0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "pgd_steps", "pool_size", "refresh_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"FlamingoAdvTrainConfig.{key} must be ≥ 1, got {getattr(self, key)!r}")
        if self.batch_size > self.pool_size:
            raise ValueError(f"FlamingoAdvTrainConfig.batch_size ({self.batch_size}) must be ≤ pool_size ({self.pool_size})")
        if self.clean_weight < 0:
            raise ValueError(f"FlamingoAdvTrainConfig.clean_weight must be ≥ 0, got {self.clean_weight!r}")
        if self.eps < 0 or self.lr <= 0 or self.weight_decay < 0 or self.budget_cpu_minutes <= 0:
            raise ValueError(
                "FlamingoAdvTrainConfig: eps and weight_decay must be ≥ 0, lr and budget_cpu_minutes > 0, "
                f"got eps={self.eps}, weight_decay={self.weight_decay}, lr={self.lr}, budget_cpu_minutes={self.budget_cpu_minutes}"
            )
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"FlamingoAdvTrainConfig.step_size must be > 0 or None, got {self.step_size!r}")

    @property
    def alpha(self) -> float:
        """The PGD step actually used."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.pgd_steps


def embedding_distance(tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image ``‖φ(x') − φ_orig(x)‖²``: squared L2 over width, mean over tokens, shape (N,)."""
    return (tokens - reference).pow(2).sum(-1).mean(-1)


def fare_loss(backbone: FlamingoBackbone, images: torch.Tensor, reference: torch.Tensor, config: FlamingoAdvTrainConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One FARE objective on a batch: ``(mean L_FARE, x_adv)``; differentiable in the LM's tower.

    :param reference: ``φ_orig(x)``, the original tower's tokens of the clean ``images``.
    """
    tower = backbone.split_vision_tower()
    flags = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(False)  # the inner max needs no parameter gradients
    try:
        adv = pgd_linf_ascent(
            lambda x: embedding_distance(backbone.vision_tokens(x), reference).sum(),
            images, config.eps, config.pgd_steps, config.alpha, True, generator,
        )
    finally:
        for p, flag in zip(tower.parameters(), flags):
            p.requires_grad_(flag)
    loss = embedding_distance(backbone.vision_tokens(adv), reference).mean()
    if config.clean_weight > 0:
        loss = loss + config.clean_weight * embedding_distance(backbone.vision_tokens(images), reference).mean()
    return loss, adv


def adversarial_finetune(
    backbone: FlamingoBackbone, config: FlamingoAdvTrainConfig, progress: bool = False, clock: Callable[[], float] = time.process_time
) -> dict:
    """FARE-fine-tune the LM's vision tower (``backbone.defended_parameters()``) in place; return a summary.

    Nothing else moves: the CLIP tower and text tower, the resampler, the cross-attention and the
    decoder keep their weights (and their ``requires_grad`` flags).

    :param clock: what ``config.budget_cpu_minutes`` is measured with (default: process CPU time;
        ``time.perf_counter`` for a wall-clock budget).
    :return: ``{"steps_run", "cpu_minutes", "seconds", "stopped_by", "final_loss", "defended_parameters", "config"}``
        (``seconds`` on ``clock``).
    """
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    defended = backbone.defended_parameters()
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in defended:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(defended, lr=config.lr, weight_decay=config.weight_decay)
    budget = config.budget_cpu_minutes * 60
    backbone.eval()  # no dropout in either tower; eval keeps the frozen parts exactly as shipped
    start, clock_start = time.process_time(), clock()
    step, loss, stopped_by = 0, torch.zeros(()), "steps"
    try:
        for step in range(config.steps):
            if step % config.refresh_every == 0:
                pool = load_dataset("shapes", split="train", n=config.pool_size, seed=int(rng.integers(1 << 31)), image_size=backbone.image_size)
                images_pool = pool.images.to(backbone.device)
            idx = torch.from_numpy(rng.choice(len(images_pool), size=config.batch_size, replace=False)).to(backbone.device)
            images = images_pool[idx]
            with torch.no_grad():
                reference = backbone.vision_tokens(images, tower=backbone.clip.visual)
            progress_done = min(1.0, max(step / config.steps, (clock() - clock_start) / budget))
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (progress_done + 1e-3) / 0.05) * 0.5 * (1 + math.cos(math.pi * progress_done))
            loss, _ = fare_loss(backbone, images, reference, config, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(defended, 1.0)
            optimizer.step()
            if progress and step % 25 == 0:
                print(f"FARE step {step}: L_FARE {loss.item():.4f}", flush=True)
            if clock() - clock_start > budget:
                stopped_by = "budget"
                break
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        backbone.eval()
    return {
        "steps_run": step + 1,
        "cpu_minutes": round((time.process_time() - start) / 60, 2),
        "seconds": clock() - clock_start,
        "stopped_by": stopped_by,
        "final_loss": float(loss.item()),
        "defended_parameters": sum(p.numel() for p in defended),
        "config": asdict(config),
    }


__all__ = ["FlamingoAdvTrainConfig", "adversarial_finetune", "embedding_distance", "fare_loss"]
