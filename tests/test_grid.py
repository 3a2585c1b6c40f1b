"""Grid files (bench/config/grid.py) and the registries they validate against
(strategies/registry.py, strategies/backbones.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from PIL import Image

from bench.config import grid
from bench.config import spec as spec_mod
from bench.config.grid import GridError, from_dict
from bench.config.spec import RunSpec
from strategies import FRAMEWORKS, registry
from strategies import backbones as bb
from strategies.constraint import Constraint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))


def doc(axes=None, **top):
    """A minimal valid grid document, with axes overridden."""
    return {"axes": {"framework": ["torch"], "backbone": ["resnet18"], "dataset": ["digits"],
                     **(axes or {})}, **top}


def problems(d, smoke=False) -> str:
    with pytest.raises(GridError) as e:
        from_dict(d, "x.toml", smoke=smoke)
    assert str(e.value).startswith("grid x.toml is invalid")
    return str(e.value)


# ---- the shipped grids -----------------------------------------------------------------------
SHIPPED = sorted(p.stem for p in (ROOT / "bench" / "grids").glob("*.toml"))


def test_the_shipped_grids_are_all_tested():
    assert {"default", "gpu", "seeds", "yosinski"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_grid_is_valid(name):
    g = grid.load(name, check_data=False)  # the seeds' data/train is the user's own
    assert g.data_problems == (("dataset 'seed_data': image folder 'data/train' does not "
                                "exist (expected root/<class>/<image>)",) if name == "seeds"
                               else ())
    assert g.name == name and not g.smoke and g.duplicates == 0
    assert g.specs and len({s.hash for s in g.specs}) == len(g.specs)
    for s in g.specs:
        assert isinstance(s, RunSpec) and s.framework in FRAMEWORKS
        info = bb.get(s.backbone)
        assert s.framework in info.frameworks
        strat = registry.get(s.strategy)
        assert {k for k, _ in s.strategy_params} == {p.name for p in strat.params}
        depth = s.params.get("depth")
        if depth is not None:
            assert depth == "all" or 1 <= depth <= info.n_blocks
        assert s.dataset in g.cards
        assert sum(n for _, n in strat.phases(s.params, s.epochs)) == s.epochs
        assert RunSpec.from_params(s.to_params()).hash == s.hash
    # every cell told apart by its label, which names each field the grid varies
    labels = [g.label(s) for s in g.specs]
    assert len(set(labels)) == len(labels)
    named = {"framework", "backbone", "strategy", "dataset", "seed"}  # in the name itself
    assert all(f"{f}=" in label for label in labels for f in set(g.varying) - named)
    smoke = grid.load(name, smoke=True, check_data=False)
    # one epoch, or one a phase where the strategy has several (two_stage: 2)
    assert smoke.name == f"{g.name}-smoke" and all(
        s.epochs == registry.get(s.strategy).min_epochs(s.params) for s in smoke.specs)


def _without(s: RunSpec, field: str) -> str:
    """The cell's identity with one field left out."""
    return repr(sorted((k, repr(v)) for k, v in s.canonical().items() if k != field))


def test_default_grid_compares_every_strategy_in_both_frameworks():
    g = grid.load("default")
    # 6 cells a framework: 4 strategies on ImageNet weights, `full` from scratch twice
    assert len(g.specs) == 12 == len({s.hash for s in g.specs})
    by_fw = {fw: sorted(_without(s, "framework") for s in g.specs if s.framework == fw)
             for fw in ("torch", "keras")}
    assert by_fw["torch"] == by_fw["keras"] and len(by_fw["torch"]) == 6  # the same cells
    # the original strategies but reinit_top, which needs a harness-pretrained source
    # (yosinski's); the later ones (blocks, bitfit, norm, ...) have grids of their own
    assert {s.strategy for s in g.specs} == {"feature_extraction", "partial", "full",
                                             "two_stage"}
    assert {s.strategy for s in g.specs if s.weights == "imagenet"} == \
        {s.strategy for s in g.specs} and {s.weights for s in g.specs} == {"imagenet", "none"}
    # precise BatchNorm only where BatchNorm trains: the from-scratch control, with and
    # without it (the trap and the fair control)
    assert {s.precise_bn for s in g.specs if s.weights == "imagenet"} == {0}
    scratch = [s for s in g.specs if s.weights == "none"]
    assert {s.strategy for s in scratch} == {"full"}
    assert sorted(s.precise_bn > 0 for s in scratch) == [False, False, True, True]
    assert {s.dataset for s in g.specs} == set(g.cards) == {"digits"}


