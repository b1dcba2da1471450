"""What one evaluated round and one evaluated episode record (the rows of ``rounds.csv``).

Per round, :func:`round_row` flattens the environment's ``info`` into :data:`ROUND_COLUMNS`. Per
episode, :func:`episode_record` reduces the rows to an :class:`EpisodeRecord`:

* the return (Σ rewards);
* ASR = mean probe ASR over the rounds in which an attack is active (quiet rounds have ASR 0 by
  definition and would only dilute it); the end-to-end ``system_asr`` (attacks that flip the
  model *and* pass the detector) and detector TPR over the same attacked rounds;
* clean accuracy, ``false_rejection_rate``, ``system_clean_acc``, consistency score,
  ``prediction_entropy`` (how flat the clean predictions are), detector FPR and compute cost over
  all rounds;
* per-attack ASR over the rounds where that attack is active;
* the three adaptation latencies of :mod:`cmai_env.latency` (rounds and ms), averaged over the
  episode's shifts where they were measured: detection and weight response over every shift,
  recovery over shifts into attacking phases (a shift into a quiet phase "recovers" trivially).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from agents.protocol import EVAL_SEED_OFFSET
from cmai_env.latency import LATENCY_FIELDS

__all__ = ["EPISODE_METRICS", "ROUND_COLUMNS", "EpisodeRecord", "episode_record", "episode_line", "mean_defined", "round_row"]

#: Metrics summarised per seed (all but ``return`` are means over rounds, see the module docstring).
EPISODE_METRICS = (
    "return",
    "asr",
    "clean_acc",
    "system_asr",
    "false_rejection_rate",
    "system_clean_acc",
    "consistency_score",
    "prediction_entropy",
    "detector_tpr",
    "detector_fpr",
    "compute_cost",
)
#: Columns of ``rounds.csv``, in order.
ROUND_COLUMNS = (
    "policy",
    "seed",
    "env_seed",
    "episode",
    "round",
    "phase",
    "attacks",
    "shift",
    "clean_acc",
    "asr",
    "asr_per_attack",
    "system_asr",
    "false_rejection_rate",
    "system_clean_acc",
    "consistency_score",
    "prediction_entropy",
    "detector_tpr",
    "detector_fpr",
    "detector_flag_rate",
    "beta_task",
    "beta_consist",
    "beta_adv",
    "reward",
    "compute_cost",
    "loss_task",
    "loss_consistency",
    "loss_adv",
    "loss_total",
    *LATENCY_FIELDS,
    "round_ms",
)


@dataclass
class EpisodeRecord:
    """One evaluated episode.

    :param seed: the evaluation seed.
    :param episode: the episode's index within its seed.
    :param n_rounds: rounds played.
    :param metrics: the episode's :data:`EPISODE_METRICS`.
    :param latency: per latency field, the mean over the shifts where it was measured (``None``
        if none).
    :param latency_counts: per latency field, ``(measured, eligible shifts)``.
    :param asr_per_attack: mean ASR per attack name over the rounds it was active.
    :param shifts: the episode's :class:`cmai_env.latency.ShiftRecord` dicts.
    :param timeline: ``(start, end, phase)`` of the episode's schedule.
    """

    seed: int
    episode: int
    n_rounds: int
    metrics: dict[str, float | None]
    latency: dict[str, float | None]
    latency_counts: dict[str, tuple[int, int]]
    asr_per_attack: dict[str, float]
    shifts: list[dict]
    timeline: list[tuple[int, int, str]]


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values, ``None`` if there are none."""
    clean = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(clean)) if clean else None


def detector_rates(info: dict) -> dict[str, float | None]:
    """A round's ``detector_tpr`` and ``detector_fpr``, ``None`` where undefined: TPR over no
    adversarial pairs, FPR over no clean ones (``info['detector_pairs']``; the env's info reads 0.0
    there, which the reward and observation use)."""
    pairs = info.get("detector_pairs") or {}
    return {key: None if pairs.get(side, 1) == 0 else float(info[key])
            for key, side in (("detector_tpr", "adversarial"), ("detector_fpr", "clean")) if key in info}


