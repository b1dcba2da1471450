"""A script of ``benchmarks/`` loaded as a module, for the tests that call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``; the scripts beside it (which some import) are importable too."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve a module's string annotations through it
    spec.loader.exec_module(module)
    return module


def usage_error(script: str, argv: list[str], monkeypatch, capsys) -> str:
    """``benchmarks/<script> <argv>`` run through its ``main()`` in this process (``monkeypatch`` and
    ``capsys`` are the calling test's fixtures): asserts it exits 2 as argparse does; its stderr.
    Any other exception propagates and fails the test, as a traceback would."""
    module = load_benchmark(script.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *argv])
    with pytest.raises(SystemExit) as exited:
        module.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-2000:]
    return err
