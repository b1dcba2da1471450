"""``cmai sweep``: algorithms × scenarios × seeds (× hyperparameter samples) as Ray Tune trials.

    from agents.sweep import SweepArgs, sweep
    report = sweep(SweepArgs(algos=["ppo", "a2c"], scenarios=["quickstart"], seeds=[0, 1], timesteps=2000))

is ``cmai sweep --algos ppo a2c --scenarios quickstart --seeds 0 1 --timesteps 2000``. Each trial
trains one policy with :func:`agents.train.train` into its own run folder in the usual layout
(``<out>/<algo>/<scenario>_<n>/``, everything ``cmai train`` writes) and evaluates it under the
frozen protocol on the run's seed (``sweep_eval/summary.json``). Every baseline is evaluated on
the same scenarios and seeds (``<out>/baselines/<scenario>/<name>/seed_<s>/``), also as trials.

Ray: ``address=None`` starts a local Ray on the cores it finds (``num_cpus`` to cap it); an
address (``ray://head:10001`` or ``auto``) runs the same trials on a cluster, which then needs
``--out`` on a filesystem every node shares. Each trial asks for ``cpus_per_trial`` CPUs and
``gpus_per_trial`` GPUs (the env and the policy go to ``cuda`` when it asks for one).

Resuming: ``<out>/sweep_manifest.json`` fixes each trial's run folder (and its hyperparameter
sample) the first time it is seen. Running the same command again skips finished trials,
continues interrupted ones from their latest checkpoint (``cmai train --resume``) and restarts
those that stopped before their first checkpoint.

Report: ``sweep.json``/``sweep.md`` with one row per trial, mean ± 95% t-interval per policy and
scenario (the tables of ``cmai benchmark``), and the rliable aggregates (:mod:`agents.aggregate`:
IQM and mean with stratified-bootstrap CIs, P(improvement) of each learned policy over each
baseline, ``profile_*.png``); training seeds are the runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.aggregate import HIGHER_IS_BETTER, aggregate, plot_profiles
from agents.aggregate import render_markdown as render_aggregate
from agents.stats import bounds_for, t_interval

MANIFEST = "sweep_manifest.json"
RESULT_FILE = "sweep_result.json"
#: Baselines every sweep compares against (the references of ``cmai benchmark``).
DEFAULT_BASELINES = ("no_defense", "static_adversarial", "proeat_dynamic", "static_consistency", "uniform")
METRICS = tuple(HIGHER_IS_BETTER)


@dataclass
class SweepArgs:
    """Everything ``cmai sweep`` takes.

    :param algos: algorithms (as for ``cmai train``).
    :param scenarios: shipped scenario names or YAML files.
    :param seeds: training seeds; each trained run is evaluated on its own seed (the protocol
        adds its evaluation offset), and each baseline on every seed.
    :param timesteps: environment steps per trial (``None``: the hyperparameter file's).
    :param out: root of the run folders, the manifest and the report.
    :param samples: hyperparameter samples per algorithm (0: the hyperparameter files as they
        are); sample ``k`` of ``algo`` is the policy ``algo#k``, drawn from
        :func:`agents.tune.sample_hyperparams` by a seeded random sampler.
    :param set: hyperparameter overrides for every trial (``key=value``).
    :param env_kwargs: scenario overrides for training and evaluation (``key:value``).
    :param fidelity: ``embedding`` or ``pixel``.
    :param baselines: baselines evaluated on every scenario and seed.
    :param eval_episodes: evaluation episodes per run (and per baseline seed).
    :param address: Ray cluster address; ``None`` starts a local Ray.
    :param num_cpus: CPUs of the local Ray (default: all it finds).
    :param cpus_per_trial: CPUs each trial reserves.
    :param gpus_per_trial: GPUs each trial reserves (> 0 also puts the trial on ``cuda``).
    :param bootstrap_reps: rliable bootstrap resamples.
    :param verbose: 0 quiet, 1 a line per trial.
    """

    algos: Sequence[str] = ("ppo",)
    scenarios: Sequence[str] = ("quickstart",)
    seeds: Sequence[int] = (0, 1, 2)
    timesteps: int | None = None
    out: Path = Path("runs/sweep")
    samples: int = 0
    set: Sequence[str] = field(default_factory=list)
    env_kwargs: Sequence[str] = field(default_factory=list)
    fidelity: str = "embedding"
    baselines: Sequence[str] = DEFAULT_BASELINES
    eval_episodes: int = 1
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    bootstrap_reps: int = 1000
    verbose: int = 1


class SweepIncomplete(RuntimeError):
    """Some trials failed; the report covers the others and the same command retries the rest."""


@dataclass(frozen=True)
class TrialSpec:
    """One trial: train ``algo`` (sample ``sample``) on ``scenario`` with ``seed``, or evaluate a baseline.

    :param kind: ``train`` or ``baseline``.
    :param policy: the label in the report (``ppo``, ``ppo#1``, ``uniform``).
    :param folder: the run folder (``train``) or the evaluation folder (``baseline``), absolute.
    :param overrides: hyperparameter overrides (``--set`` plus the sample).
    """

    kind: str
    policy: str
    algo: str
    scenario: str
    seed: int
    folder: str
    overrides: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.policy}|{self.scenario}|{self.seed}"


# ------------------------------------------------------------------------------ the grid
def _validate(args: SweepArgs) -> None:
    from agents.baselines import available_baselines
    from agents.policies import algo_class
    from agents.protocol import distinct_seeds
    from cmai_env.scenario import distinct_scenario_names

    for algo in args.algos:
        algo_class(algo)
    if not args.algos or not args.scenarios or not args.seeds:
        raise ValueError("a sweep needs at least one algorithm, scenario and seed")
    distinct_seeds(args.seeds, "seeds")
    unknown = [b for b in args.baselines if b not in available_baselines()]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; available: {', '.join(available_baselines())}")
    from agents.aggregate import check_reps

    check_reps(args.bootstrap_reps, "bootstrap_reps")  # the report's aggregate needs this many, after every trial
    for name in ("samples", "eval_episodes"):
        if getattr(args, name) < (0 if name == "samples" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'samples' else 'at least 1'}, got {getattr(args, name)}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ValueError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {args.cpus_per_trial} and {args.gpus_per_trial}")
    if args.timesteps is not None and args.timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {args.timesteps}")
    # trials and baseline folders are keyed by scenario name: two files of one name would share them
    distinct_scenario_names([_scenario_argument(s) for s in args.scenarios])


def _scenario_argument(scenario: str) -> str:
    """A shipped name as is; a file as an absolute path (Ray runs trials in other folders)."""
    path = Path(scenario)
    return str(path.resolve()) if path.suffix in (".yml", ".yaml") or path.is_file() else scenario


def _sample_overrides(algo: str, samples: int, seed: int) -> list[dict[str, Any]]:
    """``samples`` hyperparameter draws from the ``cmai tune`` search space (seeded random sampler)."""
    import optuna

    from agents.tune import sample_hyperparams

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    draws = []
    for _ in range(samples):
        trial = study.ask()
        draws.append(sample_hyperparams(trial, algo))
        study.tell(trial, 0.0)
    return draws


def plan_trials(args: SweepArgs, manifest: dict[str, Any]) -> list[TrialSpec]:
    """Every trial of the grid, with the run folder the manifest fixed for it (new ones reserved now).

    ``manifest`` (the parsed ``sweep_manifest.json``, or ``{}``) is updated in place.
    """
    from agents.train import _slug, parse_assignments, resolve_scenario, reserve_run_dir

    out = Path(args.out).resolve()
    base_overrides = parse_assignments(args.set, "=", "--set")
    env_overrides = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    env_overrides.setdefault("fidelity", args.fidelity)
    trials_entry: dict[str, Any] = manifest.setdefault("trials", {})
    samples_entry: dict[str, Any] = manifest.setdefault("samples", {})
    specs: list[TrialSpec] = []
    for scenario in args.scenarios:
        argument = _scenario_argument(scenario)
        name = _slug(resolve_scenario(argument, env_overrides).name)
        for algo in args.algos:
            if args.samples:
                draws = samples_entry.setdefault(algo, [])
                if len(draws) < args.samples:  # keep the draws already run, add new ones
                    draws.extend(_sample_overrides(algo, args.samples, seed=len(draws) + 7919 * args.algos.index(algo))[len(draws):])
                variants = [(f"{algo}#{k}", {**base_overrides, **draws[k]}) for k in range(args.samples)]
            else:
                variants = [(algo, dict(base_overrides))]
            for policy, overrides in variants:
                for seed in args.seeds:
                    key = f"train|{policy}|{name}|{seed}"
                    if key not in trials_entry:
                        trials_entry[key] = str(reserve_run_dir(out, algo, name))
                    specs.append(TrialSpec("train", policy, algo, argument, int(seed), trials_entry[key], overrides))
        for baseline in args.baselines:
            for seed in args.seeds:
                folder = out / "baselines" / name / baseline / f"seed_{seed}"
                specs.append(TrialSpec("baseline", baseline, "", argument, int(seed), str(folder), {}))
    return specs


def _finished(spec: TrialSpec) -> bool:
    return (Path(spec.folder) / RESULT_FILE).is_file()


# ------------------------------------------------------------------------------ one trial
def run_trial(spec: TrialSpec, args: SweepArgs) -> dict[str, Any]:
    """Train (or resume) and evaluate one trial in its folder; return and store its metrics.

    Runs inside a Ray worker, but is a plain function (tests call it directly).
    """
    from agents.evaluation import evaluate_policy
    from agents.policies import RUN_FILE
    from agents.train import TrainArgs, parse_assignments, train

    folder = Path(spec.folder)
    env_kwargs = parse_assignments(args.env_kwargs, ":", "--env-kwargs")
    device = "cuda" if args.gpus_per_trial > 0 else "cpu"
    status = None
    if spec.kind == "train":
        record_path = folder / RUN_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        status = None if record is None else record.get("status")
        resumed = False
        if status not in (None, "finished"):
            try:  # interrupted, failed or killed mid-run: continue from its latest checkpoint
                train(TrainArgs(resume=folder, progress=False, verbose=0))
                resumed = True
            except FileNotFoundError:  # stopped before its first checkpoint: start again
                shutil.rmtree(folder)
                status = None
        if status is None and not resumed:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():  # a previous attempt's Monitor files
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            train(
                TrainArgs(
                    algo=spec.algo, scenario=spec.scenario, timesteps=args.timesteps, seed=spec.seed, out=folder.parent.parent,
                    set=spec.overrides, env_kwargs=env_kwargs, fidelity=args.fidelity, device=device, progress=False, verbose=0,
                ),
                run_dir=folder,
            )
        policy: Any = str(folder)
        eval_dir = folder / "sweep_eval"
    else:
        from agents.baselines import make_baseline

        policy = make_baseline(spec.policy)
        eval_dir = folder
    result = evaluate_policy(
        policy, spec.scenario, seeds=[spec.seed], episodes=args.eval_episodes, fidelity=args.fidelity,
        env_kwargs={k: v for k, v in env_kwargs.items() if k != "fidelity"}, reference=False, out=eval_dir, plots=False,
    )
    metrics = {m: result.per_seed(m)[0] for m in METRICS}
    entry = {"key": spec.key, "policy": spec.policy, "kind": spec.kind, "algo": spec.algo, "scenario": spec.scenario,
             "scenario_name": result.metadata["scenario"], "seed": spec.seed, "folder": str(folder), "metrics": metrics,
             "resumed": status not in (None, "finished")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT_FILE).write_text(json.dumps(entry, indent=2))
    return entry


def _ray_trainable(config: dict[str, Any], configs: Sequence[Mapping[str, Any]]) -> None:
    """The Ray Tune function trainable: one :func:`run_trial` (``configs[config["trial"]]``), its metrics reported once."""
    import torch
    from ray import tune

    chosen = configs[int(config["trial"])]
    torch.set_num_threads(max(1, int(chosen["cpus"])))
    spec = TrialSpec(**chosen["spec"])
    args = SweepArgs(**chosen["args"])
    entry = run_trial(spec, args)
    tune.report({k: (float("nan") if v is None else float(v)) for k, v in entry["metrics"].items()})


# ------------------------------------------------------------------------------ the sweep
def _args_payload(args: SweepArgs) -> dict[str, Any]:
    payload = dataclasses.asdict(args)
    payload["out"] = str(Path(args.out).resolve())
    for key in ("algos", "scenarios", "seeds", "set", "env_kwargs", "baselines"):
        payload[key] = list(payload[key])
    return payload


def run_ray(specs: Sequence[TrialSpec], args: SweepArgs, log: Callable[[str], None]) -> None:
    """Run ``specs`` as Ray Tune trials (a grid over the specs), each with its own resources."""
    import ray
    from ray import tune

    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": args.verbose >= 2, "configure_logging": False}
        if args.address is not None:
            init["address"] = args.address
        else:
            init["num_cpus"] = args.num_cpus or os.cpu_count() or 1
            init["num_gpus"] = int(np.ceil(args.gpus_per_trial)) if args.gpus_per_trial > 0 else None
        # Trials run with the driver's package on the path; on a cluster, nodes need cmai installed.
        ray.init(**{k: v for k, v in init.items() if v is not None})
    try:
        payload = _args_payload(args)
        configs = [{"spec": dataclasses.asdict(s), "args": payload, "cpus": args.cpus_per_trial} for s in specs]
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        tuner = tune.Tuner(
            # The grid is over trial indices; the specs travel through Ray's object store.
            tune.with_resources(tune.with_parameters(_ray_trainable, configs=configs), resources),
            param_space={"trial": tune.grid_search(list(range(len(configs))))},
            # One worker process runs trial after trial: torch, the backbone and the env caches are
            # loaded once per worker, not once per trial.
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name="ray_tune",
                storage_path=str(Path(args.out).resolve() / "ray_results"),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
        results = tuner.fit()
        errors = [r.error for r in results if r.error is not None]
        for error in errors:
            log(f"trial failed: {error}")
    finally:
        if started_here:
            ray.shutdown()


def sweep(args: SweepArgs, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the grid (skipping finished trials), then write ``sweep.json``, ``sweep.md`` and the profiles."""
    log = log or (print if args.verbose >= 1 else (lambda _: None))
    _validate(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    specs = plan_trials(args, manifest)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    todo = [s for s in specs if not _finished(s)]
    log(f"cmai sweep: {len(specs)} trials, {len(specs) - len(todo)} already finished, {len(todo)} to run")
    if todo:
        run_ray(todo, args, log)
    missing = [s.key for s in specs if not _finished(s)]
    entries = [json.loads((Path(s.folder) / RESULT_FILE).read_text()) for s in specs if _finished(s)]
    report = build_report(args, entries, missing)
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sweep.md").write_text(render_markdown(report))
    plot_profiles(_scores(entries), out, reps=args.bootstrap_reps)
    if missing:
        raise SweepIncomplete(f"{len(missing)} trial(s) did not finish ({', '.join(missing[:4])}...); run the same command again to retry them")
    return report


def _scores(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, list]]]:
    scores: dict[str, dict[str, dict[str, list]]] = {}
    for e in sorted(entries, key=lambda e: e["seed"]):
        policy = scores.setdefault(e["scenario_name"], {}).setdefault(e["policy"], {m: [] for m in METRICS})
        for m in METRICS:
            policy[m].append(e["metrics"][m])
    return scores


def build_report(args: SweepArgs, entries: Sequence[Mapping[str, Any]], missing: Sequence[str] = ()) -> dict[str, Any]:
    """Per-trial rows, t-interval tables per policy and scenario, and the rliable aggregates."""
    scores = _scores(entries)
    learned = list(dict.fromkeys(e["policy"] for e in entries if e["kind"] == "train"))
    baselines = [b for b in args.baselines if any(e["policy"] == b for e in entries)]
    intervals = {
        scenario: {policy: {m: t_interval(values[m], bounds=bounds_for(m)).as_dict() for m in METRICS} for policy, values in block.items()}
        for scenario, block in scores.items()
    }
    return {
        "settings": _args_payload(args),
        "trials": sorted(entries, key=lambda e: e["key"]),
        "missing": list(missing),
        "t_intervals": intervals,
        "aggregate": aggregate(scores, learned, baselines, reps=args.bootstrap_reps) if scores else None,
    }


def render_markdown(report: Mapping[str, Any]) -> str:
    """``sweep.md``: mean ± 95% t-interval per policy and scenario, then the rliable tables."""
    from agents.stats import Interval

    lines = ["# CMAI sweep", "", "Mean ± 95% t-interval over seeds (runs); each learned run is evaluated on its own seed.", ""]
    lines += ["| scenario | policy | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for scenario, block in report["t_intervals"].items():
        for policy, entry in block.items():
            lines.append(f"| {scenario} | {policy} | " + " | ".join(Interval.from_dict(entry[m]).format() for m in METRICS) + " |")
    if report["missing"]:
        lines += ["", f"Not finished: {', '.join(report['missing'])}"]
    if report["aggregate"] is not None:
        lines += ["", render_aggregate(report["aggregate"])]
    return "\n".join(lines) + "\n"
