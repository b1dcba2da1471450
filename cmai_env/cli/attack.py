"""``cmai attack list | eval``: the attack registry and one attack's robustness report.

    cmai attack list
    cmai attack eval --attack pgd_linf --eps 8/255 --steps 10 --n 1000 --json

``eval`` attacks ``--n`` pairs of ``--split`` (default ``test``), calibrates the consistency
detector's threshold on ``--calibration-n`` clean pairs of the ``val`` split, and prints the
:class:`cmai_env.robustness.AttackReport` (``clean_accuracy``, ``asr``, ``consistency_clean``,
``consistency_adv``, ``detector_auroc``, ``detector_tpr``, ``detector_fpr``, …). ``universal``
is fitted on ``--fit-n`` pairs of the ``train`` split first, so it is applied to unseen images.

``list`` shows each attack's threat model (modalities controlled, white-/black-box, detector-aware).
For a detector-aware attack (``aware_pgd_linf``, ``aware_caption_rewrite``) ``eval`` also runs its
non-adaptive counterpart at the same budget on the same pairs and ``τ`` and reports it under
``counterpart`` (``asr``, ``system_asr``, ``detector_tpr``, …), so detection against the adaptive
attacker stands next to detection against the attacker it adapts (``--no-counterpart`` skips it).
``system_asr`` is the share of originally correct pairs flipped *and* not flagged.

    cmai attack eval --attack autoattack --n 500 --json        # AutoAttack-grade ASR
    cmai attack eval --attack aware_caption_rewrite --json     # detector TPR: adaptive vs counterpart
"""

from __future__ import annotations

import argparse
import sys

