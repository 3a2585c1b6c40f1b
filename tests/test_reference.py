"""The reference that cannot drift (issue 26): the grid files' JSON Schema and the generated
documentation pages, both made from the declarations.

The schema accepts every shipped grid and every generated grid that `grid.from_dict`
accepts (it is a superset: never in an editor's way), refuses planted errors that loading
refuses too, and the committed bench/grids/grid.schema.json is what the code makes. Each
page is Markdown under a '# ' title, names every strategy, backbone, grid field and what
the reporter reads from MLflow, and builds in a strict MkDocs build."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from dataclasses import fields

import jsonschema
import pytest
from test_imports import blocking

from bench import reference
from bench.config import schema as schemamod
from bench.config import tune as tunemod
from bench.config.grid import GridError, from_dict
from bench.config.spec import RunSpec
from bench.paths import ROOT, grids_dir
from strategies import backbones as bb
from strategies import registry

SHIPPED = sorted(grids_dir().glob("*.toml"))


@pytest.fixture(scope="module")
def validator():
    schema = schemamod.grid_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def pages():
    return {path: make() for path, make in reference.PAGES.items()}


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator.iter_errors(doc)]


# ---- the schema ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_grid_validates(validator, path):
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    assert _errors(validator, doc) == []


def _default() -> dict:
    return tomllib.loads((grids_dir() / "default.toml").read_text(encoding="utf-8"))


PLANTED = {
    "epochs is not a number": lambda d: d["defaults"].update(epochs="four"),
    "unknown top-level key": lambda d: d.update(axis={"seed": [0]}),
    "unknown backbone in axes": lambda d: d["axes"].update(backbone=["resnet51"]),
    "unknown backbone in coupled axes": lambda d: d["axes"].update(
        {"backbone, image_size": [["resnet51", 32]]}),
    "coupled row too short": lambda d: d["axes"].update(
        {"backbone, image_size": [["resnet18"]]}),
    "unknown strategy parameter": lambda d: d["axes"].update(strategy=["partial[dept=2]"]),
    "unknown strategy": lambda d: d["axes"].update(strategy=["fine_tune"]),
    "a field the harness sets": lambda d: d["defaults"].update(device_kind="cpu"),
    "a list in [defaults]": lambda d: d["defaults"].update(seed=[0, 1]),
    "batch_size below 1": lambda d: d["defaults"].update(batch_size=0),
    "lr not above 0 on an axis": lambda d: d["axes"].update(lr=[0.0]),
    "bad device": lambda d: d.update(run={"device": "gpu"}),
    "unknown card key": lambda d: d.update(
        datasets={"mine": {"source": "sklearn_digits", "classez": [1, 2]}}),
    "unknown card source": lambda d: d.update(datasets={"mine": {"source": "kaggle"}}),
    "a test metric chooses": lambda d: d.update(tune={"lr": [1e-3], "metric": "test_acc"}),
    "no framework": lambda d: d["axes"].pop("framework"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", PLANTED, ids=list(PLANTED))
def test_a_planted_error_is_refused_by_both(validator, plant):
    doc = _default()
    assert _errors(validator, doc) == [] and from_dict(copy.deepcopy(doc)).specs
    PLANTED[plant](doc)
    with pytest.raises(GridError):
        from_dict(copy.deepcopy(doc), "planted.toml")
    assert _errors(validator, doc), f"the schema accepts a grid with {plant}"


# values a generated grid draws from: the first of each is valid
POOL = {
    "framework": ["torch", "keras", "jax", 1],
    "backbone": ["resnet18", "resnet50", "vit_tiny", "mobilenet_v2", "resnet", ""],
    "dataset": ["digits", "mnist5k", "local", "nope", "mnist5k_c"],
    "strategy": ["feature_extraction", "partial[depth=1,2]", " partial [ depth = 2 ] ",
                 "full[bn=frozen]", "two_stage", "two_stage[depth=all,lr_scale=0.1]",
                 "partial[dept=2]", "lora[depth=1]", "vpt", "adapter[width=4]",
                 "blocks[names=stem+stage1]", "blocks[names=stem,stage1]", "gradual[every=1]",
                 "partial[2]", "feature_extraction[]", "full[]", "partial[depth=9]", "norm",
                 "partial[depth=1,,2]", "reinit_top[depth=1,copied=finetune]"],
    "weights": ["imagenet", "none", "pretrained:digits", "pretrained:digits[epochs=2]",
                "pretrained:x", "/nope"],
    "epochs": [2, 1, 6, 0, "four", 2.0, True],
    "lr": [1e-3, 1, 0, -1.0, "x"],
    "image_size": [32, 8, 7, 224, 33],
    "seed": [0, 1, -1],
    "subset": [0, 100, -5],
    "batch_size": [32, 1, 0],
    "precise_bn": [0, 10, -1],
    "head": ["linear", "mlp", "x"],
    "head_init": ["new", "source"],
    "select": ["last", "best_val", "x"],
    "optimizer": ["adam", "sgd", "rmsprop"],
    "workers": [-1, 0, 4, -2],
    "feature_cache": [True, False, 1],
    "device_kind": ["cpu"],
    "weight_decay": [0.0, 1e-4, -1],
}
CARDS = [{"source": "sklearn_digits"}, {"source": "sklearn_digits", "classes": [1, 2, 3]},
         {"source": "sklearn_digits", "split": {"train_size": 50, "val_size": 20}},
         {"source": "sklearn_digits", "split": {"val_fraction": 0.9}},
         {"source": "sklearn_digits", "split": {"test": "val"}},
         {"source": "sklearn_digits", "corruption": {"invert": True}},
         {"source": "sklearn_digits", "corruption": {"noise_std": 0}},
         {"source": "sklearn_digits", "label_permutation": 1},
         {"source": "sklearn_digits", "split": {"train_size": 50}}, {"source": "nope"}]
TUNES = [{"lr": [1e-3, 1e-2]}, {"lr": {"log": [1e-4, 1e-2]}, "trials": 2},
         {"lr": {"log": [0, 1]}, "trials": 2}, {"partial": {"depth": [1, 2]}},
         {"weight_decay": [0.0], "final_seeds": [0, 1]}, {"trials": 3},
         {"two_stage": {"lr_scale": [0.1, 2.0]}}, {"lr": [1e-3], "metric": "test_acc"},
         {"lr": [1e-3], "pruner": "median", "batch": 2}]
RUNS = [{"device": "cpu"}, {"device": "cuda:1", "parallel": 2}, {"timeout_minutes": 0},
        {"parallel": "auto", "deterministic": "auto"}, {"timeout_minutes": 1.5},
        {"device": "gpu"}, {"deterministic": "yes"}]


def _value(r: random.Random, field: str):
    pool = POOL.get(field, [0, 1, "x", True, 1.5])
    return pool[0] if r.random() < 0.8 else r.choice(pool)


def _generated(r: random.Random) -> dict:
    """A grid near the valid ones: required axes, a few more fields, coupled axes (with the
    key spelled with and without spaces, a row sometimes too long), tables now and then."""
    names = schemamod.grid_fields() + ["device_kind", "bogus"]
    axes = {f: [_value(r, f) for _ in range(r.randint(1, 2))]
            for f in ("framework", "backbone", "dataset") if r.random() < 0.95}
    for f in r.sample(names, r.randint(0, 2)):
        axes[f] = [_value(r, f) for _ in range(r.randint(1, 2))]
    if r.random() < 0.4:
        coupled = r.sample(["backbone", "image_size", "strategy", "lr", "weights", "epochs",
                            "framework"], r.randint(2, 3))
        for n in coupled:
            axes.pop(n, None)
        key = (", " if r.random() < 0.8 else ",").join(coupled)
        axes[key] = [[_value(r, n) for n in coupled] + ([1] if r.random() < 0.1 else [])
                     for _ in range(r.randint(1, 2))]
    doc: dict = {"axes": axes}
    swept = {n.strip() for k in axes for n in k.split(",")}
    if r.random() < 0.5:  # a default an axis overrides is never checked: any value
        doc["defaults"] = {f: r.choice([*POOL.get(f, [0]), {"a": 1}]) if f in swept
                           else _value(r, f) for f in r.sample(names, r.randint(1, 3))}
    if r.random() < 0.3:  # checked only under --smoke
        doc["smoke"] = {f: r.choice([_value(r, f), "x", {"a": 1}])
                        for f in r.sample(names, r.randint(1, 2))}
    if r.random() < 0.1:
        doc["description"] = r.choice(["a grid", 3, ["x"]])
    if r.random() < 0.3:
        doc["run"] = copy.deepcopy(r.choice(RUNS))
    if r.random() < 0.3:
        doc["tune"] = copy.deepcopy(r.choice(TUNES))
    if r.random() < 0.3:
        doc["datasets"] = {"local": copy.deepcopy(r.choice(CARDS))}
    if r.random() < 0.2:
        doc["name"] = r.choice(["ok", "../x", "a.b", 3])
    if r.random() < 0.05:
        doc["bogus"] = 1
    return doc


@pytest.mark.timeout(60)
def test_the_schema_never_refuses_a_grid_that_loads(validator):
    """The superset promise, on 600 generated grids: each one grid loading accepts
    validates. (Some that loading refuses validate too: what needs the registries per cell
    or the data is left to loading.)"""
    r = random.Random(26)
    loaded, refused_by_both = 0, 0
    for _ in range(600):
        doc = _generated(r)
        try:
            from_dict(copy.deepcopy(doc), "generated.toml")
        except GridError:
            refused_by_both += bool(_errors(validator, doc))
            continue
        loaded += 1
        assert _errors(validator, doc) == [], f"a grid that loads is refused: {doc}"
    assert loaded >= 50 and refused_by_both >= 100, (loaded, refused_by_both)


@pytest.mark.timeout(60)
def test_the_committed_schema_is_what_the_code_makes(capsys):
    path = grids_dir() / schemamod.SCHEMA_FILE
    assert json.loads(path.read_text(encoding="utf-8")) == schemamod.grid_schema(), (
        f"{path} is stale: run python -m bench.config.schema")
    assert schemamod.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_schema_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / schemamod.SCHEMA_FILE
    stale.write_text(schemamod.render().replace("resnet18", "resnet17"), encoding="utf-8")
    monkeypatch.setattr(schemamod, "schema_path", lambda: stale)
    assert schemamod.main(["--check"]) == 1
    assert "differs" in capsys.readouterr().err
    assert schemamod.main([]) == 0 and schemamod.main(["--check"]) == 0


@pytest.mark.timeout(60)
def test_every_schema_property_has_a_description(validator):
    missing = []

    def walk(node, where):
        """The properties an editor shows, not the conditions of the rules (allOf, ...)."""
        for key in ("properties", "patternProperties"):
            for name, sub in node.get(key, {}).items():
                if not sub.get("description"):
                    missing.append(f"{where}/{name}")
                walk(sub, f"{where}/{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}/{key}")

    schema = validator.schema
    walk(schema, "")
    for name, sub in schema["$defs"].items():
        assert sub.get("description"), name
        walk(sub, f"$defs/{name}")
    assert missing == [] and len(schema["$defs"]) > 20


# ---- the pages -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_each_page_is_markdown_under_a_title(pages):
    assert set(pages) == {"reference/strategies.md", "reference/backbones.md",
                          "reference/grid.md", "reference/datasets.md", "reference/mlflow.md"}
    for path, text in pages.items():
        lines = text.splitlines()
        assert lines[0].startswith("# ") and len(lines[0]) > 2, path
        assert "Generated from" in lines[2], path
        assert text.count("```") % 2 == 0, f"{path}: an unclosed code block"
        for line in lines:  # every table row has its header's columns
            assert not line.startswith("|") or line.endswith("|"), (path, line)


@pytest.mark.timeout(60)
def test_pages_name_every_strategy_and_backbone(pages):
    strategies, backbones = pages["reference/strategies.md"], pages["reference/backbones.md"]
    for name, s in registry.STRATEGIES.items():
        assert f"## {name}\n" in strategies, name
        for p in s.params:
            assert f"| `{p.name}` |" in strategies, (name, p.name)
    for name, info in bb.BACKBONES.items():
        assert f"| `{name}` |" in backbones, name
        assert " → ".join(f"`{b}`" for b in info.blocks) in backbones, name
    for head in bb.HEADS:
        assert f"| `{head}` |" in backbones, head


@pytest.mark.timeout(60)
def test_grid_page_names_every_field_and_table(pages):
    grid = pages["reference/grid.md"]
    for f in fields(RunSpec):
        if f.name != "strategy_params":
            assert f"| `{f.name}` |" in grid, f.name
    for key in (*tunemod.SETTINGS, *tunemod.SEARCHABLE, "device", "timeout_minutes",
                "deterministic", "parallel"):
        assert f"| `{key}` |" in grid, key
    assert schemamod.SCHEMA_FILE in grid and "#:schema" in grid and ".taplo.toml" in grid


@pytest.mark.timeout(60)
def test_datasets_page_names_every_card_and_source(pages):
    text = pages["reference/datasets.md"]
    from bench.data import cards, sources

    for name in cards.shipped_cards():
        assert f"| `{name}` |" in text, name
    for kind in sources.SOURCES:
        assert f"| `{kind}` |" in text, kind
    for key in cards.CARD_KEYS | cards.SPLIT_KEYS | cards.CORRUPTION_KEYS:
        assert f"`{key}`" in text or f"`[{key}]`" in text, key


@pytest.mark.timeout(60)
def test_mlflow_page_names_what_the_reporter_and_the_search_read(pages):
    """Every tag the reporter reads (its `t_<name>` columns), every metric a [tune] table
    may choose by and the curves the report draws are found where the code records them;
    every param a cell logs is listed."""
    text = pages["reference/mlflow.md"]
    read = set()
    for path in (ROOT / "bench" / "report").glob("*.py"):
        read |= set(re.findall(r"\"t_([a-z0-9_]+)\"", path.read_text(encoding="utf-8")))
    assert len(read) >= 10
    for tag in sorted(read):
        assert f"| `tlbench.{tag}` |" in text, tag
    from bench.report.frame import CURVE_KEYS

    for metric in (*tunemod.METRICS, *CURVE_KEYS, "test_acc", "train_images_per_sec",
                   "model_only_train_images_per_sec", "inference_images_per_sec",
                   "peak_memory_mb", "trainable_params", "total_params", "wall_seconds"):
        assert f"| `{metric}` |" in text, metric
    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits",
                   strategy="two_stage")
    for param in spec.to_params():
        assert f"| `{param}` |" in text, param
    for s in registry.STRATEGIES.values():
        for p in s.params:
            assert f"| `strategy.{p.name}` |" in text, p.name


@pytest.mark.timeout(60)
def test_reference_main_writes_every_page(tmp_path, pages):
    assert reference.main([str(tmp_path)]) == 0
    for path, text in pages.items():
        assert (tmp_path / path).read_text(encoding="utf-8") == text


@pytest.mark.timeout(60)
def test_pages_and_schema_are_made_without_a_framework():
    code = blocking("mlflow") + """
