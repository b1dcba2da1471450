"""Drawing an episode: metric curves and loss weights over rounds, phases shaded.

Used by ``CMAIEnv.render()`` (``rgb_array``, e.g. for gymnasium's RecordVideo) and by the
evaluation plots. matplotlib's Agg backend draws off-screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_PHASE_COLOURS = ["#dbe9f6", "#fde2c8", "#d9f0d3", "#eadcf0", "#f6d5d5", "#fff2b3"]


def shade_phases(ax, timeline: Sequence[tuple[int, int, str]], label: bool = True) -> None:
    """Shade each phase of ``timeline`` ((start, end, name) in rounds) on ``ax``."""
    names = sorted({name for _, _, name in timeline})
    for start, end, name in timeline:
        ax.axvspan(start - 0.5, end - 0.5, color=_PHASE_COLOURS[names.index(name) % len(_PHASE_COLOURS)], alpha=0.6, lw=0)
        if label:
            ax.text((start + end - 1) / 2, 1.02, name, ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform())


def plot_episode(
    rounds: np.ndarray,
    metrics: dict[str, np.ndarray],
    betas: np.ndarray,
    timeline: Sequence[tuple[int, int, str]],
    title: str,
    n_rounds: int | None = None,
    figsize: tuple[float, float] = (8, 5),
):
    """Two stacked panels: metrics (ASR, clean accuracy, consistency, …) and β over rounds."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=figsize, sharex=True)
    for ax in (top, bottom):
        shade_phases(ax, timeline, label=ax is top)
    for name, values in metrics.items():
        top.plot(rounds, values, label=name, lw=1.5)
    top.set_ylabel("metric")
    top.set_ylim(-0.05, 1.05)
    top.legend(loc="lower left", fontsize=7, ncol=len(metrics))
    top.set_title(title, fontsize=9, pad=14)
    if len(betas):
        for i, name in enumerate(["β_task", "β_consist", "β_adv"]):
            bottom.plot(rounds, betas[:, i], label=name, lw=1.5)
        bottom.legend(loc="upper left", fontsize=7, ncol=3)  # no lines before the first round: no legend
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("loss weight")
    bottom.set_xlabel("round")
    if n_rounds:
        bottom.set_xlim(-0.5, n_rounds - 0.5)
    fig.tight_layout()
    return fig


def render_history(history: list[dict], timeline, n_rounds: int, title: str) -> np.ndarray:
    """RGB array (H, W, 3) of the episode so far."""
    rounds = np.array([h["round"] for h in history], dtype=float)
    metrics = {key: np.array([h[key] for h in history], dtype=float) for key in ("asr", "clean_acc", "consistency_score")}
    betas = np.array([h["betas"] for h in history], dtype=float).reshape(-1, 3)
    fig = plot_episode(rounds, metrics, betas, timeline, title, n_rounds, figsize=(6.4, 4.8))
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