def test_yosinski_grid_is_the_papers_protocol():
    from bench.config import pretrained

    g = grid.load("yosinski")
    # per framework: {AnB, AnB+, BnB, BnB+} x depths 1, 3, 5, 7, and baseB
    assert len(g.specs) == 34 == len({s.hash for s in g.specs})
    for fw in ("torch", "keras"):
        cells = [s for s in g.specs if s.framework == fw]
        assert len(cells) == 17
        reinit = [s for s in cells if s.strategy == "reinit_top"]
        assert sorted({s.params["depth"] for s in reinit}) == [1, 3, 5, 7]
        assert sorted({(s.weights, s.params["copied"]) for s in reinit}) == [
            (f"pretrained:mnist_{t}", c) for t in "ab" for c in ("finetune", "frozen")]
        (base,) = [s for s in cells if s.strategy != "reinit_top"]
        assert (base.strategy, base.weights) == ("full", "none")
    assert {s.dataset for s in g.specs} == {"mnist_b"}
    # base networks on A and on B, once per framework
    sources = {pretrained.pretrain_spec(s) for s in g.specs if pretrained.is_pretrained(s.weights)}
    assert len({p.hash for p in sources}) == 4
    assert {(p.framework, p.dataset) for p in sources} == {
        (fw, d) for fw in ("torch", "keras") for d in ("mnist_a", "mnist_b")}


def test_bare_name_resolves_to_the_shipped_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = ROOT / "bench" / "grids" / "default.toml"
    assert grid.resolve_path("default") == shipped
    assert grid.resolve_path("default.toml") == shipped
    assert [s.hash for s in grid.load("default").specs] == \
        [s.hash for s in grid.load(shipped).specs]


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(GridError) as e:
        grid.load(missing)
    assert str(missing) in str(e.value)
    assert "not found" in str(e.value) and "default" in str(e.value)  # lists shipped grids
    with pytest.raises(GridError, match="'nope'"):
        grid.load("nope")


def test_load_reads_a_toml_file(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[axes]\nframework = ["torch"]\nbackbone = ["resnet18"]\n'
                 'dataset = ["digits"]\nseed = [0, 1]\n[defaults]\nepochs = 2\n'
                 '[run]\ndevice = "cpu"\n')
    g = grid.load(p)
    assert g.name == "mine" and g.device == "cpu" and g.path == str(p)
    assert [s.seed for s in g.specs] == [0, 1] and {s.epochs for s in g.specs} == {2}
    assert g.varying == ("seed",)


