"""Was the machine shared while a cell's speed was measured?

A throughput figure taken while another process used the cores is not a measurement of the
cell: on a 2-core machine a test suite running beside a grid halves a cell's images/s, and
a table would present that as a framework or strategy difference. MLflow's system metrics
(the runner logs them per cell) show the machine's total load; they cannot tell the cell's
own load from the rest. A CpuProbe can: over the cell's timed intervals it reads the
machine's busy CPU time and this process tree's own CPU time (its threads and its children,
e.g. DataLoader workers), and the difference is what other processes took.

    share = CPU seconds of other processes / (timed wall seconds x logical CPUs)

A cell whose share exceeds CONTENDED_SHARE is tagged `tlbench.contended = true: ...`; the
report marks its speed figures. GPU contention (another process on the same GPU) is not
measured here.
"""

from __future__ import annotations

import time

CONTENDED_SHARE = 0.10  # an idle machine measures 0.00-0.03 (the runner logging, the OS)


def _psutil():
    try:
        import psutil
    except ImportError:  # a declared dependency; without it the share is unknown
        return None
    return psutil


def _snapshot(psutil) -> tuple[float, float, float]:
    """(wall, machine busy CPU seconds, this process tree's CPU seconds)."""
    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq",
                                            "steal"))
    me = psutil.Process()
    mine = me.cpu_times()
    own = mine.user + mine.system + mine.children_user + mine.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            own += c.user + c.system
        except psutil.Error:  # exited between the listing and the read
            pass
    return time.perf_counter(), busy, own


class CpuProbe:
    """Accumulates other processes' CPU time over timed intervals: `begin()` ... `end()`
    (nested or repeated begins are ignored until the interval ends)."""

    def __init__(self):
        self.psutil = _psutil()
        self.cpus = (self.psutil.cpu_count() or 1) if self.psutil else 1
        self.wall = 0.0
        self.others = 0.0
        self._open: tuple[float, float, float] | None = None

    def begin(self) -> None:
        if self.psutil is not None and self._open is None:
            self._open = _snapshot(self.psutil)

    def end(self) -> None:
        if self._open is None:
            return
        w0, busy0, own0 = self._open
        w1, busy1, own1 = _snapshot(self.psutil)
        self._open = None
        self.wall += w1 - w0
        self.others += max(0.0, (busy1 - busy0) - (own1 - own0))

    @property
    def share(self) -> float | None:
        """Other processes' share of the machine's CPU time over the timed intervals."""
        if self.psutil is None or self.wall <= 0:
            return None
        return min(1.0, self.others / (self.wall * self.cpus))

    def tag(self) -> str:
        """`tlbench.contended`: true/false, then what was measured."""
        share = self.share
        if share is None:
            why = "psutil is not installed" if self.psutil is None else "nothing was timed"
            return f"unknown: {why}"
        what = (f"other processes used {share:.0%} of the machine's {self.cpus} CPUs during "
                f"the {self.wall:.1f} s of timed steps")
        return f"{str(share > CONTENDED_SHARE).lower()}: {what}"
