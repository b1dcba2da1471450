"""Per-pair attack budgets for the embedding fidelity, from how far the pixel attacks move each pair.

The radius laws (:data:`cmai_env.fidelity.stacked.FAMILY_RADIUS_LAW`) give every pair one L2 radius
per attack configuration. A pixel attack moves some images' embeddings much farther than others'
at the same budget, so its ASR rises with the budget more slowly than one radius for every pair
gives, and on out-of-sample pairs the laws fit only 14–18 of issue 10's 30 calibration cells
(``benchmarks/fidelity_calibration.py``). Playing each pair at the distance its own pixel attack
travelled (times one constant per family, :data:`PIXEL_TRAVEL_SCALE`) fits 24–25 of them
(docs/measurements.md). The embedding PGD still picks the direction against the current
adapters, so the attacker stays white-box; only each pair's budget comes from the pixel attack.
The shipped scenarios keep ``law``: they were designed at it, and at ``pixel_travel`` the
defence acts less within their episodes (README, Known limits).

A scenario chooses it with ``embedding_attack_radius: pixel_travel``. Then
:class:`~cmai_env.fidelity.stacked.StackedEmbeddingWorld` runs every attack of the scenario as a
pixel attack once at construction, on the undefended backbone, over every pool and probe image of
every view it caches
(``benchmarks/attack_radius_cost.py``: 43.8 CPU-s for ``abrupt_shift``'s 12 attack configurations
and views over the 2,256 images of ``shapes``, against 2.9 at ``law``), and memoises the result for worlds built alike (:func:`memoised`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cmai_env.attacks import Attack, PairBatch, ZeroShotTask, make_attack
from cmai_env.fidelity.base import universal_fit_pairs

#: Per embedding family, ``c`` of the per-pair radius ``r = c · travel``, where ``travel`` is how far
#: the pair's own pixel attack moved that side's unit embedding. Grid-searched (0.05…2.0, step 0.025)
#: by ``python benchmarks/fidelity_calibration.py --pixel-travel --calibrate`` on quickstart's clean
#: data (dataset seed 0, 128 attacked pairs, undefended model): per family the ``c`` minimising the
#: largest |Δ| of ASR and detector TPR between the fidelities over its cells (ties: the mean |Δ|).
#: There 22/30 cells are within ±0.10; on dataset seeds 1 and 2 (not fitted on), 25/30 each.
PIXEL_TRAVEL_SCALE: dict[str, float] = {
    "image": 0.875,
    "image_l2": 0.75,
    "text": 0.8,
    "bridge_image": 1.45,
    "bridge_text": 0.775,
    "both": 0.775,
    "universal": 1.6,
    "aware_image": 1.275,
    "aware_rewrite": 0.7,
}
#: Tables kept by :func:`memoised` (a benchmark builds a new world for every batch of episodes).
MEMO_SIZE = 8
_MEMO: "OrderedDict[tuple, Any]" = OrderedDict()
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
    A side the attack leaves alone travels 0.

    :param clean: :func:`clean_embeddings` of ``pairs`` when the caller has them; computed here otherwise.
    """
    clean_v, clean_t = clean if clean is not None else clean_embeddings(task, pairs)
    moved_v, moved_t = [], []
    for start in range(0, len(pairs), CHUNK):
        adv_v, adv_t = _unit_embeddings(task, attack(task, pairs.subset(slice(start, start + CHUNK)), generator).batch)
        moved_v.append((adv_v - clean_v[start : start + CHUNK]).norm(dim=-1))
        moved_t.append((adv_t - clean_t[start : start + CHUNK]).norm(dim=-1))
    return torch.cat(moved_v).cpu().numpy(), torch.cat(moved_t).cpu().numpy()


def entry_attack(name: str, params: dict, task: ZeroShotTask, fit_pairs: PairBatch, generator: torch.Generator) -> Attack:
    """The registered pixel attack of a scenario entry, a universal one fitted first on
    ``fit_pairs`` as the pixel fidelity fits it (:func:`~cmai_env.fidelity.base.universal_fit_pairs`)."""
    attack = make_attack(name, **params)
    if hasattr(attack, "fit"):
        attack.fit(task, universal_fit_pairs(fit_pairs), generator)
    return attack


def travel_radii(family: str, travel: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``PIXEL_TRAVEL_SCALE[family] · travel`` for the image and the caption side, float32."""
    scale = PIXEL_TRAVEL_SCALE[family]
    return (scale * np.asarray(travel[0])).astype(np.float32), (scale * np.asarray(travel[1])).astype(np.float32)


def memoised(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``key`` in this process, the last :data:`MEMO_SIZE` keys kept.

    The radii are a pure function of the scenario's data, backbone, views and attack
    configurations (every pixel attack is seeded by the dataset seed), so worlds built alike share
    them instead of running every pixel attack again. Callers must not write to what it returns.
    """
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    value = compute()
    _MEMO[key] = value
    while len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value
