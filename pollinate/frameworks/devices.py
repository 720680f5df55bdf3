"""Devices: ``[train] device`` and ``[simulation] gpus_per_worker``, with no framework import.

``device`` is one of ``auto`` (a GPU when the framework sees one, else the CPU), ``cpu``,
``cuda``, ``cuda:N`` or ``mps`` (Apple silicon, torch and keras-on-torch only). Each adapter
says which accelerators it sees (``gpu_count``); ``resolve_device`` turns the setting into the
concrete device or raises ``ConfigError`` naming what is missing and how to fix it.

``gpus_per_worker`` (a fraction is allowed: 0.5 puts two workers on each GPU) pins the
process backend's workers to GPUs round robin through ``CUDA_VISIBLE_DEVICES``
(``worker_gpus``); Ray actors request ``num_gpus`` and Ray pins them itself.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

from pollinate.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


def check_device(name: str) -> str:
    """``name`` when it is a device setting; ConfigError otherwise."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ConfigError(f"train.device = {name!r} is not a device; use one of {DEVICE_HELP}")
    return name


def resolve_device(name: str, framework: str, gpus: int, mps: bool = False) -> str:
    """The concrete device for setting ``name`` on a framework that sees ``gpus`` CUDA GPUs.

    Returns ``"cpu"``, ``"cuda:N"`` or ``"mps"``. ``auto`` picks ``cuda:0`` when there is a
    GPU, then ``mps``, then the CPU. ConfigError when the device asked for is absent.
    """
    check_device(name)
    if name == "auto":
        return "cuda:0" if gpus > 0 else "mps" if mps else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "mps":
        if not mps:
            raise ConfigError(
                f"train.device = 'mps' but {framework} sees no Apple GPU (MPS); use device = "
                "'cpu' or 'auto'"
            )
        return "mps"
    index = int(name.partition(":")[2] or 0)
    if gpus == 0:
        raise ConfigError(
            f"train.device = {name!r} but {framework} sees no CUDA GPU on this machine "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use "
            f"device = 'cpu' or 'auto', or install a CUDA build of {framework}"
        )
    if index >= gpus:
        raise ConfigError(
            f"train.device = {name!r} but {framework} sees only {gpus} CUDA GPU(s) "
            f"(cuda:0..cuda:{gpus - 1})"
        )
    return f"cuda:{index}"


def visible_gpus() -> list[str]:
    """The GPU ids a child process may use: ``CUDA_VISIBLE_DEVICES`` when set, else the GPUs
    ``nvidia-smi -L`` lists (none without an NVIDIA driver)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def worker_gpus(index: int, gpus_per_worker: float, gpus: list[str]) -> list[str]:
    """The GPUs of worker ``index`` when each worker gets ``gpus_per_worker`` of ``gpus``.

    Round robin: with a fraction f < 1, worker i shares GPU ⌊i·f⌋ mod G (1/f workers per
    GPU); with f >= 1, worker i gets ⌈f⌉ consecutive GPUs starting at i·⌈f⌉ mod G.
    """
    if gpus_per_worker <= 0:
        return []
    if not gpus:
        raise ConfigError(
            f"simulation.gpus_per_worker = {gpus_per_worker} but no GPU is visible "
            "(no CUDA_VISIBLE_DEVICES, no nvidia-smi); set gpus_per_worker = 0"
        )
    if gpus_per_worker < 1:
        return [gpus[math.floor(index * gpus_per_worker) % len(gpus)]]
    count = math.ceil(gpus_per_worker)
    if count > len(gpus):
        raise ConfigError(
            f"simulation.gpus_per_worker = {gpus_per_worker} but only {len(gpus)} GPU(s) are "
            "visible; lower it"
        )
    start = index * count
    return [gpus[(start + k) % len(gpus)] for k in range(count)]


def worker_env(index: int, gpus_per_worker: float, gpus: list[str] | None = None) -> dict[str, str]:
    """The environment that pins worker ``index`` to its GPUs (empty when it uses none)."""
    if gpus_per_worker <= 0:
        return {}
    chosen = worker_gpus(index, gpus_per_worker, visible_gpus() if gpus is None else gpus)
    return {"CUDA_VISIBLE_DEVICES": ",".join(chosen)}