def test_invalid_toml_is_a_grid_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[axes\nframework = torch\n")
    with pytest.raises(GridError, match="not valid TOML"):
        grid.load(p)


def test_bench_grid_imports_no_framework():
    code = ("import sys, bench.config.grid, bench.config.spec, bench.data, strategies\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'torchvision') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr


# ---- refusals: field, value and what is allowed -------------------------------------------
def test_unknown_backbone():
    msg = problems(doc({"backbone": ["resnet19"]}))
    assert "axes.backbone" in msg and "'resnet19'" in msg
    assert "allowed:" in msg and "resnet18" in msg and "resnet50" in msg


def test_unknown_strategy():
    msg = problems(doc({"strategy": ["partiall[depth=1]"]}))
    assert "axes.strategy" in msg and "'partiall[depth=1]'" in msg and "unknown strategy" in msg
    assert all(n in msg for n in ("feature_extraction", "partial", "full", "two_stage"))


def test_unknown_dataset():
    msg = problems(doc({"dataset": ["digitz"]}))
    assert "axes.dataset" in msg and "'digitz'" in msg
    assert "digits" in msg and "mnist5k" in msg and "[datasets.digitz]" in msg


def test_unknown_framework():
    msg = problems(doc({"framework": ["jax"]}))
    assert "axes.framework" in msg and "'jax'" in msg and "allowed: keras, torch" in msg


def test_depth_beyond_the_backbones_blocks():
    msg = problems(doc({"strategy": ["partial[depth=6]"]}))
    assert "axes.strategy" in msg and "depth = 6" in msg
    assert "1..5" in msg and "'all'" in msg and "resnet18 has 5 blocks" in msg
    assert "stage4" in msg
    msg = problems(doc({"strategy": ["partial[depth=0]"]}))
    assert "depth = 0" in msg


def test_strategy_param_refusals():
    msg = problems(doc({"strategy": ["partial[dept=1]"]}))
    assert "unknown parameter 'dept'" in msg and "allowed: depth, bn" in msg
    msg = problems(doc({"strategy": ["partial"]}))
    assert "partial needs depth" in msg
    msg = problems(doc({"strategy": ["two_stage[lr_scale=2]"]}))
    assert "lr_scale = 2" in msg and "must be in [1e-08, 1.0]" in msg
    msg = problems(doc({"strategy": ["partial[depth=1,bn=sometimes]"]}))
    assert "bn = 'sometimes'" in msg and "train, frozen" in msg
    msg = problems(doc({"strategy": ["partial[depth=1"]}))
    assert "malformed selector" in msg and "axes.strategy" in msg


@pytest.mark.parametrize("section, field, value, expected", [
    ("defaults", "epochs", "3", "must be an integer"),
    ("defaults", "lr", "fast", "must be a number"),
    ("axes", "seed", 1.5, "must be an integer"),
    ("defaults", "seed", True, "must be an integer"),
    ("defaults", "optimizer", "adagrad", "allowed: adam, adamw, sgd"),
    ("defaults", "precision", "fp8", "allowed: fp32, bf16, fp16"),
    ("defaults", "batch_size", 0, "must be >= 1"),
    ("defaults", "lr", 0, "must be > 0"),
    ("defaults", "weights", "no/such/file.pt", "allowed: 'imagenet', 'none'"),
    ("defaults", "channels_last", "yes", "must be true or false"),
    ("axes", "feature_cache", 1, "must be true or false"),
    ("defaults", "workers", -2, "must be >= -1"),
])
def test_wrong_field_values(section, field, value, expected):
    d = doc()
    if section == "axes":
        d["axes"][field] = [value]
    else:
        d[section] = {field: value}
    msg = problems(d)
    assert f"{section}.{field}: {field} = {value!r}: {expected}" in msg


# ---- a field's constraint is declared once, on the field, and validation reports it ----------
def _violations(name: str, c) -> list:
    """Values that break constraint `c` of field `name`: of the wrong kind, outside its
    choices, at or below its minimum."""
    bad = ["x" if c.kind is not str else 1]
    if c.choices:
        bad.append("no-such-" + name)
    if c.minimum is not None:
        bad.append(c.kind(c.minimum) if c.exclusive else c.kind(c.minimum - 1))
    return bad


# (role and train_on are declared too, but a grid file may not set them: SET_BY_RUNNER)
DECLARED = [(f.name, spec_mod.CONSTRAINTS[f.name]) for f in dataclasses.fields(RunSpec)
            if "check" in f.metadata and f.name not in grid.SET_BY_RUNNER]


def test_fields_declare_their_constraints():
    assert {n for n, _ in DECLARED} >= {"epochs", "lr", "weight_decay", "optimizer", "seed",
                                        "precision", "head", "select", "workers"}
    hints = typing.get_type_hints(RunSpec)
    for f in dataclasses.fields(RunSpec):
        if f.name == "strategy_params":
            continue
        c = spec_mod.CONSTRAINTS[f.name]
        assert c.kind is hints[f.name] and c.kind in (bool, int, float, str), f.name
        if f.default is not dataclasses.MISSING:
            assert spec_mod.check_value(f.name, f.default) is None, f.name


@pytest.mark.parametrize("name, c", DECLARED, ids=[n for n, _ in DECLARED])
def test_declared_constraint_is_what_validation_reports(name, c):
    for bad in _violations(name, c):
        expected = c.problem(bad)
        assert expected, (name, bad)
        msg = problems(doc(defaults={name: bad}))
        assert f"defaults.{name}: {name} = {bad!r}: {expected}" in msg


def test_changing_the_declaration_changes_validation(monkeypatch):
    """One place: a stricter declared minimum is enforced with no other edit."""
    from_dict(doc(defaults={"epochs": 4}))
    monkeypatch.setitem(spec_mod.CONSTRAINTS, "epochs",
                        Constraint(int, minimum=5, help="test"))
    assert "defaults.epochs: epochs = 4: must be >= 5" in problems(doc(defaults={"epochs": 4}))


@pytest.mark.timeout(30)
def test_values_no_cell_is_built_from_are_checked_too():
    """A default an axis overrides, and [smoke] without --smoke: refused at load all the same
    (a typo must not hide behind an axis, nor wait for the first --smoke)."""
    d = doc(defaults={"seed": "x"})
    d["axes"]["seed"] = [0, 1]
    assert "defaults.seed: seed = 'x': must be an integer" in problems(d)
    msg = problems(doc(smoke={"epochs": "four"}))
    assert "smoke.epochs: epochs = 'four': must be an integer" in msg
    assert "smoke.epochs: epochs = 'four'" in problems(doc(smoke={"epochs": "four"}), smoke=True)


def test_unknown_top_level_key():
    msg = problems(doc(bogus=1))
    assert "unknown top-level key(s) ['bogus']" in msg and "'axes'" in msg


def test_unknown_axes_and_defaults_fields():
    msg = problems(doc({"epoch": [1]}))
    assert "axes.epoch: unknown field" in msg and "epochs" in msg
    msg = problems(doc(defaults={"learning_rate": 0.1}))
    assert "defaults.learning_rate: unknown field" in msg and "lr" in msg
    msg = problems(doc(defaults={"epochs": [1, 2]}))
    assert "defaults.epochs" in msg and "a list belongs under [axes]" in msg


def test_missing_required_axis():
    d = doc()
    del d["axes"]["backbone"]
    msg = problems(d)
    assert "axes.backbone is missing" in msg
    # a required field given once in [defaults] is enough
    d["defaults"] = {"backbone": "resnet18"}
    assert len(from_dict(d, "x.toml").specs) == 1


def test_bad_run_device_and_axis_shapes():
    msg = problems(doc(run={"device": "tpu"}))
    assert "run.device = 'tpu'" in msg and "cuda:<i>" in msg
    msg = problems(doc({"seed": []}))
    assert "axes.seed = []: must be a non-empty list" in msg
    msg = problems(doc({"backbone, image_size": [["resnet18", 32], ["resnet50"]]}))
    assert "axes.backbone, image_size[1]" in msg and "lists of 2 values" in msg


def test_backbone_not_available_in_a_framework():
    pairs = [(fw, name) for fw in FRAMEWORKS for name, info in bb.BACKBONES.items()
             if fw not in info.frameworks]
    if not pairs:
        pytest.skip("every registered framework implements every backbone; nothing to refuse")
    fw, name = pairs[0]
    msg = problems(doc({"framework": [fw], "backbone": [name]}))
    assert f"backbone = {name!r} is not available in framework {fw!r}" in msg


def test_image_folder_dataset_with_missing_root(tmp_path):
    root = tmp_path / "no_such_pets"
    msg = problems(doc({"dataset": ["pets"]},
                       datasets={"pets": {"source": "image_folder", "root": str(root)}}))
    assert "axes.dataset: dataset = 'pets'" in msg and str(root) in msg
    assert "does not exist" in msg and "root/<class>/<image>" in msg


def test_image_folder_dataset_that_exists(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "pets" / c).mkdir(parents=True)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "pets" / c / "a.png")
    g = from_dict(doc({"dataset": ["pets", "digits"]},
                      datasets={"pets": {"source": "image_folder",
                                         "root": str(tmp_path / "pets")}}), "x.toml")
    assert [s.dataset for s in g.specs] == ["pets", "digits"]
    assert set(g.cards) == {"pets", "digits"}
    assert g.cards["pets"]["split"] == {"val_fraction": 0.2, "test_fraction": 0.2}


def test_invalid_grid_local_card_is_reported():
    msg = problems(doc(datasets={"mine": {"source": "csv_files"}}))
    assert "datasets.mine.source = 'csv_files'" in msg and "sklearn_digits" in msg


def test_several_errors_are_all_reported():
    d = doc({"backbone": ["resnet19"], "dataset": ["digitz"], "seed": [0, 1]},
            defaults={"lr": "fast"})
    with pytest.raises(GridError) as e:
        from_dict(d, "x.toml")
    text = "\n".join(e.value.problems)
    assert "'resnet19'" in text and "'digitz'" in text and "'fast'" in text
    # each problem once, although two seeds repeat it
    assert len(e.value.problems) == len(set(e.value.problems)) == 3


def test_several_errors_in_different_cells_are_all_reported():
    d = doc({"backbone": ["resnet19", "resnet18"], "strategy": ["partiall"]})
    msg = problems(d)
    assert "'resnet19'" in msg and "'partiall'" in msg


def test_errors_in_defaults_and_axes_are_reported_together():
    msg = problems(doc({"backbone": ["resnet19"]}, defaults={"epoch": 3}))
    assert "defaults.epoch" in msg and "'resnet19'" in msg


def test_unknown_strategy_reported_alongside_unknown_backbone():
    msg = problems(doc({"backbone": ["resnet19"], "strategy": ["partiall"]}))
    assert "'resnet19'" in msg and "'partiall'" in msg


@pytest.mark.parametrize("d", [
    pytest.param({"axes": ["torch"]}, id="axes-not-a-table"),
    pytest.param({**doc(), "defaults": 3}, id="defaults-not-a-table"),
    pytest.param({**doc({"dataset": ["p"]}), "datasets": {"p": "x"}}, id="card-not-a-table"),
    pytest.param({**doc({"dataset": ["p"]}),
                  "datasets": {"p": {"source": "sklearn_digits", "split": 0.2}}},
                 id="card-split-not-a-table"),
])
def test_wrongly_typed_sections_are_grid_errors(d):
    with pytest.raises(GridError):
        from_dict(d, "x.toml")


# ---- expansion -------------------------------------------------------------------------------
def test_cartesian_product():
    g = from_dict(doc({"backbone": ["resnet18", "resnet50"],
                       "strategy": ["feature_extraction", "full", "partial[depth=2]"],
                       "seed": [0, 1]}), "x.toml")
    assert len(g.specs) == 12
    cells = {(s.backbone, s.strategy, s.seed) for s in g.specs}
    assert cells == {(b, st, sd) for b in ("resnet18", "resnet50")
                     for st in ("feature_extraction", "full", "partial") for sd in (0, 1)}
    assert set(g.varying) == {"backbone", "strategy", "seed"}


def test_selector_expands_to_one_cell_per_value():
    g = from_dict(doc({"strategy": ["partial[depth=1,2,3]"]}), "x.toml")
    assert [s.params["depth"] for s in g.specs] == [1, 2, 3]
    assert {s.params["bn"] for s in g.specs} == {"train"}  # default filled in
    g = from_dict(doc({"strategy": ["two_stage[depth=2,lr_scale=0.1,0.01]"]}), "x.toml")
    assert sorted(s.params["lr_scale"] for s in g.specs) == [0.01, 0.1]
    assert {s.params["depth"] for s in g.specs} == {2}


def test_coupled_axes_give_exactly_those_pairs():
    d = {"axes": {"framework": ["torch"], "dataset": ["digits"], "seed": [0, 1],
                  "backbone, image_size": [["resnet18", 32], ["resnet50", 64]]}}
    g = from_dict(d, "x.toml")
    assert sorted((s.backbone, s.image_size, s.seed) for s in g.specs) == [
        ("resnet18", 32, 0), ("resnet18", 32, 1), ("resnet50", 64, 0), ("resnet50", 64, 1)]


def test_duplicate_cells_are_removed():
    g = from_dict(doc({"strategy": ["full", "full[bn=train]", "feature_extraction"],
                       "seed": [0, 0]}), "x.toml")
    assert [s.strategy for s in g.specs] == ["full", "feature_extraction"]
    assert g.duplicates == 4


def test_depth_all_is_accepted():
    g = from_dict(doc({"strategy": ["partial[depth=all]", "two_stage"]}), "x.toml")
    assert [s.params["depth"] for s in g.specs] == ["all", "all"]
    assert [s.name for s in g.specs] == ["torch/resnet18/partial[depth=all]/digits/seed0",
                                         "torch/resnet18/two_stage/digits/seed0"]


def test_float_strategy_params_are_floats():
    g = from_dict(doc({"strategy": ["two_stage[lr_scale=1,head_share=0.25]"]},
                      defaults={"lr": 1, "weight_decay": 0}), "x.toml")
    (s,) = g.specs
    assert s.params["lr_scale"] == 1.0 and type(s.params["lr_scale"]) is float
    assert type(s.params["head_share"]) is float
    assert type(s.lr) is float and type(s.weight_decay) is float
    assert RunSpec.from_params(s.to_params()).hash == s.hash


def test_smoke_shrinks_any_grid():
    g = grid.load("default", smoke=True)
    full = grid.load("default")
    assert g.name == "default-smoke" and g.smoke
    assert len(g.specs) == len(full.specs)
    assert all(0 < s.subset <= 120 for s in g.specs)
    assert {s.strategy: s.epochs for s in g.specs} == {
        "feature_extraction": 1, "partial": 1, "full": 1, "two_stage": 2}
    assert all("digits[n=120]" in s.name for s in g.specs)
    # a smaller subset is kept; a grid's own [smoke] table wins over the defaults
    g = from_dict(doc({"subset": [50]}, smoke={"epochs": 2}), "x.toml", smoke=True)
    assert [(s.subset, s.epochs) for s in g.specs] == [(50, 2)]
    assert g.name == "x-smoke"


def test_smoke_subset_is_per_cell():
    g = from_dict(doc({"subset": [50, 500, 0]}), "x.toml", smoke=True)
    assert sorted(s.subset for s in g.specs) == [50, 120]


# ---- the registries --------------------------------------------------------------------------
def test_backbone_catalog():
    assert {"resnet18", "resnet50", "vgg16", "mobilenet_v3_small"} <= set(bb.BACKBONES)
    for name, info in bb.BACKBONES.items():
        assert info.name == name
        assert info.n_blocks == len(info.blocks) >= 2
        assert len(set(info.blocks)) == len(info.blocks)
        assert info.frameworks
    assert bb.get("resnet18").blocks == ("stem", "stage1", "stage2", "stage3", "stage4")
    with pytest.raises(KeyError, match="resnet19.*known:.*resnet18"):
        bb.get("resnet19")


def test_strategy_registry():
    assert {"feature_extraction", "partial", "full", "two_stage"} <= set(registry.STRATEGIES)
    with pytest.raises(registry.UnknownStrategy, match="partiall.*known:.*two_stage"):
        registry.get("partiall")
    before = dict(registry.STRATEGIES)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Strategy("full", "again", lambda p: []))
    assert registry.STRATEGIES == before
    assert registry.resolve_depth("all", 5) == 5 and registry.resolve_depth(2, 5) == 2


