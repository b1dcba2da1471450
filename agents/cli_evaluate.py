"""``cmai evaluate``, ``cmai benchmark`` and ``cmai quickstart``.

    cmai evaluate --policy runs/ppo/quickstart_1 --scenario quickstart --seeds 0 1 2 3 4 --out runs/eval
    cmai evaluate --policy baseline:uniform --scenario unseen_attacks --out runs/eval-uniform
    cmai benchmark --scenarios quickstart abrupt_shift --seeds 0 1 2 --out runs/bench --policies runs/ppo/quickstart_1
    cmai quickstart                      # train PPO on quickstart, compare with uniform and no_defense

Bad input (an unknown baseline, a missing policy folder or scenario, a malformed
``--env-kwargs``) raises ``ValueError``/``FileNotFoundError``, which ``cmai`` turns into a
one-line error and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cmai_env.cli.common import device_arg, positive_int, set_torch_threads

if TYPE_CHECKING:  # the heavy modules (gymnasium, torch, scipy) load only when a command runs
    from agents.results import EvaluationResult
    from agents.stats import Interval

#: ``cmai quickstart``'s default PPO budget (environment steps = rounds, summed over the recipe's
#: 32 batched envs: 4 rollouts of 64 rounds each), sized so training plus the three five-seed
#: evaluations stay near a minute on two CPU cores at embedding fidelity. Measured 2026-11-27 on
#: the quickstart with its noisy caption phase: 8,192 rounds trained in 43 s wall and returned
#: 37.802 against uniform's 37.159 and no_defense's 30.066 (seeds 0-4), where 2,048 rounds on one
#: env with quickstart's own entry took 72 s and returned 31.470.
QUICKSTART_TIMESTEPS = 8192
QUICKSTART_SEEDS = (0, 1, 2, 3, 4)
#: The ``agents/hyperparams/ppo.yml`` entry whose recipe ``cmai quickstart`` trains with: the shipped
#: one that beat the best fixed β on abrupt_shift, detector_evasion, periodic and gradual_drift
#: (gSDE noise held per rollout, γ 0.95, 32 batched envs), at ``QUICKSTART_TIMESTEPS`` instead of its budget.
QUICKSTART_RECIPE = "abrupt_shift"


def _log(quiet: bool):
    return None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))


def _console():
    from rich.console import Console

    return Console()


def _fmt(interval: Interval, digits: int = 3) -> str:
    if interval.mean is None:
        return "—"
    if interval.half_width is None:
        return f"{interval.mean:.{digits}f}"
    return f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


# ------------------------------------------------------------------------------ evaluate
def print_summary(result: EvaluationResult) -> None:
    """A rich table of the evaluation's metrics (mean [95% CI] over seeds)."""
    from rich.table import Table

    summary = result.summary()
    meta = summary["metadata"]
    table = Table(title=f"{result.policy} on {meta['scenario']} ({meta['env_id']}, seeds {meta['seeds']})")
    table.add_column("metric")
    table.add_column("mean [95% CI]", justify="right")
    table.add_column("n", justify="right")
    for name in ("return", "asr", "clean_acc", "clean_acc_drop", "consistency_score", "detector_tpr", "detector_fpr", "compute_cost"):
        interval = result.interval(name)
        table.add_row(name, _fmt(interval), str(interval.n))
    for name, entry in summary["latency"].items():
        interval = result.interval(name)
        table.add_row(f"latency/{name} ({entry['measured']}/{entry['shifts']} shifts)", _fmt(interval, 1 if name.endswith("ms") else 2), str(interval.n))
    _console().print(table)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from agents.evaluation import evaluate_policy
    from agents.policy_resolution import resolve_policy
    from cmai_env.keyvalue import parse_assignments
    from agents.output_dir import claim_output_dir

    set_torch_threads(args.threads)
    policy = resolve_policy(args.policy, device=args.device)
    env_kwargs = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    if args.device != "cpu":
        env_kwargs["device"] = args.device
    # One writer per --out, and results already there are kept unless --overwrite (checked before
    # any episode runs, so a refused command costs nothing).
    with claim_output_dir(args.out, ("summary.json", "rounds.csv"), overwrite=args.overwrite):
        result = evaluate_policy(
            policy,
            args.scenario,
            seeds=args.seeds,
            episodes=args.episodes,
            fidelity=args.fidelity,
            env_kwargs=env_kwargs,
            use_disk_cache=not args.no_cache,
            tensorboard=args.tensorboard,
            out=args.out,
            plots=not args.no_plots,
            log=_log(args.quiet),
        )
    if not args.quiet:
        print_summary(result)
        print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return 0


