"""Dataset cards: one TOML file per dataset in datasets/, or a [datasets.<name>] table in a
grid file. A card names its source, and the split rule used by the split manifest.

    source = "image_folder"        # see bench/data/sources.py for every source kind
    root = "~/data/pets"           # image_folder only: root/<class>/<image>
    classes = [0, 1, 2, 3, 4]      # optional: a class subset, relabelled 0..k-1
    label_permutation = 0          # optional: a label-level shift: class k becomes perm[k],
                                   # perm a derangement of the k classes seeded by this int
    [corruption]                   # optional: an input-level shift, per source image i:
    noise_std = 60.0               #   x + noise_std * N(0,1) (pixels 0..255; seed, i), clipped
    invert = true                  #   then 255 - x (contrast inversion)
    seed = 0                       #   the noise's seed (default 0)
    [split]
    val_fraction = 0.2             # the seeds' validation_split
    test_fraction = 0.2            # or: test = "official" (the dataset's own test split),
                                   # or test = "val" (none held out: the val part is tested,
                                   # what the seeds report)

The VTAB-1k protocol (Zhai et al. 2019): counts instead of val_fraction, drawn (seeded,
stratified) from what the test split leaves, the test split kept whole:

    [split]
    test = "official"
    train_size = 800
    val_size = 200
"""

from __future__ import annotations

import hashlib
import json
import tomllib

from bench.data.sources import ARRAY_SOURCES, SOURCES
from bench.paths import datasets_dir
from strategies.constraint import Constraint

CARD_KEYS = {"name", "description", "source", "root", "url", "split", "classes",
             "corruption", "label_permutation"}
# the shift options' rules (applied in bench/data/sources.py `load`)
CORRUPTION = {
    "noise_std": Constraint(float, minimum=0, maximum=255,
                            help="the noise's standard deviation in pixel units"),
    "invert": Constraint(bool),
    "seed": Constraint(int, minimum=0),
}
CORRUPTION_KEYS = set(CORRUPTION)
LABEL_PERMUTATION = Constraint(int, minimum=0, help="the seed of the permutation of the "
                                                    "classes; every class moves")
# [split]'s numbers (`test` is "official" or "val": its message explains each)
SPLIT_NUMBERS = {
    "train_size": Constraint(int, minimum=1),
    "val_size": Constraint(int, minimum=0),
    "val_fraction": Constraint(float, minimum=0, maximum=1, open_max=True),
    "test_fraction": Constraint(float, minimum=0, maximum=1, open_max=True),
}
SPLIT_KEYS = {*SPLIT_NUMBERS, "test"}


class CardError(ValueError):
    pass


def shipped_cards() -> dict[str, dict]:
    cards = {}
    for path in sorted(datasets_dir().glob("*.toml")):
        with path.open("rb") as fh:
            card = tomllib.load(fh)
        card.setdefault("name", path.stem)
        cards[card["name"]] = card
    return cards


