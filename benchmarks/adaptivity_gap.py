"""Does the environment reward adapting the loss weights? Task-only, best fixed β and best schedule.

For each scenario, on the embedding fidelity's batched vector environment:

1. **Fixed β**: every weight vector of the grid (the simplex with step 1/3, ``DISCRETE_BETAS``)
   held for the whole episode, on the *search* seeds; the best by mean return is "best fixed".
2. **Schedule search**: coordinate ascent over per-phase β (one β per phase name), starting from
   the best fixed β, scoring whole episodes on the search seeds; a phase's β changes only when
   the mean return improves, so the schedule is never worse than the best fixed β on those seeds.
   Unlike a greedy per-phase oracle it sees the value of preparing before an attack arrives.
3. **Held-out evaluation**: task-only β = (1, 0, 0), the best fixed β and the best schedule are
   replayed on separate *evaluation* seeds (environment seeds ``100000 + s``, the frozen protocol's),
   so the search's selection bias does not inflate the gap. The schedule is also replayed one
   round late ("reactive"): a gate reading the stream learns of a phase only from its first round.
   Printed: mean return, the model's ASR and the end-to-end ``system_asr`` (model + detector; both
   over attacked rounds) and clean accuracy with 95% t-intervals, and the paired gaps schedule −
   best fixed and reactive − best fixed with their 95% CIs, and the former's share of
   schedule − task-only.

The gap is the most a gate that knows the schedule could win over the best fixed weighting; the
reactive gap is what a gate that reads the stream and plays the schedule's β can win. A schedule
holds one β per phase *name*, and every environment plays it on its own timeline, so a random
schedule (``randomized_training``: a new phase order and new lengths per seed) is measured too:
there the schedule is the best policy that knows the current phase, and a fixed timeline would
not exist to prepare for.

With ``--objective system_asr`` the fixed-β choice and the search minimise the mean system ASR
over attacked rounds instead of maximising return, among the schedules whose mean clean accuracy
is at most ``--clean-allowance`` (default 0.02, point 6's held-out bound) below task-only's on the
search seeds. That estimates how far a policy playing one β per phase can lower system ASR,
whatever the reward pays for (the search is coordinate ascent: the best it finds, not a proven
optimum), and runs on evaluation-only scenarios too (``unseen_attacks``: the search plays the
search seeds, never the frozen evaluation seeds). It prints the schedule's system ASR against the
best fixed β's, paired, and their ratio: point 6's held-out clause asks a gate for ≤ 0.7× the best
static weighting's, and a ratio above 0.7 says the search found no schedule that gets there.
``--segments K`` gives each phase K β, one per equal part of it (a gate can change β every round;
K parts let the search build up a defence early in a phase and drop it later, or the reverse).

    python benchmarks/adaptivity_gap.py [--scenarios abrupt_shift periodic] [--search-seeds 0 1 2 3 4] [--eval-seeds 0 1 2 3 4]
    python benchmarks/adaptivity_gap.py --scenarios unseen_attacks --objective system_asr [--segments 3]
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

import cmai_env  # noqa: F401  (registers the environments)
from agents.protocol import CONTINUOUS_ENV_ID, EVAL_ENV_ID, EVAL_SEED_OFFSET, DistinctSeeds
from agents.stats import bounds_for, paired_difference, t_interval
from cmai_env.cli.common import assignments_option, positive_int
from cmai_env.env import DISCRETE_BETAS, action_from_betas
from cmai_env.scenario import Scenario, apply_overrides, load_scenario, scenario_option, scenarios_available

ENV_ID = CONTINUOUS_ENV_ID
#: Environment seed of search seed ``s`` (evaluation seeds use the frozen protocol's ``EVAL_SEED_OFFSET``).
SEARCH_SEED_OFFSET = 200_000
TASK_ONLY = 0  # DISCRETE_BETAS[0] == (1, 0, 0)
#: Largest batch of environments stepped at once.
MAX_BATCH = 256
#: What the fixed-β choice and the search optimise: mean return, or mean system ASR (lower is better).
OBJECTIVES = ("return", "system_asr")
#: ``--objective system_asr``: the most a schedule's mean clean accuracy may fall below task-only's.
DEFAULT_CLEAN_ALLOWANCE = 0.02

Schedule = tuple[int, ...]  # one DISCRETE_BETAS index per slot: per phase name (first-appearance order) × segment


@dataclass
class Episodes:
    """Per (schedule, seed): return, model and system ASR over attacked rounds, mean clean accuracy."""

    returns: np.ndarray
    asr: np.ndarray
    system_asr: np.ndarray
    clean_acc: np.ndarray


def load_spec(scenario: str | Scenario, overrides: dict) -> Scenario:
    """The scenario (a shipped name, a path or a :class:`Scenario`) with ``overrides`` applied."""
    spec = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    return apply_overrides(spec, overrides) if overrides else spec


def env_id(spec: Scenario) -> str:
    """The registered ID that plays ``spec``: evaluation-only scenarios (``unseen_attacks``) need the evaluation ID."""
    return EVAL_ENV_ID if spec.evaluation_only else ENV_ID


def phase_names(spec: Scenario) -> list[str]:
    """The scenario's distinct phase names in declaration order: a schedule holds one β per name."""
    return list(dict.fromkeys(phase.name for phase in spec.phases))


