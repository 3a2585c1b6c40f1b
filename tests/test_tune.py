"""Tuned comparisons (bench/config/tune.py, bench/run/tune.py): a [tune] table refused
with the field named before any work; seeded studies that propose the same trials in the
same order; selection that never reads a test metric; kill -9 and a second runner with
nothing lost or run twice."""

from __future__ import annotations

import pytest

from bench.config import tune

pytestmark = pytest.mark.timeout(300)

STRATEGIES = ["feature_extraction", "partial", "full"]


def _parse(table, axes=None, has_val=True):
    return tune.parse(table, axes or {}, STRATEGIES, has_val)


@pytest.mark.parametrize("table, axes, has_val, says", [
    ({"lr": [1e-3], "colour": 1}, {}, True, "tune.colour: unknown field"),
    ({"lr": {"range": [1e-2, 1e-3]}}, {}, True,
     "tune.lr.range = [0.01, 0.001]: empty or inverted"),
    ({"lr": {"range": [1e-3, 1e-3]}}, {}, True, "empty or inverted"),
    ({"lr": {"log": [0.0, 1e-1]}}, {}, True,
     "tune.lr.log = [0.0, 0.1]: a log range needs bounds > 0"),
    ({"lr": {"log": [-1.0, 1e-1]}}, {}, True, "needs bounds > 0"),
    ({"lr": [1e-3], "metric": "test_acc"}, {}, True, "tune.metric = 'test_acc': a test metric"),
    ({"lr": [1e-3], "metric": "test_loss"}, {}, True, "never selects anything"),
    ({"lr": [1e-3], "trials": 0}, {}, True, "tune.trials = 0: must be an integer >= 1"),
    ({"lr": [1e-3]}, {"lr": [1e-3, 1e-2]}, True, "tune.lr: lr is searched and also an axis"),
    ({"lr": [1e-3]}, {"seed": [0, 1]}, True, "axes.seed: with [tune]"),
    ({"lr": [1e-3], "refit": "train+val"}, {}, False, "tune.refit: 'train+val' needs a "
                                                      "validation part"),
    ({"lr": [1e-3], "refit": "all"}, {}, True, "tune.refit = 'all': must be"),
    ({"lr": [1e-3], "final_seeds": []}, {}, True, "tune.final_seeds = []"),
    ({"lr": [1e-3], "final_seeds": [0, 0]}, {}, True, "distinct seeds"),
    ({"lr": []}, {}, True, "tune.lr = []: allowed: a non-empty list"),
    ({"lr": "fast"}, {}, True, "tune.lr = 'fast': allowed: a list of values"),
    ({"partial": {"width": [1]}}, {}, True, "tune.partial.width: partial has no parameter"),
    ({"two_stage": {"lr_scale": [0.1]}}, {}, True, "strategy 'two_stage' is not in this grid"),
    ({"lr": [0.0, 1e-3]}, {}, True, "tune.lr: the value 0.0 must be a number > 0"),
    ({"weight_decay": {"range": [-0.1, 0.1]}, "trials": 2}, {}, True,
     "tune.weight_decay: the value -0.1 must be a number >= 0"),
    ({"trials": 4}, {}, True, "tune: nothing is searched"),
    ({"lr": {"log": [1e-4, 1e-2]}}, {}, True, "tune.trials: required when a searched field "
                                             "is a range"),
    ({"lr": [1e-4, 1e-3], "trials": 3}, {}, True, "tune.trials = 3: more than the points of "
                                                  "feature_extraction's grid (2)"),
])
def test_bad_tune_tables_are_refused_naming_the_field(table, axes, has_val, says):
    with pytest.raises(tune.TuneError) as e:
        _parse(table, axes, has_val)
    assert says in str(e.value)


