"""Fidelity calibration: each attack at the pixel and the embedding fidelity, side by side.

    python benchmarks/fidelity_calibration.py [--probe-n 256] [--steps 3] [--attacks pgd_linf,...]
        [--radius R [--exponent G]] [--calibrate] [--rank] [--rank-scenarios quickstart,abrupt_shift]
        [--rank-seeds 0,1,2] [--train-radius-scale K] [--like-for-like] [--data-seed S] [--quick]
        [--displacement] [--corruption NAME:SEVERITY] [--radius-spread SIGMA] [--laws FAMILY=SCALE,GAMMA ...]
        [--pixel-travel] [--train-travel]

On the ``quickstart`` scenario's data (shapes, ``cmai-tiny``), for every attack in ``CASES`` and
each of its budgets, the UNDEFENDED model (the pretrained backbone; at the embedding fidelity its
residual adapters are fresh, i.e. exactly the identity) is attacked on the same probe pairs at
both fidelities:

* ``pixel``: the registered attack class on the images / token embeddings
  (:func:`cmai_env.robustness.evaluate_attack`; ``universal`` is first fitted on 256 training
  pairs, as :class:`cmai_env.fidelity.pixel.PixelFidelity` does);
* ``embedding``: the attack's embedding counterpart crafted on the cached embeddings by
  :meth:`cmai_env.fidelity.stacked.StackedEmbeddingWorld.craft`, radius
  ``r = scale(family) · budget / default budget`` (``--radius`` overrides every family's scale).

The probe set (``--probe-n`` pairs of the ``val`` split) is split in two halves: the first is
attacked, the second calibrates the consistency detector's ``τ`` (5% FPR on clean pairs, flag
``L_consistency > τ``). Per cell it prints ``asr`` (share of originally correct pairs flipped),
``tpr`` (share of attacked pairs flagged) and ``sys`` (system ASR: flipped and not flagged) at
both fidelities, the embedding − pixel differences and whether |Δ| ≤ 0.10 for ASR and TPR.

Every attack runs ``--steps`` iterations (3 by default: the embedding fidelity caps its steps at
``MAX_STEPS`` = 3 and the shipped scenarios use 3) with step size ``2.5·budget/steps`` (Madry et
al.'s rule, the embedding fidelity's :func:`cmai_env.round.default_step_size`); only the budget
parameter varies, as a scenario entry would vary it.

``--calibrate`` grid-searches, per embedding family, the scale in ``GRID`` minimising the largest
|Δ| of ASR and TPR over that family's cells (ties: the smallest mean |Δ|) and prints it, with the
table at the chosen scales. ``--rank`` plays every baseline of :mod:`agents.baselines` for whole
episodes at both fidelities and prints the Spearman rank correlation of their mean returns (pixel
episodes: ~15 CPU-s each on quickstart); with ``--radius`` it also plays the embedding fidelity at
that law (``--radius 0.5``: the old single radius) against the same pixel returns. ``--quick`` is a smoke run (one budget of three attacks, 32 probe pairs). ``--train-radius-scale K``
with ``--rank`` also plays the embedding fidelity with ``defense.embedding_train_radius_scale: K``
(``L_adv``'s training examples K × farther out; see ``--displacement``). ``--like-for-like`` with
``--rank`` also plays pixel defending what the embedding fidelity defends (its residual adapters
at ``defense.adapter_lr``) where the scenario's pixel defence differs (``quickstart``: the whole
model at 1e-3), and correlates every embedding run with both pixel runs. ``--train-travel`` with
``--rank`` also plays the embedding fidelity with both of its distances taken from pixel fidelity:
``embedding_attack_radius: pixel_travel`` and ``defense.embedding_train_radius: pixel_travel`` at
training scale 1 (each ``L_adv`` example as far out as the pixel trainer's own).

``--displacement`` also prints, per image-side cell, how far the pixel attack moves the unit image
embedding (median and 90th percentile of ``‖e_v(x + δ) − e_v(x)‖₂``) beside the radius the embedding
fidelity gives that attack, and the radius of ``L_adv``'s training examples (``defense.eps_v``).
The radii match the attacks' *success*; if pixel attacks travel much farther to get it, training
on them (``β_adv``) pulls far-off points back to their class at pixel fidelity, where the
embedding fidelity trains on near ones: the cost in clean accuracy is not alike.

``--corruption NAME:SEVERITY`` (e.g. ``gaussian_noise:2``) plays every cell on the corrupted copy
of the pool and probe images that a scenario phase with that ``corruption`` serves, at both
fidelities (the embedding side attacks the view :class:`StackedEmbeddingWorld` caches for it),
with τ calibrated on the corrupted clean pairs as in such a phase. The radius laws were fitted on
clean images; most shipped scenarios run their attacks on noisy ones, so this is the out-of-sample
check of the calibration where points 4–6 of issue 10 are measured.

``--radius-spread SIGMA`` tests a richer embedding attack than the environment plays: each attacked
probe pair's radius is multiplied by ``exp(SIGMA · z)``, ``z ~ N(0, 1)`` drawn once per pair
(``--seed``), as if some images were more fragile than others at the same budget (a lognormal
random effect; pixel attacks' success varies per image beyond its embedding's margin, so their
ASR rises more slowly with the budget than one radius for every pair gives). The table and
``--calibrate`` then use it; the environment does not (SIGMA 0). ``--calibrate`` ends with the
fitted laws as a ``--laws`` argument and as a scenario's ``embedding_radius_laws`` field (with
``--pixel-travel``: its ``pixel_travel_laws``), which plays them in the environment, and ``--laws FAMILY=SCALE,GAMMA ...`` plays given laws
instead of the environment's (families not named keep theirs), e.g. laws fitted on clean images
checked on noisy ones with ``--corruption``.

``--pixel-travel`` tests the embedding attack the radius laws approximate: each attacked pair's
radius is ``c · travel^γ``, where ``travel`` is how far that cell's own pixel attack moved
that pair's unit embedding on the undefended model (image and caption side each their own; the
same adversarial examples the pixel column scores), and ``(c, γ)`` one pair per family
(:data:`cmai_env.fidelity.travel.PIXEL_TRAVEL_LAW`; ``--calibrate`` refits both). The direction is still the embedding PGD's,
against the current model, so the attack stays white-box; only each pair's budget is the pixel
attack's. A scenario plays it with ``embedding_attack_radius: pixel_travel`` (:mod:`cmai_env.fidelity.travel`).
``token_substitution`` (named with ``--attacks``) is played there as the environment plays it: of each
pair's candidate captions from the pixel attack (``REPLAY_WIDTH`` first-order flips on the undefended
model), the worst under the current adapters (its declaration's ``replay``); its ``r`` column is unused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

from agents.protocol import distinct_seeds  # noqa: E402
from cmai_env.attacks import PairBatch, ZeroShotTask, make_attack  # noqa: E402
from cmai_env.attacks.specs import declaration  # noqa: E402
from cmai_env.cli.common import positive_float, positive_int  # noqa: E402
from cmai_env.consistency import ConsistencyDetector  # noqa: E402
from cmai_env.corruptions import corrupted_split  # noqa: E402
from cmai_env.data import load_dataset  # noqa: E402
from cmai_env.fidelity import stacked  # noqa: E402
from cmai_env.fidelity.base import defended_backbone  # noqa: E402
from cmai_env.fidelity.stacked import EmbeddingAttack, RowAttacks, StackedEmbeddingWorld  # noqa: E402
from cmai_env.fidelity.travel import (  # noqa: E402
    CHUNK,
    PIXEL_TRAVEL_LAW,
    clean_embeddings,
    embedding_moves,
    entry_attack,
    replay_captions,
    travel_radii,
)
from cmai_env.robustness import evaluate_attack  # noqa: E402
from cmai_env.scenario import AttackSpec, Scenario, apply_overrides, load_scenario, scenario_option  # noqa: E402

#: the tolerance of the issue's target: |embedding − pixel| ≤ 0.10 for ASR and TPR
TOLERANCE = 0.10
#: radius scales the calibration tries per family (a plain grid, step 0.025)
GRID = tuple(round(0.025 * k, 3) for k in range(1, 41))
#: budget exponents γ it tries (r = scale · (budget / default)^γ; γ = 1: radius proportional to the budget)
EXPONENTS = (2.0, 1.5, 1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
#: the ``c`` values ``--pixel-travel --calibrate`` tries (0.05 … 3.0, step 0.025)
TRAVEL_GRID = tuple(round(0.025 * k, 3) for k in range(2, 121))
#: the travel exponents γ it tries (r = c · travel^γ; γ = 1: radius proportional to the travel)
TRAVEL_EXPONENTS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
#: embedding families of the detector-aware attacks while their declarations carry none
AWARE_FAMILIES = {"aware_pgd_linf": "aware_image", "aware_caption_rewrite": "aware_rewrite"}


@dataclass(frozen=True)
class Case:
    """One attack and the budgets it is measured at (values of its budget parameter)."""

    attack: str
    budgets: tuple[float, ...]


CASES = (
    Case("pgd_linf", (2 / 255, 4 / 255, 8 / 255)),
    Case("pgd_l2", (0.125, 0.25, 0.5)),
    Case("fgsm", (2 / 255, 4 / 255, 8 / 255)),
    Case("text_embedding_pgd", (0.05, 0.1, 0.2)),
    Case("bridge_image_to_text", (4 / 255, 8 / 255, 16 / 255)),
    Case("bridge_text_to_image", (0.05, 0.1, 0.2)),
    Case("co_attack", (2 / 255, 4 / 255, 8 / 255)),
    Case("universal", (2 / 255, 4 / 255, 8 / 255)),
    Case("aware_pgd_linf", (2 / 255, 4 / 255, 8 / 255)),
    Case("aware_caption_rewrite", (2 / 255, 4 / 255, 8 / 255)),
)
#: Attacks the shipped scenarios play beyond issue 10's 30 cells, selected only by name
#: (``--attacks token_substitution``): the default run stays the issue's table.
#: ``token_substitution`` (``k`` word tokens swapped) shares the ``text`` family's law.
EXTRA_CASES = (Case("token_substitution", (1, 2, 3)),)


@dataclass(frozen=True)
class Rates:
    """One attack's effect on the undefended model: ASR, detector TPR, system ASR."""

    asr: float
    tpr: float
    system_asr: float


