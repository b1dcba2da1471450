"""The frozen evaluation protocol and :func:`evaluate_policy`.

Protocol
--------
In the manner of the CAGE challenges, an evaluation is fully determined by a small table that
is part of the code, and everything needed to reproduce or compare a number travels with it:

* **Seeds and episodes** per scenario (:data:`PROTOCOLS`; any scenario not in the table,
  including user scenario files, uses :data:`DEFAULT_PROTOCOL`):

  =======================  ==============  ===============  ===================================
  scenario                 seeds           episodes / seed  why
  =======================  ==============  ===============  ===================================
  (default), every shipped 0, 1, 2, 3, 4   1                five replicates for a t-interval;
  fixed-schedule scenario                                   the schedule is fixed, so seeds
                                                            vary traffic, probes and attacks
  ``randomized_training``  0, 1, …, 9      1                the schedule itself is drawn per
                                                            seed: more seeds for the same CI
  =======================  ==============  ===============  ===================================

  Episode ``e`` of seed ``s`` is played on an environment reset with
  ``seed = EVAL_SEED_OFFSET + s`` for ``e = 0`` and continued without a new seed for ``e > 0``
  (gymnasium's convention), with ``EVAL_SEED_OFFSET = 100 000``: evaluation episodes replay
  neither the first episode of a training run seeded with a small integer nor the validation
  episodes ``cmai train`` uses to pick ``best_model.zip`` (seeded ``seed + 10 000``). Policies
  act deterministically.
* **Environment**: training scenarios run in ``cmai_env/CMAI-v0`` (``CMAI-Discrete-v0`` for
  policies with a discrete action space, e.g. DQN), evaluation-only scenarios in
  ``cmai_env/CMAI-Eval-v0``. The env ID, the scenario name, file and hash
  (:func:`cmai_env.scenario.scenario_hash`), the fidelity, any ``env_kwargs`` overrides, the
  package version and the git commit are recorded in every result.

Metrics
-------
Per episode: the return (Σ rewards); ASR = mean probe ASR over the rounds in which an attack is
active (quiet rounds have ASR 0 by definition and would only dilute it); the end-to-end
``system_asr`` (attacks that flip the model *and* pass the detector) and detector TPR over the
same attacked rounds; clean accuracy, ``false_rejection_rate``, ``system_clean_acc``,
consistency score, detector FPR and compute cost over all rounds; per-attack ASR over the rounds where that attack is active; and the three adaptation
latencies of :mod:`cmai_env.latency` (rounds and ms), averaged over the episode's shifts where
they were measured: detection and weight response over every shift, recovery over shifts into
attacking phases (a shift into a quiet phase "recovers" trivially). Per seed: the mean over its
episodes. Summary: mean and 95% t-interval over the seeds (:mod:`agents.stats`); the
clean-accuracy drop is the paired per-seed difference ``clean_acc(no_defense) − clean_acc``,
with ``no_defense`` evaluated on the same seeds (cached in memory and on disk, see
:func:`reference_clean_acc`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import subprocess
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import gymnasium as gym
import numpy as np

import cmai_env
from agents.protocol import (  # noqa: F401 (re-exported: the evaluation API)
    CONTINUOUS_ENV_ID,
    DEFAULT_PROTOCOL,
    DISCRETE_ENV_ID,
    EVAL_ENV_ID,
    EVAL_SEED_OFFSET,
    PROTOCOLS,
    EvalProtocol,
    protocol_for,
)
from agents.stats import Interval, bounds_for, t_interval
from cmai_env.latency import LATENCY_FIELDS

if TYPE_CHECKING:
    from agents.policies import GatingPolicy

#: Metrics summarised per seed (all but ``return`` are means over rounds, see the module docstring).
EPISODE_METRICS = (
    "return",
    "asr",
    "clean_acc",
    "system_asr",
    "false_rejection_rate",
    "system_clean_acc",
    "consistency_score",
    "detector_tpr",
    "detector_fpr",
    "compute_cost",
)
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


# ------------------------------------------------------------------------------ inputs
def resolve_policy(spec: str | Path, device: str = "cpu") -> "GatingPolicy":
    """``baseline:NAME`` → a fresh baseline; a run folder or model file → the trained policy.

    :raises ValueError: unknown baseline name.
    :raises FileNotFoundError: the path does not exist.
    """
    from agents.baselines import available_baselines, make_baseline

    text = str(spec)
    if text.startswith("baseline:"):
        return make_baseline(text.split(":", 1)[1])
    path = Path(text)
    if not path.exists() and not path.with_suffix(".zip").exists():
        raise FileNotFoundError(
            f"policy folder {text!r} not found; pass a run folder written by `cmai train` "
            f"or baseline:NAME (baselines: {', '.join(available_baselines())})"
        )
    from agents.policies import load_policy

    return load_policy(path, device=device)


def policy_action_mode(policy: Any) -> str:
    """``"discrete"`` for policies that act on the Discrete weight grid (e.g. DQN), else ``"continuous"``."""
    if getattr(policy, "discrete", False) or getattr(policy, "env_id", None) == DISCRETE_ENV_ID:
        return "discrete"
    inner = getattr(policy, "inner", None)  # ablation wrappers
    return policy_action_mode(inner) if inner is not None else "continuous"


def _policy_env_kwargs(policy: Any) -> dict[str, Any]:
    """The env kwargs a trained policy's run was made with (empty for baselines)."""
    run = getattr(policy, "run", None)
    if run is None:
        inner = getattr(policy, "inner", None)
        return _policy_env_kwargs(inner) if inner is not None else {}
    try:
        return dict(run.env_kwargs)
    except (OSError, KeyError, TypeError):
        return {}