def test_strategy_phases():
    ph = registry.get("feature_extraction").phases({}, 6)
    assert [(p.trainable_blocks, n) for p, n in ph] == [(0, 6)]
    ph = registry.get("partial").phases({"depth": 2, "bn": "frozen"}, 4)
    assert [(p.trainable_blocks, p.bn, n) for p, n in ph] == [(2, "frozen", 4)]
    ph = registry.get("full").phases({"bn": "train"}, 3)
    assert [(p.trainable_blocks, n) for p, n in ph] == [(registry.ALL, 3)]
    two = registry.get("two_stage")
    params = {p.name: p.default for p in two.params}
    ph = two.phases({**params, "depth": 2, "head_share": 0.25}, 8)
    assert [(p.name, p.trainable_blocks, p.lr_scale, n) for p, n in ph] == [
        ("head", 0, 1.0, 2), ("finetune", 2, 0.01, 6)]
    assert ph[1][0].bn == "frozen"
    # every phase gets at least one epoch, and the counts sum to the cell's budget
    assert [n for _, n in two.phases(params, 2)] == [1, 1]
    assert [n for _, n in two.phases(params, 5)] == [2, 3]
    with pytest.raises(registry.BudgetError, match="allowed: epochs >= 2"):
        two.phases(params, 1)


