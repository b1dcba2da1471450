"""The attack stream: a scenario's schedule unrolled into one plan per defence round.

:class:`AttackStream` expands the scenario's phases into a *timeline* of segments (rounds
``[start, end)`` of one phase) when it is built and at every :meth:`AttackStream.reset`:

* ``sequential``: the phases in order;
* ``periodic``: the phase list ``repeat`` times;
* ``random`` (domain randomisation): ``randomization.n_phases`` phases drawn uniformly from
  ``phases`` (never the same phase twice in a row when there are several), each lasting a
  uniform number of rounds in ``randomization.rounds`` (inclusive); if they fall short of the
  episode, more are drawn the same way until it is filled.

The timeline is then fitted to the episode length (``episode_rounds``, else the schedule's
total): truncated, or its last segment extended. Each round ``t`` gets a :class:`RoundPlan`:
the attack mixture (weights summing to 1), the adversarial share of the incoming batch, and
whether the attack pattern changes there (``shift``).

Gradual transitions. In the first ``R = transition.rounds`` rounds of a segment whose phase
has a gradual transition, round ``i`` (0-based within the segment) blends the previous
segment's phase ``P`` into the new phase ``N`` with

    b = (i + 1) / (R + 1)                                   (b = 1 from round R on)
    adversarial_share = (1 − b)·share_P + b·share_N
    weight_a ∝ (1 − b)·share_P·w_P,a + b·share_N·w_N,a

i.e. the *traffic* each attack sends moves linearly from ``P``'s to ``N``'s; with equal
shares the weights themselves are the linear blend ``(1 − b)·w_P + b·w_N``. Attacks are the
same entry when name and parameters agree. Abrupt transitions switch at the segment's first
round (``b = 1`` throughout).

All randomness comes from the generator given to the constructor or :meth:`reset` (unless
``randomization.seed`` pins the timeline), so the same seed gives the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cmai_env.scenario import Phase, Scenario


@dataclass(frozen=True)
class MixtureEntry:
    """One attack of a round's mixture.

    :param name: registered attack name.
    :param params: the attack's parameters (fractions already floats); pass as ``make_attack(name, **params)``.
    :param weight: share of the round's adversarial pairs this attack crafts (a round's weights sum to 1).
    """

    name: str
    params: dict[str, Any]
    weight: float

    @property
    def key(self) -> tuple:
        """Identity of the attack configuration (name and sorted parameters)."""
        return (self.name, tuple(sorted(self.params.items())))


@dataclass(frozen=True)
class RoundPlan:
    """What the stream sends in one round.

    :param round: 0-based round index.
    :param phase: name of the phase of this round's segment.
    :param phase_index: index of that segment in the expanded timeline (not in ``scenario.phases``).
    :param mixture: the active attacks with weights summing to 1; empty in quiet rounds.
    :param adversarial_share: share of the incoming batch that is adversarial.
    :param shift: True on the first round of a segment (after the first) whose attack pattern
        differs from the previous segment's.
    :param blend: progress of a gradual transition in ``(0, 1]``; 1 outside transitions.
    :param corruption: ``(name, severity)`` of the phase's image corruption; ``None``: clean data.
    """

    round: int
    phase: str
    phase_index: int
    mixture: tuple[MixtureEntry, ...]
    adversarial_share: float
    shift: bool
    blend: float = 1.0
    corruption: tuple[str, int] | None = None


@dataclass(frozen=True)
class Segment:
    """Rounds ``[start, end)`` of the timeline spent in ``phase``."""

    start: int
    end: int
    phase: Phase


class AttackStream:
    """Round-by-round attack plans of a scenario (see the module docstring).

    :param scenario: a validated scenario.
    :param rng: generator for the random schedule's draws (unused by other schedules).
    """

    def __init__(self, scenario: Scenario, rng: np.random.Generator) -> None:
        self.scenario = scenario
        self.segments: list[Segment] = []
        self._plans: list[RoundPlan] = []
        self.reset(rng)

    def reset(self, rng: np.random.Generator) -> None:
        """Expand the schedule again (a new draw for ``random`` schedules)."""
        self.segments = _fit(_expand(self.scenario, rng), self.scenario.episode_length())
        self._plans = _plans(self.segments)

    def __len__(self) -> int:
        return len(self._plans)

    def plan(self, t: int) -> RoundPlan:
        """The plan of round ``t`` (0 ≤ t < ``len(self)``)."""
        if not 0 <= t < len(self._plans):
            raise IndexError(f"round {t} is outside the episode's {len(self._plans)} rounds")
        return self._plans[t]

    def __iter__(self):
        return iter(self._plans)

    @property
    def timeline(self) -> list[tuple[int, int, str]]:
        """``(start_round, end_round_exclusive, phase_name)`` per segment (for plot shading)."""
        return [(s.start, s.end, s.phase.name) for s in self.segments]

    @property
    def shift_rounds(self) -> list[int]:
        """Rounds whose plan has ``shift`` set."""
        return [p.round for p in self._plans if p.shift]

    def __repr__(self) -> str:
        return f"AttackStream({self.scenario.name!r}, rounds={len(self)}, timeline={self.timeline})"


# ----------------------------------------------------------------------------- expansion
def _expand(scenario: Scenario, rng: np.random.Generator) -> list[tuple[Phase, int]]:
    """(phase, rounds) in schedule order, before fitting to the episode length."""
    if scenario.schedule == "sequential":
        return [(p, p.rounds) for p in scenario.phases]
    if scenario.schedule == "periodic":
        return [(p, p.rounds) for _ in range(scenario.repeat) for p in scenario.phases]
    spec = scenario.randomization
    assert spec is not None  # validated: schedule random has randomization
    draw = np.random.default_rng(spec.seed) if spec.seed is not None else rng
    low, high = spec.rounds
    n = len(scenario.phases)
    out: list[tuple[Phase, int]] = []
    previous = -1
    # Draw n_phases phases, and more while they fall short of the episode: extending the last
    # one instead would give it a duration outside the randomisation range.
    length = scenario.episode_length()
    while len(out) < spec.n_phases or sum(rounds for _, rounds in out) < length:
        if previous < 0 or n == 1:
            index = int(draw.integers(n))
        else:  # uniform over the other phases: consecutive segments always differ
            index = int(draw.integers(n - 1))
            index += index >= previous
        out.append((scenario.phases[index], int(draw.integers(low, high + 1))))
        previous = index
    return out


def _fit(parts: list[tuple[Phase, int]], length: int) -> list[Segment]:
    """Lay the parts end to end, truncated or with the last one extended to ``length`` rounds."""
    segments: list[Segment] = []
    start = 0
    for phase, rounds in parts:
        if start >= length:
            break
        end = min(start + rounds, length)
        segments.append(Segment(start, end, phase))
        start = end
    if start < length:
        last = segments[-1]
        segments[-1] = Segment(last.start, length, last.phase)
    return segments


# ----------------------------------------------------------------------------- plans
def _config(phase: Phase) -> tuple[float, dict[tuple, MixtureEntry]]:
    """(adversarial share, entries keyed by attack configuration with normalised weights)."""
    if not phase.attacks:
        return 0.0, {}
    total = sum(a.weight for a in phase.attacks)
    entries: dict[tuple, MixtureEntry] = {}
    for attack in phase.attacks:
        entry = MixtureEntry(attack.name, dict(attack.params), attack.weight / total)
        if entry.key in entries:  # the same attack listed twice: one entry, summed weight
            entry = MixtureEntry(entry.name, entry.params, entries[entry.key].weight + entry.weight)
        entries[entry.key] = entry
    return phase.adversarial_share, entries


def _blend(old: tuple[float, dict], new: tuple[float, dict], b: float) -> tuple[float, tuple[MixtureEntry, ...]]:
    """Linear blend of two configurations' traffic at progress ``b`` (see the module docstring)."""
    (share_old, old_entries), (share_new, new_entries) = old, new
    share = (1 - b) * share_old + b * share_new
    traffic_old, traffic_new = (1 - b) * share_old, b * share_new
    if traffic_old + traffic_new <= 0:  # no adversarial traffic either side: blend the weights alone
        traffic_old, traffic_new = 1 - b, b
    raw: dict[tuple, tuple[MixtureEntry, float]] = {key: (e, traffic_new * e.weight) for key, e in new_entries.items()}
    for key, entry in old_entries.items():
        kept, weight = raw.get(key, (entry, 0.0))
        raw[key] = (kept, weight + traffic_old * entry.weight)
    total = sum(w for _, w in raw.values())
    mixture = tuple(MixtureEntry(e.name, dict(e.params), w / total) for e, w in raw.values() if w > 0)
    return share, mixture


