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


# ---- what the two train rates say, side by side (tags input_bound and rate_check) ----------
INPUT_BOUND_RATIO = 0.9
# Session.data_path -> the words the input_bound tag uses for it
DATA_PATHS = {
    "resident": "arrays resident",
    "arrays-resized-per-batch": "arrays resized every batch",
    "files": "files decoded every epoch",
    "decoded-resident": "decoded cache, resident",
    "decoded-per-batch": "decoded cache, read per batch",
}
RESIDENT_PATHS = ("resident", "decoded-resident")  # nothing read from disk per batch
MODEL_ONLY_MAX_STEPS = 30
# a data-fed rate this much above the model-only one is beyond the two medians' noise
RATE_TOLERANCE = 0.05


def model_only_steps(meter: StepMeter | None, least: int) -> int:
    """Timed model-only steps: as many as the data-fed median had, `least` to
    MODEL_ONLY_MAX_STEPS, so the two medians rest on comparable samples."""
    n = len(meter.rates) if meter is not None else 0
    return max(least, min(n, MODEL_ONLY_MAX_STEPS))


def input_bound_tag(data_path: str, data_fed: float | None, model_only: float | None,
                    warmup: int = 3) -> str:
    """`input_bound`: 'true' or 'false' (the data-fed rate under INPUT_BOUND_RATIO of the
    model-only rate), the ratio, and the data path that fed the cell. Resident data reads
    nothing per batch: a gap there is the per-batch work around the step (preprocessing,
    augmentation, copies, the loop), which the tag says, so 'true' does not read as a
    contradiction of 'resident'."""
    fed_by = DATA_PATHS.get(data_path, data_path)
    if not (data_fed and model_only):
        return (f"unknown: the last phase ran no steps past the {warmup} warm-up steps "
                f"({fed_by})")
    bound = data_fed < INPUT_BOUND_RATIO * model_only
    if bound and data_path in RESIDENT_PATHS:
        fed_by += ": nothing is read per batch, the gap is the work around each step"
    return f"{str(bound).lower()} at {data_fed / model_only:.2f}x model-only ({fed_by})"


def rate_check(data_fed: float | None, model_only: float | None) -> str:
    """`rate_check`: a data-fed loop does the model's work and more (the input), so its rate
    cannot honestly exceed the model-only rate. 'ok: ...' when it does not (or by no more
    than RATE_TOLERANCE, the medians' noise), 'suspect: ...' with a sentence when it does,
    'unknown: ...' when a rate is missing."""
    if not (data_fed and model_only):
        return "unknown: a train rate is missing (no steps past the warm-up)"
    ratio = data_fed / model_only
    if ratio <= 1 + RATE_TOLERANCE:
        return (f"ok: data-fed {data_fed:.4g} <= model-only {model_only:.4g} images/s "
                f"({ratio:.2f}x, tolerance {RATE_TOLERANCE:.0%})")
    return (f"suspect: the data-fed rate {data_fed:.4g} images/s is {ratio:.2f}x the "
            f"model-only rate {model_only:.4g}, though it does the same steps plus the input; "
            f"one of the two was measured off its steady state (a busy machine in one timed "
            f"window: see contended), so neither is the cell's speed")
