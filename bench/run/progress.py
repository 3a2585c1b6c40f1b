"""The runner's console: one line per event in a log (CI), a live status line on a terminal
that shows every running cell and one ETA for the grid.

Cells report through events (plain dicts, so that they can come from a thread of this
process or, through a queue, from a Ray task on another machine):

    {"event": "start", "index": i, "head": "[3/20] torch/resnet18/full/..."}
    {"event": "epoch", "index": i, "phase": ..., "epoch": e, "epochs": n, "fraction": f,
     "val_acc": a (at an epoch's end only)}
    {"event": "note", "text": "..."}                          a permanent line
    {"event": "done", "index": i, "status": ..., "seconds": s, "text": "..."}
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time


class Progress:
    def __init__(self, total: int, slots: int = 1, stream=sys.stderr):
        self.total = total  # cells this invocation runs
        self.slots = max(slots, 1)  # cells at once
        self.stream = stream
        self.tty = stream.isatty()
        self.done_seconds: list[float] = []
        self.running: dict[int, dict] = {}  # index -> {head, started, fraction, text}
        self._lock = threading.Lock()

    def __call__(self, ev: dict) -> None:
        """One event from a cell (thread-safe)."""
        with self._lock:
            getattr(self, "_on_" + ev["event"])(ev)

    def _on_start(self, ev: dict) -> None:
        self.running[ev["index"]] = {"head": ev["head"], "started": time.monotonic(),
                                     "fraction": 0.0, "text": "starting"}
        self._live(quiet_line=f"{ev['head']}  starting")

    def _on_epoch(self, ev: dict) -> None:
        cell = self.running.get(ev["index"])
        if cell is None:
            return
        cell["fraction"] = ev.get("fraction") or 0.0
        text = f"{ev.get('phase', '')} epoch {ev.get('epoch')}/{ev.get('epochs')}"
        if ev.get("val_acc") is not None:
            text += f"  val_acc {ev['val_acc']:.3f}"
        cell["text"] = text
        line = f"{cell['head']}  {text}  ETA {self.eta()}"
        if ev.get("val_acc") is not None and not self.tty:
            self._write(line)  # an epoch's end: kept in a log
        else:
            self._live(quiet_line=line)

    def _on_note(self, ev: dict) -> None:
        self._write(ev["text"])
        self._live()

    def _on_done(self, ev: dict) -> None:
        cell = self.running.pop(ev["index"], None)
        if ev.get("status") not in ("SKIPPED", "HELD"):
            self.done_seconds.append(ev.get("seconds", 0.0))
        head = cell["head"] if cell else ev.get("head", "")
        self._write(f"{head}  {ev['text']}")
        self._live()

    # ---- the ETA ------------------------------------------------------------------------
    def _cell_left(self, cell: dict) -> float | None:
        elapsed = time.monotonic() - cell["started"]
        frac = cell["fraction"]
        return elapsed / frac - elapsed if frac > 0.02 else None

    def eta(self) -> str:
        """The grid's time left: the running cells' estimated rests plus the cells not yet
        started at the mean cell time, shared by the slots."""
        avg = sum(self.done_seconds) / len(self.done_seconds) if self.done_seconds else None
        lefts = [self._cell_left(c) for c in self.running.values()]
        unstarted = self.total - len(self.done_seconds) - len(self.running)
        if avg is None and (not lefts or None in lefts):
            return "?"
        fallback = avg if avg is not None else max(x for x in lefts if x is not None)
        work = sum(fallback if x is None else x for x in lefts) + fallback * max(unstarted, 0)
        return fmt_s(work / min(self.slots, max(len(lefts) + max(unstarted, 0), 1)))

    # ---- output -------------------------------------------------------------------------
    def _live(self, quiet_line: str | None = None) -> None:
        """The status line on a terminal: the one running cell's line, or every running
        cell in brief and the grid's ETA."""
        if not self.tty:
            return
        if len(self.running) <= 1 and quiet_line is not None:
            text = quiet_line
        elif self.running:
            cells = "  |  ".join(f"{c['head'].split(']')[0]}] {c['text']}"
                                 for _, c in sorted(self.running.items()))
            text = f"{len(self.running)} running: {cells}  |  grid ETA {self.eta()}"
        else:
            return
        self.stream.write("\r\033[K" + text[: _columns(self.stream) - 1])
        self.stream.flush()

    def _write(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        self({"event": "note", "text": text})


def _columns(stream) -> int:
    """The width of the terminal `stream` is on. Not stdout's: `bench run > table.md` leaves
    the progress on a terminal and stdout in a file."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size().columns


def fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
