"""Captioning pretraining of ``cmai-tiny-flamingo`` (``cmai backbone pretrain --arch flamingo``).

Flamingo's recipe at toy scale: the vision tower (cmai-tiny's open_clip ViT, already trained
contrastively) is frozen; the perceiver resampler, the gated cross-attention layers and the
decoder learn next-word prediction on freshly rendered ``shapes`` captions,

    L = − Σ_j log p_LM(w_j | x, w_<j)     over the caption's words and its end token.

Flamingo also freezes its language model; ours has no pretrained language model to keep, so the
decoder trains from scratch with the rest. Because the tower is frozen, its tokens are computed
once per data pool (no gradient through it), which is what makes the run fit in a few CPU
minutes. The budget is measured in *process CPU time* (all threads), on ``threads`` threads.
The checkpoint is stored in fp16 and the recorded accuracies are measured on the fp16-rounded
weights, i.e. on exactly what ships.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cmai_env.data import load_dataset
from cmai_env.models.flamingo import FlamingoBackbone, evaluate_generative, parameter_counts, tokenizer_file
from cmai_env.models.pretrain import check_pretrain_config
from cmai_env.models.registry import load_backbone, weights_dir


@dataclass
class FlamingoPretrainConfig:
    """Settings of one captioning pretraining run (all recorded beside the checkpoint)."""

    name: str = "cmai-tiny-flamingo"
    dataset: str = "shapes"
    seed: int = 0
    steps: int = 1200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    pool_size: int = 8192  # images rendered (and encoded once by the frozen tower) per pool
    refresh_every: int = 300  # steps between pool refreshes
    eval_n: int = 1000
    budget_cpu_minutes: float = 10.0
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_pretrain_config(self, "budget_cpu_minutes", counts=("threads",))


def caption_ids(backbone: FlamingoBackbone, captions: list[str]) -> torch.Tensor:
    """``[BOS] words [EOS]`` per caption, right-padded with ``[PAD]`` (id 0): (N, L)."""
    seqs = [[1, *backbone.lm_encode(c), 2] for c in captions]
    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids.to(backbone.device)


@torch.no_grad()
def vision_tokens(backbone: FlamingoBackbone, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The frozen tower's tokens for a pool of images, in chunks."""
    return torch.cat([backbone.visual_features(images[s : s + chunk].to(backbone.device))[1] for s in range(0, len(images), chunk)])


def caption_loss(backbone: FlamingoBackbone, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-word cross-entropy of captions ``ids`` given vision ``tokens`` (padding ignored)."""
    latents = backbone.resample(tokens)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = backbone.lm_forward(latents, backbone.lm_token_embeddings(inputs), (inputs != 0).long()).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=0)


def pretrain_flamingo(config: FlamingoPretrainConfig, out: Path | None = None, command: str = "", progress: bool = True) -> dict:
    """Train, evaluate and write ``<out>/<name>.pt``, ``<name>.tokenizer.json`` and ``<name>.json``; return the record."""
    out = Path(out) if out is not None else weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(config, out, command, progress)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(config: FlamingoPretrainConfig, out: Path, command: str, progress: bool) -> dict:
    torch.manual_seed(config.seed)  # IDEFICS initialises its layers from torch's global generator
    rng = np.random.default_rng(config.seed)
    backbone = load_backbone(config.name, pretrained="random", device=config.device)
    if not isinstance(backbone, FlamingoBackbone):
        raise ValueError(f"{config.name} is not a generative (flamingo) architecture; use `cmai backbone pretrain` without --arch")
    backbone.clip.requires_grad_(False)
    backbone.eval()  # the frozen tower stays in eval mode; the LM has no dropout
    trainable = [p for p in backbone.lm.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(frac, 1.0)))

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    bar = tqdm(range(config.steps), disable=not progress, desc=f"pretrain {config.name}")
    step, loss = 0, torch.zeros(())
    for step in bar:
        if step % config.refresh_every == 0:
            pool = load_dataset(config.dataset, split="train", n=config.pool_size, seed=int(rng.integers(1 << 31)), image_size=backbone.image_size)
            pool_tokens = vision_tokens(backbone, pool.images)
            pool_ids = caption_ids(backbone, pool.captions)
        idx = torch.from_numpy(rng.choice(len(pool_ids), size=config.batch_size, replace=False)).to(pool_ids.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = caption_loss(backbone, pool_tokens[idx], pool_ids[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.process_time() - cpu_start > config.budget_cpu_minutes * 60:
            break
    train_cpu = (time.process_time() - cpu_start) / 60
    train_wall = (time.perf_counter() - wall_start) / 60

    # What ships is fp16: round the model to it before measuring, so the record describes the file.
    state = {k: v.half() if v.is_floating_point() else v for k, v in backbone.checkpoint_state_dict().items()}
    backbone.lm.load_state_dict({k.removeprefix("lm."): v.float() for k, v in state.items() if k.startswith("lm.")})
    backbone.clip.load_state_dict({k.removeprefix("clip."): v.float() for k, v in state.items() if k.startswith("clip.")})
    backbone.eval()
    test = load_dataset(config.dataset, split="test", n=config.eval_n, seed=config.seed, image_size=backbone.image_size)
    report = evaluate_generative(backbone, test)
    torch.save(state, out / f"{config.name}.pt")
    backbone.lm_tokenizer.save(str(tokenizer_file(out, config.name)))
    import transformers

    def measured(key: str) -> dict:
        return {"dataset": config.dataset, "split": "test", "n": len(test), "seed": config.seed, "value": report[key]}

    record = {
        "name": config.name,
        "command": command,
        "config": asdict(config),
        "steps_run": step + 1,
        "train_cpu_minutes": round(train_cpu, 2),
        "train_wall_minutes": round(train_wall, 2),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "prompt": report["prompt"],
        "class_template": report["class_template"],
        "caption_accuracy": measured("caption_accuracy"),
        "zero_shot_accuracy": measured("zero_shot_accuracy"),
        "clip_zero_shot_accuracy": measured("clip_zero_shot_accuracy"),
        "example_captions": report["example_captions"],
        "parameters": parameter_counts(backbone),
        "final_loss": float(loss.item()),
    }
    (out / f"{config.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["FlamingoPretrainConfig", "caption_ids", "caption_loss", "pretrain_flamingo", "vision_tokens"]
