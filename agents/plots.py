"""Evaluation figures, drawn with :mod:`cmai_env.render` (metric and β panels, phases shaded).

* ``episode_seed<S>.png``: the first episode of each seed: ASR, clean accuracy, consistency
  score and detector TPR over rounds (top), β over rounds (bottom);
* ``mean_over_seeds.png``: the same curves averaged over every evaluated episode, when there
  are several and all share one phase timeline (scenarios with randomised schedules skip it,
  since their rounds do not line up; one episode's mean would be ``episode_seed<S>.png`` again).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmai_env.render import plot_episode, save_figure

if TYPE_CHECKING:
    from agents.results import EvaluationResult

#: Metric curves of the top panel (round-row column names).
PLOT_METRICS = ("asr", "clean_acc", "consistency_score", "detector_tpr")


def _curves(rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    rounds = np.array([r["round"] for r in rows], dtype=float)
    metrics = {name: np.array([r[name] for r in rows], dtype=float) for name in PLOT_METRICS}
    betas = np.array([[r["beta_task"], r["beta_consist"], r["beta_adv"]] for r in rows], dtype=float).reshape(-1, 3)
    return rounds, metrics, betas


def plot_evaluation(result: "EvaluationResult", out: str | Path) -> dict[str, Path]:
    """Write the evaluation's PNGs under ``out``; returns ``{name: path}``."""
    out = Path(out)
    files: dict[str, Path] = {}
    scenario = result.metadata["scenario"]
    first_episode = {}
    for record in result.episodes:
        first_episode.setdefault(record.seed, record)
    for seed, record in first_episode.items():
        rows = [r for r in result.rows if r["seed"] == seed and r["episode"] == record.episode]
        rounds, metrics, betas = _curves(rows)
        title = f"{result.policy} on {scenario}, seed {seed} (episode {record.episode})"
        path = out / f"episode_seed{seed}.png"
        save_figure(plot_episode(rounds, metrics, betas, record.timeline, title, record.n_rounds), path)
        files[f"episode_seed{seed}"] = path
    timelines = {tuple(e.timeline) for e in result.episodes}
    lengths = {e.n_rounds for e in result.episodes}
    if len(result.episodes) > 1 and len(timelines) == 1 and len(lengths) == 1:
        n_rounds = lengths.pop()
        stacked = [
            _curves([r for r in result.rows if r["seed"] == e.seed and r["episode"] == e.episode]) for e in result.episodes
        ]
        rounds = stacked[0][0]
        metrics = {name: np.mean([s[1][name] for s in stacked], axis=0) for name in PLOT_METRICS}
        betas = np.mean([s[2] for s in stacked], axis=0)
        title = f"{result.policy} on {scenario}: mean of {len(stacked)} episode(s) over seeds {result.seeds}"
        path = out / "mean_over_seeds.png"
        save_figure(plot_episode(rounds, metrics, betas, list(timelines.pop()), title, n_rounds), path)
        files["mean_over_seeds"] = path
    return files
