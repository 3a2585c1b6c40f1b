"""The committed sample reports still say what their commands make from today's code
(bench/report/sample.py): the same cells, the same tables from their runs, and a cell that
trains again to the accuracy the sample shows. Timings are not compared: they are numbers
of the machine, kept as the sample recorded them."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import tracking
from bench.config import grid as gridmod
from bench.report import sample
from bench.run import runner

GRID_SAMPLES = [s for s in sample.SAMPLES.values() if s.grid is not None]


@pytest.mark.timeout(120)
def test_the_default_sample_holds_the_cells_its_grid_makes():
    """(A tuned grid's cells are known only once its studies ran: the tuned sample's are
    compared through its tables.)"""
    s = sample.SAMPLES["default"]
    problems = sample.grid_problems(s)
    assert not problems, (f"reports/sample/{s.name} is stale; regenerate it with "
                          f"`nox -s samples -- {s.name}`:\n" + "\n".join(problems))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("s", GRID_SAMPLES, ids=lambda s: s.name)
def test_a_samples_tables_are_what_todays_reporter_makes_of_its_runs(s):
    problems = sample.table_problems(s)
    assert not problems, (f"reports/sample/{s.name}'s tables are not what the reporter makes "
                          f"of its runs today; `nox -s samples -- {s.name} --tables` (reporter "
                          f"changes) or `nox -s samples -- {s.name}`:\n" + "\n".join(problems))


def test_the_check_finds_a_changed_table(tmp_path, monkeypatch):
    """The check can fail: a sample whose table was edited by hand is reported."""
    src = sample.SAMPLES["default"]
    folder = tmp_path / "default"
    (folder / "tables").mkdir(parents=True)
    (folder / "runs.parquet").write_bytes((src.folder / "runs.parquet").read_bytes())
    for p in (src.folder / "tables").glob("*.md"):
        (folder / "tables" / p.name).write_text(p.read_text())
    monkeypatch.setattr(sample, "SAMPLES_DIR", tmp_path)
    assert sample.table_problems(src) == []
    acc = folder / "tables" / "accuracy.md"
    acc.write_text(acc.read_text().replace("0.618", "0.619", 1))
    assert sample.table_problems(src) == [
        "tables/accuracy.md: today's reporter makes another table"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sample_cell_trains_again_to_its_committed_accuracy(store):
    """The cheapest cell of the default sample (Keras feature extraction on EfficientNet-Lite0,
    ~10 s of training), run again by the runner from today's grid: the same test accuracy,
    to the last digit (the sample's cells ran deterministic on a CPU), and the same tags."""
    s = sample.SAMPLES["default"]
    frame = sample.committed_frame(s)
    cells = frame[(frame["role"] != "pretrain") & (frame["status"] == "FINISHED")]
    cheapest = cells.sort_values("wall_seconds").iloc[0]
    assert str(cheapest["t_deterministic"]).lower() == "true"
    g = gridmod.load("default")
    spec = next(sp for sp in g.specs if sp.hash == cheapest["spec_hash"])
    result = runner.run_grid(dataclasses.replace(g, specs=[spec]),
                             Path(g.path).read_text(), stream=sys.stdout)
    (outcome,) = result.outcomes
    assert outcome.status == "FINISHED", outcome.error
    run = tracking.client().get_run(outcome.run_id)
    assert run.data.metrics["test_acc"] == pytest.approx(cheapest["test_acc"], abs=1e-9), (
        f"{spec.name}: test_acc {run.data.metrics['test_acc']} today, "
        f"{cheapest['test_acc']} in reports/sample/default; regenerate it with "
        f"`nox -s samples -- default`")
    # every tag the sample's cell recorded, the cell records today (and no new one is lost)
    had = {c[2:] for c in cells.columns if c.startswith("t_") and pd.notna(cheapest[c])}
    has = {k[len(tracking.TAG):] for k in run.data.tags if k.startswith(tracking.TAG)}
    assert had <= has | {"heartbeat"}, sorted(had - has)