@dataclass
class Setup:
    """The quickstart data at both fidelities: same probe pairs, attacked half ``[0, n)``."""

    scenario: Scenario
    task: ZeroShotTask
    pool: PairBatch
    attacked: PairBatch
    calibration: PairBatch
    world: StackedEmbeddingWorld
    n: int
    #: the probe images' cached embeddings the embedding side attacks, (P, D): the world's clean
    #: view, or the corrupted copy of them that a phase with ``corruption`` serves
    probe_v: torch.Tensor
    corruption: tuple[str, int] | None = None


def load_setup(
    scenario_name: str, probe_n: int, data_seed: int | None = None, device: str = "cpu", corruption: tuple[str, int] | None = None
) -> Setup:
    """Backbone, task and probe pairs (pixel) and the embedding world, from one scenario's data.

    :param data_seed: overrides the scenario's ``dataset.seed`` (other pairs: an out-of-sample check).
    :param corruption: ``(name, severity)``: both fidelities see the corrupted copy of the pool and
        the probe set that a scenario phase with this ``corruption`` serves
        (:func:`cmai_env.corruptions.corrupted_split`, the same images at both), attacked and
        calibrated on as in such a phase; ``None``: the clean images.
    """
    overrides: dict[str, object] = {"fidelity": "embedding", "dataset.probe_n": probe_n}
    if data_seed is not None:
        overrides["dataset.seed"] = data_seed
    scenario = apply_overrides(load_scenario(scenario_name), overrides)
    spec = scenario.dataset
    backbone = defended_backbone(scenario, device=device)
    backbone.eval()
    size = backbone.image_size
    pool = load_dataset(spec.name, split="train", n=spec.train_n, seed=spec.seed, image_size=size, root=spec.root)
    probe = load_dataset(spec.name, split="val", n=spec.probe_n, seed=spec.seed, image_size=size, root=spec.root)
    pool_batch, probe_batch = PairBatch.from_dataset(backbone, pool), PairBatch.from_dataset(backbone, probe)
    # The zero-shot task (class prompts) comes from the clean pool: a corruption changes images only.
    task = ZeroShotTask.from_dataset(backbone, pool)
    world = StackedEmbeddingWorld(scenario, 1, device=device)
    probe_v = world.probe_v
    if corruption is not None:
        pool_batch = PairBatch(corrupted_split(pool_batch.images, corruption, spec.seed, "train"), pool_batch.tokens, pool_batch.labels)
        probe_batch = PairBatch(corrupted_split(probe_batch.images, corruption, spec.seed, "val"), probe_batch.tokens, probe_batch.labels)
        with torch.no_grad():  # the view StackedEmbeddingWorld caches for such a phase
            probe_v = stacked._embed_images(backbone, probe_batch.images).to(world.device)
    n = probe_n // 2
    return Setup(
        scenario, task, pool_batch, probe_batch.subset(slice(0, n)), probe_batch.subset(slice(n, probe_n)), world, n, probe_v, corruption
    )


