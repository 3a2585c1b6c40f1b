"""Fair comparisons, framework-free: every strategy trains exactly the cell's budget, a
cell that trained away from its start says so, and a speed figure knows whether other
processes shared the machine while it was taken."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.cell import loop
from bench.cell.contention import CONTENDED_SHARE, CpuProbe
from helpers import strategy_test_params
from strategies import registry


def _variants(strategy: registry.Strategy) -> list[dict]:
    """The strategy's test parameters, and for two_stage every head share from its minimum
    to its maximum (the shares that decide the split)."""
    base = strategy_test_params(strategy)
    if strategy.name != "two_stage":
        return [base]
    return [base | {"head_share": s} for s in (0.05, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.95)]


@pytest.mark.parametrize("name", sorted(registry.STRATEGIES))
def test_every_strategy_trains_exactly_the_budget(name):
    strategy = registry.get(name)
    for params in _variants(strategy):
        need = strategy.min_epochs(params)
        for epochs in range(1, 51):
            if epochs < need:
                assert strategy.budget_problem(params, epochs)
                with pytest.raises(registry.BudgetError, match=f"epochs >= {need}"):
                    strategy.phases(params, epochs)
                continue
            phases = strategy.phases(params, epochs)
            counts = [n for _, n in phases]
            assert sum(counts) == epochs, (params, epochs, counts)
            for phase, n in phases:
                assert n >= 1 if phase.epoch_share > 0 else n == 0, (params, epochs, counts)


def test_two_stage_splits_as_documented():
    two = registry.get("two_stage")
    split = {e: [n for _, n in two.phases({"depth": 2}, e)] for e in (2, 3, 5, 7, 10)}
    # half-and-half, the odd epoch to the fine-tuning stage (was 2+2 for 5, 2+2 for 3)
    assert split == {2: [1, 1], 3: [1, 2], 5: [2, 3], 7: [3, 4], 10: [5, 5]}
    assert [n for _, n in two.phases({"depth": 2, "head_share": 0.95}, 3)] == [2, 1]
    assert two.budget_problem({"depth": 2}, 1) == (
        "two_stage trains 2 phases (head, finetune) of at least one epoch each; allowed: "
        "epochs >= 2")


def test_split_epochs_by_largest_remainder():
    assert registry.split_epochs([1.0], 7) == [7]
    assert registry.split_epochs([0.25, 0.75], 4) == [1, 3]
    assert registry.split_epochs([1, 1, 1], 4) == [1, 1, 2]
    assert registry.split_epochs([0.5, 0.0, 0.5], 3) == [1, 0, 2]
    assert registry.split_epochs([0.01, 0.99], 2) == [1, 1]  # the minimum of one wins


def test_diverged_tag_compares_the_last_epoch_with_the_first():
    rows = [{"epoch": 1, "train_loss": 2.3}, {"epoch": 2, "train_loss": 1.1e6}]
    assert loop.diverged_tag(rows).startswith("true: final train loss 1.1e+06 above")
    assert loop.diverged_tag(rows[:1]) == "false"
    assert loop.diverged_tag([rows[0], {"epoch": 2, "train_loss": 0.4}]) == "false"


def test_device_kind_of_a_session():
    assert loop.device_kind({"device_type": "cpu", "device": "cpu (x86_64, 2 threads)"}) \
        == "cpu"
    assert loop.device_kind({"device_type": "cuda", "device": "NVIDIA H200"}) \
        == "cuda:NVIDIA H200"
    assert loop.device_kind({"device_type": "gpu", "device": "NVIDIA H200"}) \
        == "cuda:NVIDIA H200"  # Keras says gpu


# ---- contention: other processes' CPU time during the timed steps ----------------------------
BURN = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"


def _foreign_burners(n: int, seconds: float) -> list[int]:
    """`n` busy loops that are NOT this process's descendants (their shell exits at once, so
    they are re-parented): what a test suite or another grid beside a cell looks like."""
    out = subprocess.run(
        ["sh", "-c", " ".join(f'{sys.executable} -c "$B" >/dev/null 2>&1 & echo $!;'
                              for _ in range(n))],
        env={**os.environ, "B": BURN.format(s=seconds)}, capture_output=True, text=True,
        timeout=30)
    return [int(p) for p in out.stdout.split()]


def _probe_while(work, seconds: float = 1.5) -> CpuProbe:
    probe = CpuProbe()
    probe.begin()
    work(seconds)
    probe.end()
    return probe


def _busy(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


def test_cpu_probe_counts_other_processes_not_the_cells_own_work():
    pytest.importorskip("psutil")
    own = _probe_while(_busy)  # the cell's own work: not contention
    burners = _foreign_burners(os.cpu_count() or 1, 3.0)
    time.sleep(0.3)  # the interpreters are up and burning
    try:
        shared = _probe_while(time.sleep)
    finally:
        for pid in burners:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert shared.share > own.share + 0.3, (shared.share, own.share)
    assert shared.share > CONTENDED_SHARE
    assert shared.tag().startswith("true: other processes used ")
    assert 0.0 <= own.share <= 1.0 and own.wall > 1.0


def test_cpu_probe_counts_its_own_children_as_its_own():
    """A DataLoader's worker processes are the cell's own work."""
    pytest.importorskip("psutil")
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=3.0)])
    try:
        time.sleep(0.3)
        probe = _probe_while(time.sleep)
    finally:
        child.kill()
        child.wait(timeout=10)
    cpus = os.cpu_count() or 1
    # the child burns one CPU: counted as other processes' it would be >= 1/cpus
    assert probe.share < 0.8 / cpus + 0.25, probe.share


def test_cpu_probe_without_an_interval_is_unknown():
    probe = CpuProbe()
    assert probe.share is None
    assert probe.tag().startswith("unknown: ")


def test_a_loss_far_above_chance_is_divergence_even_when_it_fell():
    """lr 1000 (issue 27): the loss falls from 3.1e6 to 1.8e6 and stays a million times
    chance (ln 10 = 2.3): diverged. A loss near chance is not."""
    rows = [{"epoch": 1, "train_loss": 3.1e6}, {"epoch": 2, "train_loss": 1.8e6}]
    assert loop.diverged_tag(rows, num_classes=10).startswith(
        "true: final train loss 1.8e+06 is over 10x the chance level ln 10")
    assert loop.diverged_tag(rows[:1], num_classes=10).startswith("true")
    near = [{"epoch": 1, "train_loss": 2.4}, {"epoch": 2, "train_loss": 2.3}]
    assert loop.diverged_tag(near, num_classes=10) == "false"
