"""Can any fixed β defend against the held-out attacks? One regime at a time, task-only against the grid.

Issue 10's point 6 asks a gate trained elsewhere to reach, on ``unseen_attacks``, a system ASR of at
most 0.7× the best static weighting's at a clean-accuracy drop ≤ 0.02. A gate can only beat every
fixed β by picking, regime by regime, a β that defends better than the others there. So this
benchmark asks the question beneath the clause: for each held-out attack of ``unseen_attacks``
(its phases' attack entries: the universal perturbation and Co-Attack) at ½×, 1× and 2× its
shipped budget, on clean images and under Gaussian noise of severity 2 and 4, how far does the
best fixed β lower system ASR below task-only's?

Each regime is a two-phase scenario built in memory from ``unseen_attacks`` (its defended system,
detector, reward and batch size; ``evaluation_only`` off so it can be played): 6 quiet rounds,
then 18 rounds of the one attack at adversarial share 0.5. Every β of the grid (``DISCRETE_BETAS``,
step 1/3) is held for the episode on evaluation seeds 0–4 (embedding fidelity, batched
environment; :func:`defence_per_phase.play_fixed`). Printed per regime: task-only's system ASR in
the attack phase (95% t-interval), the fixed β with the lowest system ASR there among those within
0.02 clean accuracy of task-only (the clause's allowance), its system ASR, the paired drop and the
ratio to task-only. The last line counts the regimes where some β reaches ≤ 0.7× task-only with a
drop whose CI excludes 0: where there are none, a scenario made of these regimes gives a gate no
β to switch to that beats holding task-only by the clause's margin (up to what one regime's
training carries into the next).

``--scenario S`` asks the same of any scenario's attacks (its defended system and detector), and
``--clean-allowance 0.05`` with point 4's allowance: where a phase of a scenario would need a
budget or corruption at which the defence acts (README, Known limits: ``pixel_travel``).

    python benchmarks/held_out_regimes.py [--scenario unseen_attacks] [--budgets 1] [--corruptions clean gaussian_noise:2]
                                          [--clean-allowance 0.02] [--env-kwargs KEY:VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defence_per_phase import play_fixed  # noqa: E402

from agents.protocol import DistinctSeeds  # noqa: E402
from agents.stats import bounds_for, paired_difference, t_interval  # noqa: E402
from cmai_env.cli.common import assignments_option, non_negative_float, positive_float, positive_int  # noqa: E402
from cmai_env.env import DISCRETE_BETAS  # noqa: E402
from cmai_env.scenario import Scenario, ScenarioError, apply_overrides, load_scenario, validate_scenario  # noqa: E402

#: The scenario whose attacks, defended system and detector the regimes take, unless ``--scenario`` names another.
SOURCE = "unseen_attacks"
QUIET_ROUNDS = 6
ATTACK_ROUNDS = 18
ADVERSARIAL_SHARE = 0.5
#: Point 6's held-out clause: the ratio to reach and the clean-accuracy allowance.
TARGET_RATIO = 0.7
CLEAN_ALLOWANCE = 0.02
TASK_ONLY = 0  # DISCRETE_BETAS[0] == (1, 0, 0)
#: Attack parameters that are budgets or step sizes, scaled together by ``--budgets``.
SCALED_PARAMS = ("eps", "step_size", "text_eps", "text_step_size")


def attack_entries(source: Scenario) -> list[dict[str, Any]]:
    """The distinct attack entries of ``source``'s phases (name, parameters and a label: the name,
    numbered from the second entry of a name on), in order of appearance."""
    seen: dict[str, dict[str, Any]] = {}
    for phase in source.phases:
        for attack in phase.attacks:
            key = f"{attack.name} {sorted(attack.params.items())}"
            if key not in seen:
                repeat = sum(entry["name"] == attack.name for entry in seen.values())
                label = attack.name if not repeat else f"{attack.name}{repeat + 1}"
                seen[key] = {"name": attack.name, "params": dict(attack.params), "label": label}
    return list(seen.values())


def regime(source: Scenario, attack: dict[str, Any], budget: float, corruption: tuple[str, int] | None) -> Scenario:
    """Quiet rounds, then ``attack`` at ``budget``× its budgets on images with ``corruption`` (``None``: clean)."""
    params = {k: (v * budget if k in SCALED_PARAMS else v) for k, v in attack["params"].items()}
    raw = source.model_dump(exclude={"phases", "held_out_attacks", "evaluation_only", "episode_rounds"})
    condition = "clean" if corruption is None else f"{corruption[0]}:{corruption[1]}"
    raw.update(
        name=f"{attack['label']}_x{budget:g}_{condition.replace(':', '')}",
        description=f"regime: {attack['name']} at {budget:g}× on {condition} images",
        phases=[
            {"name": "quiet", "rounds": QUIET_ROUNDS, "attacks": []},
            {"name": "attack", "rounds": ATTACK_ROUNDS, "adversarial_share": ADVERSARIAL_SHARE,
             "attacks": [{"name": attack["name"], "params": params}],
             "corruption": None if corruption is None else {"name": corruption[0], "severity": corruption[1]}},
        ],
    )
    return validate_scenario(raw, f"regime {raw['name']}")


def measure(spec: Scenario, seeds: list[int], overrides: dict, clean_allowance: float = CLEAN_ALLOWANCE) -> dict[str, Any]:
    """Task-only and the best fixed β within ``clean_allowance`` clean accuracy of it, in the attack phase of ``spec``."""
    figures = play_fixed(spec, seeds, overrides)
    names, system, clean = figures.names, figures.system, figures.clean
    k = names.index("attack")
    task_system, task_clean = system[TASK_ONLY, :, k], clean[TASK_ONLY, :, k]
    admissible = [b for b in range(len(DISCRETE_BETAS)) if clean[b, :, k].mean() >= task_clean.mean() - clean_allowance]
    best = min(admissible, key=lambda b: system[b, :, k].mean())
    task_mean = float(task_system.mean())
    return {
        "regime": spec.name,
        "task_system_asr": t_interval(task_system.tolist(), bounds=bounds_for("system_asr")),
        "task_clean_acc": float(task_clean.mean()),
        "best_betas": DISCRETE_BETAS[best],
        "best_system_asr": float(system[best, :, k].mean()),
        "drop": paired_difference(task_system.tolist(), system[best, :, k].tolist(), bounds=bounds_for("system_asr")),
        "ratio": float(system[best, :, k].mean() / task_mean) if task_mean > 0 else None,
    }


def defends(row: dict[str, Any]) -> bool:
    """Some fixed β reaches ≤ TARGET_RATIO× task-only's system ASR, with a drop whose CI excludes 0."""
    low = row["drop"].low
    return row["ratio"] is not None and row["ratio"] <= TARGET_RATIO and low is not None and low > 0


