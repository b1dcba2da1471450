"""One policy's evaluation on one scenario: its summary over seeds and the files it writes.

:class:`EvaluationResult` holds the round rows, the :class:`agents.records.EpisodeRecord` of every
episode and the provenance. Per seed it takes the mean over the seed's episodes; the summary is
the mean and 95% t-interval over seeds (:mod:`agents.stats`). The clean-accuracy drop is the
paired per-seed difference ``clean_acc(no_defense) − clean_acc``, with ``no_defense`` evaluated on
the same seeds (:mod:`agents.reference`). :meth:`EvaluationResult.save` writes ``rounds.csv``,
``summary.json`` and the PNGs of :mod:`agents.plots`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.records import EPISODE_METRICS, ROUND_COLUMNS, EpisodeRecord, mean_defined
from agents.stats import Interval, bounds_for, t_interval
from cmai_env.latency import LATENCY_FIELDS

__all__ = ["SUMMARY_DEFINITIONS", "EvaluationResult"]

#: The ``definitions`` block of ``summary.json``.
SUMMARY_DEFINITIONS = {
    "asr": "mean probe ASR over rounds with an active attack (share of originally-correct predictions flipped)",
    "detector_tpr": "mean over rounds with an active attack",
    "clean_acc_drop": "paired per-seed clean_acc(no_defense) - clean_acc(policy)",
    "return": "sum of rewards over an episode",
    "latency": "mean over shifts where measured (recovery: shifts into attacking phases); 'measured' of 'shifts' counts them",
    "ci": "95% Student-t interval over per-seed means",
}


@dataclass
class EvaluationResult:
    """Rounds, episodes and provenance of one policy on one scenario.

    :param policy: the policy's name.
    :param metadata: provenance (:func:`agents.provenance.metadata`).
    :param rows: one dict per round per episode (:data:`agents.records.ROUND_COLUMNS`).
    :param episodes: per-episode summaries.
    :param reference_clean_acc: ``no_defense`` clean accuracy per seed on the same protocol.
    :param files: what :meth:`save` wrote, by kind (``rounds``, ``summary``, plots).
    """

    policy: str
    metadata: dict[str, Any]
    rows: list[dict[str, Any]]
    episodes: list[EpisodeRecord]
    reference_clean_acc: dict[int, float] | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        """The evaluation seeds, in order."""
        return list(self.metadata["seeds"])

    def per_seed(self, metric: str) -> list[float | None]:
        """Per seed, the mean of ``metric`` over its episodes (``None`` where never defined).

        ``metric`` is an episode metric, a latency field, ``clean_acc_drop`` or ``asr:<attack>``.
        """
        out: list[float | None] = []
        for seed in self.seeds:
            episodes = [e for e in self.episodes if e.seed == seed]
            if metric == "clean_acc_drop":
                if self.reference_clean_acc is None:
                    out.append(None)
                    continue
                own = mean_defined(e.metrics["clean_acc"] for e in episodes)
                out.append(None if own is None else self.reference_clean_acc[seed] - own)
            elif metric in LATENCY_FIELDS:
                out.append(mean_defined(e.latency[metric] for e in episodes))
            elif metric.startswith("asr:"):
                out.append(mean_defined(e.asr_per_attack.get(metric[4:]) for e in episodes))
            else:
                out.append(mean_defined(e.metrics[metric] for e in episodes))
        return out

    def interval(self, metric: str) -> Interval:
        """Mean and 95% t-interval over seeds of ``metric`` (see :meth:`per_seed`), clipped to its range."""
        return t_interval(self.per_seed(metric), bounds=bounds_for(metric))

    def mean_betas(self) -> np.ndarray:
        """Mean [β_task, β_consist, β_adv] over every evaluated round."""
        return np.array([[r["beta_task"], r["beta_consist"], r["beta_adv"]] for r in self.rows]).mean(axis=0)

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content: provenance, metric intervals, latencies, per-attack ASR."""
        metrics = {name: self.interval(name).as_dict() for name in EPISODE_METRICS}
        metrics["clean_acc_drop"] = self.interval("clean_acc_drop").as_dict()
        latency = {}
        for name in LATENCY_FIELDS:
            entry = self.interval(name).as_dict()
            entry["measured"] = sum(e.latency_counts[name][0] for e in self.episodes)
            entry["shifts"] = sum(e.latency_counts[name][1] for e in self.episodes)
            latency[name] = entry
        attacks = sorted({name for e in self.episodes for name in e.asr_per_attack})
        return {
            "metadata": self.metadata,
            "metrics": metrics,
            "latency": latency,
            "asr_per_attack": {name: self.interval(f"asr:{name}").as_dict() for name in attacks},
            "mean_betas": dict(zip(("beta_task", "beta_consist", "beta_adv"), self.mean_betas().round(6).tolist())),
            "reference": {
                "policy": "no_defense",
                "clean_acc_per_seed": None
                if self.reference_clean_acc is None
                else {str(s): v for s, v in self.reference_clean_acc.items()},
            },
            "definitions": dict(SUMMARY_DEFINITIONS),
        }

    def save(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``rounds.csv``, ``summary.json`` and (``plots``) PNGs under ``out``; return the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"rounds": out / "rounds.csv", "summary": out / "summary.json"}
        with files["rounds"].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ROUND_COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in ROUND_COLUMNS})
        files["summary"].write_text(json.dumps(self.summary(), indent=2, default=_json_default) + "\n")
        if plots:
            from agents.plots import plot_evaluation

            files.update(plot_evaluation(self, out))
        # An --overwrite'n folder must not keep an earlier evaluation's figures beside these results.
        for stale in [*out.glob("episode_seed*.png"), out / "mean_over_seeds.png"]:
            if stale.exists() and stale not in files.values():
                stale.unlink()
        self.files = files
        return files


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