def budget_param(name: str) -> str:
    """The parameter that sets an attack's strength (its embedding counterpart's ``budget``)."""
    counterpart = declaration(name).embedding
    return counterpart.budget if counterpart is not None else "eps"


def attack_params(name: str, budget: float, steps: int) -> dict[str, float | int]:
    """The entry parameters both fidelities play: the budget, ``steps`` and ``2.5·budget/steps``."""
    params: dict[str, float | int] = {budget_param(name): budget, "steps": steps, "step_size": 2.5 * budget / steps}
    defaults = declaration(name).defaults()
    params = {key: value for key, value in params.items() if key in defaults}
    if "text_steps" in defaults:  # co_attack's caption stage: same step count, its default budget
        params["text_steps"] = steps
        params["text_step_size"] = 2.5 * float(defaults["text_eps"]) / steps
    return params


def family_of(name: str) -> str:
    """The embedding family an attack is played as."""
    counterpart = declaration(name).embedding
    if counterpart is not None:
        return counterpart.family
    if name in AWARE_FAMILIES:
        return AWARE_FAMILIES[name]
    raise ValueError(f"attack {name!r} has no embedding counterpart; it cannot be compared across fidelities")


def relative_budget(name: str, params: dict) -> float:
    """``budget / default budget`` of an attack entry."""
    key = budget_param(name)
    return float(params[key]) / float(declaration(name).defaults()[key])


def module_radius(family: str, relative: float) -> float:
    """The radius the environment gives ``family`` at ``relative`` budget (before the per-family
    table existed: ``RADIUS · relative`` for every family)."""
    if hasattr(stacked, "embedding_radius"):
        return float(stacked.embedding_radius(family, relative))
    return float(stacked.RADIUS) * relative


def embedding_attack(name: str, params: dict, law: tuple[float, float] | None) -> EmbeddingAttack:
    """The embedding counterpart as the environment builds it (``from_entry``), radius by ``law``.

    ``law = (scale, γ)`` sets ``r = scale · relative^γ``; ``None`` keeps the environment's radius.
    The detector-aware attacks, until their declarations name a family, are built directly as
    tests/test_aware_embedding.py does.
    """
    relative = relative_budget(name, params)
    if declaration(name).embedding is not None:
        attack = EmbeddingAttack.from_entry(AttackSpec(name=name, params=params))
    else:
        defaults = declaration(name).defaults()
        family = AWARE_FAMILIES[name]
        steps = max(1, min(int(params.get("steps", defaults.get("steps", 1))), stacked.MAX_STEPS))
        aware = {k: float(params.get(k, defaults.get(k, v))) for k, v in stacked.AWARE_PARAMS.items()}
        attack = EmbeddingAttack(name, family, module_radius(family, relative), steps, "image", **aware)
    if law is not None:
        attack = dataclasses.replace(attack, radius=law[0] * relative ** law[1])
    return attack


# ---------------------------------------------------------------------------- the two fidelities
#: Families whose attack moves the image side (the ones ``--displacement`` measures).
IMAGE_FAMILIES = ("image", "image_l2", "bridge_image", "aware_image", "aware_rewrite")


def pixel_displacement(setup: Setup, clean: torch.Tensor, name: str, params: dict, seed: int) -> tuple[float, float]:
    """Median and 90th percentile of the L2 distance the pixel attack moves the unit image embedding
    (``clean``: the attacked pairs' clean image embeddings)."""
    attack = make_attack(name, **params)
    backbone = setup.task.backbone
    adversarial = attack(setup.task, setup.attacked, torch.Generator().manual_seed(seed)).batch
    with torch.no_grad():
        moved = (backbone.encode_image(adversarial.images) - clean).norm(dim=-1)
    return float(moved.median()), float(moved.quantile(0.9))


def print_displacement(setup: Setup, cells: Sequence[Cell], seed: int) -> None:
    """``--displacement``'s table (module docstring)."""
    world = setup.world
    eps_v = setup.scenario.defense.eps_v
    print(f"\nhow far each image-side attack moves the unit image embedding (L2), pixel vs the embedding radius; "
          f"L_adv's training examples (eps_v {fmt_budget(eps_v)}): embedding radius {world.train_radius_v:.3f}")
    print(f"{'attack':<22} {'budget':>7} | {'pixel median':>12} {'p90':>6} | {'emb radius':>10} {'ratio':>6}")
    with torch.no_grad():
        clean = setup.task.backbone.encode_image(setup.attacked.images)
    for c in cells:
        if c.family not in IMAGE_FAMILIES:
            continue
        median, p90 = pixel_displacement(setup, clean, c.attack, c.params, seed)
        print(f"{c.attack:<22} {fmt_budget(c.budget):>7} | {median:>12.3f} {p90:>6.3f} | {c.radius:>10.3f} {median / max(c.radius, 1e-12):>6.2f}")


