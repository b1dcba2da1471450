"""``embedding`` fidelity: bounded perturbations of cached frozen embeddings, for fast RL iteration.

The frozen backbone embeds the training pool, the probe set and the class prompts once. The
defended parameters are residual adapters on the pooled embeddings (``e ↦ norm(e + A(e))`` with
:class:`cmai_env.models.backbone.ResidualAdapter`, the same adapter the pixel fidelity trains;
one for images and one for text; class prompts pass the text adapter). Every registered attack maps to an embedding-space counterpart on the *input*
embedding (before the adapter), under an L2 radius

    r = RADIUS · (attack's budget / that attack's default budget)

with ``RADIUS`` = 0.5 for every family, so a default-budget attack moves a unit embedding by at
most half its norm. Families:

==============================================  ================================================
registered attacks                              embedding-space counterpart
==============================================  ================================================
fgsm, pgd_linf, pgd_l2                           untargeted L2-PGD on e_v (task CE of the image)
universal                                        one shared δ for the whole batch on e_v
text_embedding_pgd, token_substitution           untargeted L2-PGD on e_t (task CE of the caption)
bridge_image_to_text                             e_v pulled toward the nearest wrong class prompt
bridge_text_to_image                             e_t pulled toward the nearest wrong class prompt
co_attack                                        text step, then image step (both perturbed)
==============================================  ================================================

Steps follow the attack's ``steps`` parameter, capped at ``MAX_STEPS``. The spaces, metrics
and the reward are the same as in ``pixel``; absolute numbers differ (this is a fast proxy).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmai_env.attacks import attack_class, attack_success_rate
from cmai_env.consistency import consistency_terms
from cmai_env.data import load_dataset
from cmai_env.fidelity.base import Fidelity, ProbeResult, RoundTraffic, TrafficStats, UpdateResult, assign_attacks
from cmai_env.models import load_backbone
from cmai_env.models.backbone import ResidualAdapter
from cmai_env.scenario import Scenario
from cmai_env.stream import RoundPlan

RADIUS = 0.5
MAX_STEPS = 3
ADAPTER_HIDDEN = 64
PROBE_ATTACK_N = 64

_FAMILY = {
    "fgsm": "image",
    "pgd_linf": "image",
    "pgd_l2": "image",
    "universal": "universal",
    "text_embedding_pgd": "text",
    "token_substitution": "text",
    "bridge_image_to_text": "bridge_image",
    "bridge_text_to_image": "bridge_text",
    "co_attack": "both",
}
_MODALITY = {"image": "image", "universal": "image", "text": "text", "bridge_image": "image", "bridge_text": "text", "both": "both"}


@dataclass(frozen=True)
class EmbeddingAttack:
    """An attack's embedding-space counterpart: family, L2 radius and steps."""

    name: str
    family: str
    radius: float
    steps: int

    @property
    def modality(self) -> str:
        return _MODALITY[self.family]

    @classmethod
    def from_entry(cls, entry) -> "EmbeddingAttack":
        if entry.name not in _FAMILY:
            raise ValueError(f"attack {entry.name!r} has no embedding-fidelity counterpart; known: {sorted(_FAMILY)}")
        defaults = attack_class(entry.name).parameters()
        budget_key = "k" if "k" in defaults else "eps"
        default_budget = float(defaults.get(budget_key, 1.0) or 1.0)
        budget = float(entry.params.get(budget_key, default_budget))
        steps = int(entry.params.get("steps", defaults.get("steps", 1)))
        return cls(entry.name, _FAMILY[entry.name], RADIUS * budget / default_budget, max(1, min(steps, MAX_STEPS)))