def test_every_strategy_expands_on_every_backbone():
    for sname, strat in registry.STRATEGIES.items():
        sel = f"{sname}[depth=1]" if any(p.name == "depth" for p in strat.params) else sname
        for backbone in sorted(bb.BACKBONES):  # block names and refusals are per backbone
            info = bb.get(backbone)
            if any(p.kind == "blocks" for p in strat.params):
                sel = f"{sname}[names={info.blocks[0]}+{info.blocks[-1]}]"
            problem = strat.backbone_problem(info) if strat.backbone_problem else None
            # vit_tiny has no published weights: from random init
            weights = "none" if bb.weights_problem(backbone, "imagenet") else "imagenet"
            d = doc({"backbone": [backbone], "strategy": [sel], "weights": [weights]})
            if problem:  # norm on vgg16: refused with the reason
                assert problem in problems(d)
                continue
            (s,) = from_dict(d, "x.toml").specs
            assert registry.get(s.strategy).phases(s.params, 2)


# ---- budgets, selection, the device kind and [run] -------------------------------------------
def test_select_is_validated():
    msg = problems(doc(defaults={"select": "best"}))
    assert "defaults.select: select = 'best': allowed: last, best_val" in msg
    msg = problems(doc({"select": ["last", "final"]}))
    assert "axes.select: select = 'final': allowed: last, best_val" in msg
    g = from_dict(doc({"select": ["last", "best_val"]}), "x.toml")
    assert [s.select for s in g.specs] == ["last", "best_val"]
    assert g.specs[0].hash == from_dict(doc(), "x.toml").specs[0].hash  # the default


