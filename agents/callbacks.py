"""TensorBoard metrics for CMAI runs, and the evaluation callbacks training and tuning use.

Tags
----
Per round (one ``env.step``; with several environments, the mean over them), step = the
number of environment steps so far (during training) or the round index (evaluation):

=====================================  ==========================================================
tag                                    value (from the env's ``info``)
=====================================  ==========================================================
``cmai/asr``                           probe attack success rate ``info["asr"]``
``cmai/clean_acc``                     probe clean accuracy
``cmai/system_asr``                    end-to-end ASR: flipped and not flagged by the detector
``cmai/false_rejection_rate``          share of clean probe pairs the detector rejects
``cmai/system_clean_acc``              clean probe pairs classified correctly and not rejected
``cmai/consistency_score``             probe consistency score (mean matched cosine)
``cmai/prediction_entropy``            clean probe predictions' mean entropy / ln K (1: uniform)
``cmai/beta_task``                     ``β_task`` the action chose
``cmai/beta_consist``                  ``β_consist``
``cmai/beta_adv``                      ``β_adv``
``cmai/detector_tpr``                  detector true-positive rate on the incoming traffic
``cmai/detector_fpr``                  detector false-positive rate on the incoming traffic
``cmai/latency/detection_rounds``      shift → detection, rounds (once per shift, see below)
``cmai/latency/detection_ms``          the same in wall-clock ms
``cmai/latency/weight_response_rounds``  detection → first weight change, rounds
``cmai/latency/weight_response_ms``    the same in ms (includes the policy's inference time)
``cmai/latency/recovery_rounds``       shift → scored (by default system) ASR back at or below the target, rounds
``cmai/latency/recovery_ms``           the same in ms
``cmai/compute_cost``                  share of the maximum attack-crafting steps spent on L_adv
``cmai/reward``                        the round's reward, unnormalised (sum of ``reward_terms``)
=====================================  ==========================================================

Per episode, at the step where the episode ends (episodes of several environments ending on
the same step are averaged):

* ``cmai/episode/<name>`` for every per-round tag except the latencies: the mean over the
  episode's rounds (``cmai/episode/asr``, ``cmai/episode/beta_adv``, ``cmai/episode/reward``, …);
* ``cmai/episode/return`` (sum of rewards) and ``cmai/episode/length`` (rounds);
* ``cmai/episode/latency/<name>``: the mean over the episode's shifts whose latency was
  measured (absent when none was), and ``cmai/episode/shifts``: the number of shifts.

During training the per-round and per-episode tags are written straight to the algorithm
logger's TensorBoard writer (as rl-baselines3-zoo's ``RawStatisticsCallback`` does), so they
keep round resolution instead of one value per ``log_interval`` and do not flood the console;
the per-episode means also go through ``self.logger.record_mean`` into the console/CSV table
(excluded from TensorBoard there, so no tag is written twice; keys longer than SB3's 36-character
console column are kept out of the console table, where they would be cut and collide). Evaluation
code writes the same tags with :class:`TensorBoardRecorder` (``step`` = round).

Latencies are written **once per shift, at the round where they are measured** (a shift's detection
latency at its detection round, its recovery latency at its recovery round), never repeated while
``info["latency"]`` keeps carrying the latest shift. A latency that is never measured (no detection, no
weight change, or ASR never back at the scenario's ``asr_target`` before the next shift or the episode's
end) is simply absent from TensorBoard: no point is written, and nothing is written as 0. A detection
latency of 0 rounds means the detector flagged the shift's own round (its traffic is observed before the
agent acts). Recovery is written only for shifts into attacking phases (a shift into a quiet phase
"recovers" trivially), so ``cmai/episode/latency/recovery_*`` is the mean ``summary.json`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat

from agents.records import detector_rates
from cmai_env.latency import LATENCY_FIELDS as LATENCY_KEYS

PREFIX = "cmai/"
EPISODE_PREFIX = "cmai/episode/"
#: Per-round metric tags read directly from ``info`` (tag → info key).
INFO_TAGS: dict[str, str] = {
    "cmai/asr": "asr",
    "cmai/clean_acc": "clean_acc",
    "cmai/system_asr": "system_asr",
    "cmai/false_rejection_rate": "false_rejection_rate",
    "cmai/system_clean_acc": "system_clean_acc",
    "cmai/consistency_score": "consistency_score",
    "cmai/prediction_entropy": "prediction_entropy",
    "cmai/detector_tpr": "detector_tpr",
    "cmai/detector_fpr": "detector_fpr",
    "cmai/compute_cost": "compute_cost",
}
BETA_TAGS: tuple[str, ...] = ("cmai/beta_task", "cmai/beta_consist", "cmai/beta_adv")
LATENCY_TAGS: tuple[str, ...] = tuple(f"cmai/latency/{key}" for key in LATENCY_KEYS)
#: Every per-round tag, in the order of the module docstring's table.
ROUND_TAGS: tuple[str, ...] = (
    "cmai/asr",
    "cmai/clean_acc",
    "cmai/system_asr",
    "cmai/false_rejection_rate",
    "cmai/system_clean_acc",
    "cmai/consistency_score",
    "cmai/prediction_entropy",
    *BETA_TAGS,
    "cmai/detector_tpr",
    "cmai/detector_fpr",
    *LATENCY_TAGS,
    "cmai/compute_cost",
    "cmai/reward",
)
#: Per-round tags written every round (the latencies only appear once measured).
ALWAYS_ROUND_TAGS: tuple[str, ...] = tuple(t for t in ROUND_TAGS if t not in LATENCY_TAGS)
#: Every per-episode tag that can appear.
EPISODE_TAGS: tuple[str, ...] = (
    *(EPISODE_PREFIX + t[len(PREFIX) :] for t in ALWAYS_ROUND_TAGS),
    "cmai/episode/return",
    "cmai/episode/length",
    "cmai/episode/shifts",
    *(EPISODE_PREFIX + t[len(PREFIX) :] for t in LATENCY_TAGS),
)


def info_reward(info: dict, fallback: float | None = None) -> float | None:
    """The round's unnormalised reward: the sum of ``info["reward_terms"]`` (else ``fallback``).

    Read from ``info`` because VecNormalize rescales the rewards the algorithm sees.
    """
    terms = info.get("reward_terms")
    if terms:
        return float(sum(terms.values()))
    return None if fallback is None else float(fallback)


#: SB3's console (``stdout``) output cuts keys to this many characters.
CONSOLE_KEY_LENGTH = 36


def console_exclude(tag: str, exclude: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """``exclude`` for ``logger.record*``: adds ``stdout`` for keys the console table would cut (and collide)."""
    out = exclude + (("stdout",) if len(tag) > CONSOLE_KEY_LENGTH else ())
    return out or None


def round_scalars(info: dict, reward: float | None = None) -> dict[str, float]:
    """The per-round tags of one environment's ``info``, with every latency the latest shift has measured.

    :class:`TensorBoardRecorder` writes latencies only at the round they are first measured; this
    function reports them as ``info`` carries them.

    :param info: the ``info`` dict of one ``env.step``.
    :param reward: the step's reward, used when ``info`` has no ``reward_terms``.
    """
    out: dict[str, float] = {}
    values = {**info, **detector_rates(info)}  # an undefined rate (over no pairs) gets no point
    for tag, key in INFO_TAGS.items():
        if values.get(key) is not None:
            out[tag] = float(values[key])
    betas = info.get("betas")
    if betas is not None:
        for tag, beta in zip(BETA_TAGS, np.asarray(betas, dtype=np.float64).reshape(-1)):
            out[tag] = float(beta)
    latency = info.get("latency") or {}
    for tag, key in zip(LATENCY_TAGS, LATENCY_KEYS):
        if latency.get(key) is not None:
            out[tag] = float(latency[key])
    value = info_reward(info, reward)
    if value is not None:
        out["cmai/reward"] = value
    return out


def mean_scalars(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Tag-wise mean over the rows that have the tag."""
    keys = sorted({k for row in rows for k in row})
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