from cmai_env.cli.common import add_backbone_args, add_dataset_args, emit, parse_budget, positive_int
from cmai_env.keyvalue import parse_assignments


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("attack", help="list attacks or evaluate one against a backbone")
    sub = group.add_subparsers(dest="attack_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="registered attacks with modality, parameters and defaults")
    ls.set_defaults(func=run_list)

    ev = sub.add_parser("eval", help="clean accuracy, ASR, consistency and detector quality under one attack")
    ev.add_argument("--attack", required=True, help="registered attack name (see `cmai attack list`)")
    ev.add_argument("--eps", type=parse_budget, default=None, help="budget ε (fractions allowed: 8/255)")
    ev.add_argument("--steps", type=int, default=None, help="attack steps")
    ev.add_argument("--step-size", type=parse_budget, default=None, help="step size α (fractions allowed: 2/255)")
    ev.add_argument("--k", type=int, default=None, help="tokens to substitute (token_substitution)")
    ev.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="any other attack parameter, e.g. --param target=random (repeatable)",
    )
    add_backbone_args(ev)
    add_dataset_args(ev)
    ev.add_argument("--calibration-split", default="val", help="clean split τ is calibrated on (default: val)")
    ev.add_argument("--calibration-n", type=positive_int, default=None, help="calibration pairs (default: --n)")
    ev.add_argument("--fit-n", type=positive_int, default=512, help="train pairs a universal perturbation is fitted on (default: 512)")
    ev.add_argument("--target-fpr", type=float, default=0.05, help="detector target false-positive rate (default: 0.05)")
    ev.add_argument("--batch-size", type=positive_int, default=128, help="pairs per attack call (default: 128)")
    ev.add_argument(
        "--no-counterpart", action="store_true",
        help="for a detector-aware attack, skip evaluating its non-adaptive counterpart at the same budget",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    ev.set_defaults(func=run_eval)


#: what ``eval`` reports of a detector-aware attack's non-adaptive counterpart
COUNTERPART_KEYS = (
    "attack", "asr", "system_asr", "detector_tpr", "detector_tpr_flipped", "detector_auroc", "detector_fpr",
    "consistency_adv", "robust_accuracy",
)


def attack_params(args: argparse.Namespace) -> dict[str, object]:
    """The parameters the user set (flags and ``--param``), to pass to ``make_attack``."""
    params = {key.replace("-", "_"): value for key, value in parse_assignments(args.param, "=", "--param").items()}
    for key in ("eps", "steps", "step_size", "k"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    return params


def run_list(args: argparse.Namespace) -> int:
    from cmai_env.attacks.specs import available_attacks, declaration  # the declarations: no torch

    for name in available_attacks():
        attack = declaration(name)
        params = ", ".join(f"{key}={_format(value)}" for key, value in attack.defaults().items())
        print(f"{name} [{attack.modality}]: {attack.description}")
        against = f" · non-adaptive counterpart: {attack.counterpart}" if attack.counterpart else ""
        print(f"    threat model: {attack.threat_model}{against}")
        print(f"    {params}")
    return 0


def _format(value: object) -> str:
    """Short decimals as they are (``0.2``); pixel budgets in 1/255 units (``8/255``)."""
    if isinstance(value, float):
        short = f"{value:.4g}"
        in_255 = value * 255
        if float(short) != value and abs(in_255 - round(in_255)) < 1e-9:
            return f"{round(in_255)}/255"
        return short
    return str(value)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from cmai_env.attacks import PairBatch, ZeroShotTask, make_attack
    from cmai_env.consistency import ConsistencyDetector
    from cmai_env.data import load_dataset
    from cmai_env.models import load_backbone
    from cmai_env.robustness import evaluate_attack

    attack = make_attack(args.attack, **attack_params(args))
    backbone = load_backbone(args.backbone, args.pretrained, device=args.device)
    backbone.eval()

    def load(split: str, n: int):
        return load_dataset(args.dataset, split=split, n=n, seed=args.seed, image_size=backbone.image_size, root=args.data_root)

    generative = getattr(backbone, "generative", False)

    def pairs(split: str, n: int) -> PairBatch:
        return task.pairs(load(split, n)) if generative else PairBatch.from_dataset(backbone, load(split, n))

    data = load(args.split, args.n)
    task = ZeroShotTask.from_dataset(backbone, data)
    if generative:
        # Captioning: the prompt is the text, ASR counts generations whose class changes (flamingo_task.py).
        from cmai_env.models.flamingo_task import GenerativeTask, generative_attack

        task, attack = GenerativeTask.from_dataset(backbone, data), generative_attack(attack)
    clean = pairs(args.split, args.n)
    calibration = pairs(args.calibration_split, args.calibration_n or args.n)
    generator = torch.Generator().manual_seed(args.seed)
    if hasattr(attack, "fit"):
        attack.fit(task, pairs("train", args.fit_n), generator)
    detector = ConsistencyDetector(args.target_fpr)
    from tqdm import tqdm

    # Progress on stderr (stdout stays one JSON object with --json).
    with tqdm(total=len(clean), desc=f"{attack.name} on {len(clean)} pairs", unit="pair", file=sys.stderr, disable=args.quiet) as bar:
        report = evaluate_attack(task, clean, attack, generator, detector, calibration, batch_size=args.batch_size, progress=bar.update)
    params = {key: getattr(attack, key) for key in type(attack).parameters()}
    extra: dict[str, object] = {}
    if getattr(attack, "broken_by", None):
        extra["broken_by"] = dict(attack.broken_by)  # AutoAttack-grade chains: examples each component flipped first
    if attack.counterpart is not None and not args.no_counterpart:
        # The same pairs, τ and seed, so the two rows differ only in what the attacker optimises.
        other = make_attack(attack.counterpart, **attack.counterpart_params())
        other_report = evaluate_attack(
            task, clean, other, torch.Generator().manual_seed(args.seed), detector, batch_size=args.batch_size
        )
        extra["counterpart"] = {
            **{key: value for key, value in other_report.as_dict().items() if key in COUNTERPART_KEYS},
            "params": {key: getattr(other, key) for key in type(other).parameters()},
            "threat_model": type(other).threat_model.as_dict(),
        }
    if attack.name == "transfer":
        # Beside the target's ASR: the inner attack's white-box ASR on the surrogate it was crafted on.
        s_task = attack.surrogate_task(task)
        s_pairs = lambda split, n: PairBatch.from_dataset(s_task.backbone, load_dataset(  # noqa: E731
            args.dataset, split=split, n=n, seed=args.seed, image_size=s_task.backbone.image_size, root=args.data_root))
        white = evaluate_attack(
            s_task, s_pairs(args.split, args.n), attack.inner_attack, torch.Generator().manual_seed(args.seed),
            ConsistencyDetector(args.target_fpr), s_pairs(args.calibration_split, args.calibration_n or args.n), args.batch_size,
        )
        extra["threat_model"] = attack.threat_model.as_dict()  # the inner attack's controls, black-box
        extra["surrogate"] = {"backbone": attack.surrogate, "pretrained": s_task.backbone.pretrained, "white_box_asr": white.asr,
                              **{k: v for k, v in white.as_dict().items() if k in ("clean_accuracy", "detector_tpr", "detector_auroc")}}
    emit(
        {
            **report.as_dict(),
            "threat_model": type(attack).threat_model.as_dict(),
            **extra,
            "params": params,
            "backbone": backbone.name,
            "dataset": args.dataset,
            "split": args.split,
            "calibration_split": args.calibration_split,
            "seed": args.seed,
        },
        args.json,
    )
    return 0
