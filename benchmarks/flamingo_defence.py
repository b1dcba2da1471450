"""Does FARE make ``cmai-tiny-flamingo``'s captions robust? PGD ASR, caption accuracy, detector, cost.

Loads the embedded ``cmai-tiny-flamingo``, measures it on ``--n`` held-out ``shapes`` test images,
fine-tunes the language model's vision tower with FARE (:mod:`cmai_env.models.flamingo_defence`)
for ``--steps`` steps or ``--budget-cpu-minutes`` of process CPU time on one thread, and measures
again. Printed per model: clean caption accuracy (greedy caption names the right colour and
shape), then per ℓ∞ budget of ``--eval-eps`` the PGD (``--pgd-steps`` steps, α = ε/4, random
start; the attacker controls the image, white-box, ascending CE of the LM's class
distribution) ASR (share of originally correct captions whose class changes), detector AUROC
(``L_consistency`` of clean vs attacked pairs, CLIP head vs LM) and system ASR (flipped and not
flagged at τ calibrated to 5% FPR on ``--n`` val pairs).

    python benchmarks/flamingo_defence.py --n 200 --steps 650 [--train-eps 8/255] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction

import torch

from cmai_env.cli.common import non_negative_float, positive_float, positive_int
from cmai_env.attacks import make_attack
from cmai_env.data import load_dataset
from cmai_env.models import load_backbone
from cmai_env.models.flamingo_defence import FlamingoAdvTrainConfig, adversarial_finetune
from cmai_env.models.flamingo_task import GenerativeTask, generative_attack
from cmai_env.robustness import evaluate_attack


def measure(backbone, test, val, eval_eps: list[float], pgd_steps: int, seed: int) -> dict:
    """Caption accuracy and, per ε, PGD ASR, detector AUROC and system ASR of one model."""
    task = GenerativeTask.from_dataset(backbone, test)
    clean, calibration = task.pairs(test), task.pairs(val)
    out: dict = {"attacks": {}}
    for eps in eval_eps:
        attack = generative_attack(make_attack("pgd_linf", eps=eps, steps=pgd_steps, step_size=eps / 4))
        cpu = time.process_time()
        report = evaluate_attack(task, clean, attack, torch.Generator().manual_seed(seed), calibration=calibration, batch_size=100)
        out["caption_accuracy"] = report.clean_accuracy
        out["attacks"][f"{Fraction(eps).limit_denominator(255)}"] = {
            "asr": report.asr, "robust_accuracy": report.robust_accuracy, "detector_auroc": report.detector_auroc,
            "detector_tpr": report.detector_tpr, "system_asr": report.system_asr, "cpu_seconds": round(time.process_time() - cpu, 1),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=positive_int, default=200, help="held-out test images (and val images for τ) (default: 200)")
    p.add_argument("--steps", type=positive_int, default=650, help="FARE steps at most (default: 650)")
    p.add_argument("--budget-cpu-minutes", type=positive_float, default=9.0, help="FARE budget in process CPU minutes (default: 9)")
    p.add_argument("--train-eps", type=Fraction, default=Fraction(8, 255), help="ε_v of FARE's inner max (default: 8/255)")
    p.add_argument("--train-pgd-steps", type=positive_int, default=5, help="PGD steps of FARE's inner max (default: 5)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="FARE batch size (default: 128)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="FARE peak learning rate (default: 2e-3)")
    p.add_argument("--clean-weight", type=non_negative_float, default=1.0, help="weight of the clean embedding term (default: 1; FARE's is 0)")
    p.add_argument("--eval-eps", default="8/255,4/255,2/255", help="comma-separated ℓ∞ budgets evaluated (default: 8/255,4/255,2/255)")
    p.add_argument("--pgd-steps", type=positive_int, default=10, help="PGD steps of the evaluation (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    torch.set_num_threads(1)
    eval_eps = [float(Fraction(e)) for e in args.eval_eps.split(",")]

    backbone = load_backbone("cmai-tiny-flamingo")
    test = load_dataset("shapes", split="test", n=args.n, seed=args.seed, image_size=backbone.image_size)
    val = load_dataset("shapes", split="val", n=args.n, seed=args.seed, image_size=backbone.image_size)
    before = measure(backbone, test, val, eval_eps, args.pgd_steps, args.seed)
    config = FlamingoAdvTrainConfig(
        steps=args.steps, batch_size=args.batch_size, eps=float(args.train_eps), pgd_steps=args.train_pgd_steps, lr=args.lr,
        clean_weight=args.clean_weight, seed=args.seed, budget_cpu_minutes=args.budget_cpu_minutes,
    )
    training = adversarial_finetune(backbone, config, progress=not args.json)
    after = measure(backbone, test, val, eval_eps, args.pgd_steps, args.seed)
    result = {"n": args.n, "before": before, "after": after, "training": training}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t = training
    print(f"FARE: {t['steps_run']} steps ({t['stopped_by']}), {t['cpu_minutes']} CPU-min, train ε {args.train_eps}, "
          f"{t['defended_parameters']:,} parameters, final L_FARE {t['final_loss']:.4f}")
    print(f"caption accuracy on {args.n} test shapes: {before['caption_accuracy']:.3f} → {after['caption_accuracy']:.3f}")
    print(f"{'PGD-' + str(args.pgd_steps) + ' ε':<12} {'ASR before':>10} {'ASR after':>10} {'AUROC before':>13} {'AUROC after':>12} "
          f"{'sys ASR before':>15} {'sys ASR after':>14}")
    for key in before["attacks"]:
        b, a = before["attacks"][key], after["attacks"][key]
        print(f"{key:<12} {b['asr']:>10.3f} {a['asr']:>10.3f} {b['detector_auroc']:>13.3f} {a['detector_auroc']:>12.3f} "
              f"{b['system_asr']:>15.3f} {a['system_asr']:>14.3f}")


if __name__ == "__main__":
    main()