def round_row(policy_name: str, seed: int, episode: int, reward: float, info: dict, round_ms: float | None) -> dict[str, Any]:
    """One ``rounds.csv`` row from a step's ``info`` (plus ``_asr_per_attack``, a dict the episode
    record reads and :func:`agents.runner.run_episodes` removes before returning)."""
    betas = np.asarray(info["betas"], dtype=np.float64)
    losses = info.get("losses") or {}
    latency = info.get("latency") or {}
    per_attack = {str(k): float(v) for k, v in (info.get("asr_per_attack") or {}).items()}
    row = {
        "policy": policy_name,
        "seed": seed,
        "env_seed": EVAL_SEED_OFFSET + seed,
        "episode": episode,
        "round": int(info["round"]),
        "phase": info["phase"],
        "attacks": "+".join(info.get("attacks") or []),
        "shift": bool(info.get("shift", False)),
        "clean_acc": float(info["clean_acc"]),
        "asr": float(info["asr"]),
        "asr_per_attack": json.dumps(per_attack, sort_keys=True),
        "_asr_per_attack": per_attack,
        "system_asr": float(info["system_asr"]),
        "false_rejection_rate": float(info["false_rejection_rate"]),
        "system_clean_acc": float(info["system_clean_acc"]),
        "consistency_score": float(info["consistency_score"]),
        "prediction_entropy": float(info["prediction_entropy"]),
        # a rate over no pairs is undefined: empty in rounds.csv and left out of the episode's mean
        **detector_rates(info),
        "detector_flag_rate": float(info.get("detector_flag_rate", float("nan"))),
        "beta_task": float(betas[0]),
        "beta_consist": float(betas[1]),
        "beta_adv": float(betas[2]),
        "reward": float(reward),
        "compute_cost": float(info["compute_cost"]),
        "loss_task": losses.get("task"),
        "loss_consistency": losses.get("consistency"),
        "loss_adv": losses.get("adv"),
        "loss_total": losses.get("total"),
        "round_ms": round_ms,
    }
    for name in LATENCY_FIELDS:
        row[name] = latency.get(name)
    return row


def episode_record(seed: int, episode: int, rows: Sequence[dict], shifts: list[dict], timeline: Iterable[tuple]) -> EpisodeRecord:
    """Reduce an episode's :func:`round_row` rows and shift records (module docstring)."""
    attacked = [r for r in rows if r["attacks"]]
    metrics: dict[str, float | None] = {
        "return": float(sum(r["reward"] for r in rows)),
        "asr": mean_defined(r["asr"] for r in attacked),
        "clean_acc": mean_defined(r["clean_acc"] for r in rows),
        "system_asr": mean_defined(r["system_asr"] for r in attacked),
        "false_rejection_rate": mean_defined(r["false_rejection_rate"] for r in rows),
        "system_clean_acc": mean_defined(r["system_clean_acc"] for r in rows),
        "consistency_score": mean_defined(r["consistency_score"] for r in rows),
        "prediction_entropy": mean_defined(r["prediction_entropy"] for r in rows),
        "detector_tpr": mean_defined(r["detector_tpr"] for r in attacked),
        "detector_fpr": mean_defined(r["detector_fpr"] for r in rows),
        "compute_cost": mean_defined(r["compute_cost"] for r in rows),
    }
    latency: dict[str, float | None] = {}
    counts: dict[str, tuple[int, int]] = {}
    for name in LATENCY_FIELDS:
        eligible = [s for s in shifts if s.get("attacking")] if name.startswith("recovery") else list(shifts)
        values = [s.get(name) for s in eligible if s.get(name) is not None]
        latency[name] = mean_defined(values)
        counts[name] = (len(values), len(eligible))
    per_attack: dict[str, list[float]] = {}
    for r in rows:
        for name, value in (r["_asr_per_attack"] or {}).items():
            per_attack.setdefault(name, []).append(float(value))
    return EpisodeRecord(
        seed=seed,
        episode=episode,
        n_rounds=len(rows),
        metrics=metrics,
        latency=latency,
        latency_counts=counts,
        asr_per_attack={name: float(np.mean(v)) for name, v in per_attack.items()},
        shifts=shifts,
        timeline=[(int(a), int(b), str(p)) for a, b, p in timeline],
    )


def episode_line(policy_name: str, record: EpisodeRecord) -> str:
    """The progress line logged after each episode."""

    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    m = record.metrics
    return (
        f"{policy_name} seed {record.seed} episode {record.episode}: return {m['return']:.3f} "
        f"asr {fmt(m['asr'])} clean_acc {fmt(m['clean_acc'])}"
    )
