"""The defended model at both fidelities: each attack's ASR per phase under a fixed β, side by side.

Issue 10's point 3 compares the fidelities on the *undefended* model (``fidelity_calibration.py``),
but every figure the environment reports comes from a model the gate is defending. This plays
whole episodes with one β held fixed, at pixel and at embedding fidelity (the same scenario and
environment seeds ``EVAL_SEED_OFFSET + s``), and prints per phase and attack the model's ASR and
the system's (flipped and not flagged) over the phase's attacked rounds at each fidelity and their
difference, a cell being within ±0.10 as in ``fidelity_calibration.py``; and per phase the
detector's TPR on the rounds' traffic, its threshold τ, the clean accuracy and the clean
predictions' entropy over ln K (``info["prediction_entropy"]``), the last also held to ±0.10 and
counted apart: a defence can keep clean accuracy while flattening the predictions toward uniform,
which flattens ``L_consistency`` too and so decides what the detector can still see. ``--env-kwargs``
overrides the scenario at both fidelities, ``--embedding-kwargs`` at the embedding one only (e.g.
``embedding_attack_radius:pixel_travel``). A pixel episode of ``periodic`` takes about 30 CPU-s, an embedding
one about 3.

    python benchmarks/defended_fidelity.py [--scenario periodic] [--betas 1,0,0 0,2/3,1/3] [--seeds 0 1 2]
        [--embedding-kwargs embedding_attack_radius:pixel_travel] [--env-kwargs KEY:VALUE ...] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptivity_gap import load_spec, phase_names  # noqa: E402
from defence_per_phase import episode_infos, in_processes  # noqa: E402

from agents.protocol import DistinctSeeds  # noqa: E402
from cmai_env.cli.common import assignments_option, parse_budget, positive_int  # noqa: E402
from cmai_env.scenario import scenario_option  # noqa: E402

#: |embedding − pixel| a cell may differ by (``fidelity_calibration.py``'s tolerance).
TOLERANCE = 0.10
FIDELITIES = ("pixel", "embedding")
#: Per phase, the round figures averaged over its attacked rounds (per attack: ASR and system ASR).
PHASE_FIGURES = ("detector_tpr", "detector_threshold", "clean_acc", "prediction_entropy")


def betas_arg(text: str) -> tuple[float, float, float]:
    """``"a,b,c"`` (numbers or fractions such as ``2/3``) → β normalised to sum 1."""
    expected = f"expected β as three numbers ≥ 0 with a positive sum, such as 0,2/3,1/3, got {text!r}"
    try:
        values = [parse_budget(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(expected) from exc
    if len(values) != 3 or min(values) < 0 or not 0 < sum(values) < float("inf"):
        raise argparse.ArgumentTypeError(expected)
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def _episode(job: tuple) -> list[dict]:
    return episode_infos(*job)


def summarise(rounds: list[dict]) -> dict[str, dict]:
    """Per phase: ``{"attacks": {name: (ASR, system ASR)}, figure: mean}`` over its attacked rounds."""
    asr, system, figures = (defaultdict(lambda: defaultdict(list)) for _ in range(3))
    for info in rounds:
        if not info["attacks"]:
            continue
        phase = str(info["phase"])
        for name, value in info["asr_per_attack"].items():
            asr[phase][name].append(value)
            system[phase][name].append(info["system_asr_per_attack"][name])
        for figure in PHASE_FIGURES:
            figures[phase][figure].append(info[figure])
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {phase: {"attacks": {name: (mean(asr[phase][name]), mean(system[phase][name])) for name in asr[phase]},
                    **{figure: mean(values) for figure, values in figures[phase].items()}}
            for phase in figures}


def compare(scenario: str, betas: list[tuple[float, float, float]], seeds: list[int], overrides: dict | None = None,
            embedding_overrides: dict | None = None, processes: int = 1) -> dict:
    """Both fidelities' per-phase summaries, averaged over seeds: ``{β: {fidelity: {phase: ...}}}``.

    :param overrides: scenario overrides at both fidelities; ``embedding_overrides`` on top of them
        at the embedding one.
    """
    sides = {"pixel": dict(overrides or {}), "embedding": {**(overrides or {}), **(embedding_overrides or {})}}
    jobs = [(scenario, fidelity, b, seed, sides[fidelity]) for b in betas for fidelity in FIDELITIES for seed in seeds]
    summaries = iter(summarise(rounds) for rounds in in_processes(_episode, jobs, processes))
    result: dict = {}
    for b in betas:
        for fidelity in FIDELITIES:
            per_seed = [next(summaries) for _ in seeds]
            result.setdefault(b, {})[fidelity] = _mean_over_seeds(per_seed)
    return result


def _mean_over_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Seed-mean of :func:`summarise` outputs (a phase or attack a seed never met is left out of its mean)."""
    phases = dict.fromkeys(phase for summary in per_seed for phase in summary)
    merged = {}
    for phase in phases:
        present = [summary[phase] for summary in per_seed if phase in summary]
        names = list(dict.fromkeys(name for row in present for name in row["attacks"]))
        merged[phase] = {
            "attacks": {name: tuple(float(np.mean([row["attacks"][name][i] for row in present if name in row["attacks"]])) for i in (0, 1))
                        for name in names},
            **{figure: float(np.mean([row[figure] for row in present])) for figure in PHASE_FIGURES},
        }
    return merged