# ------------------------------------------------------------------------------ benchmark
def cmd_benchmark(args: argparse.Namespace) -> int:
    from agents.benchmark import BenchmarkArgs, run_benchmark
    from cmai_env.keyvalue import parse_assignments
    from agents.output_dir import claim_output_dir

    set_torch_threads(args.threads)
    with claim_output_dir(args.out, ("results.json", "results.md"), overwrite=args.overwrite):
        report = run_benchmark(
            BenchmarkArgs(
                scenarios=args.scenarios,
                out=Path(args.out),
                seeds=args.seeds,
                episodes=args.episodes,
                policies=args.policies or [],
                baselines=args.baselines,
                fidelity=args.fidelity,
                env_kwargs=parse_assignments(args.env_kwargs, ":", "--env-kwargs"),
                plots=not args.no_plots,
                bootstrap_reps=args.bootstrap_reps,
                fixed_grid=args.fixed_grid,
            ),
            log=_log(args.quiet),
        )
    if not args.quiet:
        print((Path(args.out) / "results.md").read_text())
        print(f"wrote {Path(args.out) / 'results.md'} and {Path(args.out) / 'results.json'} ({len(report['scenarios'])} scenario(s))")
    return 0


# ------------------------------------------------------------------------------ quickstart
@dataclass
class QuickstartArgs:
    """``cmai quickstart``: train PPO on ``quickstart``, compare with ``uniform`` and ``no_defense``.

    PPO trains with the shipped recipe of ``QUICKSTART_RECIPE``'s entry in ``agents/hyperparams/ppo.yml``.

    :param timesteps: PPO budget in environment steps (rounds).
    :param seeds: evaluation seeds (the frozen protocol's five by default).
    :param train_seed: seed of the training run.
    :param fidelity: ``embedding`` (default, fast) or ``pixel``.
    :param out: output folder (``train/`` run folder, ``eval/<policy>/``, ``quickstart.md/json``).
    :param env_kwargs: scenario overrides for training and evaluation.
    :param n_envs: training envs; ``None``: the recipe's (32 batched embedding envs). Each PPO
        update needs one rollout of ``n_envs × 64`` rounds, so small budgets want fewer, and so does
        ``fidelity="pixel"``, where envs are not batched.
    """

    timesteps: int = QUICKSTART_TIMESTEPS
    seeds: Sequence[int] = QUICKSTART_SEEDS
    train_seed: int = 0
    fidelity: str = "embedding"
    out: Path = Path("runs/quickstart")
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    n_envs: int | None = None


