"""Convert a run's pickled ``vecnormalize.pkl`` (older CMAI) to the ``vecnormalize.npz`` CMAI loads.

    python -m agents.convert_run runs/ppo/quickstart_1/quickstart/vecnormalize.pkl

CMAI's loaders never read a ``.pkl``: unpickling can call any function the file names. This
one-off converter reads the legacy statistics with an unpickler that may name only the classes a
Stable-Baselines3 ``VecNormalize`` pickle is made of (:data:`ALLOWED_GLOBALS`: the wrapper, its
running statistics, numpy arrays, scalars and random generators, gymnasium's spaces). A file that
names anything else (``os.system``, ``builtins.eval``, …) is refused before that name is looked
up, so converting a file runs none of its code. It is the same defence as ``torch.load(...,
weights_only=True)``; the standard library's ``pickle`` documents it as "restricting globals".
It is written by hand because no well-kept library restricts a pickle to SB3's classes. The
statistics are then written as plain arrays, so the run never needs the pickle again. Model
archives need no conversion: they load safely as they are (see :mod:`agents.safe_load`).
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from pathlib import Path

from agents.safe_load import UnsafeFileError, save_normalization

#: ``(module, name)`` of every global a ``VecNormalize`` pickle may name. Numpy 2 moved its
#: internals to ``numpy._core``; pickles written with numpy 1 name ``numpy.core``.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("stable_baselines3.common.vec_env.vec_normalize", "VecNormalize"),
        ("stable_baselines3.common.running_mean_std", "RunningMeanStd"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pcg64", "PCG64"),
        ("numpy.random._pcg64", "PCG64DXSM"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._philox", "Philox"),
        ("numpy.random._sfc64", "SFC64"),
        ("numpy.random.bit_generator", "SeedSequence"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        ("gymnasium.spaces.box", "Box"),
        ("gymnasium.spaces.discrete", "Discrete"),
        ("gymnasium.spaces.dict", "Dict"),
        ("collections", "OrderedDict"),
    }
)


class _StatisticsUnpickler(pickle.Unpickler):
    """Unpickles only :data:`ALLOWED_GLOBALS`; any other name raises :class:`UnsafeFileError`."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle.Unpickler's hook)
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeFileError(
                f"{self._path}: names {module}.{name}, which VecNormalize statistics never contain; refusing to convert it "
                f"(allowed: {', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))})"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):  # noqa: D102
        raise UnsafeFileError(f"{self._path}: holds a persistent reference, which VecNormalize statistics never contain")


def load_vecnormalize(pkl: Path):
    """The ``VecNormalize`` pickled in ``pkl``, read with :class:`_StatisticsUnpickler`.

    :raises UnsafeFileError: the file names a global outside :data:`ALLOWED_GLOBALS`.
    :raises ValueError: not a pickle, or not ``VecNormalize`` statistics (naming the file).
    """
    try:
        loaded = _StatisticsUnpickler(pkl.read_bytes(), pkl).load()
    except UnsafeFileError:
        raise
    except Exception as error:  # a truncated or foreign file: pickle raises many types
        raise ValueError(f"{pkl}: not a readable pickle ({type(error).__name__}: {error})") from None
    for attribute in ("obs_rms", "ret_rms", "clip_obs", "clip_reward", "epsilon", "gamma", "norm_obs", "norm_reward"):
        if not hasattr(loaded, attribute):
            raise ValueError(f"{pkl}: not VecNormalize statistics (no {attribute!r})")
    return loaded


def convert(pkl: Path) -> Path:
    """Read ``pkl`` (:func:`load_vecnormalize`) and write ``<stem>.npz`` beside it."""
    return save_normalization(load_vecnormalize(pkl), pkl.with_suffix(".npz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.convert_run", description=__doc__.splitlines()[0])
    parser.add_argument("pkl", type=Path, nargs="+", help="vecnormalize .pkl files written by an older cmai train")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="accepted for older instructions; no longer needed, the converter runs no code from the file")
    args = parser.parse_args(argv)
    for pkl in args.pkl:
        if not pkl.is_file():
            print(f"{pkl}: no such file", file=sys.stderr)
            return 1
        npz = pkl.with_suffix(".npz")
        if npz.exists():
            print(f"{pkl}: {npz} already exists; remove it to convert again (nothing was written)", file=sys.stderr)
            return 1
        try:
            print(f"wrote {convert(pkl)}")
        except ValueError as error:  # UnsafeFileError included
            print(str(error), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
