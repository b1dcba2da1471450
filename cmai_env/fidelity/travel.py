"""Per-pair attack budgets for the embedding fidelity, from how far the pixel attacks move each pair.

The radius laws (:data:`cmai_env.fidelity.stacked.FAMILY_RADIUS_LAW`) give every pair one L2 radius
per attack configuration. A pixel attack moves some images' embeddings much farther than others'
at the same budget, so its ASR rises with the budget more slowly than one radius for every pair
gives, and on out-of-sample pairs the laws fit only 14–18 of issue 10's 30 calibration cells
(``benchmarks/fidelity_calibration.py``). Playing each pair at a radius set by the distance its own
pixel attack travelled (``c · travel^γ``, one ``(c, γ)`` per family, :data:`PIXEL_TRAVEL_LAW`) fits
24–28 of them (docs/measurements.md). The embedding PGD still picks the direction against the current
adapters, so the attacker stays white-box; only each pair's budget comes from the pixel attack.
The shipped scenarios keep ``law``: they were designed at it, and at ``pixel_travel`` the
defence acts less within their episodes (README, Known limits).

A caption attack whose declaration sets ``replay`` (``token_substitution``) is played from the pixel
attack's own candidates instead: :func:`replay_captions` keeps, per distinct pool and probe caption,
the :data:`REPLAY_WIDTH` captions its last greedy round ranks best on the undefended backbone, and each
round the world sends the one the current text adapter classifies worst
(:meth:`~cmai_env.fidelity.stacked.StackedEmbeddingWorld.craft`). A caption attack does not depend on
the image, so this is computed once per caption. On the undefended model it is within 0.02 of the
pixel attack's ASR and detector TPR at k 1, 2, 3, on clean and severity-4 noisy images
(``fidelity_calibration.py --pixel-travel --attacks token_substitution [--corruption gaussian_noise:4]``).

A scenario chooses it with ``embedding_attack_radius: pixel_travel``. Then
:class:`~cmai_env.fidelity.stacked.StackedEmbeddingWorld` runs every attack of the scenario as a
pixel attack once at construction, on the undefended backbone, over every pool and probe image of
each view a round can pair it with (:func:`cmai_env.stream.attack_views`;
``benchmarks/attack_radius_cost.py``: 20.2 CPU-s for ``abrupt_shift``'s 12 attack configurations
over the 2,256 images of ``shapes``, against 2.2 at ``law``). :class:`TravelCache` keeps
the result on disk for every world built alike, in this process or another.

``defense.embedding_train_radius: pixel_travel`` does the same for ``L_adv``'s crafted examples:
:func:`training_travel` runs the pixel trainer's joint PGD once per view over the pool, and each
pair's training radius is the defence's scale times how far that moved it (:class:`TrainingTravel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

import cmai_env
from cmai_env.attacks import Attack, PairBatch, ZeroShotTask, make_attack
from cmai_env.cache import cache_root, source_fingerprint
from cmai_env.fidelity.base import universal_fit_pairs

if TYPE_CHECKING:
    from cmai_env.data import CaptionedDataset
    from cmai_env.scenario import DefenseSpec

#: Per embedding family, ``(c, γ)`` of the per-pair radius ``r = c · travel^γ``, where ``travel`` is
#: how far the pair's own pixel attack moved that side's unit embedding. ``c`` was grid-searched
#: (0.05…2.0, step 0.025, γ = 1) by ``python benchmarks/fidelity_calibration.py --pixel-travel
#: --calibrate`` on quickstart's clean data (dataset seed 0, 128 attacked pairs, undefended model):
#: per family the ``c`` minimising the largest |Δ| of ASR and detector TPR between the fidelities over
#: its cells (ties: the mean |Δ|). ``universal`` alone has γ = 2 (``--calibrate`` with 256 attacked
#: pairs, which now also searches γ): a universal pixel δ moves every embedding, but at small budgets
#: mostly not toward another class (ASR 0.01 and 0.12 at 2 and 4/255, 0.68 at 8/255), which no single
#: ``c`` matched (at γ = 1 all three cells missed: ASR +0.10 at 4/255 and −0.15 at 8/255, TPR +0.26);
#: at γ = 2 they fit within 0.05 on dataset seeds 0, 1 and 2, and at 12 and 16/255 (not fitted on)
#: within 0.06. The other families stay at γ = 1, where their cells fit and the measurement log's
#: ``pixel_travel`` figures were taken; ``--calibrate`` prints the γ it would choose for each.
PIXEL_TRAVEL_LAW: dict[str, tuple[float, float]] = {
    "image": (0.875, 1.0),
    "image_l2": (0.75, 1.0),
    "text": (0.8, 1.0),
    "bridge_image": (1.45, 1.0),
    "bridge_text": (0.775, 1.0),
    "both": (0.775, 1.0),
    "universal": (2.55, 2.0),
    "aware_image": (1.275, 1.0),
    "aware_rewrite": (0.7, 1.0),
}
#: Bumped when what a :class:`TravelCache` file holds changes shape (its key also covers the code).
CACHE_FORMAT = "travel-v1"
#: Files a :class:`TravelCache` folder keeps (the most recently written; ``abrupt_shift``'s is 234 KB):
#: every code change keys new files, so without a bound the folder would only grow.
CACHE_FILES = 64
#: Pairs per pixel attack call (``cmai_env.robustness.evaluate_attack``'s default chunk).
CHUNK = 128


@torch.no_grad()
def _unit_embeddings(task: ZeroShotTask, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = task.backbone
    if batch.token_embeds is None:
        text = backbone.encode_text(batch.tokens)
    else:
        text = backbone.encode_text_embeddings(batch.token_embeds, batch.tokens)
    return backbone.encode_image(batch.images), text


def clean_embeddings(task: ZeroShotTask, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit image and caption embeddings of ``pairs``, chunk by chunk as :func:`pixel_travel`
    measures from them (one computation for every attack played on the same pairs)."""
    parts = [_unit_embeddings(task, pairs.subset(slice(start, start + CHUNK))) for start in range(0, len(pairs), CHUNK)]
    return torch.cat([v for v, _ in parts]), torch.cat([t for _, t in parts])


