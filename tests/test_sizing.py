"""`python -m bench plan`: the scheduling arithmetic, the cost model's ordering, measured
cell_seconds from a real MLflow store taking over from the model, and refused input. No
training: cell runs are written with the tracking helpers."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from bench import cli, tracking
from bench.config import grid as gridmod
from bench.config.spec import RunSpec
from bench.data import shipped_cards
from bench.paths import ROOT
from bench.run import sizing
from strategies import backbones as bb


# ---- scheduling -----------------------------------------------------------------------------
def test_lpt_makespan_on_hand_computed_examples():
    # longest-first: 4 and 3 start, the next 3 joins the 3 (6), a 2 joins the 4 (6), the last
    # 2 lands on a 6: 8. (The optimum is 7, 4+3 | 3+2+2: LPT is within 4/3 of it, not exact.)
    assert sizing.lpt_makespan([4, 3, 3, 2, 2], 2) == 8
    assert sizing.lpt_makespan([3, 3, 2, 2, 2], 2) == 7  # the textbook LPT case (optimum 6)
    assert sizing.lpt_makespan([2, 2, 2, 2], 2) == 4
    assert sizing.lpt_makespan([4, 3, 3, 2, 2], 1) == 14  # one GPU: the sum
    assert sizing.lpt_makespan([5, 1, 2], 8) == 5  # more GPUs than cells: the largest cell
    assert sizing.lpt_makespan([], 4) == 0


def test_grid_order_can_be_worse_than_longest_first():
    # the runner's order: the long cell comes last and starts when both GPUs have 2 done
    assert sizing.list_makespan([2, 2, 4], 2) == 6
    assert sizing.lpt_makespan([2, 2, 4], 2) == 4


@pytest.mark.parametrize("text,expected", [("1,8,32", (1, 8, 32)), ("4", (4,)),
                                           (" 2, 16 ", (2, 16)), ("8,8", (8,))])
def test_parse_gpu_counts(text, expected):
    assert sizing.parse_gpu_counts(text) == expected


def test_hmm_rounds_up_to_the_minute():
    assert sizing.hmm(0) == "0:00"
    assert sizing.hmm(61) == "0:02"
    assert sizing.hmm(3600) == "1:00"
    assert sizing.hmm(36000 + 59 * 60 + 1) == "11:00"


# ---- sizes and the model --------------------------------------------------------------------
def test_split_sizes_of_the_shipped_cards_follow_the_split_rule():
    cards = shipped_cards()
    from bench.data import check_card

    def sizes(name, subset=0):
        return sizing.split_sizes(check_card({**cards[name], "name": name}, name), subset)

    assert sizes("flowers102") == sizing.Sizes(1020, 1020, 6149)
    assert sizes("oxford_pet") == sizing.Sizes(2944, 736, 3669)
    assert sizes("cifar10") == sizing.Sizes(45000, 5000, 10000)
    small = sizes("flowers102", 256)  # subset: train + val drawn from 256, test whole
    assert small.train + small.val == 256 and small.test == 6149
    assert sizes("digits").train + sizes("digits").val + sizes("digits").test == 1797


def test_every_backbone_has_gflops():
    assert set(bb.BACKBONES) <= set(sizing.BACKBONE_GFLOPS)


@pytest.fixture(scope="module")
def gpu_grid():
    return gridmod.load("gpu")


def _cell(grid, backbone="resnet50", strategy="full", dataset="flowers102", seed=0, **params):
    for s in grid.specs:
        if (s.backbone, s.strategy, s.dataset, s.seed) == (backbone, strategy, dataset, seed) \
                and all(s.params.get(k) == v for k, v in params.items()):
            return s
    raise AssertionError(f"no cell {backbone} {strategy} {params} {dataset} seed {seed}")


def _seconds(grid, spec, **kw):
    return sizing.modelled_seconds(spec, sizing.split_sizes(grid.cards[spec.dataset], spec.subset),
                                 **kw)


def test_model_orders_strategies_by_what_trains(gpu_grid):
    g = gpu_grid
    fe = _seconds(g, _cell(g, strategy="feature_extraction"))
    p1 = _seconds(g, _cell(g, strategy="partial", depth=1))
    p3 = _seconds(g, _cell(g, strategy="partial", depth=3))
    two = _seconds(g, _cell(g, strategy="two_stage", depth="all"))
    full = _seconds(g, _cell(g, strategy="full"))
    assert fe < p1 < p3 < full
    assert fe < two < full
    # by hand, Flowers-102 (1,020 train, 1,020 val, 6,149 test) at 3,500 images/s: feature
    # extraction is forwards only (a third of a training step each), full trains every image
    assert fe == pytest.approx((10 * 2040 / 3 + 6149 / 3) / 3500)
    assert full == pytest.approx((10 * (1020 + 1020 / 3) + 6149 / 3) / 3500)


def test_model_orders_backbones_and_uses_the_anchor(gpu_grid):
    g = gpu_grid
    vgg = _seconds(g, _cell(g, backbone="vgg16"))
    r50 = _seconds(g, _cell(g, backbone="resnet50"))
    mbv2 = _seconds(g, _cell(g, backbone="mobilenet_v2"))
    assert vgg > r50 > mbv2
    assert r50 / mbv2 == pytest.approx(sizing.MAX_SPEEDUP)  # capped, not 4.1 / 0.3
    # ResNet-50 full on CIFAR-10 by hand: 10 epochs of 45,000 train steps + 5,000 val
    # forwards, then 10,000 test forwards, at 3,500 images/s
    cifar = _cell(g, dataset="cifar10")
    by_hand = (10 * (45000 + 5000 / 3) + 10000 / 3) / 3500
    assert _seconds(g, cifar) == pytest.approx(by_hand)
    assert _seconds(g, cifar, images_per_s=7000) == pytest.approx(by_hand / 2)


def test_cached_features_are_computed_once():
    g = gridmod.load("gpu")
    fe = _cell(g, strategy="feature_extraction", dataset="cifar10")
    cached = dataclasses.replace(fe, augmentation="none")  # feature_cache on: head epochs only
    assert _seconds(g, cached) < _seconds(g, fe) / 5


def test_plan_rows_add_up(gpu_grid):
    p = sizing.estimate(gpu_grid)
    assert p.counts() == {"measured": 0, "similar": 0, "modelled": len(gpu_grid.specs)}
    one, many = p.row(1), p.row(32)
    slots = sum(c.slot_seconds(p.overhead_s) for c in p.cells)
    assert one.wall_s == pytest.approx(slots)
    assert one.utilisation + one.overhead_share == pytest.approx(1)
    assert one.overhead_share == pytest.approx(
        len(p.cells) * (sizing.STARTUP_S + sizing.SCHEDULING_OVERHEAD_S) / slots)
    assert slots / 32 <= many.wall_s < one.wall_s
    assert many.utilisation + many.overhead_share <= 1 + 1e-9
    more = sizing.estimate(gpu_grid, overhead_s=60).row(32)
    assert more.wall_s > many.wall_s and more.overhead_share > many.overhead_share


@pytest.mark.timeout(60)
def test_a_tuned_grid_is_planned_with_its_trials_and_finals():
    """petl: 84 studies, each 4 trials and 3 finals; a full fine-tuning study's finals refit
    on train+val cost more than its trials."""
    g = gridmod.load("petl")
    p = sizing.estimate(g)
    per_study = g.tune.trials + len(g.tune.final_seeds)
    assert len(p.cells) == len(g.specs) * per_study
    roles = [c.spec.role for c in p.cells]
    assert roles.count("trial") == len(g.specs) * g.tune.trials
    assert roles.count("final") == len(g.specs) * len(g.tune.final_seeds)
    first_full = next(i for i, s in enumerate(g.specs) if s.strategy == "full")
    study = p.cells[first_full * per_study:(first_full + 1) * per_study]
    trial, final = study[0], study[-1]
    assert {c.spec.seed for c in study[g.tune.trials:]} == set(g.tune.final_seeds)
    if g.tune.refit == "train+val":
        assert final.seconds > trial.seconds
    assert f"{len(g.specs)} studies x" in sizing.render(p, (1,))


# ---- measured costs from the store -----------------------------------------------------------
def _record(exp_id, parent, spec, status, **metrics):
    rid = tracking.start_cell(exp_id, parent, spec, spec.name, "cuda")
    tracking.log_metrics(rid, metrics)
    tracking.end_run(rid, status)
    return rid


def test_measured_cell_seconds_replace_the_model(store, capsys):
    g = gridmod.load("gpu")
    exp_id = tracking.experiment_id(g.name)
    gpu = g.with_device_kind("cuda:NVIDIA H100 80GB HBM3")  # what a GPU run stamps
    parent = tracking.start_parent(exp_id, gpu, 3, "")
    full = _cell(gpu, backbone="resnet50", strategy="full", dataset="flowers102")
    fe = _cell(gpu, backbone="vgg16", strategy="feature_extraction", dataset="cifar10")
    _record(exp_id, parent, full, tracking.FINISHED, cell_seconds=1234.0, startup_seconds=4.0)
    _record(exp_id, parent, fe, tracking.FINISHED, cell_seconds=777.0)
    mbv2 = _cell(gpu, backbone="mobilenet_v2", strategy="full", dataset="oxford_pet")
    _record(exp_id, parent, mbv2, tracking.FAILED, cell_seconds=5.0)  # not a cost
    tracking.end_run(parent, tracking.FINISHED)

    p = sizing.estimate(g, g.name)
    n = len(g.specs)
    assert p.counts() == {"measured": 2, "similar": 4, "modelled": n - 6}
    by_spec = {c.spec: c for c in p.cells}
    plain = dataclasses.replace(full, device_kind="cpu")
    assert (by_spec[plain].seconds, by_spec[plain].startup) == (1230.0, 4.0)
    assert by_spec[plain].source == "measured"
    seed1 = dataclasses.replace(plain, seed=1)  # another seed of a measured cell
    assert (by_spec[seed1].source, by_spec[seed1].seconds) == ("similar", 1230.0)
    other = dataclasses.replace(mbv2, device_kind="cpu")
    assert by_spec[other].source == "modelled"
    assert by_spec[other].seconds != 5.0

    # the command finds the grid's own experiment, and says what it measured and modelled
    assert cli.main(["plan", "gpu", "--gpu-counts", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "2 measured, 4 from runs of a similar cell" in out
    assert f"{n - 6} modelled" in out and "cuda:NVIDIA H100 80GB HBM3" in out
    assert "| 1 |" in out and "| 8 |" in out and "| 32 |" not in out
    # another experiment named by --from: nothing measured there
    tracking.experiment_id("elsewhere")
    assert cli.main(["plan", "gpu", "--from", "elsewhere"]) == 0
    assert f"0 measured, {n} modelled" in capsys.readouterr().out
    # an experiment named by --from that is not there is an error, not a silent model
    assert cli.main(["plan", "gpu", "--from", "no-such-experiment"]) == 2
    assert "--from 'no-such-experiment': no MLflow experiment" in capsys.readouterr().err


def test_no_store_is_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.main(["plan", "gpu", "--gpu-counts", "1,8,32"]) == 0
    out = capsys.readouterr().out
    n = len(gridmod.load("gpu").specs)
    assert f"0 measured, {n} modelled" in out
    # one row per framework, backbone and strategy: 3 datasets x 3 seeds of resnet50 full
    assert "| 32 |" in out and "| torch | resnet50 | full | 9 |" in out
    assert "| keras | resnet50 | full | 9 |" in out and "| **all** | | | 756 |" in out
    assert cli.main(["plan", "gpu", "--from", "gpu"]) == 2
    assert "--from 'gpu': no MLflow experiment" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


# ---- refused input ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["0", "1,x", "", "-1", "1.5", "8,,32"])
def test_bad_gpus_is_refused(bad, capsys):
    assert cli.main(["plan", "gpu", "--gpu-counts", bad]) == 2
    err = capsys.readouterr().err
    assert "--gpu-counts" in err and "comma-separated list of positive integers" in err


def test_unknown_grid_gets_the_loader_message(capsys):
    assert cli.main(["plan", "no-such-grid"]) == 2
    err = capsys.readouterr().err
    assert "no-such-grid" in err and "shipped grids:" in err and "gpu" in err


def test_bad_overhead_is_refused(capsys):
    assert cli.main(["plan", "gpu", "--overhead-s", "-1"]) == 2
    assert "--overhead-s" in capsys.readouterr().err


def test_plan_imports_no_framework():
    code = ("import sys, bench.run.sizing, bench.cli; "
            "bad = {'torch', 'tensorflow', 'ray', 'mlflow'} & set(sys.modules); "
            "print(sorted(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runspec_from_a_run_matches_the_grid_cell(gpu_grid):
    s = _cell(gpu_grid, strategy="two_stage", depth=2)
    assert RunSpec.from_params(s.to_params()) == s