def slot_labels(names: list[str], segments: int) -> list[str]:
    """A schedule's slots: one per phase name, or ``segments`` per name (``name[k/segments]``)."""
    return list(names) if segments == 1 else [f"{n}[{k + 1}/{segments}]" for n in names for k in range(segments)]


def slot_per_round(timeline: list[tuple[int, int, str]], n_rounds: int, names: list[str], segments: int = 1) -> list[int]:
    """The schedule slot of every round: its phase name's index, times ``segments``, plus which of
    ``segments`` equal parts of that phase's stretch of the timeline the round falls in (a phase
    met twice restarts at part 1). Rounds past the timeline's end stay in its last part."""
    slots = []
    for t in range(n_rounds):
        start, end, name = next(((s, e, p) for s, e, p in timeline if s <= t < e), timeline[-1])
        part = min(segments - 1, (min(t, end - 1) - start) * segments // max(end - start, 1))
        slots.append(names.index(name) * segments + part)
    return slots


def play(scenario: str, schedules: list[Schedule], seeds: list[int], seed_offset: int, overrides: dict, lag: int = 0,
         segments: int = 1) -> Episodes:
    """One episode per (schedule, seed) on the batched environment; arrays are ``(schedules, seeds)``.

    ``lag`` rounds: round ``t`` plays the β of the slot of round ``t − lag`` (the first slot's before
    that), which is what a gate reading the stream's past rounds can do; 0 plays the true phase.
    ``segments``: each schedule holds one β per part of each phase (:func:`slot_per_round`).
    Each environment follows its own timeline (:meth:`CMAIVectorEnv.timelines` after ``reset``).
    """
    spec = load_spec(scenario, overrides)
    names, n_rounds = phase_names(spec), spec.episode_length()
    jobs = list(itertools.product(range(len(schedules)), seeds))
    returns = np.zeros(len(jobs))
    asr = np.zeros(len(jobs))
    system_asr = np.zeros(len(jobs))
    clean = np.zeros(len(jobs))
    for start in range(0, len(jobs), MAX_BATCH):
        batch = jobs[start : start + MAX_BATCH]
        envs = gym.make_vec(env_id(spec), num_envs=len(batch), vectorization_mode="vector_entry_point", scenario=scenario,
                            fidelity="embedding", **overrides)
        envs.reset(seed=[seed_offset + seed for _, seed in batch])
        # Each environment's own timeline: a random schedule draws one per seed; the others share one.
        phase_at = [slot_per_round(timeline, n_rounds, names, segments) for timeline in envs.unwrapped.timelines()]
        total = np.zeros(len(batch))
        attacked_asr = [[] for _ in batch]
        attacked_system = [[] for _ in batch]
        accs = [[] for _ in batch]
        for t in range(n_rounds):
            actions = np.stack([action_from_betas(DISCRETE_BETAS[schedules[k][phase_at[i][max(t - lag, 0)]]])
                                for i, (k, _) in enumerate(batch)]).astype(np.float32)
            _, rewards, terminated, truncated, infos = envs.step(actions)
            total += rewards
            for i in range(len(batch)):
                accs[i].append(float(infos["clean_acc"][i]))
                if infos["attacks"][i]:
                    attacked_asr[i].append(float(infos["asr"][i]))
                    attacked_system[i].append(float(infos["system_asr"][i]))
        envs.close()
        returns[start : start + len(batch)] = total
        asr[start : start + len(batch)] = [np.mean(a) if a else 0.0 for a in attacked_asr]
        system_asr[start : start + len(batch)] = [np.mean(a) if a else 0.0 for a in attacked_system]
        clean[start : start + len(batch)] = [np.mean(a) for a in accs]
    shape = (len(schedules), len(seeds))
    return Episodes(returns.reshape(shape), asr.reshape(shape), system_asr.reshape(shape), clean.reshape(shape))


def scores(episodes: Episodes, objective: str, task_only_clean: float, clean_allowance: float) -> np.ndarray:
    """One score per schedule (higher is better), mean over seeds: the return, or for ``system_asr``
    minus the system ASR, with ``-inf`` for schedules whose mean clean accuracy is more than
    ``clean_allowance`` below ``task_only_clean``."""
    if objective == "return":
        return episodes.returns.mean(axis=1)
    admissible = episodes.clean_acc.mean(axis=1) >= task_only_clean - clean_allowance - 1e-12
    return np.where(admissible, -episodes.system_asr.mean(axis=1), -np.inf)


def search(scenario: str, seeds: list[int], overrides: dict, passes: int = 2, objective: str = "return",
           clean_allowance: float = DEFAULT_CLEAN_ALLOWANCE, segments: int = 1) -> tuple[Schedule, Schedule, int]:
    """(best fixed schedule, best searched schedule, episodes played) on the search seeds, by ``objective``;
    a schedule holds one β per slot (``segments`` per phase name)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: allowed {', '.join(OBJECTIVES)}")
    n_slots = len(phase_names(load_spec(scenario, overrides))) * segments
    fixed = [tuple([b] * n_slots) for b in range(len(DISCRETE_BETAS))]
    fixed_episodes = play(scenario, fixed, seeds, SEARCH_SEED_OFFSET, overrides, segments=segments)
    task_only_clean = float(fixed_episodes.clean_acc[TASK_ONLY].mean())
    score = lambda episodes: scores(episodes, objective, task_only_clean, clean_allowance)  # noqa: E731
    fixed_scores = score(fixed_episodes)
    played = len(fixed) * len(seeds)
    best_fixed = fixed[int(np.argmax(fixed_scores))]
    best, best_score = best_fixed, float(fixed_scores.max())
    for _ in range(passes):
        improved = False
        for slot in range(n_slots):
            candidates = [best[:slot] + (b,) + best[slot + 1 :] for b in range(len(DISCRETE_BETAS)) if b != best[slot]]
            candidate_scores = score(play(scenario, candidates, seeds, SEARCH_SEED_OFFSET, overrides, segments=segments))
            played += len(candidates) * len(seeds)
            if candidate_scores.max() > best_score + 1e-9:
                best, best_score, improved = candidates[int(np.argmax(candidate_scores))], float(candidate_scores.max()), True
        if not improved:
            break
    return best_fixed, best, played


def _betas(schedule: Schedule, names: list[str]) -> str:
    unique = {s for s in schedule}
    if len(unique) == 1:
        return "(" + ", ".join(f"{b:.2f}" for b in DISCRETE_BETAS[schedule[0]]) + ")"
    return "; ".join(f"{n}: (" + ", ".join(f"{b:.2f}" for b in DISCRETE_BETAS[s]) + ")" for n, s in zip(names, schedule))


def report(scenario: str, search_seeds: list[int], eval_seeds: list[int], overrides: dict, objective: str = "return",
           clean_allowance: float = DEFAULT_CLEAN_ALLOWANCE, segments: int = 1) -> dict:
    """Search on ``search_seeds`` by ``objective``, replay task-only, best fixed and the schedule on ``eval_seeds``."""
    started = time.perf_counter()
    names = phase_names(load_spec(scenario, overrides))
    slots = slot_labels(names, segments)
    best_fixed, schedule, played = search(scenario, search_seeds, overrides, objective=objective, clean_allowance=clean_allowance,
                                          segments=segments)
    task_only = tuple([TASK_ONLY] * len(slots))
    held_out = play(scenario, [task_only, best_fixed, schedule], eval_seeds, EVAL_SEED_OFFSET, overrides, segments=segments)
    # The same schedule one round late: a gate that reads the stream sees a phase only after its first
    # round, so this is what such a gate can reach, not just a gate told the timeline.
    reactive = play(scenario, [schedule], eval_seeds, EVAL_SEED_OFFSET, overrides, lag=1, segments=segments)
    played += 4 * len(eval_seeds)
    gap = paired_difference(held_out.returns[2].tolist(), held_out.returns[1].tolist())
    span = paired_difference(held_out.returns[2].tolist(), held_out.returns[0].tolist())
    labelled = [("task-only", task_only, held_out, 0), ("best fixed", best_fixed, held_out, 1), ("best schedule", schedule, held_out, 2),
                ("reactive", schedule, reactive, 0)]
    fixed_system = held_out.system_asr[1].mean()
    return {
        "scenario": scenario,
        "objective": objective,
        "clean_allowance": clean_allowance,
        "phases": names,
        "segments": segments,
        "rows": {
            label: {
                "betas": _betas(s, slots) + (" one round late" if label == "reactive" else ""),
                "return": t_interval(episodes.returns[k].tolist()),
                "asr": t_interval(episodes.asr[k].tolist(), bounds=bounds_for("asr")),
                "system_asr": t_interval(episodes.system_asr[k].tolist(), bounds=bounds_for("system_asr")),
                "clean_acc": t_interval(episodes.clean_acc[k].tolist(), bounds=bounds_for("clean_acc")),
            }
            for label, s, episodes, k in labelled
        },
        "gap": gap,
        "reactive_gap": paired_difference(reactive.returns[0].tolist(), held_out.returns[1].tolist()),
        "gap_share": None if not span.mean else gap.mean / span.mean,
        "asr_ratio": float(held_out.asr[2].mean() / held_out.asr[0].mean()) if held_out.asr[0].mean() > 0 else None,
        "system_asr_ratio": (
            float(held_out.system_asr[2].mean() / held_out.system_asr[0].mean()) if held_out.system_asr[0].mean() > 0 else None
        ),
        "system_gap": paired_difference(held_out.system_asr[2].tolist(), held_out.system_asr[1].tolist()),
        "system_asr_ratio_to_fixed": float(held_out.system_asr[2].mean() / fixed_system) if fixed_system > 0 else None,
        "episodes": played,
        "seconds": time.perf_counter() - started,
    }


def print_report(result: dict) -> None:
    chosen = ("by return" if result["objective"] == "return"
              else f"by lowest system ASR at clean accuracy ≥ task-only's − {result['clean_allowance']}")
    parts = "" if result["segments"] == 1 else f", one β per {result['segments']} parts of each phase"
    print(f"\n== {result['scenario']} (phases: {', '.join(result['phases'])}{parts}; β chosen {chosen}; "
          f"{result['episodes']} episodes, {result['seconds']:.0f} s)")
    print(f"{'':14} {'return':>20} {'ASR (attacked rounds)':>24} {'system ASR':>22} {'clean acc':>22}  β")
    for label, row in result["rows"].items():
        print(f"{label:14} {row['return'].format(3):>20} {row['asr'].format(3):>24} {row['system_asr'].format(3):>22} "
              f"{row['clean_acc'].format(3):>22}  {row['betas']}")
    gap = result["gap"]
    share = "—" if result["gap_share"] is None else f"{100 * result['gap_share']:.0f}%"
    ratio = "—" if result["asr_ratio"] is None else f"{result['asr_ratio']:.2f}"
    system_ratio = "—" if result["system_asr_ratio"] is None else f"{result['system_asr_ratio']:.2f}"
    low = "—" if gap.low is None else f"{gap.low:+.3f}"
    print(f"gap schedule − best fixed: {gap.format(3)} (95% CI low {low}); share of schedule − task-only: {share}; "
          f"ASR schedule / task-only: {ratio}; system ASR schedule / task-only: {system_ratio}")
    reactive = result["reactive_gap"]
    reactive_low = "—" if reactive.low is None else f"{reactive.low:+.3f}"
    print(f"gap reactive (schedule one round late) − best fixed: {reactive.format(3)} (95% CI low {reactive_low})")
    if result["objective"] == "system_asr":
        system_gap = result["system_gap"]
        to_fixed = "—" if result["system_asr_ratio_to_fixed"] is None else f"{result['system_asr_ratio_to_fixed']:.2f}"
        high = "—" if system_gap.high is None else f"{system_gap.high:+.3f}"
        print(f"system ASR schedule − best fixed: {system_gap.format(3)} (95% CI high {high}); "
              f"system ASR schedule / best fixed: {to_fixed}")


def main() -> None:
    shipped = scenarios_available(include_evaluation_only=False, fidelity="embedding")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=shipped, help=f"default: {' '.join(shipped)}")
    parser.add_argument("--search-seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--eval-seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides, e.g. episode_rounds:40")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="return",
                        help="what the fixed-β choice and the search optimise (default: return)")
    parser.add_argument("--clean-allowance", type=float, default=DEFAULT_CLEAN_ALLOWANCE,
                        help=f"--objective system_asr: largest clean-accuracy drop against task-only (default: {DEFAULT_CLEAN_ALLOWANCE})")
    parser.add_argument("--segments", type=positive_int, default=1,
                        help="β per this many equal parts of each phase instead of one per phase (default: 1)")
    args = parser.parse_args()
    if args.segments < 1:
        parser.error(f"--segments {args.segments}: allowed a whole number ≥ 1")
    if not 0.0 <= args.clean_allowance <= 1.0:
        parser.error(f"--clean-allowance {args.clean_allowance}: allowed a clean-accuracy drop in [0, 1]")
    torch.set_num_threads(args.threads)
    overrides = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    scenario_option(parser, args.scenarios, overrides=overrides)  # every file and override checked before any search
    print(f"adaptivity gap, embedding fidelity, search seeds {args.search_seeds}, evaluation seeds {args.eval_seeds} "
          f"(mean ± 95% t-interval half-width; [low, high] where a rate's range clips it)")
    for scenario in args.scenarios:
        print_report(report(scenario, args.search_seeds, args.eval_seeds, overrides, args.objective, args.clean_allowance,
                            args.segments))


if __name__ == "__main__":
    main()