def _plans(segments: list[Segment]) -> list[RoundPlan]:
    plans: list[RoundPlan] = []
    previous_config: tuple[float, dict] | None = None
    for k, segment in enumerate(segments):
        config = _config(segment.phase)
        transition = segment.phase.transition
        ramp = 0
        if previous_config is not None and transition.type == "gradual":
            ramp = min(transition.rounds, segment.end - segment.start)
        changed = previous_config is not None and _pattern(previous_config) != _pattern(config)
        for t in range(segment.start, segment.end):
            i = t - segment.start
            if i < ramp:
                b = (i + 1) / (ramp + 1)
                share, mixture = _blend(previous_config, config, b)  # type: ignore[arg-type]
            else:
                b = 1.0
                share = config[0]
                mixture = tuple(MixtureEntry(e.name, dict(e.params), e.weight) for e in config[1].values())
            corruption = None if segment.phase.corruption is None else segment.phase.corruption.key
            plans.append(RoundPlan(t, segment.phase.name, k, mixture, float(share), changed and i == 0, float(b), corruption))
        previous_config = config
    return plans


def attack_views(scenario: Scenario) -> set[tuple[tuple, tuple[str, int] | None]]:
    """Every ``(attack configuration key, image corruption)`` pairing a round of ``scenario`` can send.

    A round serves its phase's images (:attr:`RoundPlan.corruption`) and its phase's attacks, and
    during a gradual transition also the attacks of the segment before (:func:`_plans`): the phase
    before it in the list (``sequential``; ``periodic`` also wraps from the last to the first
    when it repeats), or any other phase (``random``). So a phase's attacks meet another phase's
    images only across a gradual transition. Keys as :attr:`MixtureEntry.key`; ``None``: clean.
    """
    phases = scenario.phases
    pairs: set[tuple[tuple, tuple[str, int] | None]] = set()
    for j, phase in enumerate(phases):
        images = None if phase.corruption is None else phase.corruption.key
        sources = [phase]
        if phase.transition.type == "gradual":
            if scenario.schedule == "random":
                sources += [other for i, other in enumerate(phases) if i != j] or [phase]
            elif j > 0:
                sources.append(phases[j - 1])
            elif scenario.schedule == "periodic" and scenario.repeat > 1:
                sources.append(phases[-1])
        for source in sources:
            pairs.update((entry.key, images) for entry in _config(source)[1].values())
    return pairs


def _pattern(config: tuple[float, dict]) -> tuple:
    share, entries = config
    return (round(share, 12), frozenset((key, round(e.weight, 12)) for key, e in entries.items()))


__all__ = ["AttackStream", "MixtureEntry", "RoundPlan", "Segment", "attack_views"]
