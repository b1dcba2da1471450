"""One writer per output folder: what ``cmai evaluate`` and ``cmai benchmark`` write is never lost.

:func:`claim_output_dir` takes a lock file (``.cmai-lock``, created with ``O_EXCL``, so of two
commands started at once exactly one gets it) and refuses a folder that already holds results
unless the caller asks to overwrite. The lock of a process that died is taken over.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

LOCK_NAME = ".cmai-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(lock: Path) -> None:
    for _ in range(2):  # a second try after removing a dead process's lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid > 0 and not _alive(pid):
                lock.unlink(missing_ok=True)
                continue
            raise ValueError(
                f"{lock.parent}: another cmai command (pid {pid if pid > 0 else 'unknown'}) is writing there now; "
                f"choose another --out (or remove {lock} if no such command is running)"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        return
    raise ValueError(f"{lock}: could not take the folder's lock")


@contextlib.contextmanager
def claim_output_dir(out: str | Path, results: Sequence[str], overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Hold ``out`` for the duration of the block.

    :param out: the folder (created if missing).
    :param results: file names whose presence means the folder already holds results.
    :param overwrite: replace existing results instead of refusing.
    :param option: the command-line option that named the folder, for the message.
    :raises ValueError: another command holds the folder, or it holds results and ``overwrite`` is off.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    _take_lock(lock)
    try:
        existing = [name for name in results if (out / name).exists()]
        if existing and not overwrite:
            raise ValueError(
                f"{option} {out} already holds results ({', '.join(existing)}); choose another {option} "
                "or pass --overwrite to replace them"
            )
        yield out
    finally:
        lock.unlink(missing_ok=True)
