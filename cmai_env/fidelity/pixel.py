"""``pixel`` fidelity: real attacks in input space through the open_clip backbone."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from cmai_env.attacks import Attack, PairBatch, ZeroShotTask, attack_success_rate, make_attack
from cmai_env.data import load_dataset
from cmai_env.fidelity.base import (
    Fidelity,
    ProbeResult,
    RoundTraffic,
    TrafficStats,
    UpdateResult,
    assign_attacks,
    corrupted_pairs,
    defended_backbone,
    entry_key,
    universal_fit_pairs,
)
from cmai_env.round import AttackOutcome, mixture_asr, observed_adversarial, prediction_entropy, probe_split
from cmai_env.scenario import Scenario
from cmai_env.stream import RoundPlan
from cmai_env.training import ModalityBridgingTrainer, TrainerConfig

__all__ = ["PixelFidelity", "torch_generator"]


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from the episode's numpy generator (keeps one source of randomness)."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


class PixelFidelity(Fidelity):
    """Attacks craft δ on pixels / token embeddings against the current defended backbone."""

    name = "pixel"

    def __init__(self, scenario: Scenario, device: str = "cpu") -> None:
        super().__init__(scenario, device)
        spec = scenario.dataset
        self.backbone = defended_backbone(scenario, device=device, generative=self.generative)
        size = self.backbone.image_size
        root = spec.root
        self.pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=size, root=root)
        probe = load_dataset(spec.name, split="val", n=spec.probe_n, seed=spec.seed, image_size=size, root=root)
        self.task = self._make_task()
        self.pool_batch = self._pairs(self.pool)
        self.probe_batch = self._pairs(probe)
        # (pool, probe) per corruption the scenario's phases name: the copies the embedding fidelity embeds.
        self._views: dict[tuple[str, int] | None, tuple[PairBatch, PairBatch]] = {None: (self.pool_batch, self.probe_batch)}
        for key in scenario.corruptions_used():
            self._views[key] = (corrupted_pairs(self.pool_batch, key, spec.seed, "train"), corrupted_pairs(self.probe_batch, key, spec.seed, "val"))
        self.trainer = self._make_trainer(TrainerConfig(**scenario.defense.trainer_fields()))
        self._initial = self.trainer.snapshot()
        self._attacks: dict[tuple, Attack] = {}

    # Hooks the generative round (cmai_env.fidelity.generative) overrides: the task, its pairs, the
    # trainer, how a scenario's attack is built and how prompt tokens are embedded.
    generative: bool = False

    def _make_task(self) -> ZeroShotTask:
        return ZeroShotTask.from_dataset(self.backbone, self.pool)

    def _pairs(self, data) -> PairBatch:
        return PairBatch.from_dataset(self.backbone, data)

    def _make_trainer(self, config: TrainerConfig) -> ModalityBridgingTrainer:
        return ModalityBridgingTrainer(self.task, config)

    def _make_attack(self, entry) -> Attack:
        return make_attack(entry.name, **entry.params)

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.token_embeddings(tokens)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def reset(self) -> None:
        self.trainer.restore(self._initial)
        # Universal perturbations fitted against the old parameters must be re-fitted.
        self._attacks.clear()

    def _attack(self, entry, rng: np.random.Generator) -> Attack:
        key = entry_key(entry)
        if key not in self._attacks:
            attack = self._make_attack(entry)
            if hasattr(attack, "fit"):
                # Universal perturbations are learned on the training pool, then applied to unseen pairs.
                attack.fit(self.task, universal_fit_pairs(self.pool_batch), torch_generator(rng))
            self._attacks[key] = attack
        return self._attacks[key]

    def _perturb_groups(
        self, batch: PairBatch, attack_index: np.ndarray, plan: RoundPlan, rng: np.random.Generator
    ) -> PairBatch:
        """Replace the pairs of each mixture entry by that attack's output (text as token embeddings)."""
        images = batch.images.clone()
        token_embeds = None
        tokens = batch.tokens.clone()
        for i, entry in enumerate(plan.mixture):
            rows = torch.from_numpy(np.flatnonzero(attack_index == i)).to(self.device)
            if len(rows) == 0:
                continue
            result = self._attack(entry, rng)(self.task, batch.subset(rows), torch_generator(rng)).batch
            images[rows] = result.images
            tokens[rows] = result.tokens
            if result.token_embeds is not None:
                if token_embeds is None:
                    with torch.no_grad():
                        token_embeds = self._token_embeddings(batch.tokens)
                token_embeds[rows] = result.token_embeds.detach()
        if token_embeds is not None:
            # Pairs whose text was replaced by discrete substitutions need their new embeddings too.
            with torch.no_grad():
                untouched = torch.from_numpy(attack_index < 0).to(self.device) | (tokens != batch.tokens).any(-1)
                token_embeds[untouched] = self._token_embeddings(tokens[untouched])
        return PairBatch(images, tokens, batch.labels, token_embeds)

    def incoming(self, plan: RoundPlan, rng: np.random.Generator) -> RoundTraffic:
        n = self.scenario.batch_size
        rows = torch.from_numpy(rng.choice(len(self.pool_batch), size=n, replace=False)).to(self.device)
        clean = self._views[plan.corruption][0].subset(rows)
        attack_index = assign_attacks(plan, n, rng)
        start = time.perf_counter()
        received = self._perturb_groups(clean, attack_index, plan, rng) if (attack_index >= 0).any() else clean
        attack_ms = (time.perf_counter() - start) * 1000
        return RoundTraffic((clean, received), attack_index, [e.name for e in plan.mixture], attack_ms)

    @torch.no_grad()
    def observe(self, traffic: RoundTraffic) -> TrafficStats:
        _, received = traffic.payload
        out = self.task.forward(received)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return TrafficStats(out.image_embeds, out.text_embeds, self.task.consistency(out), cosine)

    def update(self, traffic: RoundTraffic, betas: np.ndarray, flagged: np.ndarray, rng: np.random.Generator) -> UpdateResult:
        clean, received = traffic.payload
        defense = self.scenario.defense
        observed_rows = np.flatnonzero(observed_adversarial(traffic.is_adv, flagged, defense.train_on_flagged, defense.flagged_pairs))
        observed = received.subset(torch.from_numpy(observed_rows).to(self.device)) if len(observed_rows) else None
        self.trainer.generator = torch_generator(rng)
        result = self.trainer.step(clean, betas, observed_adv=observed)
        return UpdateResult(
            l_task=result.l_task,
            l_consistency=result.l_consistency,
            l_adv=result.l_adv,
            l_total=result.l_total,
            attack_steps_used=result.attack_steps_used,
            max_attack_steps=self.trainer.config.attack_steps * self.trainer.config.updates_per_round,
            attack_ms=result.attack_ms,
            update_ms=result.update_ms,
            grad_norms=result.grad_norms,
        )

    @torch.no_grad()
    def _clean_probe(self, probe_batch: PairBatch):
        out = self.task.forward(probe_batch)
        return out, self.task.consistency(out)

    def probe(self, plan: RoundPlan, rng: np.random.Generator) -> ProbeResult:
        start = time.perf_counter()
        probe_batch = self._views[plan.corruption][1]
        out, clean_consistency = self._clean_probe(probe_batch)
        labels = probe_batch.labels
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        asr_per_attack: dict[str, float] = {}
        rates: list[float] = []
        outcomes: list[AttackOutcome] = []
        n = probe_split(len(probe_batch))
        attacked = probe_batch.subset(slice(0, n))
        for entry in plan.mixture:
            attack = self._attack(entry, rng)
            result = attack(self.task, attacked, torch_generator(rng))
            with torch.no_grad():
                adv_out = self.task.forward(result.batch)
                adv_consistency = self.task.consistency(adv_out)
            clean_correct = self.task.correct(_head(out, len(attacked)), attacked.labels, result.modality)
            adv_correct = self.task.correct(adv_out, attacked.labels, result.modality)
            asr = attack_success_rate(clean_correct, adv_correct)
            asr_per_attack[entry.name] = asr
            rates.append(asr)
            clean_ok = clean_correct.cpu().numpy()
            outcomes.append(AttackOutcome(clean_ok, clean_ok & ~adv_correct.cpu().numpy(), adv_consistency.cpu().numpy()))
        all_consistency = clean_consistency.cpu().numpy()
        image_correct = self.task.correct(out, labels, "image").cpu().numpy()
        return ProbeResult(
            clean_acc=float(image_correct.mean()),
            consistency_score=float(cosine.mean()),
            clean_consistency=all_consistency[n:],
            asr=mixture_asr([e.weight for e in plan.mixture], rates),
            prediction_entropy=float(prediction_entropy(out.image_logits).mean()),
            asr_per_attack=asr_per_attack,
            probe_ms=(time.perf_counter() - start) * 1000,
            eval_clean_consistency=all_consistency[:n],
            eval_clean_correct=image_correct[:n],
            outcomes=outcomes,
        )


def _head(out, n: int):
    """The first ``n`` rows of a TaskOutputs (or of a subclass: every field is per row)."""
    return type(out)(**{f.name: getattr(out, f.name)[:n] for f in dataclasses.fields(out)})
