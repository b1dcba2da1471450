"""Environments kept for reuse across evaluations of one scenario: an object the caller owns.

Building an environment loads the backbone and embeds the dataset, which costs more than a
short evaluation episode. ``reset(seed)`` restores parameters, stream, detector and latency
state (single and batched environments alike), so a reused environment plays exactly the
episodes a fresh one would; callers that evaluate many policies on one scenario
(``cmai benchmark``, ``cmai quickstart``) open one pool and pass it to every
:func:`agents.evaluation.evaluate_policy`::

    with EnvPool() as pool:
        for name in ("no_defense", "uniform"):
            evaluate_policy(f"baseline:{name}", "quickstart", pool=pool)

Without a pool every evaluation builds its environments and closes them when it ends.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from agents.env_spec import EnvSpec

__all__ = ["EnvPool"]


class EnvPool:
    """Environments by :class:`agents.env_spec.EnvSpec` (and batch size), least recently used first.

    :param size: environments kept; past it the least recently used one is closed.
    """

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"an EnvPool keeps at least one environment, got size={size}")
        self.size = size
        self._envs: OrderedDict[tuple["EnvSpec", int | None], Any] = OrderedDict()
        self.built = 0  #: environments constructed so far (reuse keeps it low)

    def env(self, spec: "EnvSpec") -> Any:
        """The single environment for ``spec`` (:meth:`EnvSpec.make` on first use)."""
        return self._get((spec, None), spec.make)

    def vector_env(self, spec: "EnvSpec", num_envs: int) -> Any:
        """The batched environment of ``num_envs`` copies for ``spec`` (:meth:`EnvSpec.make_vector`)."""
        return self._get((spec, int(num_envs)), lambda: spec.make_vector(num_envs))

    def _get(self, key: tuple["EnvSpec", int | None], build: Callable[[], Any]) -> Any:
        if key in self._envs:
            self._envs.move_to_end(key)
            return self._envs[key]
        env = build()
        self.built += 1
        self._envs[key] = env
        while len(self._envs) > self.size:
            _, old = self._envs.popitem(last=False)
            old.close()
        return env

    def __len__(self) -> int:
        return len(self._envs)

    def close(self) -> None:
        """Close and forget every environment (the pool stays usable)."""
        while self._envs:
            _, env = self._envs.popitem()
            env.close()

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
