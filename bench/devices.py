"""The run device (`[run] device`, `--device`) -> the kind of device a cell is measured on.

The kind is part of a cell's identity (RunSpec.device_kind): the same cell on a CPU and on an
H200 are two measurements, so a grid finished on one is not "done" on the other. Kinds:

    cpu                   the CPU
    mps                   Apple silicon's GPU
    cuda:<model>          an NVIDIA GPU, by model as nvidia-smi names it: cuda:NVIDIA H200

Framework-free on purpose (no torch, no tensorflow): the runner resolves the kind before any
cell starts, and a bad request (`cuda` on a machine without an NVIDIA GPU) stops the grid
before anything runs or is written. GPUs are listed by `nvidia-smi`, the one tool every
NVIDIA driver installs, honouring CUDA_VISIBLE_DEVICES when it lists indices (as CUDA does:
`cuda:1` is the second *visible* GPU).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

NVIDIA_SMI_TIMEOUT_S = 10.0  # a wedged driver makes nvidia-smi hang; never wait longer
ALLOWED = "auto, cpu, cuda, cuda:<i>, mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DeviceError(ValueError):
    """The requested device is not on this machine (or is not a device name)."""


def check(requested: object) -> str | None:
    """None if `requested` is a device name the harness knows, else what is allowed."""
    if isinstance(requested, str) and _DEVICE.fullmatch(requested):
        return None
    return f"allowed: {ALLOWED}"


def resolve_kind(requested: str) -> str:
    """`auto | cpu | cuda | cuda:<i> | mps` -> `cpu`, `mps` or `cuda:<model>`.

    `auto` is the first visible NVIDIA GPU, else Apple's GPU on macOS arm64, else the CPU.
    Raises DeviceError when the request cannot be met here."""
    problem = check(requested)
    if problem:
        raise DeviceError(f"device {requested!r}: {problem}")
    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        if not _apple_silicon():
            raise DeviceError(f"device 'mps' requested but this machine is not a Mac with "
                              f"Apple silicon ({sys.platform} {platform.machine()}); "
                              f"allowed here: auto, cpu")
        return "mps"
    listed = _nvidia_smi()
    gpus = visible_gpus(listed)
    if requested == "auto":
        if gpus:
            return f"cuda:{gpus[0]}"
        return "mps" if _apple_silicon() else "cpu"
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if not gpus:
        raise DeviceError(f"device {requested!r} requested but no NVIDIA GPU is visible "
                          f"({_why_no_gpu(listed)}); use --device cpu or auto")
    if index >= len(gpus):
        raise DeviceError(f"device {requested!r} requested but only {len(gpus)} NVIDIA GPU(s) "
                          f"are visible ({', '.join(gpus)}); allowed: cuda:0.."
                          f"cuda:{len(gpus) - 1}")
    return f"cuda:{gpus[index]}"


def visible_gpus(listed: list[tuple[int, str]] | None = None) -> list[str]:
    """The model names of the NVIDIA GPUs this process may use, in CUDA's order (`listed`:
    nvidia-smi's (index, model) pairs, asked for when not given)."""
    listed = _nvidia_smi() if listed is None else listed
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [name for _, name in listed]
    by_index = dict(listed)
    out = []
    # CUDA reads the list up to its first entry that names no device ("" or "-1": none)
    for i, entry in enumerate(e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) in by_index:
            out.append(by_index[int(entry)])
        elif i == 0 and entry.startswith(("GPU-", "MIG-")):
            # UUIDs are not mapped to indices here: every listed GPU stands in (the model
            # is what the kind records, and one machine's GPUs are usually one model)
            return [name for _, name in listed]
        else:
            break
    return out


def visible_entries(listed: list[tuple[int, str]] | None = None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value that shows a process exactly one of the visible GPUs,
    in visible_gpus()' order: the entries of CUDA_VISIBLE_DEVICES, or nvidia-smi's indices
    when it is not set."""
    listed = _nvidia_smi() if listed is None else listed
    n = len(visible_gpus(listed))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i, _ in listed][:n]
    return [e.strip() for e in visible.split(",")][:n]


def _nvidia_smi() -> list[tuple[int, str]]:
    """(index, model) for every GPU nvidia-smi lists; [] when it is missing, fails or hangs."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    gpus = []
    for line in done.stdout.splitlines():
        index, _, name = line.partition(",")
        if index.strip().isdigit() and name.strip():
            gpus.append((int(index), name.strip()))
    return gpus


def _why_no_gpu(listed: list[tuple[int, str]]) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and listed:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides them"
    return "nvidia-smi is missing, failed or lists none"


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"