class EmbeddingFidelity(Fidelity):
    """Cached frozen embeddings + residual adapters (see the module docstring for the mapping)."""

    name = "embedding"

    def __init__(self, scenario: Scenario, device: str = "cpu") -> None:
        super().__init__(scenario, device)
        spec = scenario.dataset
        backbone = load_backbone(scenario.backbone.name, scenario.backbone.pretrained, device=device)
        size = backbone.image_size
        pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=size, root=spec.root)
        probe = load_dataset(spec.name, split="val", n=spec.probe_n, seed=spec.seed, image_size=size, root=spec.root)
        with torch.no_grad():
            self.pool_v = _embed_images(backbone, pool.images)
            self.pool_t = backbone.encode_text(backbone.tokenize(pool.captions))
            self.probe_v = _embed_images(backbone, probe.images)
            self.probe_t = backbone.encode_text(backbone.tokenize(probe.captions))
            self.class_raw = backbone.class_text_embeddings(pool.class_names, pool.templates)
        self.pool_y = pool.labels.to(self.device)
        self.probe_y = probe.labels.to(self.device)
        self.logit_scale = float(backbone.logit_scale.detach())
        self.kl_weight = 1.0
        dim = self.pool_v.shape[-1]
        generator = torch.Generator().manual_seed(spec.seed)
        self.image_adapter = ResidualAdapter(dim, ADAPTER_HIDDEN, generator).to(self.device)
        self.text_adapter = ResidualAdapter(dim, ADAPTER_HIDDEN, generator).to(self.device)
        defense = scenario.defense
        self.params = list(self.image_adapter.parameters()) + list(self.text_adapter.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=defense.lr)
        # Training budgets map to radii the way attack budgets do: relative to the default budget
        # of the image (pgd_linf) and text (text_embedding_pgd) attacks.
        self.train_radius_v = RADIUS * defense.eps_v / float(attack_class("pgd_linf").parameters()["eps"])
        self.train_radius_t = RADIUS * defense.eps_t / float(attack_class("text_embedding_pgd").parameters()["eps"])
        self._initial = self._snapshot()

    # ------------------------------------------------------------------ state
    def _snapshot(self) -> dict:
        return {
            "image": copy.deepcopy(self.image_adapter.state_dict()),
            "text": copy.deepcopy(self.text_adapter.state_dict()),
            "optim": copy.deepcopy(self.optimizer.state_dict()),
        }

    def reset(self) -> None:
        self.image_adapter.load_state_dict(self._initial["image"])
        self.text_adapter.load_state_dict(self._initial["text"])
        self.optimizer.load_state_dict(copy.deepcopy(self._initial["optim"]))

    @property
    def embed_dim(self) -> int:
        return int(self.pool_v.shape[-1])

    # ------------------------------------------------------------------ model
    def _image(self, raw_v: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_adapter(raw_v), dim=-1)

    def _text(self, raw_t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_adapter(raw_t), dim=-1)

    def _classes(self) -> torch.Tensor:
        return self._text(self.class_raw)

    def _forward(self, raw_v: torch.Tensor, raw_t: torch.Tensor, classes: torch.Tensor):
        e_v, e_t = self._image(raw_v), self._text(raw_t)
        return e_v, e_t, self.logit_scale * e_v @ classes.T, self.logit_scale * e_t @ classes.T

    def _consistency(self, e_v, e_t, logits_v, logits_t) -> torch.Tensor:
        return consistency_terms([e_v, e_t], [logits_v, logits_t], self.kl_weight).loss

    # ------------------------------------------------------------------ attacks
    def _pgd(self, raw: torch.Tensor, loss_fn, radius: float, steps: int, shared: bool = False) -> torch.Tensor:
        """L2-PGD ascent on ``loss_fn(raw + δ)`` with ‖δ‖ ≤ radius per row (one δ if ``shared``)."""
        if radius <= 0 or steps <= 0:
            return raw
        (crafted,) = self._pgd_joint((raw,), loss_fn, (radius,), steps, shared)
        return crafted

    def _pgd_joint(self, raws: tuple[torch.Tensor, ...], loss_fn, radii: tuple[float, ...], steps: int, shared: bool = False):
        """Simultaneous L2-PGD on several inputs (``loss_fn(*perturbed)``), each within its own radius.

        Step size ``2.5·r/steps`` per input (Madry et al.'s rule of thumb); rows stay independent
        because every loss here is a per-row sum or mean.
        """
        deltas = [
            torch.zeros(1 if shared else raw.shape[0], raw.shape[1], device=raw.device, requires_grad=True) for raw in raws
        ]
        for _ in range(steps):
            grads = torch.autograd.grad(loss_fn(*(raw + d for raw, d in zip(raws, deltas))), deltas)
            with torch.no_grad():
                for delta, grad, radius in zip(deltas, grads, radii):
                    delta += (2.5 * radius / steps) * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    delta *= (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return tuple((raw + d).detach() for raw, d in zip(raws, deltas))

    def _run_attack(self, attack: EmbeddingAttack, raw_v, raw_t, labels, classes):
        """Perturbed (raw_v, raw_t) for one attack against the current adapters."""
        frozen_classes = classes.detach()
        fam = attack.family

        def image_ce(v):
            return F.cross_entropy(self.logit_scale * self._image(v) @ frozen_classes.T, labels)

        def text_ce(t):
            return F.cross_entropy(self.logit_scale * self._text(t) @ frozen_classes.T, labels)

        if fam in ("bridge_image", "bridge_text"):
            with torch.no_grad():
                sims = (self._image(raw_v) if fam == "bridge_image" else self._text(raw_t)) @ frozen_classes.T
                sims[torch.arange(len(labels)), labels] = -float("inf")
                target = frozen_classes[sims.argmax(-1)]
            adapter = self._image if fam == "bridge_image" else self._text
            pull = lambda x: (adapter(x) * target).sum(-1).mean()  # noqa: E731  (cosine to the wrong class)
            if fam == "bridge_image":
                return self._pgd(raw_v, pull, attack.radius, attack.steps), raw_t
            return raw_v, self._pgd(raw_t, pull, attack.radius, attack.steps)
        new_v, new_t = raw_v, raw_t
        if fam in ("text", "both"):
            new_t = self._pgd(raw_t, text_ce, attack.radius, attack.steps)
        if fam in ("image", "both", "universal"):
            new_v = self._pgd(raw_v, image_ce, attack.radius, attack.steps, shared=fam == "universal")
        return new_v, new_t

    # ------------------------------------------------------------------ round
    def incoming(self, plan: RoundPlan, rng: np.random.Generator) -> RoundTraffic:
        n = self.scenario.batch_size
        rows = torch.from_numpy(rng.choice(len(self.pool_y), size=n, replace=False)).to(self.device)
        raw_v, raw_t, labels = self.pool_v[rows], self.pool_t[rows], self.pool_y[rows]
        attack_index = assign_attacks(plan, n, rng)
        start = time.perf_counter()
        adv_v, adv_t = raw_v.clone(), raw_t.clone()
        if (attack_index >= 0).any():
            classes = self._classes()
            for i, entry in enumerate(plan.mixture):
                sel = torch.from_numpy(np.flatnonzero(attack_index == i)).to(self.device)
                if len(sel):
                    attack = EmbeddingAttack.from_entry(entry)
                    adv_v[sel], adv_t[sel] = self._run_attack(attack, raw_v[sel], raw_t[sel], labels[sel], classes)
        attack_ms = (time.perf_counter() - start) * 1000
        return RoundTraffic((raw_v, raw_t, adv_v, adv_t, labels), attack_index, [e.name for e in plan.mixture], attack_ms)

    @torch.no_grad()
    def observe(self, traffic: RoundTraffic) -> TrafficStats:
        _, _, adv_v, adv_t, _ = traffic.payload
        e_v, e_t, lv, lt = self._forward(adv_v, adv_t, self._classes())
        return TrafficStats(e_v, e_t, self._consistency(e_v, e_t, lv, lt), (e_v * e_t).sum(-1))

    def update(self, traffic: RoundTraffic, betas: np.ndarray, flagged: np.ndarray, rng: np.random.Generator) -> UpdateResult:
        from cmai_env.training import crafting_steps

        raw_v, raw_t, adv_v, adv_t, labels = traffic.payload
        defense = self.scenario.defense
        b_task, b_cons, b_adv = (float(b) for b in betas)
        steps = crafting_steps(b_adv, defense.attack_steps)
        start = time.perf_counter()
        if steps:
            classes = self._classes().detach()

            def objective(v, t):
                e_v, e_t, lv, lt = self._forward(v, t, classes)
                return F.cross_entropy(lv, labels) + F.cross_entropy(lt, labels) + defense.alpha * self._consistency(e_v, e_t, lv, lt).mean()

            # δ_v and δ_t ascend together, as in the pixel trainer's joint PGD.
            craft_v, craft_t = self._pgd_joint((raw_v, raw_t), objective, (self.train_radius_v, self.train_radius_t), steps)
        attack_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        observed = torch.from_numpy(np.flatnonzero(traffic.is_adv & flagged)).to(self.device)
        adv_parts_v, adv_parts_t, adv_y = [], [], []
        if steps:
            adv_parts_v.append(craft_v), adv_parts_t.append(craft_t), adv_y.append(labels)
        if len(observed):
            adv_parts_v.append(adv_v[observed]), adv_parts_t.append(adv_t[observed]), adv_y.append(labels[observed])
        classes = self._classes()
        e_v, e_t, lv, lt = self._forward(raw_v, raw_t, classes)
        l_task = F.cross_entropy(lv, labels) + F.cross_entropy(lt, labels)
        if adv_y:
            a_v, a_t, a_lv, a_lt = self._forward(torch.cat(adv_parts_v), torch.cat(adv_parts_t), classes)
            y = torch.cat(adv_y)
            l_adv = F.cross_entropy(a_lv, y) + F.cross_entropy(a_lt, y)
            l_cons = self._consistency(a_v, a_t, a_lv, a_lt).mean()
        else:
            l_adv = torch.zeros((), device=self.device)
            l_cons = self._consistency(e_v, e_t, lv, lt).mean()
        l_total = b_task * l_task + b_cons * l_cons + b_adv * l_adv
        if not torch.isfinite(l_total):
            raise FloatingPointError(
                f"non-finite loss in the embedding-fidelity update: L_task={float(l_task)}, "
                f"L_consistency={float(l_cons)}, L_adv={float(l_adv)}, betas={list(betas)}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        l_total.backward()
        self.optimizer.step()
        return UpdateResult(
            l_task=float(l_task.detach()),
            l_consistency=float(l_cons.detach()),
            l_adv=float(l_adv.detach()),
            l_total=float(l_total.detach()),
            attack_steps_used=steps,
            max_attack_steps=defense.attack_steps,
            attack_ms=attack_ms,
            update_ms=(time.perf_counter() - start) * 1000,
        )

    def probe(self, plan: RoundPlan, rng: np.random.Generator) -> ProbeResult:
        start = time.perf_counter()
        with torch.no_grad():
            classes = self._classes()
            e_v, e_t, lv, lt = self._forward(self.probe_v, self.probe_t, classes)
            clean_consistency = self._consistency(e_v, e_t, lv, lt)
        image_ok, text_ok = lv.argmax(-1) == self.probe_y, lt.argmax(-1) == self.probe_y
        n = min(PROBE_ATTACK_N, len(self.probe_y))
        asr_per_attack: dict[str, float] = {}
        weighted = 0.0
        for entry in plan.mixture:
            attack = EmbeddingAttack.from_entry(entry)
            adv_v, adv_t = self._run_attack(attack, self.probe_v[:n], self.probe_t[:n], self.probe_y[:n], classes)
            with torch.no_grad():
                _, _, alv, alt = self._forward(adv_v, adv_t, classes)
            adv_image_ok, adv_text_ok = alv.argmax(-1) == self.probe_y[:n], alt.argmax(-1) == self.probe_y[:n]
            clean_ok = {"image": image_ok[:n], "text": text_ok[:n], "both": image_ok[:n] & text_ok[:n]}[attack.modality]
            adv_ok = {"image": adv_image_ok, "text": adv_text_ok, "both": adv_image_ok & adv_text_ok}[attack.modality]
            asr_per_attack[entry.name] = attack_success_rate(clean_ok, adv_ok)
            weighted += entry.weight * asr_per_attack[entry.name]
        return ProbeResult(
            clean_acc=float(image_ok.float().mean()),
            consistency_score=float((e_v * e_t).sum(-1).mean()),
            clean_consistency=clean_consistency.numpy(),
            asr=weighted / max(sum(e.weight for e in plan.mixture), 1e-12) if plan.mixture else 0.0,
            asr_per_attack=asr_per_attack,
            probe_ms=(time.perf_counter() - start) * 1000,
        )


def _embed_images(backbone, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([backbone.encode_image(images[i : i + batch_size].to(backbone.device)) for i in range(0, len(images), batch_size)])

