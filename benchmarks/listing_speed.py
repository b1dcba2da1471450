"""Wall time and peak memory of the listing commands, each in a fresh process (cold start).

    python benchmarks/listing_speed.py [--repeats 3] [--target 1.5]

Runs ``cmai --help``, ``cmai scenarios list``, ``cmai scenarios validate <every shipped file>``
and ``cmai attack list`` ``--repeats`` times each, every run a new interpreter under
``/usr/bin/time -v`` (``python -m cmai_env.cli.main``, the code of the checkout this file is in),
and prints per command each run's wall time, CPU time (user + system) and peak RSS, and whether
the slowest run's wall time is under ``--target`` seconds. The 1-minute load average is printed too: on shared
cores a busy neighbour inflates wall time, not RSS.

Issue 8's target: each under 1.5 s. Before the torch-free attack declarations
(:mod:`cmai_env.attacks.specs`) these commands imported torch and open_clip (12–15 s, ~0.9 GB).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cmai_env.cli.common import positive_float, positive_int

ROOT = Path(__file__).resolve().parent.parent


def commands() -> dict[str, list[str]]:
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cmai_env" / "scenarios").glob("*.yaml"))
    return {
        "cmai --help": ["--help"],
        "cmai scenarios list": ["scenarios", "list"],
        f"cmai scenarios validate ({len(shipped)} files)": ["scenarios", "validate", *shipped],
        "cmai attack list": ["attack", "list"],
    }


def timed_run(args: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s = user + system, peak RSS MB) of one ``cmai ARGS`` in a new process, as /usr/bin/time -v reports them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(
            ["/usr/bin/time", "-v", "-o", report.name, sys.executable, "-m", "cmai_env.cli.main", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        text = report.read()
    if done.returncode != 0:
        raise SystemExit(f"cmai {' '.join(args[:3])} … exited {done.returncode}: {done.stderr[-500:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", text) for kind in ("User", "System")]
    if wall is None or rss is None or None in cpu:
        raise SystemExit(f"could not read /usr/bin/time -v's report:\n{text}")
    hours, minutes, seconds = int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))
    return hours * 3600 + minutes * 60 + seconds, sum(float(m.group(1)) for m in cpu), int(rss.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="cold runs per command (default: 3)")
    parser.add_argument("--target", type=positive_float, default=1.5, help="wall-time goal per command, seconds (default: 1.5)")
    args = parser.parse_args()
    if shutil.which("/usr/bin/time") is None:
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")
    print(f"checkout: {ROOT}   python: {sys.executable}   cpus: {os.cpu_count()}   load (1 min) before: {os.getloadavg()[0]:.2f}")
    print(f"{'command':<36} {'wall s per run':<18} {'median':>6} {'max':>5}   {'CPU s per run':<16} {'median':>6}   {'peak RSS MB':<13} {'max':>4}   max wall < {args.target:g} s")
    for label, argv in commands().items():
        runs = [timed_run(argv) for _ in range(args.repeats)]
        walls, cpus, rss = ([run[i] for run in runs] for i in range(3))
        per_wall = " ".join(f"{w:.2f}" for w in walls)
        per_cpu = " ".join(f"{c:.2f}" for c in cpus)
        per_rss = " ".join(f"{r:.0f}" for r in rss)
        ok = "yes" if max(walls) < args.target else "NO"
        print(
            f"{label:<36} {per_wall:<18} {statistics.median(walls):>6.2f} {max(walls):>5.2f}   "
            f"{per_cpu:<16} {statistics.median(cpus):>6.2f}   {per_rss:<13} {max(rss):>4.0f}   {ok}"
        )
    print(f"load (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
