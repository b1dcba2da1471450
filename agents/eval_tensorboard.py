"""``cmai evaluate --tensorboard``: every evaluated round's ``cmai/...`` scalars.

One event folder per evaluated episode, ``<folder>/<scenario>_<policy>/seed<S>_ep<E>``, with
step = round, so TensorBoard overlays the seeds of one policy. The tags are those of training
(:class:`agents.callbacks.TensorBoardRecorder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["EpisodeTensorBoard"]


class EpisodeTensorBoard:
    """An :data:`agents.runner.OnStep` callback writing one event folder per episode; :meth:`close` it.

    :param folder: the TensorBoard root folder.
    :param policy_name: the policy's name.
    :param scenario_name: the scenario's name.
    """

    def __init__(self, folder: str | Path, policy_name: str, scenario_name: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{scenario_name}_{policy_name}")
        self.root = Path(folder) / safe
        self._key: tuple[int, int] | None = None
        self._recorder: Any = None
        self._round = 0

    def __call__(self, info: dict, reward: float, done: bool, seed: int, episode: int) -> None:
        from agents.callbacks import TensorBoardRecorder

        if self._key != (seed, episode):
            self.close()
            self._key, self._round = (seed, episode), 0
            self._recorder = TensorBoardRecorder(self.root / f"seed{seed}_ep{episode}")
        self._recorder.record_round(info, step=self._round, done=done, reward=reward)
        self._round += 1

    def close(self) -> None:
        """Flush and close the current episode's writer."""
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