def test_a_tune_table_reads_as_its_protocol():
    t = _parse({"lr": {"log": [1e-5, 1e-1]}, "weight_decay": [0.0, 1e-4], "trials": 6,
                "partial": {"depth": [1, 2, 3]}, "final_seeds": [3, 4], "refit": "train+val"})
    assert t.trials == 6 and t.trial_seed == 3 and t.final_seeds == (3, 4)
    assert set(t.space_for("partial")) == {"lr", "weight_decay", "strategy.depth"}
    assert set(t.space_for("full")) == {"lr", "weight_decay"}
    assert t.sampler_kind("full") == "tpe"  # a range: TPE
    lists = _parse({"lr": [1e-4, 1e-3], "partial": {"depth": [1, 2]}})
    assert lists.sampler_kind("partial") == lists.sampler_kind("full") == "grid"
    assert lists.trials == 2  # the smallest grid: the same budget for every strategy
    assert "6 trials per strategy" in t.describe() and "chosen on val_acc" in t.describe()
    assert t.direction == "maximize" and _parse({"lr": [1e-3], "metric": "val_loss"}
                                                ).direction == "minimize"


# ---- the tuning loop, on real processes and a real MLflow store ----------------------------
# A trial cell is a small script that speaks the cell protocol: its validation accuracy
# peaks at lr = 1e-3 and its test accuracy is poisoned to peak at lr = 1e-4, so a choice that
# read a test metric would show.
SCRIPTED_CELL = """
import json, math, os, sys, time
from bench.cell.process import emit
job = json.load(open(sys.argv[1]))
spec = job["spec"]
emit("startup", seconds=0.0, pid=os.getpid())
lr, epochs = float(spec["lr"]), int(spec["epochs"])
depth = float(spec.get("strategy.depth", 1))
val = 0.9 - 0.1 * abs(math.log10(lr) + 3) - 0.01 * depth
for e in range(1, epochs + 1):
    emit("metrics", step=e, metrics={"val_acc": val * e / epochs, "val_loss": 1 - val})
time.sleep(float(os.environ.get("TUNE_CELL_SLEEP", "0")))
emit("metrics", step=None, metrics={"test_acc": 0.9 - 0.1 * abs(math.log10(lr) + 4),
                                    "best_val_acc": val, "epochs_trained": epochs,
                                    "n_train": 320 if spec["train_on"] == "train" else 400})
"""

TUNED = """
name = "{name}"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
weights = ["none"]
strategy = ["feature_extraction", "partial"]
dataset = ["digits"]
[defaults]
subset = 40
image_size = 16
epochs = 2
[run]
device = "cpu"
[tune]
lr = [1e-4, 1e-3, 1e-2]
trials = 3
final_seeds = [0, 1]
{extra}
[tune.partial]
depth = [1, 2]
"""


def _tuned(tmp_path, name="tuned", extra="", trials=3):
    path = tmp_path / f"{name}.toml"
    path.write_text(TUNED.format(name=name, extra=extra).replace("trials = 3",
                                                                 f"trials = {trials}"))
    return path


def _run_tuned(path):
    from fault_helpers import ScriptLauncher

    from bench.config import grid as gridmod
    from bench.run import runner

    return runner.run_grid(gridmod.load(path), path.read_text(),
                           launcher=ScriptLauncher(SCRIPTED_CELL))


def _chosen(result):
    import json

    from bench import tracking

    text = tracking.client().download_artifacts(result.parent_run_id, "tuning.json")
    with open(text) as fh:
        return {r["study"]: (r["chosen"], r["trials"], r["trial_states"]) for r in json.load(fh)}


def test_studies_choose_on_validation_never_on_test(store, tmp_path):
    from bench import tracking

    result = _run_tuned(_tuned(tmp_path))
    chosen = _chosen(result)
    fe = next(v for k, v in chosen.items() if "feature_extraction" in k)
    part = next(v for k, v in chosen.items() if "partial" in k)
    # validation peaks at 1e-3 (and the shallower depth); test would have chosen 1e-4
    assert fe[0] == {"lr": "0.001"} and part[0]["lr"] == "0.001"
    assert fe[1] == part[1] == 3  # the same budget for every strategy
    runs = tracking.child_runs(result.experiment_id, result.parent_run_id)
    roles = [r.data.tags.get("tlbench.role") for r in runs]
    assert roles.count("trial") == 6 and roles.count("final") == 4
    finals = [r for r in runs if r.data.tags.get("tlbench.role") == "final"]
    assert {r.data.params["seed"] for r in finals} == {"0", "1"}
    assert all(r.data.params["lr"] == "0.001" for r in finals)
    trial_ids = {r.info.run_id for r in runs if r.data.tags.get("tlbench.role") == "trial"}
    assert all(r.data.tags["tlbench.tuned_from"] in trial_ids for r in finals)
    # a second invocation finds every trial and final finished: nothing runs again
    again = _run_tuned(_tuned(tmp_path))
    assert again.failed == [] and {o.status for o in again.outcomes} == {"SKIPPED"}
    assert _chosen(again) == chosen


