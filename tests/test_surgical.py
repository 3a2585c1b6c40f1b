"""The surgical fine-tuning grid (Lee et al., ICLR 2023) and the dataset card options it
needs: `[corruption]` (an input-level shift) and `label_permutation` (a label-level one)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.config import grid, pretrained
from bench.config.grid import GridError, from_dict
from bench.data import CardError, check_card, dataset_inputs, prepare, sources
from strategies import backbones as bb

ROOT = Path(__file__).resolve().parents[1]
CORRUPTION = {"noise_std": 50.0, "invert": True, "seed": 0}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))


def card(name="x", source="sklearn_digits", **options) -> dict:
    return check_card({"name": name, "source": source, **options}, f"datasets.{name}")


@pytest.fixture(scope="module")
def clean():
    return sources.load(card("clean"))


# ---- corruption ----------------------------------------------------------------------------
def test_a_corrupted_image_is_the_formula(clean):
    src = sources.load(card(corruption=CORRUPTION))
    assert src.images.dtype == np.uint8 and src.images.shape == clean.images.shape
    np.testing.assert_array_equal(src.labels, clean.labels)
    assert src.class_names == clean.class_names
    for i in (0, 1, 977, len(clean) - 1):
        z = np.random.default_rng([0, i]).standard_normal(clean.images.shape[1:])
        want = 255 - np.clip(np.rint(clean.images[i] + 50.0 * z), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(src.images[i], want)


def test_corruption_is_deterministic_and_seeded(clean):
    a = sources.load(card(corruption=CORRUPTION)).images
    b = sources.load(card("y", corruption=CORRUPTION)).images  # another load, another name
    np.testing.assert_array_equal(a, b)
    other = sources.load(card(corruption={**CORRUPTION, "seed": 1})).images
    assert not np.array_equal(a, other)
    # per source image: a class subset keeps the same corrupted images
    sub = sources.load(card(corruption=CORRUPTION, classes=[3, 7]))
    np.testing.assert_array_equal(sub.images, a[np.isin(clean.labels, [3, 7])])


def test_inversion_alone_and_noise_alone(clean):
    inv = sources.load(card(corruption={"invert": True})).images
    np.testing.assert_array_equal(inv, 255 - clean.images)
    noisy = sources.load(card(corruption={"noise_std": 20.0})).images
    diff = noisy.astype(int) - clean.images
    assert 10 < diff.std() < 25 and abs(diff.mean()) < 5  # clipping at 0 shifts it a little


# ---- label permutation ---------------------------------------------------------------------
def test_label_permutation_is_a_seeded_derangement(clean):
    src = sources.load(card(label_permutation=3))
    perm = sources.derangement(10, 3)
    assert sorted(perm) == list(range(10)) and not np.any(perm == np.arange(10))
    np.testing.assert_array_equal(src.labels, perm[clean.labels])
    np.testing.assert_array_equal(src.images, clean.images)
    # a class's name goes with its images
    for k in range(10):
        assert src.class_names[perm[k]] == clean.class_names[k]
    assert sorted(src.class_names) == sorted(clean.class_names)
    # stable: the same seed the same permutation, another seed another
    np.testing.assert_array_equal(sources.derangement(10, 3), perm)
    np.testing.assert_array_equal(sources.load(card(label_permutation=3)).labels, src.labels)
    assert any(not np.array_equal(sources.derangement(10, s), perm) for s in range(4, 8))
    assert all(not np.any(sources.derangement(n, s) == np.arange(n))
               for n in (2, 3, 5) for s in range(20))


def test_label_permutation_after_a_class_subset(clean):
    src = sources.load(card(classes=[5, 6, 7, 8, 9], label_permutation=0))
    perm = sources.derangement(5, 0)
    keep = clean.labels >= 5
    np.testing.assert_array_equal(src.labels, perm[clean.labels[keep] - 5])
    assert [src.class_names[perm[k]] for k in range(5)] == ["5", "6", "7", "8", "9"]


def test_a_permuted_card_splits_into_the_clean_cards_images():
    # so its test images are the ones a pretraining on the clean card held out
    plain, perm = prepare(card("p"), 1, 400), prepare(card("q", label_permutation=0), 1, 400)
    corrupted = prepare(card("r", corruption=CORRUPTION), 1, 400)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(plain.split[part], perm.split[part])
        np.testing.assert_array_equal(plain.split[part], corrupted.split[part])
        _, labels = perm.part(part)
        np.testing.assert_array_equal(labels, sources.derangement(10, 0)[plain.part(part)[1]])


def test_a_pretraining_on_the_clean_card_holds_out_the_targets_test_images():
    # the same seed: the test part is drawn first, the same whatever the subset
    source = prepare(card("clean_source"), 2, 900)
    for target in (card("c", corruption=CORRUPTION), card("p", label_permutation=0)):
        test = prepare(target, 2, 300).split["test"]
        np.testing.assert_array_equal(test, source.split["test"])
        assert not set(test) & (set(source.split["train"]) | set(source.split["val"]))


def test_the_options_are_recorded_with_the_dataset_inputs():
    c = card(corruption=CORRUPTION, label_permutation=2)
    (train, *_) = dataset_inputs(c, prepare(c, 0, 200), 0, 200)
    recorded = json.loads(train["source"])
    assert recorded["corruption"] == CORRUPTION and recorded["label_permutation"] == 2


# ---- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, expected", [
    ({"corruption": "noise_invert"}, "datasets.x.corruption = 'noise_invert': must be a table"),
    ({"corruption": {"std": 5}}, "datasets.x.corruption: unknown key(s) ['std']; allowed: "
                                 "['invert', 'noise_std', 'seed']"),
    ({"corruption": {"noise_std": -1}}, "datasets.x.corruption.noise_std = -1: must be a "
                                        "number in [0, 255]"),
    ({"corruption": {"noise_std": True}}, "corruption.noise_std = True: must be a number"),
    ({"corruption": {"invert": "yes"}}, "datasets.x.corruption.invert = 'yes': must be true "
                                        "or false"),
    ({"corruption": {"invert": True, "seed": -2}}, "corruption.seed = -2: must be an integer"),
    ({"corruption": {"noise_std": 0}}, "corrupts nothing; allowed: noise_std > 0 and/or "
                                       "invert = true"),
    ({"corruption": {"invert": True}, "source": "image_folder", "root": "x"},
     "datasets.x.corruption: source 'image_folder' lists image files; allowed with"),
    ({"label_permutation": "yes"}, "datasets.x.label_permutation = 'yes': must be an integer "
                                   ">= 0"),
    ({"label_permutation": True}, "datasets.x.label_permutation = True: must be an integer"),
    ({"label_permutation": -1}, "datasets.x.label_permutation = -1: must be an integer"),
])
def test_bad_option_values_are_refused_naming_the_key(options, expected):
    with pytest.raises(CardError) as e:
        check_card({"name": "x", "source": "sklearn_digits", **options}, "datasets.x")
    assert expected in str(e.value)
    # and at grid load, with every other problem
    doc = {"axes": {"framework": ["torch"], "backbone": ["resnet18"], "dataset": ["x"]},
           "datasets": {"x": {"source": "sklearn_digits", **options}}}
    with pytest.raises(GridError) as e:
        from_dict(doc, "x.toml")
    assert expected in str(e.value)


# ---- the grid ------------------------------------------------------------------------------
BLOCK_SETS = ("stem", "stem+stage1", "stem+stage1+stage2", "stage7+top_conv", "top_conv")
STRATEGIES = {f"blocks[names={n},head=frozen]" for n in BLOCK_SETS} | {"full",
                                                                       "feature_extraction"}


def test_the_surgical_grid():
    g = grid.load("surgical")
    assert len(g.specs) == 84 == len({s.hash for s in g.specs})
    assert {s.framework for s in g.specs} == {"torch", "keras"}
    assert {s.seed for s in g.specs} == {0, 1, 2}
    assert {s.strategy_label for s in g.specs} == STRATEGIES
    assert {s.dataset for s in g.specs} == {"mnist5k_c", "mnist5k_perm"}
    assert {(s.backbone, s.image_size) for s in g.specs} == {("mobilenet_v2", 32)}
    # the source's head, as in the paper: the permutation is a shift the head must undo
    assert {s.head_init for s in g.specs} == {"source"}
    assert {s.params["head"] for s in g.specs if s.strategy == "blocks"} == {"frozen"}
    # sets from the input side (the stem, then one and two more blocks) and from the output
    # side (the last block, the last two) of the backbone the cells use
    blocks = bb.get("mobilenet_v2").blocks
    assert {s.params["names"] for s in g.specs if s.strategy == "blocks"} == set(BLOCK_SETS)
    assert ("+".join(blocks[:3]), "+".join(blocks[-2:])) == (BLOCK_SETS[2], BLOCK_SETS[3])
    assert g.cards["mnist5k_c"]["corruption"]["noise_std"] > 0
    assert g.cards["mnist5k_perm"]["label_permutation"] == 0
    # the source: clean MNIST-5k, pretrained once per framework and seed, shared by the
    # two targets and every strategy
    pspecs = {pretrained.pretrain_spec(s) for s in g.specs}
    assert {p.dataset for p in pspecs} == {"mnist5k"}
    assert "corruption" not in g.cards["mnist5k"] and "label_permutation" not in \
        g.cards["mnist5k"]
    assert len({p.hash for p in pspecs}) == 6
    assert {(p.framework, p.seed) for p in pspecs} == {
        (fw, s) for fw in ("torch", "keras") for s in (0, 1, 2)}


def test_the_surgical_grid_dry_run():
    out = subprocess.run([sys.executable, "-m", "bench", "run", "surgical", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "84 cells" in out.stdout
    for fw in ("torch", "keras"):
        for s in STRATEGIES:
            for seed in (0, 1, 2):
                assert f"{fw}/mobilenet_v2/{s}/mnist5k_c[n=500]/seed{seed}" in out.stdout


def test_the_surgical_source_grid_is_the_surgical_input_shift_from_a_stronger_source():
    strong, base = grid.load("surgical_source"), grid.load("surgical")
    assert len(strong.specs) == 12 and {s.framework for s in strong.specs} == {"torch"}
    assert {s.dataset for s in strong.specs} == {"mnist5k_c"}
    # the same cells as the surgical grid's but for the source: its pretraining is longer
    same = {"weights", "card_digests"}
    by_config = {dataclasses.replace(s, **{f: "" for f in same}): s for s in base.specs}
    for s in strong.specs:
        twin = by_config[dataclasses.replace(s, **{f: "" for f in same})]
        p, q = pretrained.pretrain_spec(s), pretrained.pretrain_spec(twin)
        assert (p.epochs, q.epochs) == (20, 6)
        assert dataclasses.replace(p, epochs=6) == q  # nothing else about the source differs