from bench.reference import PAGES
from bench.config.schema import grid_schema
assert all(make().startswith('# ') for make in PAGES.values()) and grid_schema()
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.timeout(60)
def test_pages_build_in_a_strict_mkdocs_site(tmp_path, pages):
    """Links between the pages, their anchors and the Markdown hold in a strict build with
    the site's validation settings (the pages alone, with the site's Markdown extensions)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    docs = tmp_path / "docs"
    for path, text in pages.items():
        (docs / path).parent.mkdir(parents=True, exist_ok=True)
        (docs / path).write_text(text, encoding="utf-8")
    (docs / "index.md").write_text("# Home\n", encoding="utf-8")
    nav = "\n".join(f"      - {p}" for p in pages)
    (tmp_path / "mkdocs.yml").write_text(f"""site_name: reference
docs_dir: docs
site_dir: site
strict: true
theme:
  name: material
markdown_extensions:
  - admonition
  - attr_list
  - tables
  - toc:
      permalink: true
  - pymdownx.highlight
  - pymdownx.superfences
  - pymdownx.details
validation:
  nav: {{omitted_files: warn, not_found: warn}}
  links: {{not_found: warn, anchors: warn, unrecognized_links: warn}}
nav:
  - index.md
  - Reference:
{nav}
""", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=50,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    html = (tmp_path / "site" / "reference" / "grid" / "index.html").read_text("utf-8")
    assert html.count("<table>") >= 5 and 'id="cell-fields"' in html


@pytest.mark.timeout(60)
def test_the_schema_is_package_data():
    """pyproject.toml ships bench/grids/*.json with the package."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data = pyproject["tool"]["setuptools"]["package-data"]["bench"]
    assert "grids/*.json" in data
