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
    except (ValueError, ZeroDivisionError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"expected a number or fraction like 8/255, got {text!r}") from exc


def _number(text: str, convert, admissible, expected: str):
    """``convert(text)`` if it parses and is ``admissible``; argparse's error naming ``expected`` otherwise."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not admissible(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (``--threads``, ``--jobs``)."""
    return _number(text, int, lambda v: v >= 1, "an integer ≥ 1")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer ≥ 0 (``--seed``, which numpy and gymnasium refuse below 0;
    counts where 0 means "skip this part")."""
    return _number(text, int, lambda v: v >= 0, "an integer ≥ 0")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, time budgets, scales)."""
    return _number(text, float, lambda v: 0.0 < v < float("inf"), "a finite number > 0")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number ≥ 0 (loss weights)."""
    return _number(text, float, lambda v: 0.0 <= v < float("inf"), "a finite number ≥ 0")


def assignments_option(parser: argparse.ArgumentParser, items, sep: str, option: str) -> dict:
    """For scripts: :func:`cmai_env.keyvalue.parse_assignments` of ``items``, with a malformed item
    a usage error (exit 2) naming ``option`` instead of a traceback."""
    from cmai_env.keyvalue import parse_assignments

    try:
        return parse_assignments(items, sep, option)
    except ValueError as error:
        parser.error(str(error))


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


def validate_device(device: str, option: str = "--device") -> str:
    """``device`` unchanged if torch can place tensors there; a ``ValueError`` naming it otherwise.

    Checked before a run loads or writes anything, so ``--device cuda`` on a machine without a GPU
    (or ``--device gpu``) is a one-line error, not torch's traceback from deep inside a model.
    """
    if device == "cpu":
        return device  # the default: no torch import just to parse arguments
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type not in ("cpu", "mps"):
        raise ValueError(f"{option} {device!r}: expected cpu, cuda or cuda:N")
    return device


def device_arg(text: str) -> str:
    """An argparse type: :func:`validate_device`."""
    try:
        return validate_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="cmai-tiny", help="architecture name (default: cmai-tiny)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: embedded weights)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: cpu)")


def add_dataset_args(parser: argparse.ArgumentParser, default_n: int = 1000) -> None:
    parser.add_argument("--dataset", default="shapes", help="dataset name (default: shapes)")
    parser.add_argument("--data-root", default=None, help="file or folder for real-format datasets")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--n", type=positive_int, default=default_n, help=f"number of samples (default: {default_n})")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed for data and randomness (default: 0)")


def emit(result: dict, as_json: bool) -> None:
    """Print one JSON object (``--json``) or aligned ``key: value`` lines."""
    if as_json:
        # Strict JSON: NaN/±inf (e.g. detector_tpr_flipped when nothing flipped) become null.
        json.dump(_json_safe(result), sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return
    for key, value in result.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")


def _json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
