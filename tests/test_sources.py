"""torchvision's datasets read without torch: a tiny fake cache in torchvision's own file
layout (real pickles, .mat files and JPEGs) gives the labels, class names and official test
split torchvision gives; no torch module is imported to read it, and a Keras cell runs on
every source with torch blocked. Plus the VTAB-1k split (train_size / val_size)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import tracking
from bench.data import CardError, DatasetError, check_card, prepare, shipped_cards, sources
from bench.data.split import make_split
from bench.paths import ROOT

CLASSES = 3
PETS = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("american_pit_bull_terrier", 3, 2)]
PET_NAMES = ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
FLOWER_SETS = {"trnid": 6, "valid": 3, "tstid": 3}  # images a class in each official split

BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, _Block())
"""


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(path)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def write_fake_cache(cache: Path) -> dict:
    """The four sources under cache/torchvision in torchvision's layout; returns what each
    must read back: labels, official test mask (and CIFAR's pixels)."""
    from scipy.io import savemat

    root = cache / "torchvision"
    rng = np.random.default_rng(0)
    expect = {}

    # CIFAR-10: five train batches and a test batch of rows (3072 bytes: R, G, B planes)
    names10 = ["airplane", "automobile", "bird"]
    data, labels, test = [], [], []
    for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        y = [(i + j) % CLASSES for j in range(4)]
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        _pickle(root / "cifar-10-batches-py" / f, {"batch_label": f, "labels": y, "data": x,
                                                   "filenames": [f"{j}.png" for j in range(4)]})
        data.append(x)
        labels += y
        test += [f == "test_batch"] * 4
    _pickle(root / "cifar-10-batches-py" / "batches.meta",
            {"label_names": names10, "num_cases_per_batch": 4, "num_vis": 3072})
    expect["cifar10"] = (labels, test, names10,
                         np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

    # CIFAR-100: one train and one test pickle, fine and coarse labels
    names100 = ["apple", "aquarium_fish", "baby"]
    xs, ys = {}, {}
    for f, n in (("train", 18), ("test", 6)):
        ys[f] = [j % CLASSES for j in range(n)]
        xs[f] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _pickle(root / "cifar-100-python" / f, {"fine_labels": ys[f], "coarse_labels": [4] * n,
                                                "data": xs[f]})
    _pickle(root / "cifar-100-python" / "meta", {"fine_label_names": names100,
                                                 "coarse_label_names": ["fruit"] * 20})
    expect["cifar100"] = (ys["train"] + ys["test"], [False] * 18 + [True] * 6, names100,
                          np.concatenate([xs["train"], xs["test"]]).reshape(-1, 3, 32, 32)
                          .transpose(0, 2, 3, 1))

    # Flowers-102: jpg/image_%05d.jpg, imagelabels.mat (1-based), setid.mat (1-based ids)
    flowers = root / "flowers-102"
    n = CLASSES * sum(FLOWER_SETS.values())
    image_labels = np.arange(n) % CLASSES + 1
    ids = rng.permutation(np.arange(1, n + 1))  # each split's ids in no particular order
    sets, at = {}, 0
    for key, per_class in FLOWER_SETS.items():
        sets[key] = ids[at:at + per_class * CLASSES]
        at += per_class * CLASSES
    for i in range(1, n + 1):
        _jpeg(flowers / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(flowers / "imagelabels.mat", {"labels": image_labels[None, :]})
    savemat(flowers / "setid.mat", {k: v[None, :] for k, v in sets.items()})
    order = np.concatenate([sets["trnid"], sets["valid"], sets["tstid"]])
    n_test = len(sets["tstid"])
    expect["flowers102"] = ((image_labels[order - 1] - 1).tolist(),
                            [False] * (len(order) - n_test) + [True] * n_test,
                            sources.FLOWERS102_CLASSES,
                            [str(flowers / "jpg" / f"image_{i:05d}.jpg") for i in order])

    # Oxford-IIIT Pet: images/<breed>_<n>.jpg, annotations/{trainval,test}.txt
    pets = root / "oxford-iiit-pet"
    lines = {"trainval": [], "test": []}  # no header: those are in list.txt only
    labels, test, files = [], [], []
    for split, count in (("trainval", 6), ("test", 3)):
        for j in range(count):
            for breed, cid, species in PETS:
                image_id = f"{breed}_{100 * (split == 'test') + j + 1}"
                _jpeg(pets / "images" / f"{image_id}.jpg", hash(image_id) % 1000)
                lines[split].append(f"{image_id} {cid} {species} {j + 1}")
                labels.append(cid - 1)
                test.append(split == "test")
                files.append(str(pets / "images" / f"{image_id}.jpg"))
    (pets / "annotations").mkdir(parents=True)
    for split, ls in lines.items():
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    expect["oxford_pet"] = (labels, test, PET_NAMES, files)
    return expect


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tlbench-cache")
    expect = write_fake_cache(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLBENCH_CACHE", str(cache))
        yield cache, expect


def _card(name: str) -> dict:
    return check_card({**shipped_cards()[name], "name": name}, name)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "flowers102", "oxford_pet"])
def test_sources_read_the_official_layout(fake, name):
    _, expect = fake
    labels, test, classes, data = expect[name]
    src = sources.load(_card(name))
    np.testing.assert_array_equal(src.labels, labels)
    np.testing.assert_array_equal(src.official_test, test)
    assert src.class_names == list(classes)
    if name.startswith("cifar"):
        assert src.images.dtype == np.uint8 and src.images.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(src.images, data)
    else:
        assert src.files == data
    prep = prepare(_card(name), seed=0, subset=0)
    np.testing.assert_array_equal(np.flatnonzero(src.official_test), prep.split["test"])


def test_same_as_torchvision(fake, monkeypatch):
    """torchvision's own classes on the same files (its md5 checks patched out: the files
    are fakes) give the same labels, class names, files and official splits."""
    tvd = pytest.importorskip("torchvision.datasets")
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.flowers102 as tv_flowers

    for mod in (tv_cifar, tv_flowers):
        monkeypatch.setattr(mod, "check_integrity", lambda *a, **k: True)
    root = str(fake[0] / "torchvision")
    for name, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        parts = [cls(root, train=t) for t in (True, False)]
        src = sources.load(_card(name))
        np.testing.assert_array_equal(src.images, np.concatenate([p.data for p in parts]))
        np.testing.assert_array_equal(src.labels, sum((p.targets for p in parts), []))
        np.testing.assert_array_equal(src.official_test,
                                      [False] * len(parts[0]) + [True] * len(parts[1]))
        assert src.class_names == parts[0].classes
    for name, cls, splits, attr in (
            ("flowers102", tvd.Flowers102, ["train", "val", "test"], "_image_files"),
            ("oxford_pet", tvd.OxfordIIITPet, ["trainval", "test"], "_images")):
        parts = [cls(root, split=s) for s in splits]
        src = sources.load(_card(name))
        assert src.files == [str(f) for p in parts for f in getattr(p, attr)]
        np.testing.assert_array_equal(src.labels, sum((list(p._labels) for p in parts), []))
        np.testing.assert_array_equal(src.official_test, sum(
            ([s == "test"] * len(p) for s, p in zip(splits, parts, strict=True)), []))
        assert src.class_names[:len(parts[-1].classes)] == parts[-1].classes


def test_reading_imports_no_torch(fake):
    """With the files present, reading every source imports no torch module; with an empty
    cache and torchvision missing, the error names each file and where it goes."""
    code = BLOCK + textwrap.dedent("""
        import os, sys
        from bench.data import DatasetError, check_card, prepare, shipped_cards
        for name in ("cifar10", "cifar100", "flowers102", "oxford_pet", "flowers102_vtab1k"):
            card = check_card(shipped_cards()[name], name)
            prep = prepare(card, seed=0, subset=12)
            assert len(prep.split["train"]) + len(prep.split["val"]) == 12, name
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))
        assert not loaded, loaded
        os.environ["TLBENCH_CACHE"] = sys.argv[1]
        try:
            prepare(check_card(shipped_cards()["cifar10"], "cifar10"), seed=0, subset=0)
        except DatasetError as e:
            print(e)
        else:
            raise SystemExit("no DatasetError")
    """)
    empty = fake[0].parent / "empty-cache"
    out = subprocess.run([sys.executable, "-c", code, str(empty)], cwd=ROOT, text=True,
                         capture_output=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    root = str(empty / "torchvision")
    assert "dataset 'cifar10'" in msg and f"missing under {root}" in msg
    assert "cifar-10-batches-py/data_batch_1" in msg and "cifar-10-batches-py/test_batch" in msg
    assert "torchvision, which downloads them, is not installed" in msg and "Offline" in msg


@pytest.mark.parametrize("name, files", [
    ("cifar100", ["cifar-100-python/train", "cifar-100-python/meta"]),
    ("flowers102", ["flowers-102/jpg", "flowers-102/setid.mat"]),
    ("oxford_pet", ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations/test.txt"])])
def test_empty_cache_offline_names_the_files(name, files, tmp_path, monkeypatch):
    """torchvision present but no internet (every proxy a closed port): the download fails
    and the error says which files to put where."""
    pytest.importorskip("torchvision")
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        sources.load(_card(name))
    msg = str(err.value)
    assert f"missing under {tmp_path / 'torchvision'}" in msg and "could not download" in msg
    for f in files:
        assert f in msg


def test_missing_image_is_named(fake, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pets = cache / "torchvision" / "oxford-iiit-pet"
    (pets / "images").mkdir(parents=True)
    (pets / "annotations").mkdir()
    (pets / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\n")
    (pets / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\n")
    monkeypatch.setenv("TLBENCH_CACHE", str(cache))
    with pytest.raises(DatasetError, match="Abyssinian_1.jpg"):
        sources.load(_card("oxford_pet"))


# ---- a Keras cell on every source, torch blocked in every process ---------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_cells_never_import_torch(fake, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK)  # read by every Python process started
    grid = tmp_path / "g.toml"
    grid.write_text(textwrap.dedent("""
        name = "sources"
        [axes]
        framework = ["keras"]
        backbone = ["mobilenet_v3_small"]
        weights = ["none"]
        strategy = ["feature_extraction"]
        dataset = ["cifar10", "cifar100", "flowers102", "oxford_pet"]
        seed = [0]
        [defaults]
        image_size = 32
        batch_size = 8
        epochs = 1
        subset = 12
        precision = "fp32"
        [run]
        device = "cpu"
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "TLBENCH_CACHE": str(fake[0])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    done = subprocess.run([sys.executable, "-m", "bench", "run", str(grid)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        runs = tracking.cell_runs(tracking.experiment_id("sources", create=False))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert {r.info.status for r in runs} == {"FINISHED"}, done.stderr[-4000:]
    assert sorted(r.data.params["dataset"] for r in runs) == [
        "cifar10", "cifar100", "flowers102", "oxford_pet"]


# ---- the VTAB-1k protocol: train_size / val_size ------------------------------------------------
VTAB = {"test": "official", "train_size": 800, "val_size": 200}


def _labels(pool: int, test: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.arange(pool) % k, np.arange(test) % k]
    return labels, np.r_[np.zeros(pool, bool), np.ones(test, bool)]


@pytest.mark.parametrize("pool, test, k", [(2040, 6149, 102), (3680, 3669, 37),
                                           (50000, 10000, 100), (1000, 50, 10)])
def test_vtab1k_draws_800_and_200_and_keeps_the_test_split(pool, test, k):
    labels, official = _labels(pool, test, k)
    m = make_split(labels, 0, 0, check_card({"source": "sklearn_digits", "split": VTAB},
                                            "x")["split"], official)
    train, val, tst = (np.asarray(m[p]) for p in ("train", "val", "test"))
    assert len(train) == 800 and len(val) == 200
    np.testing.assert_array_equal(tst, np.flatnonzero(official))
    assert not official[train].any() and not official[val].any()
    assert not set(train) & set(val)
    counts = np.bincount(labels[train], minlength=k)  # stratified: shares differ by <= 1
    assert counts.max() - counts.min() <= 1
    other = make_split(labels, 1, 0, VTAB, official)
    assert other["train"] != m["train"] and make_split(labels, 0, 0, VTAB, official) == m


def test_vtab1k_subset_scales_both_down():
    labels, official = _labels(2040, 100, 102)
    m = make_split(labels, 0, 120, VTAB, official)
    assert (len(m["train"]), len(m["val"])) == (96, 24)


def test_vtab1k_refuses_a_too_small_source():
    labels, official = _labels(999, 100, 10)
    with pytest.raises(DatasetError, match=r"train_size \+ split.val_size = 800 \+ 200 = 1000"
                                           r".*only 999 images outside its test split"):
        make_split(labels, 0, 0, VTAB, official)


@pytest.mark.parametrize("split, expected", [
    ({"train_sise": 800, "val_size": 200}, r"unknown key\(s\) \['train_sise'\].*train_size"),
    ({"train_size": 800}, "x.split.train_size: train_size and val_size go together"),
    ({"train_size": 800, "val_size": 200, "val_fraction": 0.2},
     "x.split.val_fraction: not with train_size and val_size"),
    ({"train_size": "800", "val_size": 200}, "x.split.train_size = '800': must be an integer"),
    ({"train_size": 800, "val_size": -1}, r"x.split.val_size = -1: must be an integer >= 0"),
])
def test_vtab1k_bad_keys_are_named(split, expected):
    with pytest.raises(CardError, match=expected):
        check_card({"source": "sklearn_digits", "split": split}, "x")


def test_old_cards_keep_their_split_and_manifest_keys():
    """The new keys appear only in cards that use them: existing manifests keep their keys."""
    for name in ("cifar10", "flowers102", "oxford_pet", "digits"):
        assert not {"train_size", "val_size"} & set(_card(name)["split"])
    assert _card("cifar100_vtab1k")["split"] == VTAB
