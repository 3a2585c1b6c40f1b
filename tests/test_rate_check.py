"""The data-fed and model-only train rates measure the same steps (issue 25): the check that
flags a data-fed rate above the model-only one, on its own and in a real cell, where a busy
machine during the model-only window (real processes spinning on every core) makes the
data-fed rate come out above it, as it did unseen in the default grid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.cell import timing
from bench.cell.contention import CpuProbe
from bench.cell.loop import MODEL_ONLY_STEPS, contended_tag
from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from helpers import RecordingContext
from strategies import registry


@pytest.mark.timeout(10)
def test_rate_check_flags_a_data_fed_rate_above_model_only():
    suspect = timing.rate_check(233.0, 166.0)  # the Keras from-scratch cell
    assert suspect.startswith("suspect: ") and "1.40x" in suspect and "233" in suspect
    assert timing.rate_check(166.0, 233.0).startswith("ok: ")
    assert timing.rate_check(104.0, 100.0).startswith("ok: ")  # within the medians' noise
    assert timing.rate_check(110.0, 100.0).startswith("suspect: ")
    assert timing.rate_check(None, 100.0).startswith("unknown: ")


@pytest.mark.timeout(10)
def test_model_only_is_timed_over_as_many_steps_as_the_data_fed_median():
    meter = timing.StepMeter(warmup=0)
    meter.start()
    for _ in range(57):  # the default grid's from-scratch cell: 60 steps, 3 warm-up
        meter.step(32)
    assert timing.model_only_steps(meter, MODEL_ONLY_STEPS) == timing.MODEL_ONLY_MAX_STEPS
    meter.rates = meter.rates[:14]
    assert timing.model_only_steps(meter, MODEL_ONLY_STEPS) == 14
    assert timing.model_only_steps(None, MODEL_ONLY_STEPS) == MODEL_ONLY_STEPS


SPIN = "import time\nt = time.time() + 120\nwhile time.time() < t:\n    pass\n"


class BusyModelOnly:
    """A real TorchSession whose model-only window shares the machine with processes that
    spin, one per core, the way a test suite beside a grid does."""

    def __init__(self, session):
        self.session = session

    def __getattr__(self, name):
        return getattr(self.session, name)

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        # Each spinner is started by a short-lived launcher and so is not this process's
        # descendant: the probe counts this process tree's CPU as the cell's own, and would
        # count child spinners as the cell's work, not as contention.
        # (the spinner must not hold the launcher's stdout, or reading it waits for the spin)
        launch = ("import subprocess, sys\n"
                  f"print(subprocess.Popen([sys.executable, '-c', {SPIN!r}], "
                  "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, "
                  "stderr=subprocess.DEVNULL).pid)\n")
        hogs = [int(subprocess.run([sys.executable, "-c", launch], capture_output=True,
                                   text=True, check=True).stdout)
                for _ in range(os.cpu_count() or 1)]
        time.sleep(0.5)  # started and spinning
        try:
            return self.session.model_only_rates(steps, warmup)
        finally:
            for pid in hogs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _cell(tmp_path, monkeypatch, wrap=None) -> RecordingContext:
    from bench.cell import loop
    from strategies.torch_backend import TorchSession

    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    card = check_card(shipped_cards()["digits"], "digits")
    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits", strategy="full",
                   strategy_params=tuple(registry.get("full").with_defaults({}).items()),
                   weights="none", subset=60, image_size=16, batch_size=16, epochs=2)
    ctx = RecordingContext()
    session = TorchSession()
    loop.run_cell(wrap(session) if wrap else session, spec, card, ctx)
    ctx.final = {k: v for f in ctx.finals for k, v in f.items()}
    return ctx


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~25 s on an idle 2-core machine; 95 s beside other suites
def test_a_cell_records_the_check_and_a_busy_model_only_window_is_flagged(
        tmp_path, monkeypatch, capfd):
    quiet = _cell(tmp_path, monkeypatch)
    fed, alone = (quiet.final["train_images_per_sec"],
                  quiet.final["model_only_train_images_per_sec"])
    assert quiet.tags["rate_check"] == timing.rate_check(fed, alone)
    assert quiet.final["model_only_steps"] >= MODEL_ONLY_STEPS
    assert quiet.final["contention_share_model_only"] is not None
    assert "model-only steps:" in quiet.tags["contended"]

    capfd.readouterr()
    busy = _cell(tmp_path, monkeypatch, wrap=BusyModelOnly)
    fed, alone = (busy.final["train_images_per_sec"],
                  busy.final["model_only_train_images_per_sec"])
    assert fed > alone * (1 + timing.RATE_TOLERANCE), (fed, alone)
    assert busy.tags["rate_check"].startswith("suspect: "), busy.tags["rate_check"]
    assert f"WARNING: {busy.tags['rate_check']}" in capfd.readouterr().err  # the cell's log
    # the busy window is measured on its own, not diluted by the data-fed steps: a spinning
    # process per core takes about half the machine
    assert busy.tags["contended"].startswith("true: "), busy.tags["contended"]
    assert busy.final["contention_share_model_only"] > 0.3


@pytest.mark.timeout(20)
def test_contended_says_both_windows():
    data_fed, model_only = CpuProbe(), CpuProbe()
    for probe in (data_fed, model_only):
        probe.begin()
        time.sleep(0.2)
        probe.end()
    tag = contended_tag(data_fed, model_only)
    assert tag.split(":")[0] in ("true", "false")
    assert "data-fed steps: other processes used" in tag and "model-only steps:" in tag
    assert contended_tag(data_fed, CpuProbe()) == data_fed.tag()  # no model-only window