def test_a_seeded_study_proposes_the_same_trials_in_the_same_order(store, tmp_path):
    from bench.config import grid as gridmod
    from bench.run import tune as tunerun

    g = gridmod.load(_tuned(tmp_path, extra='lr = { log = [1e-5, 1e-1] }'.replace(
        "lr", "weight_decay").replace("1e-5", "1e-6").replace("1e-1", "1e-2")))

    def proposals():
        out = []
        for s in tunerun.make_studies(g):
            specs = s.ask_round()
            s.tell_round({sp.hash: tunerun.Result("FINISHED", {"val_acc": sp.lr})
                          for sp in specs})
            out.append([(sp.lr, sp.weight_decay, sp.strategy_params) for sp in specs])
        return out

    first = proposals()
    assert first == proposals()
    assert len({p for study in first for p in study}) > 1


def test_refit_on_train_and_val_trains_on_both_parts(store, tmp_path):
    from bench import tracking

    result = _run_tuned(_tuned(tmp_path, "refit", extra='refit = "train+val"'))
    runs = tracking.child_runs(result.experiment_id, result.parent_run_id)
    finals = [r for r in runs if r.data.tags.get("tlbench.role") == "final"]
    assert finals and all(r.data.params["train_on"] == "train+val" for r in finals)
    trials = [r for r in runs if r.data.tags.get("tlbench.role") == "trial"]
    assert all(r.data.params["train_on"] == "train" for r in trials)


# a runner in its own process, with scripted cells: what kill -9 and a second runner act on
RUNNER = """
import sys
from fault_helpers import ScriptLauncher
from test_tune import SCRIPTED_CELL
from bench.config import grid as gridmod
from bench.run import runner
runner.Invocation.WAIT_FOR_HELD_S = 0.5
path = sys.argv[1]
result = runner.run_grid(gridmod.load(path), open(path).read(),
                         launcher=ScriptLauncher(SCRIPTED_CELL))
print("PARENT", result.parent_run_id)
"""


def _runner_process(path, sleep_s: float):
    import os
    import subprocess
    import sys

    from bench.paths import ROOT

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
           "TUNE_CELL_SLEEP": str(sleep_s)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], cwd=path.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _trial_and_final_runs(name):
    from bench import tracking

    exp_id = tracking.experiment_id(name, create=False)
    runs = [r for r in tracking.cell_runs(exp_id) if r.info.status == "FINISHED"]
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("tlbench.role"), []).append(
            r.data.tags["tlbench.spec_hash"])
    return by_role