def run_quickstart(args: QuickstartArgs, log=None) -> dict[str, Any]:
    """Train, evaluate three policies on the same seeds, write and return the comparison."""
    from agents.baselines import make_baseline
    from agents.env_pool import EnvPool
    from agents.evaluation import evaluate_policy
    from agents.policies import load_policy
    from agents.stats import paired_difference
    from agents.train import TrainArgs, load_hyperparams, train

    from agents.protocol import distinct_seeds

    out = Path(args.out)
    if not args.seeds:
        raise ValueError("at least one evaluation seed is needed")
    distinct_seeds(args.seeds)  # before training, not after it
    started = time.perf_counter()
    recipe = {key: value for key, value in load_hyperparams("ppo", QUICKSTART_RECIPE).items() if key != "n_timesteps"}
    recipe_envs = recipe.pop("n_envs")  # an argument of its own, never a --set override
    run_dir = train(
        TrainArgs(
            algo="ppo",
            scenario="quickstart",
            timesteps=args.timesteps,
            seed=args.train_seed,
            n_envs=recipe_envs if args.n_envs is None else args.n_envs,
            set=recipe,
            out=out / "train",
            fidelity=args.fidelity,
            env_kwargs=dict(args.env_kwargs),
            eval_freq=0,  # the frozen protocol below evaluates the final model
            checkpoint_freq=0,
            progress=args.progress,
            verbose=0,
        )
    )
    train_s = time.perf_counter() - started
    # An on-policy rollout is n_envs x n_steps rounds: a budget below it trains one whole rollout.
    from agents.policies import read_run

    timesteps_done = int(read_run(run_dir).record.get("timesteps_done") or args.timesteps)
    if log is not None:
        log(f"trained PPO for {timesteps_done} steps in {train_s:.0f} s: {run_dir}")
    ppo = load_policy(run_dir)
    ppo.name = "ppo"
    results: dict[str, EvaluationResult] = {}
    reference: dict[int, float] | bool = True
    with EnvPool() as pool:  # the three policies play in the same environments
        for policy in (make_baseline("no_defense"), make_baseline("uniform"), ppo):
            results[policy.name] = evaluate_policy(
                policy, "quickstart", list(args.seeds), 1, fidelity=args.fidelity, env_kwargs=dict(args.env_kwargs),
                reference=reference, out=out / "eval" / policy.name, log=log, pool=pool,
            )
            if policy.name == "no_defense":
                reference = results["no_defense"].reference_clean_acc or True
    uniform_returns = results["uniform"].per_seed("return")
    rows = []
    for name in ("ppo", "uniform", "no_defense"):
        result = results[name]
        rows.append(
            {
                "policy": name,
                "return": result.interval("return").as_dict(),
                "return_minus_uniform": paired_difference(result.per_seed("return"), uniform_returns).as_dict(),
                "asr": result.interval("asr").as_dict(),
                "system_asr": result.interval("system_asr").as_dict(),
                "clean_acc": result.interval("clean_acc").as_dict(),
            }
        )
    report = {
        "run_dir": str(run_dir),
        "timesteps": timesteps_done,
        "timesteps_requested": args.timesteps,
        "train_seed": args.train_seed,
        "fidelity": args.fidelity,
        "env_kwargs": dict(args.env_kwargs),
        "metadata": results["ppo"].metadata,
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "train_time_s": round(train_s, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quickstart.md").write_text(_quickstart_markdown(report))
    return report


def _cell(entry: dict, digits: int = 3) -> str:
    """An :meth:`Interval.as_dict` as ``mean ± half-width`` (``mean [low, high]`` where the metric's range clips it)."""
    from agents.stats import Interval

    return Interval.from_dict(entry).format(digits)


def _quickstart_markdown(report: dict[str, Any]) -> str:
    meta = report["metadata"]
    lines = [
        "# CMAI quickstart",
        "",
        f"PPO trained for {report['timesteps']} rounds (seed {report['train_seed']}, {report['fidelity']} fidelity) "
        f"in {report['train_time_s']} s; run folder `{report['run_dir']}`.",
        f"Evaluated on `{meta['scenario']}` (`{meta['env_id']}`, sha256 `{meta['scenario_hash'][:16]}…`), seeds "
        f"{meta['seeds']}, one episode each; mean ± 95% t-interval half-width over seeds, differences paired per seed.",
        "",
        "| policy | return | return − uniform | ASR | system ASR | clean acc |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['policy']} | {_cell(row['return'])} | {_cell(row['return_minus_uniform'])} | {_cell(row['asr'])} "
            f"| {_cell(row['system_asr'])} | {_cell(row['clean_acc'])} |"
        )
    return "\n".join(lines) + "\n"


def print_quickstart(report: dict[str, Any]) -> None:
    from rich.table import Table

    meta = report["metadata"]
    table = Table(title=f"quickstart: PPO ({report['timesteps']} steps) vs baselines, seeds {meta['seeds']}")
    for column in ("policy", "return ± 95% CI", "return − uniform ± 95% CI", "ASR", "system ASR", "clean acc"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for row in report["rows"]:
        table.add_row(row["policy"], _cell(row["return"]), _cell(row["return_minus_uniform"]), _cell(row["asr"]),
                      _cell(row["system_asr"]), _cell(row["clean_acc"]))
    _console().print(table)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cmai_env.keyvalue import parse_assignments

    report = run_quickstart(
        QuickstartArgs(
            timesteps=args.timesteps,
            seeds=args.seeds,
            train_seed=args.train_seed,
            fidelity=args.fidelity,
            out=Path(args.out),
            env_kwargs=parse_assignments(args.env_kwargs, ":", "--env-kwargs"),
            progress=not args.quiet,
            n_envs=args.n_envs,
        ),
        log=_log(args.quiet),
    )
    print_quickstart(report)
    print(f"wrote {Path(args.out) / 'quickstart.md'} ({report['wall_time_s']} s in all)")
    return 0


# ------------------------------------------------------------------------------ parsers
def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="evaluation seeds (default: the scenario's protocol, 0 1 2 3 4)")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per seed (default: the scenario's protocol, 1)")
    parser.add_argument("--fidelity", choices=("pixel", "embedding"), default=None, help="default: a trained policy's training fidelity, else the scenario's")
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides, e.g. episode_rounds:20 defense.lr:0.001")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out (default: refuse, so nothing is lost)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or tables")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads of this process (default: torch's, one per core); 1 when several runs share the cores")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``benchmark`` and ``quickstart`` to ``cmai``."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained policy or a baseline under the frozen protocol",
        description="Writes rounds.csv, summary.json (mean and 95% CI over seeds) and PNGs under --out.",
    )
    evaluate.add_argument("--policy", required=True, help="a run folder from `cmai train`, a model .zip, or baseline:NAME")
    evaluate.add_argument("--scenario", required=True, help="shipped scenario name or YAML file (evaluation-only ones use CMAI-Eval-v0)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--tensorboard", default=None, help="also log the cmai/... tags per round under this folder")
    evaluate.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: cpu)")
    evaluate.add_argument("--no-cache", action="store_true", help="re-run no_defense for the clean-accuracy drop instead of using the cache")
    _add_common(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    benchmark = subparsers.add_parser(
        "benchmark",
        help="every baseline (and given trained policies) on scenarios, with the gating ablation",
        description="Writes results.md and results.json (comparison and ablation tables) under --out.",
    )
    benchmark.add_argument("--scenarios", nargs="+", required=True, help="scenario names or YAML files")
    benchmark.add_argument("--out", required=True, help="output folder")
    benchmark.add_argument("--policies", nargs="*", default=[], help="trained run folders (or baseline:NAME) to compare and ablate")
    benchmark.add_argument("--baselines", nargs="*", default=None, help="subset of baselines (default: all); no_defense, static_adversarial, proeat_dynamic and static_consistency are always added (the report's references)")
    benchmark.add_argument("--fixed-grid", action="store_true",
                           help="also run every β of the simplex grid (step 1/3) held fixed, and compare each trained policy with the best of them")
    benchmark.add_argument("--bootstrap-reps", type=int, default=1000, help="rliable stratified-bootstrap resamples for IQM/mean/P(improvement) CIs, at least 100 (default: 1000)")
    _add_common(benchmark)
    benchmark.set_defaults(func=cmd_benchmark)

    quickstart = subparsers.add_parser(
        "quickstart",
        help="train PPO on the quickstart scenario and compare it with uniform and no_defense",
        description="The README's main job (`make run`). Writes the training run, the evaluations and quickstart.md under --out.",
    )
    quickstart.add_argument("--timesteps", type=int, default=QUICKSTART_TIMESTEPS, help=f"PPO steps (default: {QUICKSTART_TIMESTEPS})")
    quickstart.add_argument("--seeds", type=int, nargs="+", default=list(QUICKSTART_SEEDS), help="evaluation seeds (default: 0 1 2 3 4)")
    quickstart.add_argument("--train-seed", type=int, default=0, help="training seed (default: 0)")
    quickstart.add_argument("--n-envs", type=positive_int, default=None,
                            help=f"training envs (default: {QUICKSTART_RECIPE}'s recipe, 32 batched envs; one PPO update takes n_envs x 64 rounds)")
    quickstart.add_argument("--fidelity", choices=("pixel", "embedding"), default="embedding", help="default: embedding")
    quickstart.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quickstart.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides")
    quickstart.add_argument("--quiet", action="store_true", help="no progress output")
    quickstart.set_defaults(func=cmd_quickstart)
