"""Attack throughput on the default backbone, and our PGD-ℓ∞ against torchattacks' PGD.

    python benchmarks/attacks.py [--batch-size 128] [--repeats 3] [--device cpu] [--threads N] [--compare-repeats 9]

Prints, per registered attack with its default parameters, the median wall time of one call on
one batch of shapes test pairs and the images/s that makes (``universal`` is timed as the
environment uses it unfitted: fit on the batch + apply, with apply-only in the note). Then times
``pgd_linf`` (8/255, 10 × 2/255, random start) and ``torchattacks.PGD`` with the same budget on
the same batch, interleaved, and prints the ratio ours / torchattacks of the median and of the
fastest run (goal ≤ 1.0; the minimum is the less load-sensitive one on shared cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from cmai_env.cli.common import device_arg, positive_int
from cmai_env.attacks import PairBatch, ZeroShotTask, attack_class, available_attacks, make_attack
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocator, one-off caches)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compare-repeats", type=positive_int, default=9, help="interleaved runs of the PGD comparison")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(device=args.device)
    backbone.eval()
    data = load_dataset("shapes", split="test", n=args.batch_size, seed=0, image_size=backbone.image_size)
    task = ZeroShotTask.from_dataset(backbone, data)
    batch = PairBatch.from_dataset(backbone, data)
    n = len(batch)
    print(f"backbone {backbone.name} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}")
    print(f"{'attack':<22} {'modality':<8} {'s/batch':>8} {'images/s':>9}  note")

    for name in available_attacks():
        cls = attack_class(name)
        note = ""
        if name == "universal":
            seconds = median_seconds(lambda: make_attack(name)(task, batch, torch.Generator().manual_seed(0)), args.repeats)
            fitted = make_attack(name)
            fitted.fit(task, batch, torch.Generator().manual_seed(0))
            apply = median_seconds(lambda: fitted(task, batch, torch.Generator().manual_seed(0)), args.repeats)
            note = f"fit on the batch + apply; apply only: {n / apply:,.0f} images/s"
        else:
            attack = make_attack(name)
            seconds = median_seconds(lambda: attack(task, batch, torch.Generator().manual_seed(0)), args.repeats)
        print(f"{name:<22} {cls.modality:<8} {seconds:8.3f} {n / seconds:9.1f}  {note}")

    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: pip install 'cmai[test]' for the PGD comparison")
        return
    model = backbone.zero_shot_classifier(data.class_names, data.templates)
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    ours = make_attack("pgd_linf", eps=8 / 255, step_size=2 / 255, steps=10, random_start=True)
    runs: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(task, batch, torch.Generator().manual_seed(0)),
        "torchattacks": lambda: reference(batch.images, batch.labels),
    }
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.compare_repeats):  # interleaved so that load on shared cores hits both alike
        for key, fn in runs.items():
            tic = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - tic)
    print(f"\npgd_linf 8/255 × 10 steps on {n} images ({args.compare_repeats} interleaved runs each)")
    for key in runs:
        med, best = statistics.median(times[key]), min(times[key])
        print(f"  {key:<13} median {med:.3f} s ({n / med:.1f} images/s), min {best:.3f} s")
    ratio_median = statistics.median(times["ours"]) / statistics.median(times["torchattacks"])
    ratio_min = min(times["ours"]) / min(times["torchattacks"])
    print(f"  ratio ours/torchattacks: median {ratio_median:.3f}, min {ratio_min:.3f}")


if __name__ == "__main__":
    main()