@dataclass(frozen=True)
class EnvSpec:
    """Everything that determines the evaluation environment (hashable, for caching)."""

    env_id: str
    scenario: str  #: the name or path passed to gym.make
    scenario_name: str
    scenario_hash: str
    evaluation_only: bool
    fidelity: str | None
    env_kwargs_json: str  #: canonical JSON of the overrides

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return json.loads(self.env_kwargs_json)

    def make(self) -> gym.Env:
        kwargs = self.env_kwargs
        if self.fidelity is not None:
            kwargs["fidelity"] = self.fidelity
        if self.env_id == EVAL_ENV_ID:
            kwargs.setdefault("allow_evaluation_only", True)
        return gym.make(self.env_id, scenario=self.scenario, **kwargs)


def env_spec(
    scenario: str | Path,
    fidelity: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    action_mode: str = "continuous",
) -> EnvSpec:
    """Pick the env ID for ``scenario`` (Eval for evaluation-only ones) and fingerprint it."""
    from cmai_env.scenario import load_scenario, scenario_hash

    kwargs = dict(env_kwargs or {})
    if "fidelity" in kwargs:
        fidelity = fidelity or kwargs.pop("fidelity")
        kwargs.pop("fidelity", None)
    loaded = load_scenario(str(scenario))
    if loaded.evaluation_only:
        env_id = EVAL_ENV_ID
        if action_mode == "discrete":
            kwargs["action_mode"] = "discrete"
    else:
        env_id = DISCRETE_ENV_ID if action_mode == "discrete" else CONTINUOUS_ENV_ID
    return EnvSpec(
        env_id=env_id,
        scenario=str(scenario),
        scenario_name=loaded.name,
        scenario_hash=scenario_hash(str(scenario)),
        evaluation_only=bool(loaded.evaluation_only),
        fidelity=fidelity or loaded.fidelity,  # recorded resolved, not as "scenario default"
        env_kwargs_json=json.dumps(kwargs, sort_keys=True, default=str),
    )


# ------------------------------------------------------------------------------ provenance
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

    Keys the on-disk reference cache, so that any change to the code or the backbone invalidates it.
    """
    digest = hashlib.sha256()
    roots = [Path(cmai_env.__file__).resolve().parent, Path(__file__).resolve().parent]
    for root in roots:
        files = [p for pattern in ("*.py", "*.yaml", "*.yml", "*.json", "*.pt") for p in root.rglob(pattern)]
        for path in sorted(set(files)):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def metadata(spec: EnvSpec, policy_name: str, seeds: Sequence[int], episodes: int) -> dict[str, Any]:
    """Provenance recorded with every result."""
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


# ------------------------------------------------------------------------------ results
@dataclass
class EpisodeRecord:
    """One evaluated episode.

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