def test_a_study_killed_mid_round_resumes_with_no_trial_lost_or_run_twice(store, tmp_path):
    import os
    import signal
    import time

    from bench import tracking

    path = _tuned(tmp_path, "killed")
    proc = _runner_process(path, sleep_s=0.7)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill -9 once some trials have finished
        exp_id = tracking.experiment_id("killed", create=False)
        if exp_id and len(tracking.finished_hashes(exp_id)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = _trial_and_final_runs("killed")
    assert 2 <= len(before.get("trial", [])) < 6 and not before.get("final")
    result = _run_tuned(path)  # resume: the studies are replayed from the store
    after = _trial_and_final_runs("killed")
    assert sorted(after["trial"]) == sorted(set(after["trial"])) and len(after["trial"]) == 6
    assert set(before["trial"]) <= set(after["trial"])  # the finished trials were kept
    assert len(after["final"]) == len(set(after["final"])) == 4
    fresh = _run_tuned(_tuned(tmp_path, "uninterrupted"))
    assert {k.split("/", 1)[1]: v[0] for k, v in _chosen(result).items()} == \
        {k.split("/", 1)[1]: v[0] for k, v in _chosen(fresh).items()}


def test_two_runners_on_one_tuned_grid_share_the_studies_and_run_each_trial_once(store,
                                                                                tmp_path):
    path = _tuned(tmp_path, "shared")
    procs = [_runner_process(path, sleep_s=0.3) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    runs = _trial_and_final_runs("shared")
    assert len(runs["trial"]) == len(set(runs["trial"])) == 6
    assert len(runs["final"]) == len(set(runs["final"])) == 4


@pytest.mark.slow
def test_median_pruning_stops_a_poor_real_trial_and_records_it_pruned(store, tmp_path):
    """Real cells (ResNet-18, 60 digits at 16 px): one trial a round; the second, at a
    learning rate that wrecks it, is stopped at epoch 1 below the first one's validation
    accuracy, recorded FINISHED with trial_state = pruned and no test metric, told to the
    study as pruned, and never chosen."""
    from bench import tracking
    from bench.config import grid as gridmod
    from bench.run import runner

    path = tmp_path / "pruned.toml"
    path.write_text("""
name = "pruned"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
weights = ["none"]
strategy = ["full"]
dataset = ["digits"]
[defaults]
subset = 60
image_size = 16
batch_size = 16
epochs = 2
[run]
device = "cpu"
[tune]
lr = [1e-3, 50.0]
trials = 2
batch = 1
pruner = "median"
prune_after = 1
final_seeds = [0]
seed = 1  # the grid sampler's order: 1e-3 first (seeded, so always)
""")
    result = runner.run_grid(gridmod.load(path), path.read_text())
    runs = {r.data.params["lr"]: r for r in
            tracking.child_runs(result.experiment_id, result.parent_run_id)
            if r.data.tags.get("tlbench.role") == "trial"}
    bad, good = runs["50.0"], runs["0.001"]
    assert good.data.tags.get("tlbench.trial_state") is None and "test_acc" in good.data.metrics
    assert bad.info.status == "FINISHED" and bad.data.tags["tlbench.trial_state"] == "pruned"
    assert "test_acc" not in bad.data.metrics and bad.data.metrics["epochs_trained"] == 1
    assert "median" in bad.data.tags["tlbench.pruned"]
    chosen = _chosen(result)
    (study,) = chosen.values()
    assert study[0] == {"lr": "0.001"} and study[2] == {"FINISHED": 1, "pruned": 1}


def test_the_report_compares_finals_and_shows_the_search(store, tmp_path):
    """The tables hold the final cells, each strategy under one label at its chosen lr;
    the tuned table shows the choice, its validation score and test over the final seeds;
    trials appear only there and in the sensitivity figure."""
    from bench.report import figures, frame, tables, text

    result = _run_tuned(_tuned(tmp_path, "reported"))
    data = frame.load(result.experiment_id, result.parent_run_id)
    cells = data.cells
    assert set(cells["role"]) == {"final"} and len(cells) == 4
    assert set(cells["p_lr"]) == {"tuned"} and set(cells["chosen"]) >= {"lr=0.001"}
    assert set(cells["p_strategy_label"]) == {"feature_extraction", "partial[depth=*]"}
    made = tables.all_tables(data.frame)
    tuned = next(t for t in made if t.name == "tuned")
    assert len(tuned.numeric) == 2 and set(tuned.numeric["trials"]) == {3}
    assert tuned.numeric["val"].tolist() == pytest.approx([0.89, 0.89])
    assert set(tuned.numeric["seeds"]) == {2}
    assert "Every strategy: 3 trials." in tuned.markdown()
    accuracy = next(t for t in made if t.name == "accuracy")
    assert len(accuracy.numeric) == 2  # one row per strategy, not one per setting
    figs = figures.all_figures(data, tmp_path / "figures")
    assert figs["sensitivity"] and (tmp_path / figs["sensitivity"][0]).exists()
    assert "Tuned comparison: 3 trials per strategy" in text.methods(data)


def test_refit_on_train_and_val_puts_the_val_images_in_the_train_part():
    from bench.data import prepare, shipped_cards

    card = shipped_cards()["digits"]
    plain = prepare(card, seed=0, subset=120)
    refit = prepare(card, seed=0, subset=120, train_on="train+val")
    assert list(refit.split["train"]) == list(plain.split["train"]) + list(plain.split["val"])
    assert list(refit.split["val"]) == list(plain.split["val"])
    assert list(refit.split["test"]) == list(plain.split["test"])
