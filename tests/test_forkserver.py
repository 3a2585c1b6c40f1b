"""The fork server (bench/run/forkserver.py): cells forked from a process that imported the
framework once give the same numbers as cells in fresh processes, die alone, and leave
nothing behind; a server that cannot serve makes the runner start cells fresh."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from bench import tracking
from bench.cell.process import MARK
from bench.config import grid as gridmod
from bench.run import runner
from bench.run.forkserver import Launcher

pytestmark = pytest.mark.slow

GRID = """
name = "{name}"
[axes]
framework = ["{framework}"]
backbone = ["{backbone}"]
weights = ["none"]
strategy = ["{strategy}"]
dataset = ["digits"]
seed = [0]
[defaults]
subset = 40
image_size = {size}
batch_size = 16
epochs = 2
augmentation = "{augmentation}"
[run]
device = "cpu"
"""
TINY = {"torch": ("resnet18", 16), "keras": ("mobilenet_v2", 32)}


def tiny_grid(dir: Path, name: str, framework: str, strategy: str = "full",
              augmentation: str = "none") -> Path:
    backbone, size = TINY[framework]
    path = dir / f"{name}.toml"
    path.write_text(GRID.format(name=name, framework=framework, backbone=backbone,
                                strategy=strategy, size=size, augmentation=augmentation))
    return path


def job_file(dir: Path, name: str, framework: str = "torch") -> Path:
    g = gridmod.load(tiny_grid(dir, name, framework))
    spec = g.specs[0]
    path = dir / f"{name}.json"
    path.write_text(json.dumps({"spec": spec.to_params(), "card": g.cards[spec.dataset],
                                "device": "cpu"}))
    return path


def events(proc, until: str | None = None) -> list[dict]:
    """The cell's marked events, up to and including the first `until` event."""
    out = []
    for line in proc.stdout:
        if line.startswith(MARK):
            out.append(json.loads(line[len(MARK):]))
            if out[-1]["event"] == until:
                break
    return out


def cell_record(name: str) -> tuple[dict, dict, dict]:
    """(tags, final metrics, per-epoch metric histories) of the grid's one cell run."""
    (run,) = tracking.cell_runs(tracking.experiment_id(name, create=False))
    c = tracking.client()
    history = {k: [m.value for m in c.get_metric_history(run.info.run_id, k)]
               for k in ("train_loss", "val_loss", "val_acc")}
    return run.data.tags, run.data.metrics, history


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_cell_run_twice_gives_identical_numbers_forked_or_fresh(store, monkeypatch,
                                                                   framework):
    """The repeatability guarantee (deterministic = auto: on, on a CPU): the same cell run
    twice, in two processes (one forked from the warm server, one fresh), with shuffled and
    randomly augmented batches, gives the same losses every epoch and the same test
    numbers, bit for bit, and says it ran deterministically."""
    results = {}
    for how in ("spawn", "fork"):
        monkeypatch.setenv("TLBENCH_FORKSERVER", "1" if how == "fork" else "0")
        path = tiny_grid(store, f"{framework}-{how}", framework, augmentation="flip_crop")
        out = runner.run_grid(gridmod.load(path), path.read_text(), stream=sys.stdout)
        assert [o.status for o in out.outcomes] == ["FINISHED"], out.outcomes[0].error
        results[how] = cell_record(f"{framework}-{how}")
    (tags_s, final_s, hist_s), (tags_f, final_f, hist_f) = results["spawn"], results["fork"]
    assert tags_s["tlbench.launch"] == "spawn" and tags_f["tlbench.launch"] == "fork"
    assert len(hist_f["train_loss"]) == 2
    assert hist_f == hist_s  # bit for bit, every epoch
    assert tags_s["tlbench.deterministic"] == tags_f["tlbench.deterministic"] == "true"
    assert final_f["epochs_trained"] == 2 and final_f["optimizer_steps"] > 2
    for key in ("test_acc", "test_loss", "best_val_acc", "trainable_params",
                "optimizer_steps"):
        assert final_f[key] == final_s[key], key


def test_a_killed_cell_leaves_the_server_serving(tmp_path, cache):
    first, second = job_file(tmp_path, "a"), job_file(tmp_path, "b")
    with Launcher(use_fork=True) as launcher:
        proc, how = launcher.start("torch", first)
        assert how == "fork"
        server = launcher.servers["torch"].proc
        assert events(proc, until="startup")[-1]["pid"] == proc.pid
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert server.poll() is None  # the server outlives its child

        proc2, how = launcher.start("torch", second)
        assert how == "fork" and proc2.pid != proc.pid
        evs = events(proc2)
        assert proc2.wait(timeout=300) == 0
        assert any(e["event"] == "metrics" and "test_acc" in e["metrics"] for e in evs)
        assert launcher.servers["torch"].proc is server

        server.kill()  # a server that died is replaced by a new one
        server.wait()
        proc3, how = launcher.start("torch", first)
        assert how == "fork" and launcher.servers["torch"].proc is not server
        proc3.kill()
        proc3.wait(timeout=30)
        log = launcher.servers["torch"].log
    assert launcher.servers == {} and not log.exists()


def test_a_server_that_cannot_start_means_fresh_processes(tmp_path, cache):
    job = job_file(tmp_path, "c")
    with Launcher(use_fork=True) as launcher:
        for _ in range(2):  # refused once, not tried again
            proc, how = launcher.start("nope", job)  # no backend of that name
            proc.kill()
            proc.wait(timeout=30)
            assert how == "spawn" and launcher.servers == {}
        assert "unknown framework 'nope'" in launcher.refused["nope"]
