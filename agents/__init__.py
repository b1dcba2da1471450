"""CMAI agents: gating policies, their training, tuning and evaluation.

One module per concept:

* :mod:`agents.policies`: the gating network ``g`` as an SB3 policy (``GatingExtractor``), the
  :class:`~agents.policies.GatingPolicy` interface and :func:`~agents.policies.load_policy`;
* :mod:`agents.train`: ``cmai train`` (SB3 / sb3-contrib, rl-baselines3-zoo run folders);
* :mod:`agents.tune`: ``cmai tune`` (Optuna);
* :mod:`agents.callbacks`: TensorBoard tags ``cmai/...`` and the evaluation callbacks;
* :mod:`agents.baselines`, :mod:`agents.evaluation`, :mod:`agents.benchmark`: fixed and adaptive
  baselines, evaluation and benchmarks;
* ``agents/hyperparams/<algo>.yml``: default hyperparameters per algorithm and scenario.

The names below are imported lazily so that ``import agents`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GatingPolicy": "agents.policies",
    "GatingExtractor": "agents.policies",
    "SB3GatingPolicy": "agents.policies",
    "load_policy": "agents.policies",
    "read_run": "agents.policies",
    "TrainArgs": "agents.train",
    "train": "agents.train",
    "TuneArgs": "agents.tune",
    "tune": "agents.tune",
    "CMAIMetricsCallback": "agents.callbacks",
    "TensorBoardRecorder": "agents.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
