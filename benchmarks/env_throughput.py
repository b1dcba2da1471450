"""Environment throughput: one env, SyncVectorEnv of N envs, the batched env at N, pixel, PPO.

Prints, side by side and from one run:

* ``single``: one ``CMAIEnv`` (embedding fidelity) stepping random actions;
* ``sync N``: gymnasium's ``SyncVectorEnv`` of N single environments (what vectorising without
  batching gives; N ∈ ``--sync-n``, default 1 and 16: it scales linearly, each env costs a copy);
* ``batched N``: ``gymnasium.make_vec(..., vectorization_mode="vector_entry_point")`` at
  N ∈ ``--batched-n`` (default 1, 16, 64, 256), the native batched env;
* ``pixel single`` / ``pixel async N``: the pixel fidelity alone and through its ``make_vec`` path
  (``AsyncVectorEnv`` of single envs);
* ``ppo batched N``: SB3 PPO learning on the batched env through :mod:`agents.vec_adapter`
  (what ``cmai train --n-envs N`` builds), environment steps per second end to end.

Each line runs in a fresh process (so its peak RSS is its own) with ``--threads`` torch threads
(default 1). Rates are given per second of the process's CPU time and of wall time: on a
shared machine the wall-clock rate mostly measures the neighbours, so the load average is
printed with every line. ``speed-up`` compares CPU rates with the first ``sync`` line of the
same N (``*``: with the largest N measured for sync, whose CPU rate does not grow with N).

Targets (issue 9, 2 CPU cores): batched ≥ 5,000 aggregate rounds/s at some N and ≥ 20× SyncVectorEnv
at that N; single env ≥ 500 rounds/s; peak RSS ≤ 2 GB at N = 256; PPO ≥ 1,500 env steps/s at N = 64.

    python benchmarks/env_throughput.py [--scenario abrupt_shift] [--rounds 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np


def _setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import cmai_env  # noqa: F401  (registers the IDs)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step, steps: int) -> tuple[float, float]:
    """CPU and wall seconds for ``steps`` calls of ``step``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_single(cfg: dict) -> dict:
    import gymnasium as gym

    env = gym.make("cmai_env/CMAI-v0", scenario=cfg["scenario"], fidelity=cfg["fidelity"], device=cfg["device"])
    rng = np.random.default_rng(0)
    env.reset(seed=0)

    def step() -> None:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 3).astype(np.float32))
        if terminated or truncated:
            env.reset()

    for _ in range(2):
        step()
    cpu, wall = _timed(step, cfg["rounds"])
    return {"rounds": cfg["rounds"], "cpu": cpu, "wall": wall}


