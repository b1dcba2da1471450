"""Where CMAI keeps what it can recompute, and how a cached value knows the code that made it.

Two on-disk caches live under one root, ``$CMAI_CACHE_DIR`` (default ``~/.cache/cmai``):
``reference/`` (``no_defense``'s clean accuracy per seed, :mod:`agents.reference`) and ``travel/``
(``pixel_travel``'s per-pair radii, :mod:`cmai_env.fidelity.travel`). Both key their files on
:func:`source_fingerprint`, so any change to the code or an embedded checkpoint makes them miss
instead of serving a stale value. Nothing in them is unpickled: JSON and ``.npz`` read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cache_root", "source_fingerprint"]

#: The files of a source tree that define what a cached value is: code, configs, scenarios, weights.
FINGERPRINT_PATTERNS = ("*.py", "*.yaml", "*.yml", "*.json", "*.pt")


def cache_root() -> Path:
    """``$CMAI_CACHE_DIR`` (default ``~/.cache/cmai``), read at each call."""
    return Path(os.environ.get("CMAI_CACHE_DIR", Path.home() / ".cache" / "cmai"))


def source_fingerprint(*roots: Path) -> str:
    """SHA-256 (16 hex) of every :data:`FINGERPRINT_PATTERNS` file below ``roots``: names and bytes."""
    digest = hashlib.sha256()
    for root in roots:
        files = {p for pattern in FINGERPRINT_PATTERNS for p in Path(root).rglob(pattern)}
        for path in sorted(files):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
