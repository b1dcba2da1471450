"""``cmai scenarios list | show | validate``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("scenarios", help="list, show or validate scenario files")
    sub = group.add_subparsers(dest="scenarios_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="the shipped scenarios")
    ls.add_argument("--training-only", action="store_true", help="leave out evaluation-only scenarios")
    ls.set_defaults(func=run_list)

    show = sub.add_parser("show", help="a validated scenario (defaults filled in) and its expanded timeline")
    show.add_argument("scenario", metavar="NAME|FILE", help="a shipped name or a .yaml file")
    show.add_argument("--seed", type=int, default=0, help="seed of the timeline draw for random schedules (default: 0)")
    show.set_defaults(func=run_show)

    val = sub.add_parser("validate", help="check scenario files; exit status 1 if any is invalid")
    val.add_argument("files", nargs="+", metavar="FILE", help=".yaml files or shipped names")
    val.set_defaults(func=run_validate)


def run_list(args: argparse.Namespace) -> int:
    from cmai_env.scenario import load_scenario, scenarios_available

    rows = []
    for name in scenarios_available(include_evaluation_only=not args.training_only):
        scenario = load_scenario(name)
        rows.append((name, "eval-only" if scenario.evaluation_only else "training", str(scenario.episode_length()),
                     str(len(scenario.phases)), scenario.schedule, scenario.description))
    header = ("name", "use", "rounds", "phases", "schedule", "description")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def run_show(args: argparse.Namespace) -> int:
    import numpy as np

    from cmai_env.scenario import load_scenario
    from cmai_env.stream import AttackStream

    scenario = load_scenario(args.scenario)
    print(scenario.to_yaml(), end="")
    stream = AttackStream(scenario, np.random.default_rng(args.seed))
    seeded = f", seed {args.seed}" if scenario.schedule == "random" else ""
    print(f"\n# expanded timeline ({len(stream)} rounds{seeded}; * = shift round, ~ = gradual transition)")
    for index, (start, end, phase) in enumerate(stream.timeline):
        first = stream.plan(start)
        ramp = sum(1 for t in range(start, end) if stream.plan(t).blend < 1.0)
        settled = stream.plan(start + ramp) if start + ramp < end else stream.plan(end - 1)
        attacks = ", ".join(f"{e.name}×{e.weight:.2f}" for e in settled.mixture) or "quiet"
        mark = "*" if first.shift else " "
        blend = f" ~{ramp} rounds" if ramp else ""
        print(f"# {mark} {index:>2}  rounds {start:>3}–{end - 1:<3} {phase:<16} share {settled.adversarial_share:.2f}  {attacks}{blend}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from cmai_env.scenario import ScenarioError, load_scenario

    failed = 0
    for path in args.files:
        try:
            scenario = load_scenario(path)
        except (ScenarioError, OSError) as exc:  # each file is reported; one bad file does not stop the rest
            failed += 1
            print(f"INVALID {path}\n{exc}", file=sys.stderr)
        else:
            print(f"OK {path} ({scenario.name}: {scenario.episode_length()} rounds, {len(scenario.phases)} phases)")
    if failed:
        print(f"{failed} of {len(args.files)} scenario file(s) invalid", file=sys.stderr)
    return 1 if failed else 0
