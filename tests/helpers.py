"""Test helpers shared by the backend test modules (framework-free)."""

from __future__ import annotations

import time

import pytest

from bench.cell.process import CellContext
from strategies import backbones as catalog
from strategies import registry


def strategy_test_params(strategy: registry.Strategy, backbone: str = "resnet18") -> dict:
    """Defaults, plus a value for every required parameter (depth=2; blocks: the backbone's
    first and third, a set with a frozen block between)."""
    out = {}
    for p in strategy.params:
        if p.default is not None:
            out[p.name] = p.default
        elif p.kind == "depth":
            out[p.name] = 2
        elif p.kind == "blocks":
            blocks = catalog.get(backbone).blocks
            out[p.name] = f"{blocks[0]}+{blocks[2]}"
        elif p.kind == "choice":
            out[p.name] = p.choices[0]
        elif p.kind in ("int", "float"):
            out[p.name] = (int if p.kind == "int" else float)(
                p.minimum if p.minimum is not None else 1)
        else:
            pytest.fail(f"{strategy.name}: no test value for required param {p.name!r}")
    return out


class RecordingContext(CellContext):
    """A cell context that keeps what a backend reports, for assertions."""

    def __init__(self):
        super().__init__("cpu", time.perf_counter())
        self.epochs, self.finals, self.tags, self.progresses, self.artifacts = [], [], {}, [], {}
        self.elapsed_calls = 0

    def log_epoch(self, step, metrics):
        self.epochs.append((step, dict(metrics)))

    def log_final(self, metrics):
        self.finals.append(dict(metrics))

    def set_tags(self, tags):
        self.tags.update(tags)

    def progress(self, **state):
        self.progresses.append(state)

    def artifact(self, name, text):
        self.artifacts[name] = text

    def log_inputs(self, inputs):
        self.inputs = inputs

    def elapsed(self):
        self.elapsed_calls += 1
        return super().elapsed()


def keras_script_results(script: str) -> dict:
    """Run `script` in a fresh interpreter with the TensorFlow backend (torch and tensorflow
    never share a process); its last `RESULT {json}` line, plus rc and the stderr tail."""
    import json
    import os
    import subprocess
    import sys

    from bench.paths import ROOT

    pytest.importorskip("tensorflow")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return {"rc": proc.returncode, "stderr": proc.stderr[-4000:],
            **(json.loads(lines[-1][7:]) if lines else {})}