def _counts(shift: dict, key: str) -> bool:
    """Whether ``shift``'s ``key`` latency counts: recovery only after shifts into attacking phases
    (a quiet phase "recovers" trivially), as in ``summary.json`` (:func:`agents.records.episode_record`)."""
    return not key.startswith("recovery") or bool(shift.get("attacking"))


class EpisodeStats:
    """Accumulates one environment's rounds into the ``cmai/episode/...`` summary."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.shifts: dict[int, dict[str, Any]] = {}

    def add(self, info: dict, scalars: dict[str, float]) -> dict[str, float]:
        """Add one round (its ``info`` and its :func:`round_scalars`).

        :return: the latency tags measured for the first time in this round (``cmai/latency/<key>``).
        """
        self.rows.append({k: v for k, v in scalars.items() if k not in LATENCY_TAGS})
        latency = info.get("latency") or {}
        if latency.get("shift_round") is None:
            return {}
        # info carries the latest shift's record, updated in place as latencies are measured.
        before = self.shifts.get(int(latency["shift_round"]), {})
        self.shifts[int(latency["shift_round"])] = dict(latency)
        return {
            tag: float(latency[key])
            for tag, key in zip(LATENCY_TAGS, LATENCY_KEYS)
            if latency.get(key) is not None and before.get(key) is None and _counts(latency, key)
        }

    def summary(self) -> dict[str, float]:
        """The episode's tags (see the module docstring)."""
        out = {EPISODE_PREFIX + k[len(PREFIX) :]: v for k, v in mean_scalars(self.rows).items()}
        out["cmai/episode/return"] = float(sum(row.get("cmai/reward", 0.0) for row in self.rows))
        out["cmai/episode/length"] = float(len(self.rows))
        out["cmai/episode/shifts"] = float(len(self.shifts))
        for key in LATENCY_KEYS:
            values = [s[key] for s in self.shifts.values() if s.get(key) is not None and _counts(s, key)]
            if values:
                out[f"cmai/episode/latency/{key}"] = float(np.mean(values))
        return out