def test_a_budget_too_small_for_the_strategy_is_refused():
    d = doc({"strategy": ["two_stage[depth=2,lr_scale=0.1,0.01]", "full"], "seed": [0, 1]},
            defaults={"epochs": 1})
    with pytest.raises(GridError) as e:
        from_dict(d, "x.toml")
    (msg,) = e.value.problems  # one message, though 4 cells share the problem
    assert msg.startswith("defaults.epochs: epochs = 1 is too few for strategy = "
                          "'two_stage[depth=2,lr_scale=0.1,0.01]'")
    assert "two_stage trains 2 phases (head, finetune)" in msg
    assert "allowed: epochs >= 2" in msg
    msg = problems(doc({"epochs": [1, 4], "strategy": ["two_stage"]}))
    assert "axes.epochs: epochs = 1 is too few for strategy = 'two_stage'" in msg
    g = from_dict(doc({"strategy": ["two_stage", "full"]}, defaults={"epochs": 2}), "x.toml")
    assert [s.epochs for s in g.specs] == [2, 2]


def test_smoke_gives_each_strategy_the_epochs_it_needs():
    # --smoke's one epoch is raised to one a phase: it never makes a valid grid invalid
    d = doc({"strategy": ["two_stage[depth=2]", "feature_extraction", "partial[depth=1]"]},
            defaults={"epochs": 4})
    g = from_dict(d, "x.toml", smoke=True)
    assert [(s.strategy, s.epochs) for s in g.specs] == [
        ("two_stage", 2), ("feature_extraction", 1), ("partial", 1)]
    for s in g.specs:
        phases = registry.get(s.strategy).phases(s.params, s.epochs)
        assert sum(n for _, n in phases) == s.epochs  # the budget recorded is the one trained
    # a grid's own [smoke] epochs above the minimum are kept
    g = from_dict(doc({"strategy": ["two_stage"]}, smoke={"epochs": 3}), "x.toml", smoke=True)
    assert [s.epochs for s in g.specs] == [3]


