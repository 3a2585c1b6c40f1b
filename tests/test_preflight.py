"""A tracking store that is not there or cannot be written: refused before anything starts,
in one line naming the URI, exit 2, nothing run (a real closed port on 127.0.0.1)."""

from __future__ import annotations

import socket
import time

import pytest

from bench import cli
from bench.run.preflight import store_problem

pytestmark = pytest.mark.timeout(120)


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_tracking_server_is_refused_fast_in_one_line(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert cli.main(["run", "default"]) == 2
    assert cli.main(["report", "default"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30
    assert f"the tracking server {uri} could not be reached" in err
    assert "unset MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("uri, says", [
    ("sqlite:////proc/x/m.db", "its folder /proc/x does not exist"),
    ("sqlite:////proc/m.db", "cannot be written: "),
])
def test_a_store_that_cannot_be_written_is_refused_in_one_line(uri, says, monkeypatch,
                                                              capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "default"]) == 2
    err = capsys.readouterr().err
    assert says in err and uri in err and err.count("\n") == 1


def test_a_store_that_is_there_passes(tmp_path):
    assert store_problem(f"sqlite:///{tmp_path / 'mlflow.db'}") is None
    assert store_problem(str(tmp_path / "mlruns")) is None
    assert "does not exist" in store_problem(f"file://{tmp_path}/no/such/mlruns")


# ---- names that become paths -------------------------------------------------------------
GRID = """
name = {name}
[axes]
framework = ["torch"]
backbone = ["resnet18"]
dataset = [{dataset}]
{datasets}
"""


@pytest.mark.parametrize("name, dataset, datasets, says", [
    ('"../../../../tmp/x"', '"digits"', "", "name = '../../../../tmp/x': must be a plain name"),
    ('"a/b"', '"digits"', "", "name = 'a/b': must be a plain name"),
    ('"ok"', '"../evil"', '[datasets."../evil"]\nsource = "digits"',
     "datasets.../evil: dataset name '../evil' must be a plain name"),
])
def test_path_like_names_are_refused_before_any_work(name, dataset, datasets, says, tmp_path,
                                                     monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(name=name, dataset=dataset, datasets=datasets))
    assert cli.main(["run", str(path)]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # nothing written


def test_a_report_is_never_written_outside_its_folder(tmp_path, monkeypatch, capsys):
    from bench import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    tracking.client().create_experiment("../escaped")  # made by someone else's tool
    assert cli.main(["report", "../escaped", "--out", str(tmp_path / "reports")]) == 2
    assert "no report written" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cell_at_lr_1000_is_tagged_diverged_in_both_frameworks(tmp_path, monkeypatch):
    """Issue 27: from scratch at lr 1000 (Adam) the train loss ends orders of magnitude
    above chance (ln 10): FINISHED, tagged diverged, in both frameworks."""
    from bench import tracking
    from bench.config import grid as gridmod
    from bench.run import runner

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lr1000.toml"
    path.write_text("""
name = "lr1000"
[axes]
framework = ["torch", "keras"]
backbone = ["mobilenet_v3_small"]
weights = ["none"]
strategy = ["full"]
dataset = ["digits"]
[defaults]
subset = 60
image_size = 32
batch_size = 16
epochs = 1
lr = 1000.0
[run]
device = "cpu"
""")
    result = runner.run_grid(gridmod.load(path), path.read_text())
    runs = tracking.child_runs(result.experiment_id, result.parent_run_id)
    tags = {r.data.params["framework"]: (r.info.status, r.data.tags.get("tlbench.diverged", ""),
                                         r.data.tags.get("tlbench.error", "")) for r in runs}
    assert set(tags) == {"torch", "keras"}
    for fw, (status, diverged, _) in tags.items():
        # one epoch: only the chance rule can say so (measured: 1.6e8 torch, 5.6e7 keras)
        assert status == "FINISHED" and diverged.startswith("true") and \
            "chance level ln 10" in diverged, (fw, status, diverged)


# ---- --out of bench report ---------------------------------------------------------------
def _one_finished_run(tmp_path, monkeypatch):
    """A store with experiment 'tiny' and one finished run (no cells trained)."""
    from bench import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    client = tracking.client()
    run = client.create_run(client.create_experiment("tiny"), tags={
        "tlbench.label": "full", "tlbench.role": "cell"})
    for key, value in {"framework": "torch", "backbone": "resnet18", "strategy": "full",
                       "strategy_label": "full", "weights": "none", "dataset": "digits",
                       "seed": "0"}.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "test_acc", 0.5)
    client.set_terminated(run.info.run_id)


@pytest.mark.parametrize("make, says", [
    (lambda out: out.write_text("mine"), "is a file, not a folder"),
    (lambda out: (out / "tiny").mkdir(parents=True) or (out / "tiny" / "notes.txt")
     .write_text("mine"), "holds files no report wrote"),
])
def test_report_out_that_is_not_a_report_folder_is_refused(make, says, tmp_path,
                                                           monkeypatch, capsys):
    _one_finished_run(tmp_path, monkeypatch)
    out = tmp_path / "out"
    make(out)
    capsys.readouterr()  # the store's own set-up lines
    before = sorted(p.name for p in out.rglob("*")) if out.is_dir() else out.read_text()
    assert cli.main(["report", "tiny", "--all", "--no-log", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and "no report written" in err and err.count("\n") == 1
    after = sorted(p.name for p in out.rglob("*")) if out.is_dir() else out.read_text()
    assert after == before


@pytest.mark.timeout(300)
def test_report_rewrites_its_own_folder(tmp_path, monkeypatch, capsys):
    from bench.paths import REPORT_MARKER

    _one_finished_run(tmp_path, monkeypatch)
    out = tmp_path / "out"
    (out / "tiny").mkdir(parents=True)  # empty: allowed
    assert cli.main(["report", "tiny", "--all", "--no-log", "--out", str(out)]) == 0
    assert (out / "tiny" / REPORT_MARKER).is_file() and (out / "tiny" / "report.md").is_file()
    (out / "tiny" / "report.md").write_text("stale")
    assert cli.main(["report", "tiny", "--all", "--no-log", "--out", str(out)]) == 0
    assert (out / "tiny" / "report.md").read_text() != "stale"


# ---- pretraining names and cache keys ------------------------------------------------------
@pytest.mark.parametrize("weights", ["pretrained:../../x", "pretrained:a/b",
                                     "pretrained:digits/../digits"])
def test_a_path_like_pretraining_source_is_refused_at_grid_load(weights, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(name='"pt"', dataset='"digits"', datasets="").replace(
        "[axes]", f"[axes]\nweights = [{weights!r}]".replace("'", '"')))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"axes.weights: weights = {weights!r}: unknown source dataset" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("key", ["../../../x", "a/b" * 4, ".." * 5, "", "k" * 65])
def test_a_checkpoint_key_that_is_no_hash_is_refused(key, tmp_path, monkeypatch):
    from bench import checkpoints
    from bench.config.pretrained import WeightsError

    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="must be a spec hash"):
        checkpoints.Checkpoint(key)
    ok = checkpoints.Checkpoint("0123abcd" * 2)
    assert ok.path.parent == (tmp_path / "cache" / "pretrained").resolve()


def test_a_cache_file_linked_outside_its_folder_is_refused(tmp_path, monkeypatch):
    from bench import checkpoints

    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = checkpoints.Checkpoint("0123abcd" * 2)
    ckpt.folder.mkdir(parents=True)
    (ckpt.folder / f"{ckpt.key}.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    with pytest.raises(ValueError, match="outside"):
        _ = ckpt.path  # resolving it refuses the link