def pixel_rates(setup: Setup, name: str, params: dict, seed: int, travel: bool = False) -> tuple[Rates, tuple[np.ndarray, np.ndarray] | None]:
    """The registered attack on the attacked half; τ calibrated on the other half. With ``travel``
    also, per attacked pair, the L2 distance its adversarial example moved its unit image and its
    unit caption embedding on the undefended model (``--pixel-travel``), from the same examples."""
    generator = torch.Generator().manual_seed(seed)
    attack = entry_attack(name, params, setup.task, setup.pool, generator)  # universal: fitted on training pairs first
    moves: list[tuple[torch.Tensor, torch.Tensor]] = []

    def measure(chunk: PairBatch, adversarial: PairBatch) -> None:
        moves.append(embedding_moves(setup.task, clean_embeddings(setup.task, chunk), adversarial))

    report = evaluate_attack(
        setup.task, setup.attacked, attack, generator, ConsistencyDetector(0.05), setup.calibration, batch_size=CHUNK,
        on_examples=measure if travel else None,
    )
    moved = None
    if travel:
        moved = tuple(torch.cat([m[side] for m in moves]).cpu().numpy() for side in (0, 1))
    return Rates(report.asr, report.detector_tpr, report.system_asr), moved


def pixel_replay(setup: Setup, name: str, params: dict, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For an attack whose embedding counterpart declares ``replay``: the candidate captions of every
    attacked pair (:func:`cmai_env.fidelity.travel.replay_captions`), which ``--pixel-travel`` plays
    as the environment does at ``embedding_attack_radius: pixel_travel``; ``None`` for the others."""
    if not declaration(name).embedding.replay:
        return None
    attack = entry_attack(name, params, setup.task, setup.pool, torch.Generator().manual_seed(seed))
    captions, valid, row = replay_captions(setup.task, setup.attacked.tokens, setup.attacked.labels, attack)
    return captions[row], valid[row]


def pixel_travel(setup: Setup, name: str, params: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per attacked pair, the L2 distance the pixel attack moves its unit image and its unit caption
    embedding on the undefended model (:func:`pixel_rates` with ``travel``)."""
    return pixel_rates(setup, name, params, seed, travel=True)[1]


class EmbeddingProbe:
    """The embedding fidelity's side: clean scores once, then one crafted batch per attack.

    :param spread: σ of the per-pair radius factor ``exp(σ·z)`` (``--radius-spread``; 0: none, as
        the environment plays attacks). :param seed: draws ``z``, once per attacked pair.
    """

    def __init__(self, setup: Setup, spread: float = 0.0, seed: int = 0) -> None:
        world, n = setup.world, setup.n
        self.world, self.n = world, n
        z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
        self.radius_factor = np.exp(spread * z).astype(np.float32)
        self.probe_v = setup.probe_v
        with torch.no_grad():
            self.classes = world.classes(None)
            e_v, e_t, lv, lt = world.forward(self.probe_v[None], world.probe_t[None], self.classes, None)
            clean = world._consistency(e_v, e_t, lv, lt)[0].cpu().numpy()
        self.threshold = ConsistencyDetector(0.05).calibrate(clean[n:])
        labels = world.probe_y[:n]
        self.labels = labels
        self.clean_ok = {"image": (lv.argmax(-1)[0, :n] == labels), "text": (lt.argmax(-1)[0, :n] == labels)}

    def rates(
        self, attack: EmbeddingAttack, radii: tuple[np.ndarray, np.ndarray] | None = None, replay: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Rates:
        """The attack's rates on the attacked pairs; ``radii``: per pair, the image side's and the
        caption side's radius instead of ``attack.radius`` (``--pixel-travel``); ``replay``: per pair,
        candidate captions and which are real (:func:`pixel_replay`), played instead of the radius."""
        world, n = self.world, self.n
        orders = RowAttacks.empty((1, n), per_side=radii is not None)
        orders.fill(0, slice(0, n), attack, 0)
        if radii is None:
            orders.radius[0] *= self.radius_factor
        else:
            orders.radius[0], orders.radius_t[0] = radii
        table = None
        if replay is not None:
            orders.replay_from(0, slice(0, n), np.arange(n))
            table = tuple(torch.as_tensor(array, device=world.device) for array in replay)
        adv_v, adv_t = world.craft(None, self.probe_v[None, :n], world.probe_t[None, :n], self.labels[None], orders, self.classes, replay=table)
        with torch.no_grad():
            a_v, a_t, a_lv, a_lt = world.forward(adv_v, adv_t, self.classes, None)
            score = world._consistency(a_v, a_t, a_lv, a_lt)[0].cpu().numpy()
        adv_ok = {"image": a_lv.argmax(-1)[0] == self.labels, "text": a_lt.argmax(-1)[0] == self.labels}
        pick = lambda d: d["image"] & d["text"] if attack.modality == "both" else d[attack.modality]  # noqa: E731
        clean_ok, still_ok = pick(self.clean_ok).cpu().numpy(), pick(adv_ok).cpu().numpy()
        flagged = score > self.threshold
        flipped = clean_ok & ~still_ok
        correct = max(int(clean_ok.sum()), 1)
        return Rates(flipped.sum() / correct, float(flagged.mean()), (flipped & ~flagged).sum() / correct)


# ---------------------------------------------------------------------------- table
@dataclass
class Cell:
    """One attack at one budget: the entry parameters, pixel rates, and embedding rates at ``radius``."""

    attack: str
    family: str
    budget: float
    params: dict
    pixel: Rates
    embedding: Rates | None = None
    radius: float | None = None
    #: per attacked pair, how far the pixel attack moved the unit image and caption embeddings (``--pixel-travel``)
    travel: tuple[np.ndarray, np.ndarray] | None = None
    #: per attacked pair, the candidate captions a ``replay`` attack chooses between (``--pixel-travel``, :func:`pixel_replay`)
    replay: tuple[np.ndarray, np.ndarray] | None = None

    def travel_radii(self, law: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """``--pixel-travel``'s per-pair radii ``c · travel^γ`` for ``law = (c, γ)``, image side and caption side."""
        assert self.travel is not None
        return travel_radii(self.family, self.travel, law)

    def deltas(self) -> tuple[float, float]:
        assert self.embedding is not None
        return self.embedding.asr - self.pixel.asr, self.embedding.tpr - self.pixel.tpr


def fmt_budget(value: float) -> str:
    k = value * 255
    return f"{k:.0f}/255" if abs(k - round(k)) < 1e-6 and value < 0.2 else f"{value:g}"


def print_table(cells: Sequence[Cell], title: str) -> None:
    print(f"\n{title}")
    print(f"{'attack':<22} {'family':<14} {'budget':>7} {'r':>6} | {'pixel asr':>9} {'tpr':>5} {'sys':>5} | "
          f"{'emb asr':>7} {'tpr':>5} {'sys':>5} | {'Δasr':>6} {'Δtpr':>6} {'Δsys':>6}  ok")
    inside = 0
    for c in cells:
        e, p = c.embedding, c.pixel
        d_asr, d_tpr = c.deltas()
        ok = abs(d_asr) <= TOLERANCE and abs(d_tpr) <= TOLERANCE
        inside += ok
        print(f"{c.attack:<22} {c.family:<14} {fmt_budget(c.budget):>7} {c.radius:>6.3f} | {p.asr:>9.3f} {p.tpr:>5.2f} {p.system_asr:>5.2f} | "
              f"{e.asr:>7.3f} {e.tpr:>5.2f} {e.system_asr:>5.2f} | {d_asr:>+6.2f} {d_tpr:>+6.2f} {e.system_asr - p.system_asr:>+6.2f}  {'yes' if ok else 'NO'}")
    print(f"within ±{TOLERANCE:.2f} on both ASR and TPR: {inside}/{len(cells)} cells")


def fill_embedding(
    cells: Sequence[Cell], probe: EmbeddingProbe, laws: dict[str, tuple[float, float]] | None, travel_laws: dict[str, tuple[float, float]] | None = None
) -> None:
    """Embedding rates of every cell at ``laws[family]`` (``None`` or a family not in it: the environment's radii,
    the scenario's ``embedding_radius_laws`` where it sets them), or with ``travel_laws`` at the per-pair
    radii ``c · travel^γ``, ``(c, γ) = travel_laws[family]`` (the ``r`` column: their median)."""
    scenario_laws = probe.world.scenario.embedding_radius_laws
    for c in cells:
        attack = embedding_attack(c.attack, c.params, (laws or {}).get(c.family, scenario_laws.get(c.family)))
        if travel_laws is None:
            c.radius = attack.radius
            c.embedding = probe.rates(attack)
        else:
            radii = c.travel_radii(travel_laws[c.family])
            caption_only = stacked._MODES[c.family][0] == 0  # its r column is the caption side's radius
            c.radius = float(np.median(radii[1] if caption_only else radii[0]))
            c.embedding = probe.rates(attack, radii, c.replay)


def calibrate(cells: Sequence[Cell], probe: EmbeddingProbe, exponents: Sequence[float]) -> dict[str, tuple[float, float, float, float]]:
    """Per family, the ``(scale, γ)`` of ``GRID × exponents`` minimising the largest |Δ| of ASR and
    TPR over that family's cells (ties: the smallest mean |Δ|) → ``(scale, γ, max |Δ|, mean |Δ|)``."""
    chosen: dict[str, tuple[float, float, float, float]] = {}
    for family in dict.fromkeys(c.family for c in cells):
        members = [c for c in cells if c.family == family]
        best = None
        for exponent in exponents:
            for scale in GRID:
                errors = []
                for c in members:
                    e = probe.rates(embedding_attack(c.attack, c.params, (scale, exponent)))
                    errors += [abs(e.asr - c.pixel.asr), abs(e.tpr - c.pixel.tpr)]
                key = (round(max(errors), 6), float(np.mean(errors)))
                if best is None or key < best[2:]:
                    best = (scale, exponent, *key)
        chosen[family] = best
    return chosen


def calibrate_travel(cells: Sequence[Cell], probe: EmbeddingProbe) -> dict[str, tuple[float, float, float, float]]:
    """Per family, the ``(c, γ)`` of ``TRAVEL_GRID × TRAVEL_EXPONENTS`` minimising the largest |Δ| of ASR
    and TPR over that family's cells at the radii ``c · travel^γ`` (ties: the smallest mean |Δ|, then
    γ nearest 1) → ``(c, γ, max |Δ|, mean |Δ|)``."""
    chosen: dict[str, tuple[float, float, float, float]] = {}
    for family in dict.fromkeys(c.family for c in cells):
        members = [c for c in cells if c.family == family]
        best = None
        for exponent in sorted(TRAVEL_EXPONENTS, key=lambda g: abs(g - 1.0)):
            for scale in TRAVEL_GRID:
                errors = []
                for c in members:
                    e = probe.rates(embedding_attack(c.attack, c.params, None), c.travel_radii((scale, exponent)), c.replay)
                    errors += [abs(e.asr - c.pixel.asr), abs(e.tpr - c.pixel.tpr)]
                key = (round(max(errors), 6), round(float(np.mean(errors)), 6))
                if best is None or key < best[2:]:
                    best = (scale, exponent, *key)
        chosen[family] = best
    return chosen


# ---------------------------------------------------------------------------- rank correlation
def pixel_defence_like_embedding(scenario: str) -> dict[str, object] | None:
    """Overrides that make the pixel fidelity defend what the embedding fidelity does, or ``None``.

    The embedding fidelity always trains residual adapters at ``defense.adapter_lr``;
    ``defense.defended`` and ``lr`` apply to the pixel fidelity only (``quickstart`` defends the
    whole pixel model at 1e-3). Ranking the baselines of two different defences measures that
    difference, not the proxy, so ``--like-for-like`` also plays pixel with these overrides.
    """
    from cmai_env.scenario import load_scenario

    defense = load_scenario(scenario).defense
    if defense.defended == "adapter" and defense.lr == defense.adapter_lr:
        return None
    return {"defense.defended": "adapter", "defense.lr": defense.adapter_lr}


def rank_correlation(
    scenario: str,
    seeds: Sequence[int],
    episodes: int,
    other_law: tuple[float, float] | None = None,
    train_scale: float | None = None,
    like_for_like: bool = False,
    travel: bool = False,
    train_travel: bool = False,
) -> dict[str, list[float]]:
    """Mean return of every baseline at both fidelities and the Spearman correlation between them.

    :param other_law: also play the embedding fidelity with this ``(scale, γ)`` for every family
        (e.g. the old ``(0.5, 1)``) and print its correlation with the same pixel returns.
    :param train_scale: also play the embedding fidelity with ``defense.embedding_train_radius_scale``
        set to this (``L_adv``'s examples that many times farther out).
    :param like_for_like: where the scenario's pixel defence is not the embedding fidelity's
        (:func:`pixel_defence_like_embedding`), also play pixel defending the adapters at the
        embedding's rate, and correlate every embedding run with both pixel runs.
    :param travel: also play the embedding fidelity with ``embedding_attack_radius: pixel_travel``
        (each attacked pair at a radius set by how far its own pixel attack moved it); with
        ``train_scale`` too, also with both (``pixel_travel`` attacks, ``L_adv`` at that scale).
    :param train_travel: also play it with ``pixel_travel`` attacks and ``defense.embedding_train_radius:
        pixel_travel`` at scale 1 (each crafted ``L_adv`` pair as far out as the pixel trainer's).
    :returns: ``{run label: mean return per baseline}`` in :func:`available_baselines` order.
    """
    from scipy.stats import spearmanr

    from agents.baselines import available_baselines, make_baseline
    from agents.evaluation import evaluate_policy

    names = available_baselines()
    # (label, fidelity, scenario overrides)
    runs: list[tuple[str, str, dict[str, object]]] = [("pixel", "pixel", {})]
    same_defence = pixel_defence_like_embedding(scenario) if like_for_like else None
    if same_defence is not None:
        runs.append(("pixel, adapters", "pixel", same_defence))
    runs.append(("embedding", "embedding", {}))
    if other_law is not None:
        every_family = {family: list(other_law) for family in stacked.FAMILY_RADIUS_LAW}
        runs.append((f"embedding r={other_law[0]:g}·b^{other_law[1]:g}", "embedding", {"embedding_radius_laws": every_family}))
    if train_scale is not None:
        runs.append((f"embedding L_adv r×{train_scale:g}", "embedding", {"defense.embedding_train_radius_scale": train_scale}))
    if travel:
        runs.append(("embedding, pixel travel", "embedding", {"embedding_attack_radius": "pixel_travel"}))
        if train_scale is not None:
            runs.append((f"embedding, pixel travel, L_adv r×{train_scale:g}", "embedding",
                         {"embedding_attack_radius": "pixel_travel", "defense.embedding_train_radius_scale": train_scale}))
    if train_travel:
        runs.append(("embedding, travel + L_adv travel", "embedding", {
            "embedding_attack_radius": "pixel_travel", "defense.embedding_train_radius": "pixel_travel", "defense.embedding_train_radius_scale": 1.0,
        }))
    returns: dict[str, list[float]] = {}
    pixel_labels = [label for label, fidelity, _ in runs if fidelity == "pixel"]
    for label, fidelity, overrides in runs:
        returns[label] = []
        for name in names:
            tic = time.process_time()
            result = evaluate_policy(
                make_baseline(name), scenario, seeds=list(seeds), episodes=episodes, fidelity=fidelity,
                env_kwargs=overrides or None, reference=False, use_disk_cache=False, plots=False,
            )
            mean_return = float(np.mean(result.per_seed("return")))
            returns[label].append(mean_return)
            print(f"  {scenario:<14} {label:<24} {name:<20} return {mean_return:8.3f}  ({time.process_time() - tic:.0f} CPU-s)", flush=True)
    for label in returns:
        for reference in pixel_labels if label not in pixel_labels else ():
            rho = spearmanr(returns[label], returns[reference]).statistic
            print(f"{scenario}: Spearman ρ of the {len(names)} baselines' mean returns over seeds {list(seeds)}, {label} vs {reference}: {rho:.3f}")
    return returns


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart", help="whose data and backbone (default quickstart)")
    parser.add_argument("--probe-n", type=int, default=256, help="probe pairs; the first half is attacked (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="attack iterations at both fidelities (default 3)")
    parser.add_argument("--attacks", default=None, help="comma-separated subset of: " + ", ".join(c.attack for c in CASES + EXTRA_CASES)
                        + f" (the last {len(EXTRA_CASES)} only when named)")
    parser.add_argument("--budgets", type=positive_int, default=None, help="only the first N budgets of each attack")
    parser.add_argument("--radius", type=positive_float, default=None, help="one radius scale for every family (0.5: the old RADIUS)")
    parser.add_argument("--exponent", type=float, default=1.0, help="with --radius: r = radius · (budget/default)^exponent (default 1)")
    parser.add_argument("--calibrate", action="store_true", help="grid-search a radius scale per family and print the table at it")
    parser.add_argument("--rank", action="store_true", help="also the Spearman correlation of the baselines' returns (slow)")
    parser.add_argument("--rank-scenarios", default="quickstart", help="comma-separated scenarios for --rank")
    parser.add_argument("--rank-seeds", default="0", help="comma-separated evaluation seeds for --rank")
    parser.add_argument("--data-seed", type=int, default=None, help="dataset seed instead of the scenario's (out-of-sample pairs)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pixel attacks' random starts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 attacks, one budget, 32 probe pairs")
    parser.add_argument("--train-radius-scale", type=float, default=None,
                        help="with --rank: also play the embedding fidelity with defense.embedding_train_radius_scale set to this "
                             "(with --pixel-travel, also with pixel_travel attacks at that scale)")
    parser.add_argument("--like-for-like", action="store_true",
                        help="with --rank: where a scenario's pixel defence differs from the embedding fidelity's adapters, also play pixel defending them")
    parser.add_argument("--displacement", action="store_true", help="also how far pixel attacks move the image embedding vs the embedding radius")
    parser.add_argument("--corruption", default=None, metavar="NAME:SEVERITY",
                        help="attack and calibrate on the corrupted images a phase with this corruption serves (e.g. gaussian_noise:4)")
    parser.add_argument("--radius-spread", type=float, default=0.0, metavar="SIGMA",
                        help="multiply each attacked pair's embedding radius by exp(SIGMA·z), z ~ N(0,1) per pair (default 0: as the environment)")
    parser.add_argument("--laws", nargs="+", default=None, metavar="FAMILY=SCALE,GAMMA",
                        help="play these radius laws r = SCALE·(budget/default)^GAMMA instead of the environment's (as --calibrate prints them)")
    parser.add_argument("--pixel-travel", action="store_true",
                        help="also the table with each pair's radius = c · travel^γ per family, travel: how far its pixel attack moved that side's embedding; "
                             "with --rank also the embedding episodes with embedding_attack_radius: pixel_travel")
    parser.add_argument("--train-travel", action="store_true",
                        help="with --rank: also the embedding episodes with pixel_travel attacks and defense.embedding_train_radius: pixel_travel at scale 1")
    args = parser.parse_args(argv)
    given_laws = None if args.laws is None else parse_laws(parser, args.laws)
    if not (0.0 <= args.radius_spread <= 3.0):
        parser.error(f"--radius-spread must be between 0 and 3, got {args.radius_spread}")
    if given_laws is not None and args.radius is not None:
        parser.error("give --radius or --laws, not both")
    if args.pixel_travel and (given_laws is not None or args.radius is not None or args.radius_spread):
        parser.error("--pixel-travel sets every pair's radius itself; it takes no --laws, --radius or --radius-spread")
    if args.rank and (given_laws is not None or args.radius_spread):
        # --rank plays whole episodes of the environment, which has neither; refused rather than ignored
        parser.error("--laws and --radius-spread change the table only; --rank plays the environment's radii (or --radius, or --pixel-travel)")
    if args.train_travel and not args.rank:
        parser.error("--train-travel adds a run to --rank's episodes; give --rank too")
    corruption = None if args.corruption is None else parse_corruption(parser, args.corruption)
    try:  # checked before the table, not after it
        rank_seeds = distinct_seeds([int(s) for s in args.rank_seeds.split(",")], "--rank-seeds")
    except ValueError as error:
        parser.error(f"--rank-seeds {args.rank_seeds!r}: distinct comma-separated integers, e.g. 0,1,2 ({error})")
    scenario_option(parser, [args.scenario], "--scenario")
    if args.rank:
        scenario_option(parser, args.rank_scenarios.split(","), "--rank-scenarios")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cases = CASES
    if args.attacks:
        wanted = args.attacks.split(",")
        unknown = sorted(set(wanted) - {c.attack for c in CASES + EXTRA_CASES})
        if unknown:
            parser.error(f"--attacks: unknown {unknown}; choose from {', '.join(c.attack for c in CASES + EXTRA_CASES)}")
        cases = tuple(c for c in CASES + EXTRA_CASES if c.attack in wanted)
    budgets = args.budgets
    if args.quick:
        cases = tuple(c for c in cases if c.attack in ("pgd_linf", "text_embedding_pgd", "aware_caption_rewrite")) or cases[:1]
        args.probe_n, budgets = 32, 1
    if args.train_radius_scale is not None:
        from pydantic import ValidationError

        from cmai_env.scenario import DefenseSpec

        try:  # the field's own bounds, not a copy of them
            DefenseSpec(embedding_train_radius_scale=args.train_radius_scale)
        except ValidationError as error:
            parser.error(f"--train-radius-scale {args.train_radius_scale}: {error.errors()[0]['msg']} (defense.embedding_train_radius_scale)")
    if args.probe_n < 4 or args.steps < 1:
        parser.error(f"--probe-n must be ≥ 4 and --steps ≥ 1, got {args.probe_n} and {args.steps}")

    start_cpu = time.process_time()
    setup = load_setup(args.scenario, args.probe_n, args.data_seed, corruption=corruption)
    probe = EmbeddingProbe(setup, args.radius_spread, args.seed)
    images = "clean images" if corruption is None else f"images under {corruption[0]} severity {corruption[1]}"
    print(f"{args.scenario}: {setup.scenario.dataset.name} (seed {setup.scenario.dataset.seed}), {setup.scenario.backbone.name}, {images}; {setup.n} attacked probe pairs, "
          f"τ from {args.probe_n - setup.n} clean ones (pixel τ={ConsistencyDetector(0.05).calibrate(_clean_scores(setup)):.3f}, "
          f"embedding τ={probe.threshold:.3f}); {args.steps} steps, step 2.5·budget/steps")
    cells = []
    for case in cases:
        for budget in case.budgets[-budgets:] if budgets else case.budgets:
            params = attack_params(case.attack, budget, args.steps)
            tic = time.process_time()
            rates, travel = pixel_rates(setup, case.attack, params, args.seed, travel=args.pixel_travel)
            replay = pixel_replay(setup, case.attack, params, args.seed) if args.pixel_travel else None
            cells.append(Cell(case.attack, family_of(case.attack), budget, params, rates, travel=travel, replay=replay))
            print(f"  pixel {case.attack:<22} {fmt_budget(budget):>7}: asr {rates.asr:.3f} tpr {rates.tpr:.2f} ({time.process_time() - tic:.1f} CPU-s)", flush=True)
    laws = given_laws if args.radius is None else {c.family: (args.radius, args.exponent) for c in cells}
    fill_embedding(cells, probe, laws)
    label = (
        "the environment's radii" if laws is None
        else "the given --laws" if given_laws is not None
        else f"r = {args.radius} · (budget/default)^{args.exponent:g} for every family"
    )
    if args.radius_spread:
        label += f", each pair's radius × exp({args.radius_spread:g}·z)"
    print_table(cells, f"undefended model, embedding at {label}")
    travel_label = "each pair's radius = c · travel^γ per family, travel: how far its pixel attack moved that side's embedding (r: median)"
    if args.pixel_travel:
        own = setup.scenario.pixel_travel_laws
        fill_embedding(cells, probe, None, {**PIXEL_TRAVEL_LAW, **own})
        print_table(cells, f"undefended model, embedding with {travel_label}, (c, γ) = PIXEL_TRAVEL_LAW"
                           + (f", the scenario's pixel_travel_laws for {', '.join(own)}" if own else ""))
    if args.displacement:
        print_displacement(setup, cells, args.seed)
    if args.calibrate and args.pixel_travel:
        chosen_travel = calibrate_travel(cells, probe)
        print(f"\ngrid search of (c, γ) per family: c {TRAVEL_GRID[0]}…{TRAVEL_GRID[-1]} step 0.025, γ ∈ {list(TRAVEL_EXPONENTS)}; "
              "per family: c, γ, max |Δ| and mean |Δ| over its ASR and TPR cells")
        for family, (scale, exponent, worst, mean) in chosen_travel.items():
            print(f"  {family:<14} c {scale:.3f}  γ {exponent:<5g}  max {worst:.3f}  mean {mean:.3f}")
        fill_embedding(cells, probe, None, {family: best[:2] for family, best in chosen_travel.items()})
        print_table(cells, f"undefended model, embedding with {travel_label}, (c, γ) fitted")
        print("in a scenario (with embedding_attack_radius: pixel_travel): " + scenario_field("pixel_travel_laws", chosen_travel))
    elif args.calibrate:
        for title, exponents in (("one scale per family, r ∝ budget (γ = 1)", (1.0,)), ("scale and budget exponent γ per family", EXPONENTS)):
            chosen = calibrate(cells, probe, exponents)
            print(f"\ngrid search, {title}: scales {GRID[0]}…{GRID[-1]} step 0.025, γ ∈ {list(exponents)}; "
                  "per family: scale, γ, max |Δ| and mean |Δ| over its ASR and TPR cells")
            for family, (scale, exponent, worst, mean) in chosen.items():
                print(f"  {family:<14} scale {scale:.3f}  γ {exponent:<5g}  max {worst:.3f}  mean {mean:.3f}")
            fill_embedding(cells, probe, {family: best[:2] for family, best in chosen.items()})
            print_table(cells, f"undefended model, embedding at the calibrated radii ({title})")
            print("as --laws: " + " ".join(f"{family}={scale:g},{exponent:g}" for family, (scale, exponent, *_) in chosen.items()))
            print("in a scenario: " + scenario_field("embedding_radius_laws", chosen))
    print(f"\n{time.process_time() - start_cpu:.0f} CPU-s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.rank:
        for scenario in args.rank_scenarios.split(","):
            rank_correlation(
                scenario, rank_seeds, 1, None if args.radius is None else (args.radius, args.exponent), args.train_radius_scale, args.like_for_like,
                args.pixel_travel, args.train_travel,
            )
        print(f"{time.process_time() - start_cpu:.0f} CPU-s in all")


def scenario_field(name: str, chosen: dict[str, tuple[float, ...]]) -> str:
    """Fitted ``(scale, γ, …)`` per family as the scenario field ``name`` (one YAML line)."""
    return f"{name}: {{" + ", ".join(f"{family}: [{law[0]:g}, {law[1]:g}]" for family, law in chosen.items()) + "}"


def parse_corruption(parser: argparse.ArgumentParser, text: str) -> tuple[str, int]:
    """``--corruption NAME:SEVERITY`` validated by the scenario field's own model (names, 1–5)."""
    from pydantic import ValidationError

    from cmai_env.scenario import Corruption

    name, _, severity = text.partition(":")
    try:
        return Corruption(name=name, severity=severity or 3).key
    except ValidationError as error:
        problem = error.errors()[0]
        parser.error(f"--corruption {text!r}: {'/'.join(map(str, problem['loc']))}: {problem['msg']} (NAME:SEVERITY, e.g. gaussian_noise:4)")


def parse_laws(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``--laws FAMILY=SCALE,GAMMA ...`` → ``{family: (scale, γ)}``; a family the environment does not
    know, a repeated one or a non-positive number is refused naming it."""
    laws: dict[str, tuple[float, float]] = {}
    for item in items:
        family, _, numbers = item.partition("=")
        if family not in stacked.FAMILY_RADIUS_LAW:
            parser.error(f"--laws {item!r}: unknown family {family!r}; families: {', '.join(stacked.FAMILY_RADIUS_LAW)}")
        if family in laws:
            parser.error(f"--laws {item!r}: family {family!r} given twice")
        try:
            scale, exponent = (float(x) for x in numbers.split(","))
        except ValueError:
            parser.error(f"--laws {item!r}: expected FAMILY=SCALE,GAMMA with two numbers, e.g. image=0.65,0.375")
        if not (0 < scale < float("inf") and 0 < exponent < float("inf")):
            parser.error(f"--laws {item!r}: SCALE and GAMMA must be positive and finite")
        laws[family] = (scale, exponent)
    return laws


def _clean_scores(setup: Setup) -> torch.Tensor:
    from cmai_env.robustness import consistency_scores

    return consistency_scores(setup.task, setup.calibration)


if __name__ == "__main__":
    main()
