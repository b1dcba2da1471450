"""Adversarial fine-tuning of ``cmai-tiny-flamingo`` (PGD-AT on the caption, Madry et al. 2018).

Which parameters are defended is a choice: :meth:`FlamingoBackbone.defended_parameters`, the
perceiver resampler and the gated cross-attention layers, i.e. the bridge through which an image
enters the caption. The vision tower stays cmai-tiny's (so the CLIP head, the consistency
reference, is unchanged) and the decoder keeps its language. Each step:

1. craft ``x_adv`` by PGD-ℓ∞ (``ε_v``, ``pgd_steps`` steps of ``α``) ascending the CE of the
   LM's class distribution ``p_LM(· | x, P)`` against the *current* model;
2. update the defended parameters on ``w·L_cap(x) + (1 − w)·L_cap(x_adv)``, the next-word loss of
   the true caption (``flamingo_pretrain.caption_loss``), with the tower's tokens of both images.

Threat model of the crafting attack: the attacker controls the image only, white-box.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmai_env.attacks.base import frozen_model
from cmai_env.attacks.image import pgd_linf_ascent
from cmai_env.data import load_dataset
from cmai_env.models.flamingo import FlamingoBackbone
from cmai_env.models.flamingo_pretrain import caption_ids, caption_loss
from cmai_env.models.flamingo_task import GenerativeTask


@dataclass
class FlamingoAdvTrainConfig:
    """Settings of one adversarial fine-tuning run."""

    steps: int = 150
    batch_size: int = 64
    eps: float = 8 / 255
    pgd_steps: int = 3
    step_size: float = 3 / 255
    lr: float = 1e-3
    clean_weight: float = 0.5  #: w in w·L_cap(x) + (1 − w)·L_cap(x_adv)
    pool_size: int = 4096
    seed: int = 0
    budget_cpu_minutes: float = 10.0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "pgd_steps", "pool_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"FlamingoAdvTrainConfig.{key} must be ≥ 1, got {getattr(self, key)!r}")
        if not 0.0 <= self.clean_weight <= 1.0:
            raise ValueError(f"FlamingoAdvTrainConfig.clean_weight must be in [0, 1], got {self.clean_weight!r}")
        if self.eps < 0 or self.step_size <= 0 or self.lr <= 0:
            raise ValueError(f"eps must be ≥ 0 and step_size, lr > 0, got {self.eps}, {self.step_size}, {self.lr}")


def adversarial_finetune(backbone: FlamingoBackbone, config: FlamingoAdvTrainConfig, progress: bool = False) -> dict:
    """Fine-tune ``backbone.defended_parameters()`` in place by PGD-AT; return a summary.

    :return: ``{"steps_run", "cpu_minutes", "final_loss", "config"}``.
    """
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pool = load_dataset("shapes", split="train", n=config.pool_size, seed=config.seed, image_size=backbone.image_size)
    task = GenerativeTask.from_dataset(backbone, pool)
    ids = caption_ids(backbone, pool.captions)
    defended = backbone.defended_parameters()
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in defended:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(defended, lr=config.lr, weight_decay=0.0)
    start = time.process_time()
    step, loss = 0, torch.zeros(())
    try:
        for step in range(config.steps):
            idx = torch.from_numpy(rng.choice(len(pool), size=config.batch_size, replace=False))
            images, labels = pool.images[idx].to(backbone.device), pool.labels[idx].to(backbone.device)
            with frozen_model(backbone):
                backbone.eval()
                adv = pgd_linf_ascent(
                    lambda x: F.cross_entropy(task.image_logits(x), labels, reduction="sum"),
                    images, config.eps, config.pgd_steps, config.step_size, True, generator,
                )
            with torch.no_grad():
                clean_tokens = backbone.visual_features(images)[1]
                adv_tokens = backbone.visual_features(adv)[1]
            batch_ids = ids[idx.to(ids.device)]
            loss = config.clean_weight * caption_loss(backbone, clean_tokens, batch_ids) + (1 - config.clean_weight) * caption_loss(
                backbone, adv_tokens, batch_ids
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(defended, 1.0)
            optimizer.step()
            if progress and step % 10 == 0:
                print(f"step {step}: loss {loss.item():.3f}", flush=True)
            if time.process_time() - start > config.budget_cpu_minutes * 60:
                break
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        backbone.eval()
    return {"steps_run": step + 1, "cpu_minutes": round((time.process_time() - start) / 60, 2), "final_loss": float(loss.item()), "config": asdict(config)}


__all__ = ["FlamingoAdvTrainConfig", "adversarial_finetune"]
