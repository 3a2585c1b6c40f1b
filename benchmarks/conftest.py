"""`nox -s perf`: the harness's overheads as ratios, each measured in one run.

    nox -s perf                      # CPU (what this project's 2-core machine can run)
    nox -s perf -- --device cuda     # + the GPU benchmark (ResNet-50, 224 px, bf16)

Every benchmark uses pytest-benchmark (so `--benchmark-only` runs them) and adds a row to
the summary printed at the end (and to reports/perf.json): what was compared, the two rates
or times, their ratio and the target. A ratio is taken from interleaved rounds (A, B, A, B,
...) in one process, so a machine that gets busier halfway slows both sides alike; the
numbers themselves still move with the load on a shared machine.
"""

from __future__ import annotations

import json

import pytest

from bench.paths import ROOT

JSON_OUT = ROOT / "reports" / "perf.json"  # the last run's rows (reports/ is git-ignored)

ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the benchmarks: cpu (default), cuda, cuda:<i>")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def report():
    """report(name, **fields): one row of the summary (ratio, target, the measured values)."""
    def add(name: str, **fields):
        ROWS.append({"benchmark": name, **fields})
    return add


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("tlbench perf: ratios measured in this run")
    for row in ROWS:
        fields = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "benchmark")
        tr.write_line(f"{row['benchmark']}: {fields}")
    JSON_OUT.parent.mkdir(exist_ok=True)
    JSON_OUT.write_text(json.dumps(ROWS, indent=1))
    tr.write_line(f"(also in {JSON_OUT})")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
