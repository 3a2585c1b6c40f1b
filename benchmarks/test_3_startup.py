"""Per-cell start-up: a cell runs in a child process of its own (`python -m bench.cell`);
start-up is the time from spawning it to its backend being imported and ready (the child's
`startup` event), here as seconds and as a share of the whole cell, for one default-grid cell
per framework: its two_stage cell (bench/grids/default.toml: EfficientNet-Lite0, 400 digits,
32 px, 6 epochs).

Target (issue 6): under 5% of a default-grid cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import grid
from bench.cell import MARK
from bench.paths import ROOT

FRAMEWORKS = ("keras", "torch")
STRATEGY = "two_stage"  # a default-grid cell with a head phase and a fine-tuning phase


def _spawn(job: dict, tmp) -> dict:
    path = tmp / "job.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TLBENCH_CACHE=str(tmp / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.cell", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    out = {"final": {}}
    for line in proc.stdout:
        if not line.startswith(MARK):
            continue
        ev = json.loads(line[len(MARK):])
        if ev["event"] == "startup":
            out["startup_seen_s"] = time.perf_counter() - t0
            out["startup_child_s"] = ev["seconds"]
        elif ev["event"] == "metrics" and ev["step"] is None:
            out["final"].update(ev["metrics"])
        elif ev["event"] == "error":
            pytest.fail(ev["message"])
    assert proc.wait() == 0
    out["cell_s"] = time.perf_counter() - t0
    return out


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cell_startup_share(benchmark, device, report, tmp_path, framework):
    g = grid.load("default")
    spec = next(s for s in g.specs if s.framework == framework and s.strategy == STRATEGY)
    job = {"spec": spec.to_params(), "card": g.cards[spec.dataset], "device": device}
    runs = []
    benchmark.pedantic(lambda: runs.append(_spawn(job, tmp_path)), rounds=1, iterations=1)
    r = runs[-1]
    report(f"{framework} start-up, default-grid cell {spec.name}",
           startup_s=r["startup_seen_s"], cell_s=r["cell_s"],
           share=r["startup_seen_s"] / r["cell_s"], target="< 0.05",
           feature_cache_s=r["final"].get("feature_cache_seconds", 0.0))
