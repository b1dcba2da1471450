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

Then the arithmetic behind the batched rate (``--flops-n``, default 64; 0 skips it): the FLOPs of
one batched step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, forward and
backward) per round, the GFLOP/s the same steps achieve per CPU second, the share of the step's
CPU spent outside the model (per-environment bookkeeping in Python), and the device's measured
peak for a matmul of the adapter's shape (``baddbmm`` of N × 64 rows × D → H): how far the round
is from the machine's arithmetic limit. Last, the FLOPs per round of reduced rounds (fewer probe
pairs, one PGD step, a narrower adapter, all three) and the rate each allows at that peak: what
per-round work a target rate needs.

``--device cuda`` runs every line on the GPU (timed per wall second after synchronising; the CPU
rate then counts only the host's share); without CUDA it stops with a clear error.

    python benchmarks/env_throughput.py [--scenario abrupt_shift] [--rounds 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np

from cmai_env.cli.common import device_arg, non_negative_int, positive_int


#: Reduced rounds of the arithmetic report: scenario overrides and module constants of the embedding world.
REDUCED: dict[str, dict] = {
    "probe pairs 256 -> 64": {"overrides": {"dataset.probe_n": 64}},
    "PGD steps 3 -> 1": {"overrides": {"defense.attack_steps": 1}, "max_steps": 1},
    "adapter width 64 -> 16": {"hidden": 16},
    "all three": {"overrides": {"dataset.probe_n": 64, "defense.attack_steps": 1}, "max_steps": 1, "hidden": 16},
}
#: Aggregate batched rate of issue 9's target, rounds per second.
TARGET_RATE = 5000.0


def _sync(device: str) -> None:
    """Wait for the device's queued kernels (CUDA timings would otherwise measure the launch only)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


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


def matmul_peak(device: str, n: int, rows: int, dim: int, hidden: int, windows: int = 5, seconds: float = 0.1) -> float:
    """Measured GFLOP/s of ``torch.baddbmm`` on ``(n, rows, dim) @ (n, dim, hidden)``: the adapter's
    matmul at the batched env's shape, the device's arithmetic limit for this work.

    The best of ``windows`` windows of ``seconds`` each (per CPU second on the CPU, per wall
    second on a GPU): on a shared machine the neighbours only ever slow a window down.
    """
    import torch

    x, w, b = (torch.randn(*shape, device=device) for shape in ((n, rows, dim), (n, dim, hidden), (n, 1, hidden)))
    for _ in range(3):
        torch.baddbmm(b, x, w)
    _sync(device)
    best = 0.0
    for _ in range(windows):
        calls, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds or calls < 5:
            torch.baddbmm(b, x, w)
            calls += 1
        _sync(device)
        elapsed = time.process_time() - cpu if device == "cpu" else time.perf_counter() - start
        best = max(best, 2.0 * n * rows * dim * hidden * calls / max(elapsed, 1e-9) / 1e9)
    return best


def bench_arithmetic(cfg: dict) -> dict:
    """FLOPs and time of ``cfg["steps"]`` batched steps at N = ``cfg["n"]``; with ``cfg["reduced"]`` (a
    :data:`REDUCED` entry), the reduced round's FLOPs only.

    The FLOPs are counted on a copy of the warmed-up env stepping the same actions as the timed
    one, so the counter's overhead stays out of the time. ``model_cpu`` is the CPU time inside the
    stacked world (traffic, observation, update, probe); the rest of a step is per-environment
    bookkeeping (rewards, infos, detector calibration, change detector).
    """
    from cmai_env.fidelity import stacked

    reduced = cfg.get("reduced") or {}
    saved = stacked.MAX_STEPS, stacked.ADAPTER_HIDDEN
    stacked.MAX_STEPS, stacked.ADAPTER_HIDDEN = reduced.get("max_steps", saved[0]), reduced.get("hidden", saved[1])
    try:
        return _arithmetic(cfg, reduced)
    finally:
        stacked.MAX_STEPS, stacked.ADAPTER_HIDDEN = saved


def _arithmetic(cfg: dict, reduced: dict) -> dict:
    import copy

    import gymnasium as gym
    from torch.utils.flop_counter import FlopCounterMode

    n, device = cfg["n"], cfg["device"]
    overrides = {**cfg.get("overrides", {}), **reduced.get("overrides", {})}
    vec = gym.make_vec("cmai_env/CMAI-v0", num_envs=n, vectorization_mode="vector_entry_point", scenario=cfg["scenario"],
                       fidelity="embedding", device=device, **overrides)
    rng = np.random.default_rng(0)
    vec.reset(seed=0)
    for _ in range(2):
        vec.step(rng.uniform(-1, 1, (n, 3)).astype(np.float32))
    actions = [rng.uniform(-1, 1, (n, 3)).astype(np.float32) for _ in range(cfg["steps"])]
    twin = copy.deepcopy(vec)
    with FlopCounterMode(display=False) as counter:
        for action in actions:
            twin.step(action)
    result = {"rounds": len(actions) * n, "flops": float(counter.get_total_flops()), "n": n}
    if reduced:
        return result
    world, model = vec.world, [0.0]

    def timed(method):
        def call(*args, **kwargs):
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                _sync(device)
                model[0] += time.process_time() - start

        return call

    for name in ("incoming", "observe", "update", "probe"):
        setattr(world, name, timed(getattr(world, name)))
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    for action in actions:
        vec.step(action)
    _sync(device)
    result.update(cpu=time.process_time() - cpu, wall=time.perf_counter() - wall, model_cpu=model[0])
    dim, hidden = world.embed_dim, world.image.down_w.shape[-1]
    result.update(dim=dim, hidden=hidden, classes=int(world.class_raw.shape[0]), peak=matmul_peak(device, n, 64, dim, hidden))
    return result


def arithmetic_lines(measured: dict, reduced: dict[str, dict], device: str) -> list[str]:
    """The arithmetic report's lines (module docstring) from :func:`bench_arithmetic`'s results."""
    per_round = measured["flops"] / measured["rounds"]
    seconds = measured["cpu"] if device == "cpu" else measured["wall"]
    clock = "CPU" if device == "cpu" else "wall"
    achieved = measured["flops"] / seconds / 1e9
    peak = measured["peak"]
    bookkeeping = 1.0 - measured["model_cpu"] / measured["cpu"] if measured["cpu"] > 0 else float("nan")
    per_pass = 4 * measured["dim"] * measured["hidden"] + 2 * measured["dim"] * measured["classes"]
    budget = peak * 1e9 / TARGET_RATE
    lines = [
        f"arithmetic, batched N = {measured['n']}: {per_round / 1e6:.1f} MFLOP per round (matmuls, forward + backward; "
        f"{measured['rounds']} rounds counted)",
        f"  achieved {achieved:.1f} GFLOP/s per {clock} second; measured peak of the adapter's matmul "
        f"(baddbmm {measured['n']}x64x{measured['dim']} @ {measured['dim']}x{measured['hidden']}) {peak:.1f} GFLOP/s: "
        f"the round runs at {100 * achieved / peak:.0f}% of the arithmetic limit",
        f"  per-environment bookkeeping outside the model: {100 * bookkeeping:.0f}% of the step's CPU "
        f"({1e3 * bookkeeping * measured['cpu'] / measured['rounds']:.2f} ms per round)",
        f"  at that peak these FLOPs allow at most {peak * 1e9 / per_round:,.0f} rounds/s; {TARGET_RATE:,.0f} rounds/s needs "
        f"<= {budget / 1e6:.1f} MFLOP per round ("
        + (f"{per_round / budget:.1f}x less" if per_round > budget else f"today's fit {budget / per_round:.1f}x over")
        + f"), i.e. <= {budget / per_pass:,.0f} adapter passes "
        f"of one pair side ({per_pass / 1e3:.1f} kFLOP each at D = {measured['dim']}, H = {measured['hidden']}, "
        f"{measured['classes']} classes; today ~{per_round / per_pass:,.0f})",
    ]
    for name, result in reduced.items():
        flops = result["flops"] / result["rounds"]
        lines.append(f"  reduced round, {name:<24}{flops / 1e6:>7.1f} MFLOP per round: at most {peak * 1e9 / flops:>9,.0f} rounds/s at peak")
    return lines


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
    result = {"single": bench_single, "vector": bench_vector, "ppo": bench_ppo, "arithmetic": bench_arithmetic}[kind](cfg)
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
    parser.add_argument("--rounds", type=positive_int, default=256, help="env rounds per measurement (batched: at least 2 steps)")
    parser.add_argument("--sync-n", type=positive_int, nargs="*", default=[1, 16], help="SyncVectorEnv sizes")
    parser.add_argument("--batched-n", type=positive_int, nargs="*", default=[1, 16, 64, 256], help="batched env sizes")
    parser.add_argument("--pixel-rounds", type=non_negative_int, default=8, help="pixel rounds (0: skip pixel)")
    parser.add_argument("--pixel-n", type=positive_int, default=2, help="AsyncVectorEnv size for pixel")
    parser.add_argument("--ppo-n", type=non_negative_int, default=64, help="PPO on the batched env with this many envs (0: skip)")
    parser.add_argument("--ppo-n-steps", type=positive_int, default=16, help="PPO rollout length per env")
    parser.add_argument("--ppo-rollouts", type=positive_int, default=2)
    parser.add_argument("--device", type=device_arg, default="cpu", help="torch device of the environments (cpu or cuda)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--flops-n", type=non_negative_int, default=64, help="count the batched round's FLOPs at this N (0: skip)")
    parser.add_argument("--flops-steps", type=positive_int, default=8, help="batched steps counted and timed for the arithmetic report")
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
    if args.flops_n:
        cfg = {**base, "n": args.flops_n, "steps": args.flops_steps}
        measured = run("arithmetic", cfg)
        # FLOPs per round do not depend on N (each env does its own work): count the reduced rounds at N <= 8.
        small = {**cfg, "n": min(args.flops_n, 8), "steps": 2}
        reduced = {name: run("arithmetic", {**small, "reduced": spec}) for name, spec in REDUCED.items()}
        for line in arithmetic_lines(measured, reduced, args.device):
            print(line, flush=True)


if __name__ == "__main__":
    main()