def check_card(card: dict, where: str) -> dict:
    """Validate a card's keys and values; return it with split defaults filled in."""
    unknown = set(card) - CARD_KEYS
    if unknown:
        raise CardError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: "
                        f"{sorted(CARD_KEYS)}")
    src = card.get("source")
    if src not in SOURCES:
        raise CardError(f"{where}.source = {src!r}: unknown source; allowed: "
                        f"{', '.join(sorted(SOURCES))}")
    if src == "image_folder" and not isinstance(card.get("root"), str):
        raise CardError(f"{where}.root: an image_folder dataset needs root = "
                        f"\"path/to/root\" (laid out root/<class>/<image>)")
    classes = card.get("classes")
    # at least two: a one-class dataset "trains" to accuracy 1.000 and measures nothing
    if classes is not None and (
            not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in classes)
            or len({str(c) for c in classes}) != len(classes)):
        raise CardError(f"{where}.classes = {classes!r}: must be a list of at least two "
                        f"distinct class names (ints allowed: digits are named 0..9)")
    _check_options(card, where)
    split = card.get("split", {})
    if not isinstance(split, dict):
        raise CardError(f"{where}.split = {split!r}: must be a table ([split])")
    split = dict(split)
    unknown = set(split) - SPLIT_KEYS
    if unknown:
        raise CardError(f"{where}.split: unknown key(s) {sorted(unknown)}; allowed: "
                        f"{sorted(SPLIT_KEYS)}")
    sized = [k for k in ("train_size", "val_size") if k in split]
    if sized:  # counts (VTAB-1k: 800 + 200) instead of val_fraction
        if len(sized) == 1:
            raise CardError(f"{where}.split.{sized[0]}: train_size and val_size go together "
                            f"(VTAB-1k: train_size = 800, val_size = 200)")
        if "val_fraction" in split:
            raise CardError(f"{where}.split.val_fraction: not with train_size and val_size; "
                            f"allowed: either val_fraction or train_size + val_size")
    else:
        split.setdefault("val_fraction", 0.2)
    if split.get("test") not in (None, "official", "val"):
        raise CardError(f"{where}.split.test = {split['test']!r}: allowed: \"official\" (the "
                        f"dataset's own test split) or \"val\" (no held-out test: the "
                        f"validation part is tested, as the seeds do)")
    if split.get("test") == "val" and "test_fraction" in split:
        raise CardError(f"{where}.split.test_fraction: not with test = \"val\" (which holds "
                        f"out no test part); allowed: one of them")
    if split.get("test") is None:
        split.setdefault("test_fraction", 0.2)
    for key, rule in SPLIT_NUMBERS.items():
        msg = rule.check(split[key]) if key in split else None
        if msg:
            raise CardError(f"{where}.split.{key} = {split[key]!r}: {msg}")
    if split.get("val_fraction", 0) + split.get("test_fraction", 0) >= 1:
        raise CardError(f"{where}.split: val_fraction + test_fraction must be below 1")
    return {**card, "split": split}


def _check_options(card: dict, where: str) -> None:
    """The shift options (applied in bench/data/sources.py `load`)."""
    if "corruption" in card:
        c = card["corruption"]
        if not isinstance(c, dict):
            raise CardError(f"{where}.corruption = {c!r}: must be a table ([corruption] with "
                            f"noise_std = <pixels>, invert = true|false, seed = <int>)")
        unknown = set(c) - CORRUPTION_KEYS
        if unknown:
            raise CardError(f"{where}.corruption: unknown key(s) {sorted(unknown)}; allowed: "
                            f"{sorted(CORRUPTION_KEYS)}")
        for key, rule in CORRUPTION.items():
            msg = rule.check(c[key]) if key in c else None
            if msg:
                raise CardError(f"{where}.corruption.{key} = {c[key]!r}: {msg}")
        std = c.get("noise_std", 0.0)
        if std == 0 and not c.get("invert", False):
            raise CardError(f"{where}.corruption = {c!r}: corrupts nothing; allowed: "
                            f"noise_std > 0 and/or invert = true")
        if card.get("source") not in ARRAY_SOURCES:
            raise CardError(f"{where}.corruption: source {card.get('source')!r} lists image "
                            f"files; allowed with a source whose images load into memory: "
                            f"{', '.join(ARRAY_SOURCES)}")
    if "label_permutation" in card:
        v = card["label_permutation"]
        msg = LABEL_PERMUTATION.check(v)
        if msg:
            raise CardError(f"{where}.label_permutation = {v!r}: {msg}")


# what in a card does not change the images, labels or split a cell sees
_NOT_DATA = {"name", "description", "url"}


def card_digest(card: dict) -> str:
    """12 hex digits of everything in a checked card that decides the data a cell sees
    (source, root, classes, shift options, split rule): part of a cell's identity
    (RunSpec.card_digests), so editing a card's split or corruption makes new cells instead
    of resuming the old results. Its name, description and download url are left out."""
    kept = {k: v for k, v in card.items() if k not in _NOT_DATA and not k.startswith("_")}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
