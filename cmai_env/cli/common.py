"""Argument helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction


def parse_budget(text: str) -> float:
    """A budget written as a float or a fraction: ``0.03``, ``8/255``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"expected a number or fraction like 8/255, got {text!r}") from exc


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (``--threads``, ``--jobs``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer ≥ 0 (counts where 0 means "skip this part")."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, time budgets, scales)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number ≥ 0 (loss weights)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def validate_threads(threads: int | None) -> int | None:
    """``threads`` unchanged if it is ``None`` (torch's default) or ≥ 1; a ``ValueError`` otherwise.

    For ``threads`` fields that arrive from Python (``TrainArgs``, ``TuneArgs``) rather than
    through ``positive_int``; checked before a run writes anything.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def set_torch_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads in this process, validated; ``None`` keeps torch's default.

    One torch thread per run is what two runs sharing the 2 cores want: two runs of two threads
    each stepped 13× slower than with one thread each (``TrainArgs.threads``).
    """
    if validate_threads(threads) is not None:
        import torch  # here, not at the top: the argument helpers load without torch

        torch.set_num_threads(threads)


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="cmai-tiny", help="architecture name (default: cmai-tiny)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: embedded weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def add_dataset_args(parser: argparse.ArgumentParser, default_n: int = 1000) -> None:
    parser.add_argument("--dataset", default="shapes", help="dataset name (default: shapes)")
    parser.add_argument("--data-root", default=None, help="file or folder for real-format datasets")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--n", type=int, default=default_n, help=f"number of samples (default: {default_n})")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and randomness (default: 0)")


def emit(result: dict, as_json: bool) -> None:
    """Print one JSON object (``--json``) or aligned ``key: value`` lines."""
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return
    for key, value in result.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
