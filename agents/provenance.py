"""What travels with every result so that a number can be reproduced: versions, commit, hashes.

:func:`metadata` is the ``metadata`` block of ``summary.json`` (and of ``cmai benchmark``'s
``results.json``); :func:`code_fingerprint` keys the on-disk ``no_defense`` reference cache
(:mod:`agents.reference`).
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cmai_env
from agents.protocol import EVAL_SEED_OFFSET
from cmai_env.cache import source_fingerprint

if TYPE_CHECKING:
    from agents.env_spec import EnvSpec

__all__ = ["code_fingerprint", "git_commit", "metadata"]


def git_commit() -> str | None:
    """``HEAD`` of the repository the package is imported from (``+dirty`` if modified), if any."""
    root = Path(cmai_env.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_fingerprint() -> str:
    """SHA-256 (16 hex) of the environment's and agents' sources, configs and embedded weights.

    Keys the on-disk reference cache, so that any change to the code or the backbone invalidates it
    (:func:`cmai_env.cache.source_fingerprint` of both packages).
    """
    return source_fingerprint(Path(cmai_env.__file__).resolve().parent, Path(__file__).resolve().parent)


def metadata(spec: "EnvSpec", policy_name: str, seeds: Sequence[int], episodes: int) -> dict[str, Any]:
    """Provenance recorded with every result: policy, environment fingerprint, seeds, versions.

    :param spec: the evaluation environment.
    :param policy_name: the policy's name.
    :param seeds: evaluation seeds (environment seeds are ``EVAL_SEED_OFFSET + s``).
    :param episodes: episodes per seed.
    """
    return {
        "policy": policy_name,
        "env_id": spec.env_id,
        "scenario": spec.scenario_name,
        "scenario_source": spec.scenario,
        "scenario_hash": spec.scenario_hash,
        "evaluation_only": spec.evaluation_only,
        "fidelity": spec.fidelity,
        "env_kwargs": spec.env_kwargs,
        "seeds": list(seeds),
        "env_seeds": [EVAL_SEED_OFFSET + s for s in seeds],
        "episodes_per_seed": episodes,
        "deterministic": True,
        "cmai_version": cmai_env.__version__,
        "git_commit": git_commit(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