@pytest.mark.parametrize("section", ["axes", "defaults", "smoke"])
def test_device_kind_is_not_a_grid_field(section):
    d = doc()
    if section == "axes":
        d["axes"]["device_kind"] = ["cuda:NVIDIA H200"]
    else:
        d[section] = {"device_kind": "cpu"}
    msg = problems(d, smoke=section == "smoke")
    assert f"{section}.device_kind: not a grid field: it is set from run.device / --device" in msg
    # nor is it offered among the fields a grid may set
    msg = problems(doc(defaults={"learning_rate": 0.1}))
    assert "unknown field" in msg and "device_kind" not in msg


def test_run_table_time_limit_and_determinism():
    g = from_dict(doc(run={"device": "cpu", "timeout_minutes": 0.5, "deterministic": False}),
                  "x.toml")
    assert (g.device, g.timeout_minutes, g.deterministic) == ("cpu", 0.5, False)
    g = from_dict(doc(), "x.toml")
    assert (g.device, g.timeout_minutes, g.deterministic) == ("auto", None, "auto")
    for bad in (0, -1, "10", True):
        msg = problems(doc(run={"timeout_minutes": bad}))
        assert f"run.timeout_minutes = {bad!r}: must be a number of minutes > 0" in msg
    for bad in ("yes", 1, "Auto"):
        msg = problems(doc(run={"deterministic": bad}))
        assert f"run.deterministic = {bad!r}: allowed: \"auto\" or true or false" in msg
    msg = problems(doc(run={"device": "cuda:first"}))
    assert "run.device = 'cuda:first': allowed: auto, cpu, cuda, cuda:<i>, mps" in msg
    msg = problems(doc(run={"timeout": 3}))
    assert "run: unknown key(s) ['timeout']" in msg and "timeout_minutes" in msg


def test_image_folder_with_one_class_is_refused(tmp_path):
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "pets" / "cat" / "a.png")
    msg = problems(doc({"dataset": ["pets"]},
                       datasets={"pets": {"source": "image_folder",
                                          "root": str(tmp_path / "pets")}}))
    assert "axes.dataset: dataset = 'pets'" in msg and str(tmp_path / "pets") in msg
    assert "one class folder (cat)" in msg and "at least two" in msg


