"""``cmai``: entry point that assembles the subcommand groups.

Each group lives in its own module exposing ``register(subparsers)``; the parser it adds sets
``func`` (called with the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with a ``register(subparsers)`` function, in the order ``cmai --help`` lists them.
SUBCOMMAND_MODULES = [
    "cmai_env.cli.backbone",
    "cmai_env.cli.scenarios",
    "cmai_env.cli.attack",
    "cmai_env.cli.adv_train",
    "agents.cli_train",
    "agents.cli_evaluate",
    "agents.cli_sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmai", description="CMAI: Cross-Modal Adversarial Immunization")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


#: Exit status for bad input (a file, field or value the user can fix); argparse's usage errors stay 2.
EXIT_BAD_INPUT = 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
        # Bad input (paths, names, malformed files) is the user's to fix: say what, not a traceback.
        print(f"cmai: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
