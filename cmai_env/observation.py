"""The environment's observation: a fixed-size vector built from the model's hidden states.

Layout (index ranges are stable for a given ``-vN`` environment version; ``OBS_SLICES`` maps
names to slices so policies and baselines can read fields by name):

======================  =====  ==========================================================  ==========
name                    width  meaning                                                     range
======================  =====  ==========================================================  ==========
image_embed_proj        16     P·mean(e_v): batch-mean image embedding, fixed projection     [-10, 10]
text_embed_proj         16     P·mean(e_t): batch-mean caption embedding                     [-10, 10]
gap_embed_proj          16     P·mean(e_v − e_t): mean cross-modal gap                       [-10, 10]
consistency_mean        1      mean L_consistency over the incoming batch                    [0, 10]
consistency_std         1      its standard deviation                                        [0, 10]
consistency_max         1      its maximum                                                   [0, 10]
cosine_mean             1      mean cos(e_v, e_t) of incoming pairs                          [-1, 1]
cosine_min              1      minimum cos(e_v, e_t)                                         [-1, 1]
flag_rate               1      share of incoming pairs the detector flags                    [0, 1]
drift                   1      1 if the change detector fired this round                     {0, 1}
rounds_since_drift      1      rounds since it last fired, /episode length (1 if never)      [0, 1]
prev_clean_acc          1      previous round's probe accuracy the reward scores (system)    [0, 1]
prev_asr                1      previous round's probe ASR the reward scores (system_asr)     [0, 1]
prev_consistency_score  1      previous round's probe consistency score (mean cosine)        [-1, 1]
prev_detector_tpr       1      previous round's detector TPR on incoming traffic             [0, 1]
prev_detector_fpr       1      previous round's detector FPR on incoming traffic             [0, 1]
prev_betas              3      previous [β_task, β_consist, β_adv]                          [0, 1]
prev_losses             3      previous log(1 + [L_task, L_consistency, L_adv])             [0, 10]
progress                1      round / episode length                                        [0, 1]
======================  =====  ==========================================================  ==========

``P`` is a fixed (D × 16) Gaussian matrix (entries N(0, 1), drawn from a ``torch.Generator``
seeded with 0 for each embedding width D), so any backbone yields the same observation size and
a unit-norm embedding maps to roughly unit-variance features (Johnson–Lindenstrauss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROJECTION_DIM = 16
PROJECTION_SEED = 0
OBS_BOUND = 10.0

OBS_FIELDS: list[tuple[str, int]] = [
    ("image_embed_proj", PROJECTION_DIM),
    ("text_embed_proj", PROJECTION_DIM),
    ("gap_embed_proj", PROJECTION_DIM),
    ("consistency_mean", 1),
    ("consistency_std", 1),
    ("consistency_max", 1),
    ("cosine_mean", 1),
    ("cosine_min", 1),
    ("flag_rate", 1),
    ("drift", 1),
    ("rounds_since_drift", 1),
    ("prev_clean_acc", 1),
    ("prev_asr", 1),
    ("prev_consistency_score", 1),
    ("prev_detector_tpr", 1),
    ("prev_detector_fpr", 1),
    ("prev_betas", 3),
    ("prev_losses", 3),
    ("progress", 1),
]


def _slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, width in OBS_FIELDS:
        out[name] = slice(start, start + width)
        start += width
    return out


OBS_SLICES: dict[str, slice] = _slices()
OBS_SIZE: int = sum(width for _, width in OBS_FIELDS)


def fixed_projection(embed_dim: int) -> torch.Tensor:
    """The documented projection ``P`` (embed_dim × 16), identical for every run and process."""
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    return torch.randn(embed_dim, PROJECTION_DIM, generator=generator)


@dataclass
class PreviousRound:
    """What the agent is told about the round before (zeros / uniform before the first).

    ``clean_acc`` and ``asr`` are the figures the reward scores: ``system_clean_acc`` and
    ``system_asr`` by default, ``clean_acc`` and ``asr`` with ``reward.metrics: model``.
    """

    clean_acc: float = 0.0
    asr: float = 0.0
    consistency_score: float = 0.0
    detector_tpr: float = 0.0
    detector_fpr: float = 0.0
    betas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    losses: tuple[float, float, float] = (0.0, 0.0, 0.0)


#: Width of the observation's traffic part (``image_embed_proj`` … ``cosine_min``), read from the incoming pairs.
TRAFFIC_WIDTH: int = OBS_SLICES["flag_rate"].start


def traffic_features(
    projection: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, consistency: torch.Tensor, cosine: torch.Tensor
) -> np.ndarray:
    """The traffic part of E environments' observations, ``(E, TRAFFIC_WIDTH)`` float32.

    :param image_embeds: ``(E, B, D)`` incoming image embeddings (``text_embeds`` likewise).
    :param consistency: ``(E, B)`` their ``L_consistency`` (``cosine`` likewise, cos(e_v, e_t)).
    """
    with torch.no_grad():
        image_mean, text_mean = image_embeds.mean(1), text_embeds.mean(1)
        projected = torch.cat([image_mean @ projection, text_mean @ projection, (image_mean - text_mean) @ projection], 1)
        summary = torch.stack(
            [consistency.mean(1), consistency.std(1, unbiased=False), consistency.amax(1), cosine.mean(1), cosine.amin(1)], 1
        )
        return torch.cat([projected, summary], 1).cpu().numpy()


def episode_clock(t: int, episode_rounds: int, last_drift: int | None) -> tuple[float, float]:
    """``(rounds_since_drift, progress)`` of an environment at round ``t`` of ``episode_rounds``.

    The observation describes the traffic drawn in round ``t``; once the episode has ended
    (``t == episode_rounds``) that is the last round's traffic, so "since" counts from ``t − 1``.
    ``last_drift`` is the round the change detector last fired in (``None``: never, which reads 1).
    """
    rounds = max(episode_rounds, 1)
    traffic_round = t - 1 if t >= episode_rounds else t
    since = 1.0 if last_drift is None else (traffic_round - last_drift) / rounds
    return since, t / rounds


def memory_features(flag_rate: float, drift: bool, rounds_since_drift: float, previous: PreviousRound, progress: float) -> np.ndarray:
    """The rest of one observation, ``flag_rate`` … ``progress`` (``OBS_SIZE − TRAFFIC_WIDTH`` values)."""
    return np.array(
        [
            flag_rate,
            float(drift),
            rounds_since_drift,
            previous.clean_acc,
            previous.asr,
            previous.consistency_score,
            previous.detector_tpr,
            previous.detector_fpr,
            *previous.betas,
            *np.log1p(np.maximum(previous.losses, 0.0)),
            progress,
        ],
        dtype=np.float64,
    )


def assemble_observations(traffic: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """``(E, OBS_SIZE)`` float32 observations from both parts, non-finite values bounded and all clipped to ±OBS_BOUND."""
    obs = np.concatenate([traffic.astype(np.float64), memory], axis=1).astype(np.float32)
    return np.clip(np.nan_to_num(obs, nan=0.0, posinf=OBS_BOUND, neginf=-OBS_BOUND), -OBS_BOUND, OBS_BOUND)


def build_observation(
    projection: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    consistency: torch.Tensor,
    cosine: torch.Tensor,
    flag_rate: float,
    drift: bool,
    rounds_since_drift: float,
    previous: PreviousRound,
    progress: float,
) -> np.ndarray:
    """One environment's observation vector (float32, clipped to ±OBS_BOUND) in ``OBS_FIELDS`` order.

    :param image_embeds: ``(B, D)`` incoming image embeddings (``text_embeds`` likewise);
        ``consistency`` and ``cosine``: ``(B,)``.
    """
    traffic = traffic_features(projection, image_embeds[None], text_embeds[None], consistency[None], cosine[None])
    memory = memory_features(flag_rate, drift, rounds_since_drift, previous, progress)
    return assemble_observations(traffic, memory[None])[0]
