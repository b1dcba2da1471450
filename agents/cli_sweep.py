"""``cmai sweep``: the command-line face of :mod:`agents.sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to ``cmai``."""
    sw = subparsers.add_parser(
        "sweep",
        help="algorithms x scenarios x seeds as Ray Tune trials, with rliable statistics",
        description=(
            "Train and evaluate every algorithm (x hyperparameter sample) on every scenario and seed as Ray Tune "
            "trials (local Ray by default, --address for a cluster), one run folder per trial under --out; evaluate the "
            "baselines on the same seeds; write sweep.json, sweep.md (t-intervals and rliable IQM/mean CIs, "
            "P(improvement)) and performance profiles. Running it again skips finished trials and resumes interrupted ones."
        ),
    )
    sw.add_argument("--algos", nargs="+", default=["ppo"], help="algorithms (default: ppo)")
    sw.add_argument("--scenarios", nargs="+", default=["quickstart"], help="scenario names or YAML files (default: quickstart)")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, the runs of the statistics (default: 0 1 2)")
    sw.add_argument("--timesteps", type=int, default=None, help="environment steps per trial (default: n_timesteps of the hyperparameters)")
    sw.add_argument("--out", type=Path, default=Path("runs/sweep"), help="root of the run folders and the report (default: runs/sweep)")
    sw.add_argument("--samples", type=int, default=0, help="hyperparameter samples per algorithm from cmai tune's space (default: 0, the files)")
    sw.add_argument("--set", dest="set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="hyperparameter overrides for every trial")
    sw.add_argument("--env-kwargs", dest="env_kwargs", action="extend", nargs="+", default=[], metavar="KEY:VALUE", help="scenario overrides")
    sw.add_argument("--fidelity", choices=["embedding", "pixel"], default="embedding", help="environment fidelity (default: embedding)")
    sw.add_argument("--baselines", nargs="*", default=None, help="baselines to compare against (default: no_defense static_adversarial proeat_dynamic static_consistency uniform)")
    sw.add_argument("--eval-episodes", type=int, default=1, help="evaluation episodes per run (default: 1)")
    sw.add_argument("--address", default=None, help="Ray cluster address (ray://HEAD:10001 or auto); default: start a local Ray")
    sw.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all it finds)")
    sw.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial reserves (default: 1)")
    sw.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves; > 0 trains on cuda (default: 0)")
    sw.add_argument("--bootstrap-reps", type=int, default=1000, help="rliable bootstrap resamples, at least 100 (default: 1000)")
    sw.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 progress and the report (default: 1)")
    sw.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    """Run :func:`agents.sweep.sweep` from parsed arguments and print ``sweep.md``."""
    import sys

    from agents.sweep import DEFAULT_BASELINES, SweepArgs, SweepIncomplete, sweep

    sweep_args = SweepArgs(
        algos=args.algos, scenarios=args.scenarios, seeds=args.seeds, timesteps=args.timesteps, out=args.out,
        samples=args.samples, set=list(args.set), env_kwargs=list(args.env_kwargs), fidelity=args.fidelity,
        baselines=tuple(DEFAULT_BASELINES if args.baselines is None else args.baselines), eval_episodes=args.eval_episodes,
        address=args.address, num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        bootstrap_reps=args.bootstrap_reps, verbose=args.verbose,
    )
    try:
        sweep(sweep_args)
    except SweepIncomplete as exc:
        print(f"cmai sweep: {exc}", file=sys.stderr)
        return 1
    if args.verbose >= 1:
        print((Path(args.out) / "sweep.md").read_text())
    return 0
