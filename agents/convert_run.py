"""Convert a run's pickled ``vecnormalize.pkl`` (CMAI < 0.2) to the ``vecnormalize.npz`` CMAI loads.

    python -m agents.convert_run runs/ppo/quickstart_1/quickstart/vecnormalize.pkl --trust-pickle

Unpickling can run arbitrary code, so CMAI itself never loads a ``.pkl``. This one-off converter
does, and only when told with ``--trust-pickle`` that the file is your own: it is the single place
in CMAI that unpickles, it is never called by another command, and it writes the statistics as
plain arrays so the run never needs the pickle again. Model archives need no conversion: they
load safely as they are (see :mod:`agents.safe_load`).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from agents.safe_load import save_normalization


def convert(pkl: Path) -> Path:
    """Unpickle ``pkl`` (a ``VecNormalize``; trusted by the caller) and write ``<stem>.npz`` beside it."""
    with pkl.open("rb") as handle:
        vec_normalize = pickle.load(handle)  # noqa: S301  (explicitly trusted by --trust-pickle)
    for attribute in ("obs_rms", "ret_rms", "clip_obs", "clip_reward", "epsilon", "gamma", "norm_obs", "norm_reward"):
        if not hasattr(vec_normalize, attribute):
            raise ValueError(f"{pkl}: not VecNormalize statistics (no {attribute!r})")
    return save_normalization(vec_normalize, pkl.with_suffix(".npz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.convert_run", description=__doc__.splitlines()[0])
    parser.add_argument("pkl", type=Path, nargs="+", help="vecnormalize .pkl files written by an older cmai train")
    parser.add_argument("--trust-pickle", action="store_true", help="required: confirms the files are your own (unpickling runs code)")
    args = parser.parse_args(argv)
    if not args.trust_pickle:
        print("refusing to unpickle without --trust-pickle: a pickle can run arbitrary code; convert only files you made", file=sys.stderr)
        return 1
    for pkl in args.pkl:
        if not pkl.is_file():
            print(f"{pkl}: no such file", file=sys.stderr)
            return 1
        print(f"wrote {convert(pkl)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
