"""Strategies and the framework backends that run them.

registry.py and backbones.py are framework-free declarations; every module that imports
torch or tensorflow lives in a backend package named in FRAMEWORKS and is imported only
inside a cell process (or the fork server that forks cell processes, bench/run/forkserver.py).

A backend module exposes:
    run_cell(spec: RunSpec, card: dict, ctx: bench.cell.process.CellContext) -> None
    versions() -> dict[str, str]
    preload() -> None              import what a cell would import later, touching no device
    fork_problem() -> str | None   why a child forked from this process could not run a cell
    set_threads(n: int) -> None    a cell given n CPU cores uses n threads (bench/cell/process.py)
"""

from __future__ import annotations

import importlib
from types import ModuleType

FRAMEWORKS: dict[str, str] = {
    "torch": "strategies.torch_backend",
    "keras": "strategies.keras_backend",
}


def backend(framework: str) -> ModuleType:
    try:
        module = FRAMEWORKS[framework]
    except KeyError:
        raise KeyError(f"unknown framework {framework!r}; available: "
                       f"{', '.join(sorted(FRAMEWORKS))}") from None
    return importlib.import_module(module)
