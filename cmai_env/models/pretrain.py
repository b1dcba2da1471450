"""Contrastive pretraining of an embedded backbone (``cmai backbone pretrain``).

Trains a randomly initialised open_clip model on freshly rendered `shapes` image–caption pairs
with open_clip's own ``ClipLoss`` (symmetric InfoNCE), then measures zero-shot accuracy on
held-out test images and writes the checkpoint (fp16, ``torch.save`` of a plain state dict)
with its provenance beside it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm import tqdm

from cmai_env.data import load_dataset
from cmai_env.models.registry import load_backbone, weights_dir


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (all recorded beside the checkpoint)."""

    name: str = "cmai-tiny"
    dataset: str = "shapes"
    seed: int = 0
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    pool_size: int = 20000  # images rendered per refresh of the training pool
    refresh_every: int = 400  # steps between pool refreshes (fresh data, no overfitting)
    eval_n: int = 1000
    budget_minutes: float = 15.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_pretrain_config(self, "budget_minutes")


def check_pretrain_config(config, budget_field: str, counts: tuple[str, ...] = ()) -> None:
    """The checks both pretraining configs run when built: every count ≥ 1, a batch no larger than
    the pool it is drawn from without replacement, a positive learning rate and budget.

    :param budget_field: the config's time budget field. :param counts: further fields that must be ≥ 1.
    :raises ValueError: naming the config's field, its value and what is allowed.
    """
    label = type(config).__name__
    for key in ("steps", "batch_size", "pool_size", "refresh_every", "eval_n", *counts):
        if int(getattr(config, key)) < 1:
            raise ValueError(f"{label}.{key} must be ≥ 1, got {getattr(config, key)!r}")
    if config.batch_size > config.pool_size:
        raise ValueError(f"{label}.batch_size ({config.batch_size}) must be ≤ pool_size ({config.pool_size}), the images a batch is drawn from")
    if not (config.lr > 0 and getattr(config, budget_field) > 0):
        raise ValueError(f"{label}: lr and {budget_field} must be > 0, got {config.lr} and {getattr(config, budget_field)}")


def pretrain(config: PretrainConfig, out: Path | None = None, command: str = "", progress: bool = True) -> dict:
    """Run pretraining and write ``<out>/<name>.pt`` plus ``<out>/<name>.json``; return the record."""
    out = Path(out) if out is not None else weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    backbone = load_backbone(config.name, pretrained="random", device=config.device).train()
    size = backbone.image_size
    test = load_dataset(config.dataset, split="test", n=config.eval_n, seed=config.seed, image_size=size)

    params_decay = [p for n, p in backbone.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    params_rest = [p for n, p in backbone.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": params_decay, "weight_decay": config.weight_decay}, {"params": params_rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(frac, 1.0)))

    loss_fn = ClipLoss()
    start, cpu_start = time.perf_counter(), time.process_time()
    pool = None
    bar = tqdm(range(config.steps), disable=not progress, desc=f"pretrain {config.name}")
    step = 0
    for step in bar:
        if step % config.refresh_every == 0:
            pool = load_dataset(config.dataset, split="train", n=config.pool_size, seed=int(rng.integers(1 << 31)), image_size=size)
            pool_tokens = backbone.tokenize(pool.captions)
        idx = torch.from_numpy(rng.choice(len(pool), size=config.batch_size, replace=False))
        images = pool.images[idx].to(config.device)
        # Random horizontal flips keep every class name true (no shape here is chiral).
        flip = torch.from_numpy(rng.random(config.batch_size) < 0.5).to(config.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        image_features = backbone.encode_image(images)
        text_features = backbone.encode_text(pool_tokens[idx.to(pool_tokens.device)])
        loss = loss_fn(image_features, text_features, backbone.clip.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            backbone.clip.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.perf_counter() - start > config.budget_minutes * 60:
            break

    backbone.eval()
    class_embeds = backbone.class_text_embeddings(test.class_names, test.templates)
    accuracy = backbone.zero_shot_accuracy(test.images, test.labels, class_embeds)
    minutes = (time.perf_counter() - start) / 60
    state = {k: v.half() if v.is_floating_point() else v for k, v in backbone.clip.state_dict().items()}
    torch.save(state, out / f"{config.name}.pt")
    record = {
        "name": config.name,
        "command": command,
        "config": asdict(config),
        "steps_run": step + 1,
        "train_minutes": round(minutes, 2),
        # CPU time of this process (all threads), what a shared machine's load cannot inflate
        "train_cpu_minutes": round((time.process_time() - cpu_start) / 60, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "zero_shot_accuracy": {"dataset": config.dataset, "split": "test", "n": len(test), "seed": config.seed, "value": accuracy},
        "final_loss": float(loss.item()),
    }
    (out / f"{config.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
