"""``cmai benchmark``: every baseline and the given trained policies, plus the gating ablation.

For each scenario, every policy is evaluated under the frozen protocol
(:mod:`agents.evaluation`, same seeds for all, so differences are paired per seed):

* **Comparison** (one row per policy): the model's ASR and the system's (``system_asr``: flipped
  and not flagged by the detector, what the reward scores by default); ASR reduction relative to ``static_adversarial``,
  ``proeat_dynamic`` and ``static_consistency`` (``ASR_ref − ASR``, positive = fewer attacks
  succeed, paired over seeds); clean-accuracy degradation vs ``no_defense``
  (``clean_acc(no_defense) − clean_acc``); the three adaptation latencies in rounds; the return.
  Each as mean ± 95% t-interval over seeds.
* **Ablation** of each trained gating policy (or, when none is given, of the adaptive
  ``detector_switch`` heuristic so the table is never empty), via wrappers around any
  :class:`GatingPolicy` that rewrite its β before they reach the environment:

  - ``no_consist``: ``β' = (β_task, 0, β_adv) / (β_task + β_adv)``;
  - ``no_adv``: ``β' = (β_task, β_consist, 0) / (β_task + β_consist)``;
  - ``fixed_mean``: ``β' = β̄``, the policy's own mean β over its evaluation episodes on the
    scenario, i.e. the same average allocation without adaptation.

  In the continuous env a "0" weight is as small as the action space allows (≈ e^(−6) of the
  largest, :func:`cmai_env.env.action_from_betas`); in the discrete env the nearest grid β
  is used (if the remaining weights sum to 0, they become equal).

* **Against the best fixed β** (``--fixed-grid``): every β of the simplex grid (step ⅓,
  :data:`cmai_env.env.DISCRETE_BETAS`) held for whole episodes joins the comparison as
  ``fixed(β)``; the one with the highest mean return on these same seeds is the best fixed β
  (chosen on the evaluation seeds, so it is favoured, not the trained policy), and each trained
  policy (every policy given with ``--policies``) gets its paired return difference against it and
  against ``proeat_dynamic``.
* **Aggregates** (:mod:`agents.aggregate`, rliable): IQM and mean with stratified-bootstrap 95%
  intervals per policy and scenario (and over scenarios for rates), the probability of
  improvement of each trained policy over each baseline, and performance profiles
  (``profile_robustness.png``, ``profile_clean_acc.png``); seeds are the runs.

Writes ``results.json`` (everything, including per-seed values; the aggregates under
``"aggregate"``) and ``results.md`` (the tables), and each evaluation's own ``rounds.csv``/``summary.json``/PNGs under
``<out>/<scenario>/<policy>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

import cmai_env
from agents.baselines import FixedWeightsPolicy, available_baselines, decode_action, encode_betas, make_baseline
from agents.env_pool import EnvPool
from agents.evaluation import EvaluationResult, evaluate_policy
from agents.policy_resolution import policy_action_mode, policy_env_kwargs, resolve_policies
from agents.protocol import protocol_for
from agents.provenance import git_commit
from agents.aggregate import HIGHER_IS_BETTER as AGGREGATE_DIRECTIONS
from agents.aggregate import aggregate, check_reps, plot_profiles
from agents.aggregate import render_markdown as render_aggregate
from agents.stats import Interval, bounds_for, paired_difference
from cmai_env.env import DISCRETE_BETAS
from cmai_env.scenario import distinct_scenario_names

if TYPE_CHECKING:
    from agents.policies import GatingPolicy

#: Baselines whose ASR the comparison measures reductions against.
ASR_REFERENCES = ("static_adversarial", "proeat_dynamic", "static_consistency")
#: Latencies shown in the comparison (rounds; the ms values are in results.json).
LATENCY_COLUMNS = ("detection_rounds", "weight_response_rounds", "recovery_rounds")
ABLATIONS = ("full", "no_consist", "no_adv", "fixed_mean")
#: Policy ablated when no trained policy is given.
DEFAULT_ABLATION_TARGET = "detector_switch"
#: Metrics of the rliable aggregate (:mod:`agents.aggregate`).
AGGREGATE_METRICS = tuple(AGGREGATE_DIRECTIONS)


# ----------------------------------------------------------------------------- wrappers
class BetaTransformPolicy:
    """A :class:`GatingPolicy` whose β are those of ``inner`` rewritten by ``transform``.

    ``predict`` decodes the inner action to β (``softmax(3a)`` or the grid row), applies
    ``transform`` and re-encodes it for the environment; ``reset``/``observe`` go to ``inner``.

    :param inner: any gating policy.
    :param name: label for reports.
    :param transform: β ↦ β' on the simplex.
    """

    def __init__(self, inner: "GatingPolicy", name: str, transform: Callable[[np.ndarray], np.ndarray]) -> None:
        self.inner = inner
        self.name = name
        self.transform = transform
        self.action_mode = policy_action_mode(inner)

    def bind(self, env: Any) -> None:
        from agents.baselines import action_mode_of

        self.action_mode = action_mode_of(env.action_space)
        if hasattr(self.inner, "bind"):
            self.inner.bind(env)

    def reset(self) -> None:
        self.inner.reset()

    def observe(self, info: dict) -> None:
        self.inner.observe(info)

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        action, state = self.inner.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)
        if np.asarray(observation).ndim == 2:
            rows = np.asarray(action).reshape(len(observation), -1)
            return np.stack([self._rewrite(row) for row in rows]), state
        return self._rewrite(action), state

    def _rewrite(self, action: Any) -> np.ndarray:
        return encode_betas(self.transform(decode_action(action, self.action_mode)), self.action_mode)

    def __repr__(self) -> str:
        return f"BetaTransformPolicy(name={self.name!r}, inner={self.inner!r})"


def _drop_term(index: int) -> Callable[[np.ndarray], np.ndarray]:
    def transform(betas: np.ndarray) -> np.ndarray:
        kept = np.asarray(betas, dtype=np.float64).copy()
        kept[index] = 0.0
        total = kept.sum()
        if total <= 0:
            kept = np.ones(3)
            kept[index] = 0.0
            total = kept.sum()
        return kept / total

    return transform


def without_consistency(policy: "GatingPolicy") -> BetaTransformPolicy:
    """``policy`` with β_consist forced to 0 and the rest renormalised."""
    return BetaTransformPolicy(policy, f"{policy.name}/no_consist", _drop_term(1))


def without_adversarial(policy: "GatingPolicy") -> BetaTransformPolicy:
    """``policy`` with β_adv forced to 0 and the rest renormalised."""
    return BetaTransformPolicy(policy, f"{policy.name}/no_adv", _drop_term(2))


def with_fixed_weights(policy: "GatingPolicy", betas: np.ndarray) -> BetaTransformPolicy:
    """``policy`` replaced by the constant ``betas`` (its mean β: the non-adaptive counterpart)."""
    fixed = np.asarray(betas, dtype=np.float64) / float(np.sum(betas))
    return BetaTransformPolicy(policy, f"{policy.name}/fixed_mean", lambda _: fixed.copy())


# ----------------------------------------------------------------------------- tables
@dataclass
class BenchmarkArgs:
    """Arguments of :func:`run_benchmark` (the ``cmai benchmark`` flags).

    :param scenarios: scenario names or YAML paths.
    :param out: output folder.
    :param seeds: evaluation seeds (default: each scenario's protocol).
    :param episodes: episodes per seed (default: each scenario's protocol).
    :param policies: trained run folders / model files (or ``baseline:NAME``) to compare and ablate.
    :param baselines: baseline names to run (default: all).
    :param fidelity: ``pixel`` or ``embedding`` for every policy (default: the trained policies'
        training fidelity if they agree, else each scenario's).
    :param env_kwargs: scenario overrides for every evaluation.
    :param plots: write per-evaluation PNGs (and the rliable performance profiles).
    :param bootstrap_reps: resamples of the rliable stratified bootstrap (:mod:`agents.aggregate`).
    :param fixed_grid: also evaluate every β of the simplex grid held fixed and compare each
        trained policy with the best of them.
    """

    scenarios: Sequence[str]
    out: Path
    seeds: Sequence[int] | None = None
    episodes: int | None = None
    policies: Sequence[str] = ()
    baselines: Sequence[str] | None = None
    fidelity: str | None = None
    env_kwargs: dict[str, Any] | None = None
    plots: bool = True
    bootstrap_reps: int = 1000
    fixed_grid: bool = False


def _interval_json(interval: Interval) -> dict:
    return interval.as_dict()


def _comparison_row(result: EvaluationResult, by_name: dict[str, EvaluationResult], kind: str) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": result.policy, "kind": kind, "asr": _interval_json(result.interval("asr"))}
    # The end-to-end figure the reward scores by default (flipped and not flagged by the detector).
    row["system_asr"] = _interval_json(result.interval("system_asr"))
    for ref in ASR_REFERENCES:
        reference = by_name.get(ref)
        row[f"asr_reduction_vs_{ref}"] = (
            None if reference is None else _interval_json(paired_difference(reference.per_seed("asr"), result.per_seed("asr"), bounds=bounds_for("asr")))
        )
    row["clean_acc"] = _interval_json(result.interval("clean_acc"))
    row["clean_acc_drop"] = _interval_json(result.interval("clean_acc_drop"))
    for name in ("detection_rounds", "detection_ms", "weight_response_rounds", "weight_response_ms", "recovery_rounds", "recovery_ms"):
        entry = _interval_json(result.interval(name))
        summary = result.summary()["latency"][name]
        entry["measured"], entry["shifts"] = summary["measured"], summary["shifts"]
        row[name] = entry
    row["return"] = _interval_json(result.interval("return"))
    row["mean_betas"] = result.mean_betas().round(4).tolist()
    return row


def fixed_grid_policies() -> list[FixedWeightsPolicy]:
    """One fixed-β policy per point of the simplex grid (``DISCRETE_BETAS``), named ``fixed(β)``."""
    return [FixedWeightsPolicy("fixed(" + ",".join(f"{b:.2f}" for b in betas) + ")", tuple(betas)) for betas in DISCRETE_BETAS]


def _versus_best_fixed(by_name: dict[str, EvaluationResult], kinds: dict[str, str], given: Sequence[str]) -> dict[str, Any]:
    """The grid's best fixed β by mean return, and each given policy's paired return gap to it."""
    grid = [name for name, kind in kinds.items() if kind == "fixed_grid"]
    best = max(grid, key=lambda name: by_name[name].interval("return").mean)
    rows = []
    for name in given:
        returns = by_name[name].per_seed("return")
        rows.append(
            {
                "policy": name,
                "delta_return_vs_best_fixed": _interval_json(paired_difference(returns, by_name[best].per_seed("return"))),
                "delta_return_vs_proeat_dynamic": _interval_json(paired_difference(returns, by_name["proeat_dynamic"].per_seed("return"))),
            }
        )
    return {"best_fixed": best, "best_fixed_return": _interval_json(by_name[best].interval("return")), "rows": rows}


def _ablation_rows(results: dict[str, EvaluationResult]) -> list[dict[str, Any]]:
    full = results["full"]
    rows = []
    for variant in ABLATIONS:
        result = results[variant]
        rows.append(
            {
                "variant": variant,
                "policy": result.policy,
                "asr": _interval_json(result.interval("asr")),
                "system_asr": _interval_json(result.interval("system_asr")),
                "clean_acc": _interval_json(result.interval("clean_acc")),
                "return": _interval_json(result.interval("return")),
                "delta_return_vs_full": _interval_json(paired_difference(result.per_seed("return"), full.per_seed("return"))),
                "delta_asr_vs_full": _interval_json(paired_difference(result.per_seed("asr"), full.per_seed("asr"), bounds=bounds_for("asr"))),
                "mean_betas": result.mean_betas().round(4).tolist(),
            }
        )
    return rows


def _fmt(entry: dict | None, digits: int = 3) -> str:
    if entry is None or entry.get("mean") is None:
        return "—"
    text = Interval.from_dict(entry).format(digits)
    if "measured" in entry and entry.get("shifts"):
        text += f" ({entry['measured']}/{entry['shifts']})"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    """``results.md``: protocol, comparison and ablation tables per scenario."""
    protocol = report["protocol"]
    lines = [
        "# CMAI benchmark",
        "",
        f"cmai {protocol['cmai_version']}, commit `{protocol['git_commit']}`; fidelity `{protocol['fidelity'] or 'each scenario’s own'}`; "
        f"env overrides `{json.dumps(protocol['env_kwargs'])}`.",
        "Every cell is the mean ± 95% t-interval over seeds (per-seed means of the episodes); "
        "differences are paired per seed. ASR: the model's mean probe ASR over attacked rounds; system ASR: "
        "the same for the defended system (flipped and not flagged by the detector, what the reward scores by default). "
        "Latencies in rounds, with (measured/shifts).",
        "",
    ]
    for name, block in report["scenarios"].items():
        meta = block["metadata"]
        lines += [
            f"## {name}",
            "",
            f"env `{meta['env_id']}`, scenario sha256 `{meta['scenario_hash'][:16]}…`, seeds {meta['seeds']}, "
            f"{meta['episodes_per_seed']} episode(s) per seed.",
            "",
            "### Comparison",
            "",
            "| policy | ASR | system ASR | ASR red. vs static_adversarial | ASR red. vs proeat_dynamic | ASR red. vs static_consistency "
            "| clean acc | clean-acc drop vs no_defense | detection | weight response | recovery | return |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in block["comparison"]:
            label = row["policy"] + {"trained": " *(trained)*", "fixed_grid": " *(grid)*"}.get(row["kind"], "")
            cells = [
                label,
                _fmt(row["asr"]),
                _fmt(row["system_asr"]),
                *(_fmt(row[f"asr_reduction_vs_{ref}"]) for ref in ASR_REFERENCES),
                _fmt(row["clean_acc"]),
                _fmt(row["clean_acc_drop"]),
                *(_fmt(row[col], 2) for col in LATENCY_COLUMNS),
                _fmt(row["return"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        versus = block.get("versus_best_fixed")
        if versus is not None:
            lines += [
                "",
                "### Against the best fixed β",
                "",
                f"Best fixed β of the grid on these seeds: `{versus['best_fixed']}`, return {_fmt(versus['best_fixed_return'])} "
                "(chosen on the evaluation seeds themselves, which favours it). Paired over seeds:",
                "",
                "| policy | Δ return vs best fixed β | Δ return vs proeat_dynamic |",
                "|---|---|---|",
            ]
            for row in versus["rows"]:
                lines.append(f"| {row['policy']} | {_fmt(row['delta_return_vs_best_fixed'])} | {_fmt(row['delta_return_vs_proeat_dynamic'])} |")
        lines += ["", "### Ablation", ""]
        for ablation in block["ablation"]:
            lines += [
                f"Policy `{ablation['policy']}` ({ablation['note']}).",
                "",
                "| variant | mean β (task, consist, adv) | ASR | system ASR | clean acc | return | Δ return vs full | Δ ASR vs full |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in ablation["variants"]:
                betas = ", ".join(f"{b:.2f}" for b in row["mean_betas"])
                lines.append(
                    f"| {row['variant']} | ({betas}) | {_fmt(row['asr'])} | {_fmt(row['system_asr'])} | {_fmt(row['clean_acc'])} | {_fmt(row['return'])} "
                    f"| {_fmt(row['delta_return_vs_full'])} | {_fmt(row['delta_asr_vs_full'])} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- running
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _common_training_fidelity(policies: Sequence["GatingPolicy"]) -> str | None:
    found = {f for f in (policy_env_kwargs(p).get("fidelity") for p in policies) if f}
    if len(found) > 1:
        raise ValueError(f"the trained policies were trained at different fidelities {sorted(found)}; pass --fidelity")
    return found.pop() if found else None


def run_benchmark(args: BenchmarkArgs, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; write ``results.json`` and ``results.md`` under ``args.out``; return the report."""
    out = Path(args.out)
    check_reps(args.bootstrap_reps, "--bootstrap-reps")  # before the evaluations, not after them
    baseline_names = list(args.baselines) if args.baselines is not None else available_baselines()
    unknown = [n for n in baseline_names if n not in available_baselines()]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; available: {', '.join(available_baselines())}")
    for required in ("no_defense", *ASR_REFERENCES):
        if required not in baseline_names:
            baseline_names.append(required)
    trained = resolve_policies(args.policies)
    fidelity = args.fidelity or _common_training_fidelity(trained)
    env_kwargs = dict(args.env_kwargs or {})
    if not args.scenarios:
        raise ValueError("give at least one scenario")
    distinct_scenario_names(args.scenarios)  # before any runs: a bad or clashing file is refused up front

    report: dict[str, Any] = {
        "protocol": {
            "seeds": None if args.seeds is None else list(args.seeds),
            "episodes_per_seed": args.episodes,
            "fidelity": fidelity,
            "env_kwargs": env_kwargs,
            "baselines": baseline_names,
            "policies": [p.name for p in trained],
            "policy_sources": [str(s) for s in args.policies],
            "cmai_version": cmai_env.__version__,
            "git_commit": git_commit(),
        },
        "scenarios": {},
    }
    scores: dict[str, dict[str, dict[str, list]]] = {}  # rliable input: scenario → policy → metric → per-seed
    kinds: dict[str, str] = {}
    for scenario in args.scenarios:
        # Every policy of a scenario plays in the same environments: build them once.
        with EnvPool() as pool:
            name, block, by_name, kinds = _benchmark_scenario(scenario, args, baseline_names, trained, fidelity, env_kwargs, pool, log)
        report["scenarios"][name] = block
        # The grid's fixed β's have their own table ("Against the best fixed β"), not the aggregates.
        scores[name] = {policy: {m: r.per_seed(m) for m in AGGREGATE_METRICS} for policy, r in by_name.items() if kinds[policy] != "fixed_grid"}

    # rliable: IQM/mean with stratified-bootstrap CIs, P(improvement) of each trained policy over
    # each baseline, performance profiles (beside the t-interval tables above).
    learned = [p.name for p in trained if kinds.get(p.name) == "trained"]
    report["aggregate"] = aggregate(scores, learned, baseline_names, reps=args.bootstrap_reps)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(report) + "\n" + render_aggregate(report["aggregate"]))
    if args.plots:
        plot_profiles(scores, out, reps=args.bootstrap_reps)
    return report


def _benchmark_scenario(
    scenario: str,
    args: BenchmarkArgs,
    baseline_names: list[str],
    trained: list["GatingPolicy"],
    fidelity: str | None,
    env_kwargs: dict[str, Any],
    pool: EnvPool,
    log: Callable[[str], None] | None,
) -> tuple[str, dict[str, Any], dict[str, EvaluationResult], dict[str, str]]:
    """Comparison and ablation on one scenario: its name, report block, results and kinds by policy."""
    from cmai_env.scenario import load_scenario

    scenario_name = load_scenario(str(scenario)).name
    protocol = protocol_for(scenario_name)
    seeds = list(args.seeds) if args.seeds is not None else list(protocol.seeds)
    episodes = args.episodes if args.episodes is not None else protocol.episodes_per_seed
    folder = Path(args.out) / _safe(scenario_name)

    def evaluate(policy: "GatingPolicy", reference: dict[int, float] | bool) -> EvaluationResult:
        if log is not None:
            log(f"[{scenario_name}] {policy.name}")
        return evaluate_policy(
            policy, scenario, seeds, episodes, fidelity=fidelity, env_kwargs=env_kwargs, reference=reference,
            out=folder / _safe(policy.name), plots=args.plots, pool=pool,
        )

    ordered = ["no_defense"] + [n for n in baseline_names if n != "no_defense"]
    by_name: dict[str, EvaluationResult] = {}
    kinds: dict[str, str] = {}
    reference: dict[int, float] | bool = True
    for name in ordered:
        by_name[name] = evaluate(make_baseline(name), reference)
        kinds[name] = "baseline"
        if name == "no_defense":
            reference = by_name[name].reference_clean_acc or True
    if args.fixed_grid:
        for policy in fixed_grid_policies():
            by_name[policy.name] = evaluate(policy, reference)
            kinds[policy.name] = "fixed_grid"
    given: list[tuple["GatingPolicy", str]] = []
    for policy in trained:
        if policy.name in by_name and kinds.get(policy.name) == "baseline":
            given.append((policy, "baseline"))  # baseline:NAME given to be ablated: reuse its run
            continue
        # Fresh policy objects per evaluation: stateful policies start clean.
        by_name[policy.name] = evaluate(policy, reference)
        # baseline:NAME not among --baselines is still a baseline, not a trained policy
        kind = "baseline" if _is_baseline(policy) else "trained"
        kinds[policy.name] = kind
        given.append((policy, kind))

    targets = given or [(make_baseline(DEFAULT_ABLATION_TARGET), "baseline")]
    ablations = []
    for policy, kind in targets:
        full = by_name.get(policy.name) or evaluate(policy, reference)
        variants = {
            "full": full,
            "no_consist": evaluate(without_consistency(_fresh(policy)), reference),
            "no_adv": evaluate(without_adversarial(_fresh(policy)), reference),
            "fixed_mean": evaluate(with_fixed_weights(_fresh(policy), full.mean_betas()), reference),
        }
        note = (
            "trained gating policy"
            if kind == "trained"
            else "no trained policy given: the adaptive detector_switch heuristic"
            if not given
            else "baseline given with --policies"
        )
        ablations.append({"policy": policy.name, "kind": kind, "note": note, "variants": _ablation_rows(variants)})

    first = by_name["no_defense"].metadata
    block = {
        "metadata": {k: first[k] for k in ("env_id", "scenario", "scenario_source", "scenario_hash", "fidelity", "seeds", "episodes_per_seed")},
        "comparison": [_comparison_row(by_name[name], by_name, kinds[name]) for name in by_name],
        "ablation": ablations,
    }
    if args.fixed_grid:
        block["versus_best_fixed"] = _versus_best_fixed(by_name, kinds, [policy.name for policy, _ in given])
    return scenario_name, block, by_name, kinds


def _is_baseline(policy: "GatingPolicy") -> bool:
    """Whether ``policy`` is one of :mod:`agents.baselines` (``baseline:NAME``), not a trained policy."""
    return policy.name in available_baselines() and type(policy).__module__ == "agents.baselines"


def _fresh(policy: "GatingPolicy") -> "GatingPolicy":
    """A policy object with clean state for a new evaluation (baselines are re-made by name)."""
    if _is_baseline(policy):
        return make_baseline(policy.name)
    return policy