def corruption_arg(text: str) -> tuple[str, int] | None:
    """``clean`` or ``NAME:SEVERITY`` (argparse type)."""
    if text == "clean":
        return None
    name, _, severity = text.partition(":")
    if not severity.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected clean or NAME:SEVERITY, e.g. gaussian_noise:2")
    return name, int(severity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=SOURCE, help=f"whose attack entries, defended system and detector (default: {SOURCE})")
    parser.add_argument("--attacks", nargs="+", default=None, metavar="LABEL",
                        help="only these of the scenario's attack entries (their names; a name's second entry is NAME2)")
    parser.add_argument("--budgets", type=positive_float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="multiples of each attack's budgets in unseen_attacks (default: 0.5 1 2)")
    parser.add_argument("--corruptions", type=corruption_arg, nargs="+", default=[None, ("gaussian_noise", 2), ("gaussian_noise", 4)],
                        metavar="clean|NAME:SEVERITY", help="image conditions (default: clean gaussian_noise:2 gaussian_noise:4)")
    parser.add_argument("--clean-allowance", type=non_negative_float, default=CLEAN_ALLOWANCE,
                        help=f"largest clean-accuracy cost a β may have against task-only (default: {CLEAN_ALLOWANCE}, the clause's; point 4 allows 0.05)")
    parser.add_argument("--seeds", type=int, nargs="+", action=DistinctSeeds, default=[0, 1, 2, 3, 4])
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE",
                        help="overrides for every regime, e.g. embedding_attack_radius:pixel_travel")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = assignments_option(parser, args.env_kwargs, ":", "--env-kwargs")
    try:  # the scenario, every regime and every override checked before any runs
        source = load_scenario(args.scenario)
        entries = attack_entries(source)
        unknown = sorted(set(args.attacks or ()) - {entry["label"] for entry in entries})
        if unknown:
            parser.error(f"--attacks {' '.join(unknown)}: not an attack entry of {source.name}; "
                         f"its entries: {', '.join(entry['label'] for entry in entries)}")
        entries = [entry for entry in entries if args.attacks is None or entry["label"] in args.attacks]
        regimes = [regime(source, attack, budget, corruption)
                   for attack in entries for corruption in args.corruptions for budget in args.budgets]
        for spec in regimes:  # played at embedding fidelity (a generative backbone is refused here)
            apply_overrides(spec, {**overrides, "fidelity": "embedding"})
    except (ScenarioError, FileNotFoundError) as error:
        parser.error(f"--scenario {args.scenario}: {error}" if isinstance(error, FileNotFoundError) else str(error))
    started = time.perf_counter()
    print(f"the attacks of {source.name}, one regime at a time ({QUIET_ROUNDS} quiet rounds, then {ATTACK_ROUNDS} attacked); "
          f"embedding fidelity, evaluation seeds {args.seeds}; best fixed β within {args.clean_allowance} clean accuracy of task-only")
    print(f"{'regime':34} {'task-only system ASR':>22} {'clean':>6}   {'best fixed β':22} {'system ASR':>10} {'drop (95% CI)':>22} {'ratio':>6}")
    rows = []
    for spec in regimes:
        row = measure(spec, args.seeds, overrides, args.clean_allowance)
        rows.append(row)
        betas = "(" + ", ".join(f"{b:.2f}" for b in row["best_betas"]) + ")"
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['regime']:34} {row['task_system_asr'].format(3):>22} {row['task_clean_acc']:6.3f}   {betas:22} "
              f"{row['best_system_asr']:10.3f} {row['drop'].format(3):>22} {ratio:>6}{' ✓' if defends(row) else ''}", flush=True)
    defended = [row["regime"] for row in rows if defends(row)]
    print(f"\nregimes where a fixed β reaches ≤ {TARGET_RATIO}× task-only's system ASR (drop CI above 0): "
          f"{len(defended)}/{len(rows)}{': ' + ', '.join(defended) if defended else ''} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
