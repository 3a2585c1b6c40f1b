"""What the MLflow UI shows of a grid, checked without a browser: run names told apart within
the width of the run list's name column, for every shipped grid."""

from __future__ import annotations

import pytest

from bench import tracking_names
from bench.config import grid as gridmod


def shipped() -> list[str]:
    return sorted(p.stem for p in gridmod.grids_dir().glob("*.toml"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", shipped())
def test_run_names_of_every_shipped_grid_differ_within_the_name_column(name):
    g = gridmod.load(name, check_data=False)  # expanded, never trained
    width = tracking_names.NAME_WIDTH
    names = [g.run_name(s) for s in g.specs]
    seen: dict[str, str] = {}
    for s, n in zip(g.specs, names, strict=True):
        other = seen.setdefault(n[:width], s.name)
        assert other == s.name, (f"{name}: {other} and {s.name} both read {n[:width]!r} in "
                                 f"the first {width} characters")
    # the seed and the framework of every cell are in its name
    for s, n in zip(g.specs, names, strict=True):
        words = n.split()
        assert tracking_names.FRAMEWORK[s.framework] in words, n
        if "seed" in g.varying:
            assert f"s{s.seed}" in words, n


@pytest.mark.timeout(30)
def test_short_forms_read_as_documented():
    g = gridmod.load("default", check_data=False)
    names = sorted(g.run_name(s) for s in g.specs if s.framework == "torch")
    assert names == ["2stage[d3,lrs=0.1] pt", "feat pt", "full scratch pbn320 pt",
                     "full scratch pt", "full[bn=frz] lr1e-4 pt", "partial[d3,bn=frz] pt"]
    assert tracking_names.number(0.0005) == "5e-4" and tracking_names.number(0.1) == "0.1"


def _record_default_grid_invocation(accs: dict[tuple[str, str], tuple[float, float]]):
    """The default grid's parent and cells written through bench.tracking (no training):
    each cell FINISHED with the (val, test) accuracies given for its (framework, config),
    the from-scratch cell without precise_bn diverged-free at chance, one Keras cell FAILED."""
    from bench import tracking

    g = gridmod.load("default", check_data=False)
    exp = tracking.experiment_id(g.name)
    parent = tracking.start_parent(exp, g, len(g.specs), "name = 'default'")
    for s in g.specs:
        rid = tracking.start_cell(exp, parent, s, g.label(s), "cpu",
                                  tags={"config": g.config(s)}, run_name=g.run_name(s))
        val, test = accs[(s.framework, g.run_name(s).rsplit(" ", 1)[0])]
        tracking.log_metrics(rid, {"best_val_acc": val, "test_acc": test,
                                   "train_images_per_sec": 100.0, "trainable_params": 1e6})
        failed = s.framework == "keras" and s.strategy == "partial"
        tracking.set_tags(rid, {"diverged": "true: final train loss 9" if test < 0.11
                                else "false"})
        tracking.end_run(rid, tracking.FAILED if failed else tracking.FINISHED)
    tracking.end_run(parent, tracking.FINISHED)
    return tracking.client().get_run(parent), g


@pytest.mark.timeout(60)
def test_the_parent_run_sums_up_per_framework_and_strategy(store):
    """Through the MLflow API: the parent holds, per framework and strategy, the test accuracy
    of the configuration best on validation, and the counts; and the comparison table."""
    import json

    from bench import tracking

    per_config = {"feat": (0.80, 0.78), "partial[d3,bn=frz]": (0.90, 0.88),
                  "full[bn=frz] lr1e-4": (0.92, 0.85), "2stage[d3,lrs=0.1]": (0.91, 0.90),
                  "full scratch": (0.50, 0.097), "full scratch pbn320": (0.60, 0.55)}
    accs = {(fw, k): v for fw in ("torch", "keras") for k, v in per_config.items()}
    parent, g = _record_default_grid_invocation(accs)
    m = parent.data.metrics
    # full: three configurations; the best on validation (bn=frozen at 1e-4, val 0.92) is
    # reported with its test accuracy, not the best test accuracy among them
    assert m["test_acc/torch/full:imagenet"] == pytest.approx(0.85)
    assert m["test_acc/torch/full:none"] == pytest.approx(0.55)  # precise_bn 320 wins on val
    assert m["cells/torch/full:none"] == 2 and m["diverged/torch/full:none"] == 1
    assert m["test_acc/torch/two_stage:imagenet"] == pytest.approx(0.90)
    assert m["failed/keras/partial:imagenet"] == 1 and m["finished/keras/partial:imagenet"] == 0
    assert "test_acc/keras/partial:imagenet" not in m  # nothing finished: no number
    assert sum(v for k, v in m.items() if k.startswith("cells/")) == len(g.specs)
    # the comparison table: one row per configuration and framework, as an MLflow table
    path = tracking.download_artifact(parent.info.run_id, "comparison.json", store / "dl")
    table = json.loads(path.read_text())
    assert len(table["data"]) == len(g.specs)
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    scratch = [r for r in rows if r["framework"] == "torch" and r["weights"] == "none"]
    assert sorted(r["test_acc"] for r in scratch) == pytest.approx([0.097, 0.55])
    assert sorted(r["cell"] for r in scratch) == ["full scratch", "full scratch pbn320"]
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "comparison.json", "type": "table"} in logged
    # `bench ui` prints, after the experiment's runs, the link that opens this table
    links = dict(tracking.ui_links("http://127.0.0.1:5000"))
    assert links["default comparison"] == (
        f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/"
        f"{parent.info.run_id}/artifactPath/comparison.json?workflowType=machine_learning")


@pytest.mark.timeout(60)
def test_dataset_inputs_carry_a_schema_the_datasets_panel_shows(store):
    """The Datasets panel renders `mlflow_colspec` schemas as a table of columns (MLflow 3's
    ExperimentViewDatasetSchema); without one it says "No schema available"."""
    import json

    from bench import tracking
    from bench.data import check_card, dataset_inputs, prepare, shipped_cards

    card = check_card(shipped_cards()["digits"], "digits")
    exp = tracking.experiment_id("schema")
    rid = tracking.client().create_run(exp).info.run_id
    inputs = [{**d, "schema": tracking_names.input_schema(32, 10),
               "profile": tracking_names.input_profile(d)}
              for d in dataset_inputs(card, prepare(card, 0, 40), 0, 40)]
    tracking.log_inputs(rid, inputs)
    got = tracking.client().get_run(rid).inputs.dataset_inputs
    assert len(got) == 3
    for d in got:
        cols = json.loads(d.dataset.schema)["mlflow_colspec"]
        assert [(c["name"], c["type"]) for c in cols] == [
            ("image: uint8 RGB 32x32x3", "binary"), ("label: class index 0..9", "long")]
        assert json.loads(d.dataset.source)["split"]  # the split rule, as the source
        profile = json.loads(d.dataset.profile)  # and in the profile, which the panel shows
        assert profile["card"] == "digits (sklearn_digits)" and profile["num_classes"] == 10
        assert profile["split rule"] == ("test_fraction 0.2, val_fraction 0.2, seed 0, "
                                         "subset 40")