class Counts(NamedTuple):
    """What :func:`print_comparison` counted: attack cells, and phases' prediction entropies, within ±TOLERANCE."""

    within: int
    total: int
    entropy_within: int
    entropy_total: int


def print_comparison(scenario: str, result: dict, order: list[str]) -> Counts:
    """The side-by-side table and what it counted."""
    within = total = entropy_within = entropy_total = 0
    for b, by_fidelity in result.items():
        pixel, embedding = by_fidelity["pixel"], by_fidelity["embedding"]
        print(f"\n== {scenario}, β = ({', '.join(f'{x:.2f}' for x in b)}) held fixed")
        print(f"{'phase':14} {'attack':24} {'ASR pixel':>9} {'emb':>6} {'Δ':>6}   {'system ASR pixel':>16} {'emb':>6} {'Δ':>6}")
        for phase in [p for p in order if p in pixel and p in embedding]:
            for name, (asr_p, sys_p) in pixel[phase]["attacks"].items():
                if name not in embedding[phase]["attacks"]:
                    continue
                asr_e, sys_e = embedding[phase]["attacks"][name]
                marks = []
                for delta in (asr_e - asr_p, sys_e - sys_p):
                    total += 1
                    ok = abs(delta) <= TOLERANCE
                    within += ok
                    marks.append(f"{delta:+6.3f}{' ' if ok else '*'}")
                print(f"{phase:14} {name:24} {asr_p:9.3f} {asr_e:6.3f} {marks[0]}  {sys_p:16.3f} {sys_e:6.3f} {marks[1]}")
            p, e = pixel[phase], embedding[phase]
            entropy_ok = abs(e["prediction_entropy"] - p["prediction_entropy"]) <= TOLERANCE
            entropy_total += 1
            entropy_within += entropy_ok
            print(f"{'':14} {'(phase) detector TPR':24} {p['detector_tpr']:9.3f} {e['detector_tpr']:6.3f}   "
                  f"τ {p['detector_threshold']:.3f} / {e['detector_threshold']:.3f}, clean accuracy {p['clean_acc']:.3f} / {e['clean_acc']:.3f}, "
                  f"prediction entropy {p['prediction_entropy']:.3f} / {e['prediction_entropy']:.3f}{'' if entropy_ok else '*'}")
    return Counts(within, total, entropy_within, entropy_total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="periodic", help="a shipped name or a YAML path (default: periodic)")
    parser.add_argument("--betas", type=betas_arg, nargs="+", default=[betas_arg("1,0,0"), betas_arg("1/3,1/3,1/3"), betas_arg("0,2/3,1/3")],
                        help="β held fixed, each a,b,c (default: 1,0,0 1/3,1/3,1/3 0,2/3,1/3)")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2])
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides at both fidelities, e.g. episode_rounds:40")
    parser.add_argument("--embedding-kwargs", nargs="*", default=[], metavar="KEY:VALUE",
                        help="overrides at the embedding fidelity only, e.g. embedding_attack_radius:pixel_travel")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="parallel processes, one torch thread each (default: one per core)")
    args = parser.parse_args()
    overrides = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    embedding_overrides = assignments_option(parser, args.embedding_kwargs, ":", "--embedding-kwargs")
    # the file and both sides' overrides checked before anything runs
    scenario_option(parser, [args.scenario], option="--scenario", overrides={**overrides, **embedding_overrides})
    started = time.perf_counter()
    print(f"defended model at both fidelities: {args.scenario}, β held fixed, seeds {args.seeds}, overrides {overrides or 'none'}, "
          f"embedding-only overrides {embedding_overrides or 'none'}; "
          f"per phase, the mean over its attacked rounds (* : |Δ| > {TOLERANCE})", flush=True)
    result = compare(args.scenario, args.betas, args.seeds, overrides, embedding_overrides, args.jobs)
    counts = print_comparison(args.scenario, result, phase_names(load_spec(args.scenario, overrides)))
    print(f"\n{counts.within}/{counts.total} defended cells within ±{TOLERANCE}; prediction entropy within ±{TOLERANCE} "
          f"on {counts.entropy_within}/{counts.entropy_total} phases ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
