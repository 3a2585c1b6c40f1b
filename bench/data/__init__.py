"""Datasets as framework-free arrays or file lists, plus one split manifest per dataset,
subset and seed. Cards live in datasets/*.toml (or a grid's [datasets.<name>] tables)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data.cards import CardError, check_card, shipped_cards
from bench.data.sources import DatasetError, DataSource, load, scan_image_folder
from bench.data.split import manifest

__all__ = ["CardError", "DataSource", "DatasetError", "Prepared", "check_card", "prepare",
           "scan_image_folder", "shipped_cards"]


@dataclass
class Prepared:
    source: DataSource
    split: dict[str, np.ndarray]

    def part(self, name: str) -> tuple[np.ndarray | list[str], np.ndarray]:
        """(images or files, labels) of one split part."""
        idx = self.split[name]
        labels = self.source.labels[idx]
        if self.source.images is not None:
            return self.source.images[idx], labels
        return [self.source.files[i] for i in idx], labels


def prepare(card: dict, seed: int, subset: int) -> Prepared:
    src = load(card)
    m = manifest(card["name"], src.labels, seed, subset, card["split"], src.official_test)
    return Prepared(src, {k: np.asarray(v, dtype=np.int64) for k, v in m.items()})
