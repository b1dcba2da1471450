"""Adaptation latency: how long the defence takes to notice and answer a shift in the attacks.

A round ``t`` has four moments: its traffic is drawn (start), its traffic is observed (the
detector's flag rate is known and the observation is returned to the agent), the agent's action
arrives, and the update + probe finish (end). For every shift (a round ``s`` where the attack
stream changes phase) three latencies are measured, in rounds and in wall-clock milliseconds:

* **detection**: from the shift to the first round ``d ≥ s`` whose flag rate crosses the
  flag-rate threshold in the direction of the new phase (above it when the new phase attacks, at
  or below it when it is quiet), or whose change detector (ADWIN / Page–Hinkley) fires.
  ms: from the start of round ``s`` to the observation of round ``d``.
* **weight response**: from detection to the first round ``w ≥ d`` whose action moves the loss
  weights by more than ``beta_delta`` (L1, default 0.1) away from the weights in force when the
  detection happened. ms: from the moment round ``d``'s observation was returned to the moment
  round ``w``'s action arrived, so the policy's inference time is included.
* **recovery**: from the shift to the first round ``r ≥ s`` whose scored ASR (the one the reward
  reads: the system's ``system_asr`` by default, the model's probe ASR under ``reward: {metrics:
  model}``) is at or below the scenario's ``asr_target``. ms: from the start of round ``s`` to the
  end of round ``r``.

Latencies stay ``None`` until the event happens (or forever, if the episode ends first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


#: The six adaptation latencies, as keys of ``info["latency"]`` (TensorBoard: ``cmai/latency/<key>``).
LATENCY_FIELDS: tuple[str, ...] = (
    "detection_rounds",
    "detection_ms",
    "weight_response_rounds",
    "weight_response_ms",
    "recovery_rounds",
    "recovery_ms",
)


@dataclass
class ShiftRecord:
    """Latencies of one shift; ``None`` until measured."""

    shift_round: int
    phase: str
    attacking: bool
    detection_round: int | None = None
    detection_rounds: int | None = None
    detection_ms: float | None = None
    weight_response_rounds: int | None = None
    weight_response_ms: float | None = None
    recovery_rounds: int | None = None
    recovery_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class LatencyTracker:
    """Follows shifts, detections, weight responses and recoveries round by round.

    :param flag_rate_threshold: flag rate that counts as "the detector sees an attack".
    :param asr_target: ASR at or below which the model counts as recovered.
    :param beta_delta: L1 change of β that counts as a weight response.
    """

    def __init__(self, flag_rate_threshold: float, asr_target: float, beta_delta: float = 0.1) -> None:
        self.flag_rate_threshold = flag_rate_threshold
        self.asr_target = asr_target
        self.beta_delta = beta_delta
        self.records: list[ShiftRecord] = []
        self._round_start_ms: dict[int, float] = {}
        self._observed_ms: dict[int, float] = {}
        self._detection_betas: np.ndarray | None = None

    def reset(self) -> None:
        self.records.clear()
        self._round_start_ms.clear()
        self._observed_ms.clear()
        self._detection_betas = None

    @property
    def current(self) -> ShiftRecord | None:
        return self.records[-1] if self.records else None

    def traffic_started(self, t: int, now_ms: float, shift: bool, phase: str, attacking: bool) -> None:
        """Round ``t``'s traffic is about to be drawn."""
        self._round_start_ms[t] = now_ms
        if shift:
            self.records.append(ShiftRecord(shift_round=t, phase=phase, attacking=attacking))
            self._detection_betas = None
            # Older rounds are never looked up again; keep the dicts small.
            for old in [k for k in self._round_start_ms if k < t]:
                self._round_start_ms.pop(old, None)
                self._observed_ms.pop(old, None)

    def traffic_observed(self, t: int, now_ms: float, flag_rate: float, drift: bool, betas_in_force: np.ndarray) -> None:
        """Round ``t``'s flag rate is known and its observation goes to the agent now."""
        self._observed_ms[t] = now_ms
        record = self.current
        if record is None or record.detection_round is not None:
            return
        crossed = flag_rate > self.flag_rate_threshold if record.attacking else flag_rate <= self.flag_rate_threshold
        if crossed or drift:
            record.detection_round = t
            record.detection_rounds = t - record.shift_round
            record.detection_ms = now_ms - self._round_start_ms[record.shift_round]
            self._detection_betas = np.asarray(betas_in_force, dtype=np.float64).copy()

    def action_received(self, t: int, now_ms: float, betas: np.ndarray) -> None:
        """Round ``t``'s action arrived with loss weights ``betas``."""
        record = self.current
        if record is None or record.detection_round is None or record.weight_response_rounds is not None:
            return
        if float(np.abs(np.asarray(betas) - self._detection_betas).sum()) > self.beta_delta:
            record.weight_response_rounds = t - record.detection_round
            record.weight_response_ms = now_ms - self._observed_ms[record.detection_round]

    def round_finished(self, t: int, now_ms: float, asr: float) -> None:
        """Round ``t``'s update and probe are done; ``asr`` is its scored ASR (system ASR by default)."""
        record = self.current
        if record is not None and record.recovery_rounds is None and asr <= self.asr_target:
            record.recovery_rounds = t - record.shift_round
            record.recovery_ms = now_ms - self._round_start_ms[record.shift_round]

    def latest(self) -> dict:
        """The most recent shift's latencies (all keys present, ``None`` where not measured)."""
        if self.current is None:
            return {k: None for k in ShiftRecord.__dataclass_fields__}
        return self.current.as_dict()
