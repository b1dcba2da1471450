"""Source × target attack success rates: how far attacks crafted on one backbone carry to another.

    python benchmarks/transfer_matrix.py [--backbones cmai-tiny cmai-tiny-rn] [--adv runs/adv/model.pt]
        [--inner pgd_linf] [--eps 2/255 8/255] [--steps 10] [--n 500] [--seed 0] [--threads 1]

The shape of the transfer tables of SGA (Lu et al., 2023) and Co-Attack (Zhang et al., 2022):
one row per *source* (the surrogate the attacker crafts on, with ``transfer``'s inner attack,
white-box), one column per *target*; each cell is the target's ASR — the share of the target's
originally correct zero-shot predictions on ``--n`` held-out shapes images that the crafted
images flip. The diagonal (marked ``*``) is the white-box ASR. ``--adv`` adds a checkpoint of
``--adv-arch`` (e.g. from ``cmai adv-train``) as one more source and target, named ``<arch>+adv``.
The step size is ε/4 (10 × 0.5/255 at 2/255, as in SGA and Co-Attack; 2/255 at 8/255).

Each source's images are crafted once (``make_attack("transfer", surrogate=source, ...)``, so
the same code the environment runs) and scored on every target of the same image size.
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction

import torch

from cmai_env.cli.common import device_arg, positive_int
from cmai_env.attacks import PairBatch, ZeroShotTask, attack_success_rate, make_attack
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone


def budget(text: str) -> float:
    return float(Fraction(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["cmai-tiny", "cmai-tiny-rn"], help="embedded or open_clip backbones")
    parser.add_argument("--adv", default=None, help="an adversarially trained checkpoint to add as source and target")
    parser.add_argument("--adv-arch", default="cmai-tiny", help="architecture of --adv (default: cmai-tiny)")
    parser.add_argument("--inner", default="pgd_linf", help="the attack crafted on each source (default: pgd_linf)")
    parser.add_argument("--eps", nargs="+", type=budget, default=[2 / 255, 8 / 255], help="ℓ∞ budgets (default: 2/255 8/255)")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--n", type=positive_int, default=500, help="held-out shapes test images (default: 500)")
    parser.add_argument("--batch-size", type=positive_int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--device", type=device_arg, default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models: dict[str, tuple[str, str | None]] = {name: (name, None) for name in args.backbones}
    if args.adv:
        models[f"{args.adv_arch}+adv"] = (args.adv_arch, args.adv)
    tasks: dict[str, ZeroShotTask] = {}
    batches: dict[str, PairBatch] = {}
    for label, (arch, weights) in models.items():
        backbone = load_backbone(arch, weights, device=args.device).eval()
        data = load_dataset("shapes", split="test", n=args.n, seed=args.seed, image_size=backbone.image_size)
        tasks[label], batches[label] = ZeroShotTask.from_dataset(backbone, data), PairBatch.from_dataset(backbone, data)

    @torch.no_grad()
    def correct(label: str, images: torch.Tensor) -> torch.Tensor:
        task, labels = tasks[label], batches[label].labels
        return torch.cat([task.image_logits(images[s : s + 500]).argmax(-1) for s in range(0, len(images), 500)]) == labels

    clean = {label: correct(label, batches[label].images) for label in models}
    cpu = time.process_time()
    print(
        f"{args.inner} ℓ∞, {args.steps} steps of ε/4, crafted on the source and applied to the target; "
        f"{args.n} held-out shapes test images (seed {args.seed}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print("cell: target ASR (share of the target's correct zero-shot predictions flipped); * white-box (source = target)")
    for eps in args.eps:
        asr: dict[tuple[str, str], float] = {}
        for source, (arch, weights) in models.items():
            attack = make_attack(
                "transfer", inner=args.inner, surrogate=arch, surrogate_pretrained=weights, eps=eps, steps=args.steps, step_size=eps / 4
            )
            crafted: dict[int, torch.Tensor] = {}
            for target in models:
                size = tasks[target].backbone.image_size
                if size not in crafted:  # crafting depends on the target only through its image size
                    generator = torch.Generator().manual_seed(args.seed)
                    chunks = [
                        attack(tasks[target], batches[target].subset(slice(s, s + args.batch_size)), generator).batch.images
                        for s in range(0, args.n, args.batch_size)
                    ]
                    crafted[size] = torch.cat(chunks)
                asr[source, target] = attack_success_rate(clean[target], correct(target, crafted[size]))
        print(f"\nε = {Fraction(eps).limit_denominator(1000)}")
        print("| source \\ target | " + " | ".join(models) + " |")
        print("|---" * (len(models) + 1) + "|")
        for source in models:
            cells = [f"{asr[source, t]:.3f}{'*' if source == t else ''}" for t in models]
            print(f"| {source} | " + " | ".join(cells) + " |")
        print("| clean accuracy | " + " | ".join(f"{float(clean[t].double().mean()):.3f}" for t in models) + " |")
    print(f"\n{(time.process_time() - cpu) / 60:.1f} CPU-minutes of crafting and scoring")


if __name__ == "__main__":
    main()
