"""Throughput meters, the same for every framework: warm-up steps excluded, the device
synchronised before every clock read (the backend passes its `sync`), median over steps.

A step's time runs from the end of the previous step to the end of this one, so a data-fed
rate includes waiting for the input pipeline; a model-only rate (synthetic batch already on
the device) does not. Their ratio tells whether a cell is input-bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _noop() -> None:
    pass


class StepMeter:
    """Per-step images/s. Call `start()` at the start of every epoch, `step(n)` after every
    step and `stop()` when the epoch's steps are done. A `probe` (bench.cell.contention.CpuProbe)
    is told where the timed steps begin and end: once per epoch, so reading it costs
    nothing per step."""

    def __init__(self, sync: Callable[[], None] = _noop, warmup: int = 3, probe=None):
        self.sync = sync
        self.warmup = warmup
        self.probe = probe
        self.rates: list[float] = []
        self._seen = 0
        self._last: float | None = None

    def start(self) -> None:
        self.sync()
        if self.probe is not None and self._seen >= self.warmup:
            self.probe.begin()
        self._last = time.perf_counter()

    def step(self, n_items: int) -> None:
        self.sync()
        now = time.perf_counter()
        if self._last is not None and self._seen >= self.warmup:
            self.rates.append(n_items / max(now - self._last, 1e-12))
        self._seen += 1
        if self.probe is not None and self._seen == self.warmup:  # the timed steps begin
            self.probe.begin()
            now = time.perf_counter()
        self._last = now

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.end()

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def measure(fn: Callable[[], object], n_items: int, steps: int = 10, warmup: int = 3,
            sync: Callable[[], None] = _noop) -> float:
    """Median items/s of `fn()` over `steps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    meter = StepMeter(sync, warmup=0)
    meter.start()
    for _ in range(steps):
        fn()
        meter.step(n_items)
    return meter.median
