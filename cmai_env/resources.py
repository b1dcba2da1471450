"""Memory an environment count needs, checked before anything is built.

An out-of-memory kill is not an error message: ``cmai train --n-envs 100000`` grew past 20 GB
within a minute on the 24 GB machine, and ``gymnasium.make_vec`` of 1,024 pixel environments
started 1,024 processes of about 1 GB each. :func:`check_memory` estimates what N environments
of a scenario need and refuses N when it exceeds what the device has free, naming the count, the
estimate and the largest N that fits.

The estimates are measurements (2026-12-06, the 2-core CPU machine, peak RSS after six rounds),
scaled by :data:`SAFETY`:

* **embedding fidelity, batched** (:class:`cmai_env.vector_env.CMAIVectorEnv`): per environment
  about 12.8 KB per pair of ``batch_size`` (traffic, its crafting and ``L_adv`` graph) and 4.5 KB
  per attacked probe pair (``probe_n / 2`` per mixture entry of the widest phase). At N = 512,
  ``batch_size`` 64 → 256 added 2.39 MB per environment and ``probe_n`` 256 → 1,024 added 1.73 MB;
  quickstart's sizes (32, 128) predict 0.68 MiB, and ``python benchmarks/env_memory.py --counts
  1024 4096`` measured 0.78 MiB per environment between those counts.
* **pixel fidelity**: a process holding one pixel environment peaks at 1.12 GB (torch, the
  backbone, the data; the same benchmark: 1,123 MiB); each further environment in that process
  adds about 110 MB.

Written by hand: the footprint is this environment's own arithmetic, which no library estimates.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmai_env.scenario import Scenario

KIB, MIB, GIB = 1024, 1024**2, 1024**3
#: embedding fidelity, per environment: per pair of ``batch_size`` and per attacked probe pair (the
#: adapters and their AdamW state are inside these: the two terms alone reproduce the measurements)
EMBEDDING_BYTES_PER_BATCH_PAIR = int(12.8 * KIB)
EMBEDDING_BYTES_PER_ATTACKED_PROBE_PAIR = int(4.5 * KIB)
#: pixel fidelity: a process with one environment, and each further environment in the same process
PIXEL_PROCESS_BYTES = int(1.12 * GIB)
PIXEL_EXTRA_ENV_BYTES = 110 * MIB
#: a dataset's images: bytes per pixel channel, held as uint8 and again as float32 tensors
DATASET_BYTES_PER_VALUE = 1 + 4
#: the process itself before any environment (torch, the backbone, the cached embeddings)
PROCESS_BASE_BYTES = 1 * GIB
#: estimates are multiplied by this before they are compared with what is free
SAFETY = 1.5


class ResourceError(ValueError):
    """An environment count the device's memory cannot hold."""


