"""The Session protocol's call order (bench.cell.session.OrderCheck), framework-free: the
order the cell loop keeps passes through to the session, a call out of it is refused before
it reaches the session. The real backend keeping it: tests/test_torch_backend.py."""

from __future__ import annotations

import pytest

from bench.cell.session import OrderCheck

SETUP = ["start", "determinism", "seed", "build"]
EPOCH = ["train_epoch", "recalibrate_bn", "evaluate"]


class FakeSession:
    """Answers every protocol method with its name; keeps what reached it."""

    data_path = "resident"
    n_blocks = 5

    def __init__(self):
        self.received: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args):
            self.received.append((name, args))
            return name

        return method


def run(calls: list[str]) -> tuple[OrderCheck, FakeSession]:
    session = FakeSession()
    checked = OrderCheck(session)
    for name in calls:
        assert getattr(checked, name)(name, 1) == name
    return checked, session


def test_the_drivers_order_reaches_the_session():
    calls = (SETUP + ["load_backbone", "reinit_top"]
             + ["begin_phase", "use_cache"] + EPOCH + ["snapshot"]
             + ["begin_phase"] + EPOCH + EPOCH
             + ["restore", "evaluate", "param_counts", "save_backbone", "model_only_rates",
                "peak_memory_mb", "param_counts"])
    checked, session = run(calls)
    assert checked.calls == calls
    assert session.received == [(name, (name, 1)) for name in calls]
    # attributes pass through, unrecorded; so does sync, at any time
    assert (checked.data_path, checked.n_blocks) == ("resident", 5)
    checked.sync()
    assert checked.calls == calls and session.received[-1] == ("sync", ())


@pytest.mark.parametrize("before, call, why", [
    ([], "seed", "start comes first"),
    (SETUP, "start", "start comes first, once"),
    (["start"], "seed", "determinism comes right after start"),
    (SETUP, "determinism", "determinism comes right after start"),
    (["start", "determinism"], "begin_phase", "build first"),
    (SETUP, "use_cache", "begin_phase first"),
    (SETUP + ["begin_phase", "train_epoch"], "use_cache", "right after begin_phase"),
    (SETUP + ["begin_phase", "use_cache"], "use_cache", "right after begin_phase"),
    (SETUP, "train_epoch", "begin_phase first"),
    (SETUP + ["begin_phase"], "load_backbone", "before the first begin_phase"),
    (SETUP + ["begin_phase", "train_epoch"], "snapshot", "right after evaluate"),
    (SETUP + ["begin_phase", "evaluate"], "restore", "needs a snapshot"),
    (SETUP + ["begin_phase", "evaluate", "snapshot", "restore"], "param_counts",
     "restore is followed by evaluate"),
    (SETUP + ["begin_phase", "model_only_rates"], "train_epoch", "model_only_rates runs last"),
    (SETUP + ["begin_phase", "model_only_rates"], "evaluate", "model_only_rates runs last"),
    (SETUP + ["begin_phase", "model_only_rates"], "save_backbone",
     "model_only_rates runs last"),
])
def test_a_call_out_of_order_is_refused_before_it_runs(before, call, why):
    checked, session = run(before)
    with pytest.raises(RuntimeError, match=rf"^Session\.{call} called out of order: .*{why}"):
        getattr(checked, call)()
    assert checked.calls == before and [n for n, _ in session.received] == before