def test_run_names_put_what_differs_first_and_configs_group_like_with_like():
    g = grid.load("default")
    names = [g.run_name(s) for s in g.specs]
    assert len(set(names)) == len(names)  # every cell's run name is its own
    scratch = [s for s in g.specs if s.weights == "none" and s.precise_bn == 320]
    assert sorted(g.run_name(s) for s in scratch) == [
        "full scratch pbn320 pt", "full scratch pbn320 tf"]
    # a configuration is everything but framework and seed: the two frameworks' cells of one
    # row share it, and no two rows do (precise_bn 0 and 320 are apart)
    configs = {}
    for s in g.specs:
        configs.setdefault(g.config(s), set()).add(s.framework)
    assert len(configs) == len(g.specs) // 2
    assert all(fws == {"torch", "keras"} for fws in configs.values())
    seeds = grid.load("gpu")
    by_config = {}
    for s in seeds.specs:
        by_config.setdefault(seeds.config(s), set()).add((s.framework, s.seed))
    assert all(len(v) == 6 for v in by_config.values())  # 2 frameworks x 3 seeds
    assert " s0 " in seeds.run_name(seeds.specs[0])  # seeds vary: the name says which


def test_a_folder_named_like_a_shipped_grid_is_not_taken_for_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "strategies").mkdir()  # as in the repository root: the package
    assert grid.resolve_path("strategies") == grid.grids_dir() / "strategies.toml"


# ---- a cell's data is part of its identity ---------------------------------------------------
def _card_grid(noise=80.0, description="noisy digits", split=None, weights="imagenet"):
    card = {"source": "sklearn_digits", "description": description,
            "corruption": {"noise_std": noise}}
    if split:
        card["split"] = split
    return from_dict(doc({"dataset": ["noisy", "digits"], "weights": [weights]},
                         datasets={"noisy": card}), "x.toml")


def _hashes(g):
    return {s.dataset: s.hash for s in g.specs}


def test_editing_a_card_makes_new_cells_and_leaves_the_others():
    base = _hashes(_card_grid())
    # what decides the data: the shift options and the split rule
    assert _hashes(_card_grid(noise=60.0))["noisy"] != base["noisy"]
    assert _hashes(_card_grid(split={"val_fraction": 0.3}))["noisy"] != base["noisy"]
    # the cells of the other, unedited card keep their identity
    assert _hashes(_card_grid(noise=60.0))["digits"] == base["digits"]
    # words about the data are not the data
    assert _hashes(_card_grid(description="other words")) == base
    s = next(s for s in _card_grid().specs if s.dataset == "noisy")
    assert s.card_digests.startswith("noisy=") and len(s.card_digests) == len("noisy=") + 12
    assert RunSpec.from_params(s.to_params()) == s  # logged and read back whole


def test_editing_a_pretraining_source_card_makes_a_new_pretraining():
    from bench.config import pretrained

    def pspec_and_cell(noise):
        g = _card_grid(noise=noise, weights="pretrained:noisy[epochs=1]")
        cell = next(s for s in g.specs if s.dataset == "digits")
        return pretrained.pretrain_spec(cell), cell

    (p80, c80), (p60, c60) = pspec_and_cell(80.0), pspec_and_cell(60.0)
    assert p80.card_digests.startswith("noisy=") and "digits=" not in p80.card_digests
    assert p80.hash != p60.hash  # another checkpoint, not the cached one
    assert c80.hash != c60.hash  # and the cells built on it are other cells


def test_card_digests_are_not_a_grid_field():
    msg = problems(doc(defaults={"card_digests": "digits=0"}))
    assert "defaults.card_digests: not a grid field: it is computed from the dataset cards" in msg


def test_a_class_too_small_for_the_split_is_named_before_the_run(tmp_path, capsys):
    """Issue 27: one image of `lynx` with val and test fractions of 0.2 would be left out
    of two parts without a word; the grid names it (a warning: the run goes on)."""
    root = tmp_path / "pets"
    for c, n in (("cat", 5), ("dog", 5), ("lynx", 1)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 2, 3)).save(root / c / f"{i}.png")
    text = doc({"dataset": ["pets"]}, datasets={"pets": {"source": "image_folder",
                                                        "root": str(root)}})
    g = from_dict(text, "x.toml")
    (warning,) = g.warnings
    assert "class 'lynx' has 1 image(s)" in warning and "(train, val, test)" in warning
    assert "out of 2 of them" in warning