def pixel_travel(
    task: ZeroShotTask, pairs: PairBatch, attack: Attack, generator: torch.Generator, clean: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the L2 distance ``attack`` moves its unit image and its unit caption embedding.

    The attack runs chunk by chunk (:data:`CHUNK` pairs), drawing from ``generator`` in order, as
    :func:`cmai_env.robustness.evaluate_attack` does, so the same seed gives the examples it scores.
    A side the attack leaves alone travels 0. ``attack`` is an :class:`Attack` or any callable
    ``(task, pairs, generator)`` whose result's ``batch`` holds the adversarial pairs.

    :param clean: :func:`clean_embeddings` of ``pairs`` when the caller has them; computed here otherwise.
    """
    clean_v, clean_t = clean if clean is not None else clean_embeddings(task, pairs)
    moved_v, moved_t = [], []
    for start in range(0, len(pairs), CHUNK):
        adversarial = attack(task, pairs.subset(slice(start, start + CHUNK)), generator).batch
        image, caption = embedding_moves(task, (clean_v[start : start + CHUNK], clean_t[start : start + CHUNK]), adversarial)
        moved_v.append(image)
        moved_t.append(caption)
    return torch.cat(moved_v).cpu().numpy(), torch.cat(moved_t).cpu().numpy()


def training_travel(task: ZeroShotTask, pairs: PairBatch, defense: "DefenseSpec", generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, how far the pixel trainer's crafted example moves its unit image and caption
    embedding (``defense.embedding_train_radius: pixel_travel``): :func:`cmai_env.training.joint_pgd`
    at the defence's ``eps_v``, ``eps_t``, ``alpha`` and ``attack_steps`` (default step sizes, as the
    pixel fidelity's trainer crafts), measured as :func:`pixel_travel` measures an attack."""
    from cmai_env.training import joint_pgd  # training imports the attacks this module imports

    steps = max(defense.attack_steps, 1)

    def craft(task: ZeroShotTask, batch: PairBatch, generator: torch.Generator):
        return joint_pgd(task, batch, defense.eps_v, defense.eps_t, defense.alpha, steps, generator=generator)

    return pixel_travel(task, pairs, craft, generator)


def embedding_moves(task: ZeroShotTask, clean: tuple[torch.Tensor, torch.Tensor], adversarial: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the L2 distance from its clean unit image and caption embeddings (``clean``, as
    :func:`clean_embeddings` gives them) to those of its adversarial example."""
    adv_v, adv_t = _unit_embeddings(task, adversarial)
    return (adv_v - clean[0]).norm(dim=-1), (adv_t - clean[1]).norm(dim=-1)


def entry_attack(name: str, params: dict, task: ZeroShotTask, fit_pairs: PairBatch, generator: torch.Generator) -> Attack:
    """The registered pixel attack of a scenario entry, a universal one fitted first on
    ``fit_pairs`` as the pixel fidelity fits it (:func:`~cmai_env.fidelity.base.universal_fit_pairs`)."""
    attack = make_attack(name, **params)
    if hasattr(attack, "fit"):
        attack.fit(task, universal_fit_pairs(fit_pairs), generator)
    return attack


def travel_radii(family: str, travel: Sequence[np.ndarray], law: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``c · travel^γ`` for the image and the caption side, float32: ``(c, γ) = law``, by default
    ``PIXEL_TRAVEL_LAW[family]`` (``benchmarks/fidelity_calibration.py`` tries others)."""
    scale, exponent = PIXEL_TRAVEL_LAW[family] if law is None else law
    return tuple((scale * np.power(np.asarray(side, dtype=np.float64), exponent)).astype(np.float32) for side in travel[:2])


#: Candidate captions the embedding fidelity keeps per caption for a ``replay`` attack: the frozen
#: backbone's best first-order flips, all verified against the current adapters each round. The
#: pixel attack verifies only ``verify_top`` (8), but ranks its flips through the *defended* model,
#: which a table computed once cannot. Measured on the redesigned ``abrupt_shift``'s text phase
#: (scratch, pixel fidelity, seed 0, ``token_substitution`` k 1 on severity-4 noise, detector TPR at
#: the phase's end): after task-only training the pixel attack is flagged 0.875 and the 8 frozen-ranked
#: candidates 0.578 (64: 0.766); after (0, ⅔, ⅓) 0.984 against 0.625 (64: 0.859, 128: 0.922). On the
#: undefended model 64 candidates are flagged 0.44 against the pixel attack's 0.39 (128: 0.48).
REPLAY_WIDTH = 64


@torch.no_grad()
def replay_captions(
    task: ZeroShotTask, tokens: torch.Tensor, labels: torch.Tensor, attack: Attack, width: int = REPLAY_WIDTH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate captions ``attack`` (a caption attack whose declaration sets ``replay``) ranks
    best for each distinct (caption, label) of the pairs' ``tokens`` (N, L) and ``labels`` (N,), on
    the undefended backbone (``attack.replay_candidates`` with ``max(width, verify_top)``): their unit
    caption embeddings (U, T, D) float32, which are real (U, T) bool, and each pair's row (N,) int64.
    A caption attack does not depend on the image, so pairs that share a caption share its candidates."""
    backbone = task.backbone
    keys = torch.cat([tokens, labels[:, None]], 1)
    distinct, row = torch.unique(keys, dim=0, return_inverse=True)
    top = max(int(width), int(getattr(attack, "verify_top", 0)))
    captions, valid = [], []
    for start in range(0, len(distinct), CHUNK):
        chunk = distinct[start : start + CHUNK]
        batch = PairBatch(torch.empty((len(chunk), 0)), chunk[:, :-1], chunk[:, -1])  # a caption attack reads no image
        trial, ok = attack.replay_candidates(task, batch, top)
        n, t, length = trial.shape
        embeds = backbone.encode_text(trial.reshape(n * t, length)) if t else trial.new_zeros((0, backbone.embed_dim), dtype=torch.float32)
        captions.append(embeds.reshape(n, t, -1).float().cpu().numpy())
        valid.append(ok.cpu().numpy())
    return np.concatenate(captions), np.concatenate(valid), row.cpu().numpy().astype(np.int64)


@dataclass(frozen=True)
class _Table:
    """Arrays a :class:`TravelCache` stores, made read-only when built: computed or read from a file,
    they are the table."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).setflags(write=False)


@dataclass(frozen=True)
class ReplayCaptions(_Table):
    """One caption attack's candidates (a declaration with ``replay``, under ``embedding_attack_radius:
    pixel_travel``): unit caption embeddings (U, T, D) and which are real (U, T) for every distinct
    caption of the pool and probe pairs, and each pool pair's (``pool``) and probe pair's (``probe``)
    row of them, as :func:`replay_captions` gives them. Read-only."""

    captions: np.ndarray
    valid: np.ndarray
    pool: np.ndarray
    probe: np.ndarray


@dataclass(frozen=True)
class TravelRadii(_Table):
    """One attack configuration's per-pair radii on one view (``embedding_attack_radius: pixel_travel``):
    image and caption side for every pool pair (``pool_v``, ``pool_t``) and probe pair. Read-only."""

    pool_v: np.ndarray
    pool_t: np.ndarray
    probe_v: np.ndarray
    probe_t: np.ndarray


@dataclass(frozen=True)
class TrainingTravel(_Table):
    """How far the pixel trainer's crafted examples moved every pool pair of one view, image side
    (``pool_v``) and caption side (``pool_t``): :func:`training_travel`. Read-only."""

    pool_v: np.ndarray
    pool_t: np.ndarray


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype (bfloat16 has no numpy type) and device."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()


#: A table's slots, in the order its file stores them: (attack configuration, view index) for
#: :class:`TravelRadii`; (attack configuration, ``"captions"``) for :class:`ReplayCaptions`; (the
#: defence's crafting configuration, view index) for :class:`TrainingTravel`.
Slot = tuple[tuple, int | str]


class TravelCache:
    """``pixel_travel`` tables on disk: one ``.npz`` per world's inputs under ``$CMAI_CACHE_DIR/travel``
    (radii, :class:`TravelRadii`), ``$CMAI_CACHE_DIR/replay`` (:class:`ReplayCaptions`) or
    ``$CMAI_CACHE_DIR/training_travel`` (:class:`TrainingTravel`).

    The radii (and the replayed captions) are a pure function of the backbone's weights, the pool and probe pairs, the views,
    the attack configurations, the scenario's ``pixel_travel_laws``, the device and the code (every
    pixel attack is seeded by the dataset seed), and :meth:`key` hashes all of them, so a file is only ever read by a world that would
    compute the same arrays. A missing, unreadable or mismatched file is a miss (the world runs the
    pixel attacks again), and a cache folder that cannot be written only costs that again next
    time. Files are read with ``allow_pickle=False``.

    Written by hand: the arrays are this environment's own, and a pickling cache (joblib's
    ``Memory``) would execute code on load.

    :param directory: where the files live (default ``$CMAI_CACHE_DIR/`` and the record's folder, read when created).
    :param record: what a slot holds, :class:`TravelRadii`, :class:`ReplayCaptions` or :class:`TrainingTravel`.
    """

    FOLDERS = {TravelRadii: "travel", ReplayCaptions: "replay", TrainingTravel: "training_travel"}

    def __init__(self, directory: str | Path | None = None, record: type = TravelRadii) -> None:
        self.record = record
        self.fields = tuple(field.name for field in dataclasses.fields(record))
        self.directory = Path(directory) if directory is not None else cache_root() / self.FOLDERS[record]

    @staticmethod
    def key(
        backbone: torch.nn.Module, splits: Sequence["CaptionedDataset"], seed: int, views: Sequence, slots: Sequence[Slot], device: str,
        laws: Mapping[str, tuple[float, float]] | None = None,
    ) -> str:
        """SHA-256 (32 hex) of everything the table depends on (class docstring); ``seed`` is the
        dataset seed, which seeds the pixel attacks and the corrupted views; ``laws`` the scenario's
        ``pixel_travel_laws``, which scale the stored radii."""
        digest = hashlib.sha256()
        code = source_fingerprint(Path(cmai_env.__file__).resolve().parent)
        given = repr(sorted((family, tuple(map(float, law))) for family, law in (laws or {}).items()))
        for text in (CACHE_FORMAT, code, str(int(seed)), repr(list(views)), repr(list(slots)), device, given):
            digest.update(text.encode() + b"\0")
        for name, tensor in backbone.state_dict().items():
            digest.update(name.encode() + b"\0")
            digest.update(_raw_bytes(tensor))
        for split in splits:
            digest.update(_raw_bytes(split.images))
            digest.update(_raw_bytes(split.labels))
            digest.update("\0".join([*split.captions, "", *split.class_names, "", *split.templates]).encode())
        return digest.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def get(self, key: str, slots: Sequence[Slot]) -> dict[Slot, _Table] | None:
        """The table stored under ``key`` for exactly ``slots``, or ``None`` (a miss)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if stored["slots"].tolist() != [repr(slot) for slot in slots]:
                    return None
                table = {slot: self.record(*(stored[f"{i}.{field}"] for field in self.fields)) for i, slot in enumerate(slots)}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return table

    def get_or_compute(self, key: str, slots: Sequence[Slot], compute: Callable[[], dict[Slot, _Table]]) -> dict[Slot, _Table]:
        """The table stored under ``key`` for ``slots``, else ``compute()``, stored there and returned."""
        table = self.get(key, slots)
        if table is None:
            table = compute()
            self.put(key, table, slots)
        return table

    def put(self, key: str, table: dict[Slot, _Table], slots: Sequence[Slot]) -> None:
        """Store ``table`` (its ``slots``, in that order) under ``key``; a write that fails is skipped."""
        arrays = {f"{i}.{field}": getattr(table[slot], field) for i, slot in enumerate(slots) for field in self.fields}
        path = self._path(key)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written beside and renamed into place: processes sharing the cache never read half a file.
            with open(partial, "wb") as handle:
                np.savez(handle, slots=np.array([repr(slot) for slot in slots]), **arrays)
            os.replace(partial, path)
        except OSError:
            with contextlib.suppress(OSError):  # the folder itself may be what failed
                partial.unlink(missing_ok=True)
            return
        self._evict()

    def _evict(self) -> None:
        """Remove all but the :data:`CACHE_FILES` most recently written files (another process may race us: skipped)."""
        with contextlib.suppress(OSError):
            files = sorted(self.directory.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in files[CACHE_FILES:]:
                old.unlink(missing_ok=True)