def free_bytes(device: str = "cpu") -> int | None:
    """Memory free for new allocations on ``device``: the kernel's ``MemAvailable`` for the CPU,
    ``torch.cuda.mem_get_info`` for a CUDA device; ``None`` where it cannot be read."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def embedding_bytes_per_env(scenario: "Scenario") -> int:
    """Estimated bytes one batched embedding environment of ``scenario`` holds at its peak."""
    widest = max((len(phase.attacks) for phase in scenario.phases), default=0)
    attacked_probe = scenario.dataset.probe_n // 2 * max(widest, 1)
    return EMBEDDING_BYTES_PER_BATCH_PAIR * scenario.batch_size + EMBEDDING_BYTES_PER_ATTACKED_PROBE_PAIR * attacked_probe


def _linear_cost(scenario: "Scenario", fidelity: str, processes: bool) -> tuple[int, int]:
    """``(fixed, per environment)`` bytes: every estimate here is ``fixed + count · per``."""
    if fidelity == "pixel":
        if processes:
            return 0, PIXEL_PROCESS_BYTES
        return PIXEL_PROCESS_BYTES - PIXEL_EXTRA_ENV_BYTES, PIXEL_EXTRA_ENV_BYTES  # the first env costs the process
    return PROCESS_BASE_BYTES, embedding_bytes_per_env(scenario)


def _largest_fitting(available: int, fixed: int, per_item: int) -> int:
    """The largest count whose ``fixed + count · per_item``, times :data:`SAFETY`, fits in ``available``."""
    return max(0, int((available / SAFETY - fixed) // per_item))


def _free(where: str, available: int | None) -> int | None:
    return free_bytes(where) if available is None else available


def estimated_bytes(scenario: "Scenario", num_envs: int, fidelity: str, processes: bool = False) -> int:
    """Estimated peak bytes of ``num_envs`` environments of ``scenario`` (before :data:`SAFETY`).

    :param fidelity: ``embedding`` (one batched computation) or ``pixel``.
    :param processes: pixel environments in a process each (``AsyncVectorEnv``, ``SubprocVecEnv``).
    """
    fixed, per_env = _linear_cost(scenario, fidelity, processes)
    return fixed + num_envs * per_env


def check_memory(scenario: "Scenario", num_envs: int, fidelity: str, device: str = "cpu", processes: bool = False,
                 what: str = "num_envs", available: int | None = None) -> None:
    """Refuse ``num_envs`` environments whose estimated memory exceeds what ``device`` has free.

    Pixel environments live in host memory whatever the device; batched embedding worlds on
    ``device``. Nothing is checked where free memory cannot be read.

    :param what: the option that set the count, for the message (``--n-envs``, ``num_envs``).
    :param available: free bytes to compare with (default: :func:`free_bytes`).
    :raises ResourceError: the estimate, times :data:`SAFETY`, exceeds the free memory.
    """
    where = "cpu" if fidelity == "pixel" else device
    available = _free(where, available)
    if available is None:
        return
    need = SAFETY * estimated_bytes(scenario, num_envs, fidelity, processes)
    if need <= available:
        return
    fits = _largest_fitting(available, *_linear_cost(scenario, fidelity, processes))
    layout = "a process each" if fidelity == "pixel" and processes else "one process" if fidelity == "pixel" else "batched"
    sizes = "" if fidelity == "pixel" else f" at batch_size {scenario.batch_size} and probe_n {scenario.dataset.probe_n}"
    advice = f"use at most {fits}" if fits else "none fit"
    raise ResourceError(
        f"{what} {num_envs}: {num_envs} {fidelity}-fidelity environments of scenario {scenario.name!r} ({layout}{sizes}) "
        f"need about {need / GIB:.1f} GB, and {where} has {available / GIB:.1f} GB free; {advice}"
        + ("" if fidelity == "pixel" else ", or smaller batch_size / dataset.probe_n")
    )


def check_dataset_memory(name: str, n: int, image_size: int, what: str = "n", available: int | None = None) -> None:
    """Refuse generating or loading ``n`` images of ``image_size``² whose pixels (as uint8 and as
    float tensors, :data:`DATASET_BYTES_PER_VALUE`), times :data:`SAFETY`, exceed the free host memory.

    :param what: the option that set ``n`` (``--n``, ``--eval-n``), for the message.
    :raises ResourceError: naming the dataset, ``n``, the estimate, the free memory and the largest ``n`` that fits.
    """
    available = _free("cpu", available)
    if available is None:
        return
    per_sample = image_size * image_size * 3 * DATASET_BYTES_PER_VALUE
    need = SAFETY * n * per_sample
    if need <= available:
        return
    raise ResourceError(
        f"{what} {n}: {n} images of dataset {name!r} at {image_size}×{image_size} need about {need / GIB:.1f} GB, "
        f"and cpu has {available / GIB:.1f} GB free; use at most {_largest_fitting(available, 0, per_sample)}"
    )


def check_buffer_memory(hyperparams: "dict", n_envs: int, obs_size: int, action_size: int, available: int | None = None) -> None:
    """Refuse an SB3 rollout or replay buffer larger than the free host memory, before it is allocated.

    Sizes as Stable-Baselines3 stores them, float32: a rollout buffer holds ``n_steps × n_envs``
    steps of observation, action and six scalars (reward, return, value, log-probability,
    advantage, episode start); a replay buffer ``buffer_size`` transitions of observation, next
    observation, action and three scalars. Only values the hyperparameters set are checked (the
    algorithms' own defaults fit), and only whole numbers (the algorithm names a bad value itself).

    :raises ResourceError: naming the hyperparameter, its value, the estimate and the free memory.
    """
    key = "n_steps" if "n_steps" in hyperparams else "buffer_size" if "buffer_size" in hyperparams else None
    value = hyperparams.get(key) if key else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML's 1e6
    if not isinstance(value, int) or isinstance(value, bool):
        return  # unset, or not a count: the algorithm names a bad value itself
    if key == "n_steps":
        need = value * n_envs * (obs_size + action_size + 6) * 4
        detail = f"a rollout of {value} steps × {n_envs} environments"
    else:
        need = value * (2 * obs_size + action_size + 3) * 4
        detail = f"a replay buffer of {value} transitions"
    available = _free("cpu", available)
    if available is None or SAFETY * need <= available:
        return
    raise ResourceError(
        f"hyperparameter {key} = {value}: {detail} needs about {SAFETY * need / GIB:.1f} GB, "
        f"and cpu has {available / GIB:.1f} GB free; lower {key}" + (" or n_envs" if key == "n_steps" else "")
    )

