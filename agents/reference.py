"""The baseline of the clean-accuracy drop: ``no_defense``'s clean accuracy per seed, cached.

The drop of a policy is the paired per-seed difference ``clean_acc(no_defense) − clean_acc``, so
every evaluation needs ``no_defense`` on the same scenario, seeds and episodes. It always acts on
the continuous environment of the scenario (``CMAI-Eval-v0`` for evaluation-only ones), whatever
the evaluated policy's action space. :class:`ReferenceCache` keeps the values as JSON files under
``$CMAI_CACHE_DIR/reference`` (default ``~/.cache/cmai/reference``), keyed by the environment's
fingerprint, seed, episodes and :func:`agents.provenance.code_fingerprint`, so that any change
to the environment invalidates them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from agents.protocol import CONTINUOUS_ENV_ID, EVAL_ENV_ID
from agents.records import mean_defined
from agents.runner import run_episodes
from cmai_env.cache import cache_root

if TYPE_CHECKING:
    from agents.env_pool import EnvPool
    from agents.env_spec import EnvSpec

__all__ = ["ReferenceCache", "default_cache_dir", "reference_clean_acc", "reference_spec"]


def default_cache_dir() -> Path:
    """``$CMAI_CACHE_DIR/reference`` (default ``~/.cache/cmai/reference``; :func:`cmai_env.cache.cache_root`)."""
    return cache_root() / "reference"


class ReferenceCache:
    """``no_defense`` clean accuracies on disk, one JSON file per (environment, seed, episodes, code).

    :param directory: where the files live (default :func:`default_cache_dir`, read when created).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self._code: str | None = None

    def _path(self, spec: "EnvSpec", seed: int, episodes: int) -> Path:
        if self._code is None:
            from agents.provenance import code_fingerprint

            self._code = code_fingerprint()
        text = json.dumps({"spec": spec.fingerprint(), "seed": int(seed), "episodes": int(episodes), "code": self._code}, sort_keys=True)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def get(self, spec: "EnvSpec", seed: int, episodes: int) -> float | None:
        """The cached value, or ``None`` (missing or unreadable)."""
        path = self._path(spec, seed, episodes)
        if not path.is_file():
            return None
        try:
            return float(json.loads(path.read_text())["clean_acc"])
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, spec: "EnvSpec", seed: int, episodes: int, value: float) -> None:
        """Store ``value`` (a read-only cache folder only costs a re-run next time)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            record = {"clean_acc": value, "seed": int(seed), "episodes": int(episodes), "spec": spec.fingerprint()}
            path = self._path(spec, seed, episodes)
            # Written beside and renamed into place: processes sharing the cache (parallel test
            # workers, a sweep's evaluations) never read a half-written file.
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(record))
            os.replace(partial, path)
        except OSError:
            pass


def reference_spec(spec: "EnvSpec") -> "EnvSpec":
    """The environment ``no_defense`` is evaluated in: ``spec``'s scenario, continuous actions."""
    return spec.with_env_id(EVAL_ENV_ID if spec.evaluation_only else CONTINUOUS_ENV_ID, drop=("action_mode",))


def reference_clean_acc(
    spec: "EnvSpec",
    seeds: Sequence[int],
    episodes: int,
    cache: ReferenceCache | None = None,
    pool: "EnvPool | None" = None,
    log: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """``no_defense`` clean accuracy per seed on ``spec``'s scenario (module docstring).

    :param spec: the evaluated policy's environment.
    :param seeds: evaluation seeds.
    :param episodes: episodes per seed.
    :param cache: read and write values here; ``None`` always plays the episodes.
    :param pool: environments to reuse for the episodes played.
    :param log: progress callback.
    """
    from agents.baselines import make_baseline

    spec = reference_spec(spec)
    out: dict[int, float] = {}
    for seed in seeds:
        cached = cache.get(spec, seed, episodes) if cache is not None else None
        if cached is not None:
            out[seed] = cached
    missing = [seed for seed in seeds if seed not in out]
    if missing:
        _, records = run_episodes(make_baseline("no_defense"), spec, missing, episodes, log=log, pool=pool)
        for seed in missing:
            out[seed] = float(mean_defined(r.metrics["clean_acc"] for r in records if r.seed == seed))
            if cache is not None:
                cache.put(spec, seed, episodes, out[seed])
    return {seed: out[seed] for seed in seeds}