@dataclass
class EvaluationResult:
    """Rounds, episodes and provenance of one policy on one scenario.

    :param policy: the policy's name.
    :param metadata: provenance (:func:`metadata`).
    :param rows: one dict per round per episode (:data:`ROUND_COLUMNS`).
    :param episodes: per-episode summaries.
    :param reference_clean_acc: ``no_defense`` clean accuracy per seed on the same protocol.
    """

    policy: str
    metadata: dict[str, Any]
    rows: list[dict[str, Any]]
    episodes: list[EpisodeRecord]
    reference_clean_acc: dict[int, float] | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
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
                own = _mean([e.metrics["clean_acc"] for e in episodes])
                out.append(None if own is None else self.reference_clean_acc[seed] - own)
            elif metric in LATENCY_FIELDS:
                out.append(_mean([e.latency[metric] for e in episodes]))
            elif metric.startswith("asr:"):
                out.append(_mean([e.asr_per_attack.get(metric[4:]) for e in episodes]))
            else:
                out.append(_mean([e.metrics[metric] for e in episodes]))
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
            "definitions": {
                "asr": "mean probe ASR over rounds with an active attack (share of originally-correct predictions flipped)",
                "detector_tpr": "mean over rounds with an active attack",
                "clean_acc_drop": "paired per-seed clean_acc(no_defense) - clean_acc(policy)",
                "return": "sum of rewards over an episode",
                "latency": "mean over shifts where measured (recovery: shifts into attacking phases); "
                "'measured' of 'shifts' counts them",
                "ci": "95% Student-t interval over per-seed means",
            },
        }

    def save(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``rounds.csv``, ``summary.json`` and (``plots``) PNGs under ``out``."""
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
        self.files = files
        return files


def _mean(values: Sequence[float | None]) -> float | None:
    clean = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(clean)) if clean else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------ running
def _episode_record(seed: int, episode: int, rows: list[dict], shifts: list[dict], timeline) -> EpisodeRecord:
    attacked = [r for r in rows if r["attacks"]]
    metrics: dict[str, float | None] = {
        "return": float(sum(r["reward"] for r in rows)),
        "asr": _mean([r["asr"] for r in attacked]),
        "clean_acc": _mean([r["clean_acc"] for r in rows]),
        "system_asr": _mean([r["system_asr"] for r in attacked]),
        "false_rejection_rate": _mean([r["false_rejection_rate"] for r in rows]),
        "system_clean_acc": _mean([r["system_clean_acc"] for r in rows]),
        "consistency_score": _mean([r["consistency_score"] for r in rows]),
        "detector_tpr": _mean([r["detector_tpr"] for r in attacked]),
        "detector_fpr": _mean([r["detector_fpr"] for r in rows]),
        "compute_cost": _mean([r["compute_cost"] for r in rows]),
    }
    latency: dict[str, float | None] = {}
    counts: dict[str, tuple[int, int]] = {}
    for name in LATENCY_FIELDS:
        eligible = [s for s in shifts if s.get("attacking")] if name.startswith("recovery") else list(shifts)
        values = [s.get(name) for s in eligible if s.get(name) is not None]
        latency[name] = _mean(values)
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


def _round_row(policy_name: str, seed: int, episode: int, reward: float, info: dict, round_ms: float | None) -> dict[str, Any]:
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
        "detector_tpr": float(info["detector_tpr"]),
        "detector_fpr": float(info["detector_fpr"]),
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


#: Environments kept for reuse, most recently used last (building one loads the backbone and
#: embeds the dataset; ``reset(seed)`` restores parameters, stream, detector and latency state,
#: so a reused environment plays exactly the episodes a fresh one would).
_ENV_POOL: OrderedDict[EnvSpec, gym.Env] = OrderedDict()
ENV_POOL_SIZE = 4


def acquire_env(spec: EnvSpec) -> gym.Env:
    """The pooled environment for ``spec`` (built on first use; the oldest is closed past the pool size)."""
    if spec in _ENV_POOL:
        _ENV_POOL.move_to_end(spec)
        return _ENV_POOL[spec]
    env = spec.make()
    _ENV_POOL[spec] = env
    while len(_ENV_POOL) > ENV_POOL_SIZE:
        _, old = _ENV_POOL.popitem(last=False)
        old.close()
    return env


def close_pooled_envs() -> None:
    """Close and forget the environments kept for reuse."""
    while _ENV_POOL:
        _, env = _ENV_POOL.popitem()
        env.close()


def run_episodes(
    policy: "GatingPolicy",
    spec: EnvSpec,
    seeds: Sequence[int],
    episodes: int,
    on_step: Callable[[dict, float, bool, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    reuse_env: bool = True,
) -> tuple[list[dict], list[EpisodeRecord]]:
    """Play ``episodes`` episodes per seed; return the round rows and per-episode records.

    :param on_step: called after every step with ``(info, reward, done, seed, episode)``
        (TensorBoard).
    :param reuse_env: take the environment from (and leave it in) the in-process pool.
    """
    env = acquire_env(spec) if reuse_env else spec.make()
    try:
        if hasattr(policy, "bind"):
            policy.bind(env)
        rows: list[dict] = []
        records: list[EpisodeRecord] = []
        for seed in seeds:
            for episode in range(episodes):
                policy.reset()
                obs, _ = env.reset(seed=EVAL_SEED_OFFSET + seed if episode == 0 else None)
                state, start, done = None, True, False
                episode_rows: list[dict] = []
                while not done:
                    action, state = policy.predict(obs, state=state, episode_start=np.array([start]), deterministic=True)
                    obs, reward, terminated, truncated, info = env.step(action)
                    policy.observe(info)
                    timing = getattr(env.unwrapped, "last_timing", None)
                    episode_rows.append(_round_row(policy.name, seed, episode, reward, info, timing.round_ms if timing else None))
                    start, done = False, bool(terminated or truncated)
                    if on_step is not None:
                        on_step(info, float(reward), done, seed, episode)
                base = env.unwrapped
                shifts = [record.as_dict() for record in base.latency.records]
                records.append(_episode_record(seed, episode, episode_rows, shifts, list(base.stream.timeline)))
                rows.extend(episode_rows)
                if log is not None:
                    m = records[-1].metrics
                    log(
                        f"{policy.name} seed {seed} episode {episode}: return {m['return']:.3f} "
                        f"asr {_fmt(m['asr'])} clean_acc {_fmt(m['clean_acc'])}"
                    )
        for row in rows:
            row.pop("_asr_per_attack", None)
        return rows, records
    finally:
        if not reuse_env:
            env.close()


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------ reference
_REFERENCE_CACHE: dict[tuple, dict[int, float]] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("CMAI_CACHE_DIR", Path.home() / ".cache" / "cmai")) / "reference"


def reference_clean_acc(
    spec: EnvSpec,
    seeds: Sequence[int],
    episodes: int,
    use_disk_cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """``no_defense`` clean accuracy per seed on ``spec`` (the baseline of the clean-accuracy drop).

    Cached per (env spec, seed, episodes) in memory and, with ``use_disk_cache``, as JSON under
    ``$CMAI_CACHE_DIR/reference`` (default ``~/.cache/cmai``), keyed also by
    :func:`code_fingerprint` so that any change to the environment invalidates it.
    """
    from agents.baselines import make_baseline

    # The reference always acts on the continuous env of the same scenario.
    spec = EnvSpec(**{**spec.__dict__, "env_id": EVAL_ENV_ID if spec.evaluation_only else CONTINUOUS_ENV_ID,
                      "env_kwargs_json": json.dumps({k: v for k, v in spec.env_kwargs.items() if k != "action_mode"}, sort_keys=True)})
    out: dict[int, float] = {}
    missing = []
    fingerprint = code_fingerprint() if use_disk_cache else ""
    for seed in seeds:
        key = (spec, int(seed), int(episodes))
        if key in _REFERENCE_CACHE:
            out[seed] = _REFERENCE_CACHE[key][seed]
            continue
        if use_disk_cache:
            path = _cache_dir() / f"{_key_digest(key, fingerprint)}.json"
            if path.is_file():
                try:
                    out[seed] = float(json.loads(path.read_text())["clean_acc"])
                    _REFERENCE_CACHE[key] = {seed: out[seed]}
                    continue
                except (ValueError, KeyError):
                    pass
        missing.append(seed)
    if missing:
        _, records = run_episodes(make_baseline("no_defense"), spec, missing, episodes, log=log)
        for seed in missing:
            value = _mean([r.metrics["clean_acc"] for r in records if r.seed == seed])
            out[seed] = float(value)
            key = (spec, int(seed), int(episodes))
            _REFERENCE_CACHE[key] = {seed: out[seed]}
            if use_disk_cache:
                try:
                    directory = _cache_dir()
                    directory.mkdir(parents=True, exist_ok=True)
                    (directory / f"{_key_digest(key, fingerprint)}.json").write_text(
                        json.dumps({"clean_acc": out[seed], "seed": seed, "episodes": episodes, "spec": spec.__dict__})
                    )
                except OSError:
                    pass  # a read-only home only costs a re-run next time
    return {seed: out[seed] for seed in seeds}


def _key_digest(key: tuple, fingerprint: str) -> str:
    spec, seed, episodes = key
    text = json.dumps({"spec": spec.__dict__, "seed": seed, "episodes": episodes, "code": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------ API
def evaluate_policy(
    policy: "GatingPolicy | str",
    scenario: str | Path,
    seeds: Sequence[int] | None = None,
    episodes: int | None = None,
    fidelity: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    reference: dict[int, float] | bool = True,
    use_disk_cache: bool = True,
    tensorboard: str | Path | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluate a gating policy under the frozen protocol.

    :param policy: a :class:`GatingPolicy`, or a spec string (``baseline:NAME`` or a run folder).
    :param scenario: a shipped scenario name or a scenario YAML path.
    :param seeds: evaluation seeds (default: the scenario's protocol).
    :param episodes: episodes per seed (default: the scenario's protocol).
    :param fidelity: ``pixel`` or ``embedding``; default: the trained policy's training fidelity,
        else the scenario's.
    :param env_kwargs: scenario overrides (``{"episode_rounds": 8}``); a trained policy's own
        training overrides are *not* applied (the protocol's scenario is the scenario).
    :param reference: ``True`` evaluates (or reuses the cached) ``no_defense`` on the same
        seeds for the clean-accuracy drop, ``False`` skips it, a dict gives per-seed values.
    :param use_disk_cache: allow the on-disk ``no_defense`` cache.
    :param tensorboard: log every round's ``cmai/...`` scalars under this folder.
    :param out: if given, write ``rounds.csv``, ``summary.json`` and plots there.
    :param plots: write PNGs with ``out``.
    :param log: progress callback (one line per episode).
    """
    if isinstance(policy, (str, Path)):
        policy = resolve_policy(policy)
    from cmai_env.scenario import load_scenario

    scenario_name = load_scenario(str(scenario)).name
    protocol = protocol_for(scenario_name)
    seeds = list(protocol.seeds if seeds is None else seeds)
    episodes = protocol.episodes_per_seed if episodes is None else int(episodes)
    if not seeds:
        raise ValueError("at least one evaluation seed is needed")
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    if fidelity is None and not (env_kwargs or {}).get("fidelity"):
        fidelity = _policy_env_kwargs(policy).get("fidelity")
    spec = env_spec(scenario, fidelity, env_kwargs, policy_action_mode(policy))

    on_step = None
    recorder = None
    if tensorboard is not None:
        recorder = _make_recorder(tensorboard, policy.name, spec)
        on_step = recorder
    try:
        from agents.batched_evaluation import run_episodes_batched  # all seeds in one batched env (embedding)

        rows, records = run_episodes_batched(policy, spec, seeds, episodes, on_step=on_step, log=log)
    finally:
        if recorder is not None:
            recorder.close()
    if reference is True:
        if getattr(policy, "name", None) == "no_defense" and spec.env_id in (CONTINUOUS_ENV_ID, EVAL_ENV_ID):
            reference_values: dict[int, float] | None = {
                s: float(_mean([r.metrics["clean_acc"] for r in records if r.seed == s])) for s in seeds
            }
        else:
            reference_values = reference_clean_acc(spec, seeds, episodes, use_disk_cache=use_disk_cache, log=log)
    elif reference is False:
        reference_values = None
    else:
        reference_values = {int(k): float(v) for k, v in reference.items()}
    result = EvaluationResult(
        policy=policy.name,
        metadata=metadata(spec, policy.name, seeds, episodes),
        rows=rows,
        episodes=records,
        reference_clean_acc=reference_values,
    )
    if out is not None:
        result.save(out, plots=plots)
    return result


class _Recorder:
    """Writes the ``cmai/...`` tags with :class:`agents.callbacks.TensorBoardRecorder`.

    One event folder per evaluated episode, ``<folder>/<scenario>_<policy>/seed<S>_ep<E>``, with
    step = round, so TensorBoard overlays the seeds of one policy.
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
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None


def _make_recorder(folder: str | Path, policy_name: str, spec: EnvSpec) -> _Recorder:
    return _Recorder(folder, policy_name, spec.scenario_name)