class TensorBoardRecorder:
    """Writes the ``cmai/...`` tags (module docstring) to TensorBoard, one call per round.

    Used by :class:`CMAIMetricsCallback` during training and by evaluation code directly::

        recorder = TensorBoardRecorder("runs/tb/eval_ppo")
        obs, info = env.reset(seed=0)
        for t in range(n_rounds):
            obs, reward, terminated, truncated, info = env.step(policy.predict(obs)[0])
            recorder.record_round(info, step=t, done=terminated or truncated, reward=reward)
        recorder.close()

    :param log_dir: folder for a new event file (SB3's ``TensorBoardOutputFormat``); or
    :param output: an existing ``TensorBoardOutputFormat`` to write through (not closed here).
        With neither, the recorder only computes the scalars (for the console table).
    :param n_envs: number of parallel environments whose episodes are tracked.
    """

    def __init__(self, log_dir: str | Path | None = None, output: TensorBoardOutputFormat | None = None, n_envs: int = 1) -> None:
        if log_dir is not None and output is not None:
            raise ValueError("pass log_dir or output, not both")
        self._owns_output = log_dir is not None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            output = TensorBoardOutputFormat(str(log_dir))
        self.output = output
        self.log_dir = None if output is None else Path(output.writer.log_dir)
        self.episodes = [EpisodeStats() for _ in range(n_envs)]
        self.last_round: dict[str, float] = {}
        self.last_episode: dict[str, float] = {}

    @classmethod
    def from_logger(cls, logger: Logger, n_envs: int = 1) -> TensorBoardRecorder:
        """A recorder writing through ``logger``'s TensorBoard output (scalars only if it has none)."""
        output = next((f for f in logger.output_formats if isinstance(f, TensorBoardOutputFormat)), None)
        return cls(output=output, n_envs=n_envs)

    @property
    def writing(self) -> bool:
        """Whether the scalars reach a TensorBoard event file."""
        return self.output is not None

    def write(self, scalars: dict[str, float], step: int) -> None:
        """Write ``scalars`` at ``step`` (no-op without an output)."""
        if self.output is not None and scalars:
            self.output.write(scalars, {k: None for k in scalars}, int(step))

    def record_step(
        self,
        infos: Sequence[dict],
        dones: Sequence[bool] | np.ndarray,
        step: int,
        rewards: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Record one vectorised step: per-round means over envs, then any finished episodes.

        :param infos: one ``info`` per environment.
        :param dones: whether each environment's episode ended with this step.
        :param step: the x-axis value (environment steps so far, or the round).
        :param rewards: the step's rewards (only used where ``info`` lacks ``reward_terms``).
        :return: the per-round scalars written, and the summaries of the episodes that ended.
        """
        if len(self.episodes) < len(infos):
            self.episodes += [EpisodeStats() for _ in range(len(infos) - len(self.episodes))]
        rows = []
        finished: list[dict[str, float]] = []
        for i, info in enumerate(infos):
            reward = None if rewards is None else float(np.asarray(rewards).reshape(-1)[i])
            scalars = round_scalars(info, reward)
            new_latencies = self.episodes[i].add(info, scalars)
            rows.append({**{k: v for k, v in scalars.items() if k not in LATENCY_TAGS}, **new_latencies})
            if bool(np.asarray(dones).reshape(-1)[i]):
                finished.append(self.episodes[i].summary())
                self.episodes[i] = EpisodeStats()
        self.last_round = mean_scalars(rows)
        self.write(self.last_round, step)
        if finished:
            self.last_episode = mean_scalars(finished)
            self.write(self.last_episode, step)
        return self.last_round, finished

    def record_round(self, info: dict, step: int, done: bool = False, reward: float | None = None) -> dict[str, float]:
        """Single-environment form of :meth:`record_step`; returns the round's scalars."""
        scalars, _ = self.record_step([info], [done], step, None if reward is None else [reward])
        return scalars

    def flush(self) -> None:
        if self.output is not None:
            self.output.writer.flush()

    def close(self) -> None:
        """Flush, and close the event file if this recorder opened it."""
        self.flush()
        if self._owns_output and self.output is not None:
            self.output.close()
            self.output = None


class CMAIMetricsCallback(BaseCallback):
    """Logs the ``cmai/...`` tags (module docstring) from the env infos while an agent trains.

    Reads ``self.locals["infos"]`` (and ``dones``, ``rewards``) after every vectorised step.

    :param tensorboard_dir: write to a new event file in this folder instead of the
        algorithm's TensorBoard output (which is used when the model was created with
        ``tensorboard_log``; with neither, only the per-episode means reach ``self.logger``).
    :param verbose: 0 silent, 1 prints each finished episode's mean ASR and clean accuracy.
    """

    def __init__(self, tensorboard_dir: str | Path | None = None, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        self.tensorboard_dir = tensorboard_dir
        self.recorder: TensorBoardRecorder | None = None
        self.episodes_seen = 0

    def _init_callback(self) -> None:
        n_envs = self.training_env.num_envs if self.training_env is not None else 1
        if self.tensorboard_dir is not None:
            self.recorder = TensorBoardRecorder(self.tensorboard_dir, n_envs=n_envs)
        else:
            self.recorder = TensorBoardRecorder.from_logger(self.logger, n_envs=n_envs)

    def _on_step(self) -> bool:
        assert self.recorder is not None, "callback used before init_callback()"
        infos = self.locals.get("infos", [])
        dones = self.locals.get("dones", np.zeros(len(infos), dtype=bool))
        _, finished = self.recorder.record_step(infos, dones, self.num_timesteps, self.locals.get("rewards"))
        exclude = ("tensorboard",) if self.recorder.writing else ()
        for summary in finished:
            self.episodes_seen += 1
            for tag, value in summary.items():
                self.logger.record_mean(tag, value, exclude=console_exclude(tag, exclude))
            if self.verbose >= 1:
                print(
                    f"episode {self.episodes_seen}: asr {summary.get('cmai/episode/asr', float('nan')):.3f}, "
                    f"clean_acc {summary.get('cmai/episode/clean_acc', float('nan')):.3f}, "
                    f"return {summary['cmai/episode/return']:.3f}"
                )
        return True

    def _on_training_end(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


class FinalEvalCallback(EvalCallback):
    """``EvalCallback`` that also evaluates once when training ends (unless it just did).

    So every run folder has ``evaluations.npz`` and ``best_model.zip`` even when the budget is
    not a multiple of ``eval_freq``. Arguments as for :class:`EvalCallback`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_eval_call = 0

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            self._last_eval_call = self.n_calls
        return super()._on_step()

    def _on_training_end(self) -> None:
        if self.eval_freq > 0 and self.n_calls > 0 and self._last_eval_call != self.n_calls:
            eval_freq, self.eval_freq = self.eval_freq, 1  # n_calls % 1 == 0: evaluate now
            try:
                self._on_step()
            finally:
                self.eval_freq = eval_freq
        super()._on_training_end()
