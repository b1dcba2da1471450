"""``cmai backbone eval | pretrain | list``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cmai_env.cli.common import add_backbone_args, add_dataset_args, device_arg, emit


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("backbone", help="evaluate, pretrain or list backbones")
    sub = group.add_subparsers(dest="backbone_command", metavar="ACTION", required=True)

    ev = sub.add_parser("eval", help="zero-shot accuracy of a backbone on a dataset")
    add_backbone_args(ev)
    add_dataset_args(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=run_eval)

    pt = sub.add_parser("pretrain", help="pretrain an embedded backbone on shapes (contrastive CLIP, or flamingo captioning)")
    pt.add_argument(
        "--arch", choices=("clip", "flamingo"), default="clip",
        help="clip: contrastive open_clip pretraining; flamingo: captioning pretraining of a generative backbone "
        "on a frozen cmai-tiny tower (default: clip)",
    )
    pt.add_argument("--name", default=None, help="architecture (default: cmai-tiny; cmai-tiny-flamingo with --arch flamingo)")
    pt.add_argument("--steps", type=int, default=None, help="default: 1500 (clip), 1200 (flamingo)")
    pt.add_argument("--batch-size", type=int, default=None, help="default: 256 (clip), 128 (flamingo)")
    pt.add_argument("--lr", type=float, default=None, help="default: 2e-3 (clip), 3e-3 (flamingo)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--budget-minutes", type=float, default=None, help="default: 15 wall minutes (clip), 10 CPU minutes (flamingo)")
    pt.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: cpu)")
    pt.add_argument("--out", default=None, help="folder for <name>.pt/.json (default: the package's weights/)")
    pt.add_argument("--overwrite", action="store_true",
                    help="replace a <name>.pt already in the folder (without --out: the shipped weights every command loads by default)")
    pt.set_defaults(func=run_pretrain)

    ls = sub.add_parser("list", help="architectures load_backbone accepts")
    ls.set_defaults(func=run_list)


def run_eval(args: argparse.Namespace) -> int:
    from cmai_env.data import load_dataset
    from cmai_env.models import load_backbone

    backbone = load_backbone(args.backbone, args.pretrained, device=args.device)
    data = load_dataset(args.dataset, split=args.split, n=args.n, seed=args.seed, image_size=backbone.image_size, root=args.data_root)
    if getattr(backbone, "generative", False):
        from cmai_env.models.flamingo import evaluate_generative

        # caption_accuracy from greedy captions, zero_shot_accuracy from the LM's class log-likelihoods
        head = {"backbone": backbone.name, "pretrained": backbone.pretrained, "dataset": args.dataset, "split": args.split}
        emit({**head, "n": len(data), "num_classes": len(data.class_names), **evaluate_generative(backbone, data)}, args.json)
        return 0
    class_embeds = backbone.class_text_embeddings(data.class_names, data.templates)
    accuracy = backbone.zero_shot_accuracy(data.images, data.labels, class_embeds)
    emit(
        {
            "backbone": backbone.name,
            "pretrained": backbone.pretrained,
            "dataset": args.dataset,
            "split": args.split,
            "n": len(data),
            "num_classes": len(data.class_names),
            "zero_shot_accuracy": accuracy,
        },
        args.json,
    )
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from cmai_env.models.pretrain import PretrainConfig, pretrain

    command = "cmai " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("cmai") else ""
    overrides = {k: getattr(args, k) for k in ("name", "steps", "batch_size", "lr") if getattr(args, k) is not None}
    if args.arch == "flamingo":
        from cmai_env.models.flamingo_pretrain import FlamingoPretrainConfig, pretrain_flamingo

        _refuse_replacing(args, FlamingoPretrainConfig(seed=args.seed, device=args.device, **overrides).name)

        if args.budget_minutes is not None:
            overrides["budget_cpu_minutes"] = args.budget_minutes
        record = pretrain_flamingo(
            FlamingoPretrainConfig(seed=args.seed, device=args.device, **overrides), out=Path(args.out) if args.out else None, command=command
        )
        for key in ("caption_accuracy", "zero_shot_accuracy"):
            print(f"{key} on {record[key]['n']} held-out images: {record[key]['value']:.4f}")
        print(f"training CPU minutes: {record['train_cpu_minutes']}")
        return 0
    from cmai_env.model_configs import is_generative_backbone

    if args.name is not None and is_generative_backbone(args.name):
        raise ValueError(f"{args.name} is a generative (flamingo) architecture; use `cmai backbone pretrain --arch flamingo`")
    if args.budget_minutes is not None:
        overrides["budget_minutes"] = args.budget_minutes
    config = PretrainConfig(seed=args.seed, device=args.device, **overrides)
    _refuse_replacing(args, config.name)
    record = pretrain(config, out=Path(args.out) if args.out else None, command=command)
    print(f"zero-shot accuracy on {record['zero_shot_accuracy']['n']} held-out images: {record['zero_shot_accuracy']['value']:.4f}")
    return 0


def _refuse_replacing(args: argparse.Namespace, name: str) -> None:
    """Refuse, before training, to replace ``<out>/<name>.pt`` without ``--overwrite``.

    Without ``--out`` that file is the package's shipped checkpoint, which every command loads by
    default and which a pip install cannot restore.
    """
    from cmai_env.models.registry import weights_dir

    target = (Path(args.out) if args.out else weights_dir()) / f"{name}.pt"
    if target.exists() and not args.overwrite:
        shipped = "" if args.out else " (the shipped weights every command loads by default)"
        raise ValueError(f"{target} already exists{shipped}; give --out DIR to write elsewhere, or --overwrite to replace it")


def run_list(args: argparse.Namespace) -> int:
    from cmai_env.models import available_backbones, checkpoint_info, embedded_backbones

    for name in embedded_backbones():
        info = checkpoint_info(name)
        acc = info.get("zero_shot_accuracy", {}).get("value")
        print(f"{name} (embedded{'' if acc is None else f', zero-shot {acc:.3f} on shapes'})")
    others = [n for n in available_backbones() if n not in embedded_backbones()]
    print(f"open_clip architectures ({len(others)}): {', '.join(others)}")
    return 0