def bench_vector(cfg: dict) -> dict:
    import gymnasium as gym

    n = cfg["n"]
    kwargs = {"scenario": cfg["scenario"], "fidelity": cfg["fidelity"], "device": cfg["device"]}
    vec = gym.make_vec("cmai_env/CMAI-v0", num_envs=n, vectorization_mode=cfg["mode"], **kwargs)
    rng = np.random.default_rng(0)
    vec.reset(seed=0)
    step = lambda: vec.step(rng.uniform(-1, 1, (n, 3)).astype(np.float32))  # noqa: E731
    step()
    steps = max(2, cfg["rounds"] // n)
    cpu, wall = _timed(step, steps)
    if isinstance(vec, gym.vector.AsyncVectorEnv):  # the work happens in the workers: their CPU time is not ours
        cpu = float("nan")
    vec.close()
    return {"rounds": steps * n, "cpu": cpu, "wall": wall}


def bench_ppo(cfg: dict) -> dict:
    from stable_baselines3 import PPO

    from agents.train import make_envs

    n = cfg["n"]
    env = make_envs("cmai_env/CMAI-v0", {"scenario": cfg["scenario"], "fidelity": "embedding", "device": cfg["device"]}, n, seed=0)
    model = PPO("MlpPolicy", env, n_steps=cfg["ppo_n_steps"], batch_size=min(256, cfg["ppo_n_steps"] * n), n_epochs=4, seed=0, device="cpu", verbose=0)
    timesteps = cfg["ppo_rollouts"] * cfg["ppo_n_steps"] * n
    cpu, wall = time.process_time(), time.perf_counter()
    model.learn(total_timesteps=timesteps)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    env.close()
    return {"rounds": timesteps, "cpu": cpu, "wall": wall}


def _child(kind: str, cfg: dict, queue) -> None:
    _setup(cfg["threads"])
    result = {"single": bench_single, "vector": bench_vector, "ppo": bench_ppo}[kind](cfg)
    result["rss_mb"] = _peak_rss_mb()
    queue.put(result)


def run(kind: str, cfg: dict) -> dict:
    """Run one measurement in a fresh process; returns rounds, cpu, wall, rss_mb and the load average."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    load = os.getloadavg()[0]
    proc = ctx.Process(target=_child, args=(kind, cfg, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result["load"] = (load + os.getloadavg()[0]) / 2
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="abrupt_shift")
    parser.add_argument("--rounds", type=int, default=256, help="env rounds per measurement (batched: at least 2 steps)")
    parser.add_argument("--sync-n", type=int, nargs="*", default=[1, 16], help="SyncVectorEnv sizes")
    parser.add_argument("--batched-n", type=int, nargs="*", default=[1, 16, 64, 256], help="batched env sizes")
    parser.add_argument("--pixel-rounds", type=int, default=8, help="pixel rounds (0: skip pixel)")
    parser.add_argument("--pixel-n", type=int, default=2, help="AsyncVectorEnv size for pixel")
    parser.add_argument("--ppo-n", type=int, default=64, help="PPO on the batched env with this many envs (0: skip)")
    parser.add_argument("--ppo-n-steps", type=int, default=16, help="PPO rollout length per env")
    parser.add_argument("--ppo-rollouts", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device of the environments (cpu or cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    args = parser.parse_args()
    base = {"scenario": args.scenario, "device": args.device, "threads": args.threads, "fidelity": "embedding"}

    print(f"scenario {args.scenario}, device {args.device}, torch threads per process {args.threads}, {os.cpu_count()} CPUs")
    print(f"{'what':<22}{'N':>5}{'rounds':>8}{'rounds/s cpu':>14}{'rounds/s wall':>15}{'speed-up':>10}{'peak RSS MB':>13}{'load':>7}")
    sync_rate: dict[int, float] = {}

    def show(what: str, n: int, r: dict) -> None:
        cpu_rate = r["rounds"] / r["cpu"] if r["cpu"] == r["cpu"] and r["cpu"] > 0 else float("nan")
        if what.startswith("sync"):
            sync_rate[n] = cpu_rate
        speedup = ""
        if what.startswith("batched") and sync_rate:
            # SyncVectorEnv steps its envs one after another: its rate per CPU second does not grow
            # with N, so N's without their own sync line compare with the largest one measured (*).
            ref = n if n in sync_rate else max(sync_rate)
            speedup = f"{cpu_rate / sync_rate[ref]:.1f}x" + ("" if ref == n else "*")
        print(
            f"{what:<22}{n:>5}{r['rounds']:>8}{cpu_rate:>14.1f}{r['rounds'] / r['wall']:>15.1f}{speedup:>10}"
            f"{r['rss_mb']:>13.0f}{r['load']:>7.1f}",
            flush=True,
        )

    show("single", 1, run("single", {**base, "rounds": max(args.rounds // 4, 8)}))
    for n in args.sync_n:
        show("sync", n, run("vector", {**base, "n": n, "mode": "sync", "rounds": max(args.rounds // 4, 2 * n)}))
    for n in args.batched_n:
        show("batched", n, run("vector", {**base, "n": n, "mode": "vector_entry_point", "rounds": max(args.rounds, 2 * n)}))
    if args.pixel_rounds:
        pixel = {**base, "fidelity": "pixel"}
        show("pixel single", 1, run("single", {**pixel, "rounds": args.pixel_rounds}))
        show("pixel async", args.pixel_n, run("vector", {**pixel, "n": args.pixel_n, "mode": "vector_entry_point", "rounds": args.pixel_rounds * args.pixel_n}))
    if args.ppo_n:
        cfg = {**base, "n": args.ppo_n, "ppo_n_steps": args.ppo_n_steps, "ppo_rollouts": args.ppo_rollouts}
        show("ppo batched (steps)", args.ppo_n, run("ppo", cfg))


if __name__ == "__main__":
    main()
