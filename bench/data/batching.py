"""Batching, decoding and memory rules both backends share, framework-free (numpy and PIL
only; PIL is imported when a file is decoded).

The backends build their loaders with the framework's own tools (torch tensors and
DataLoader, tf.data); what an epoch contains, how a file becomes pixels and how a synthetic
batch is made of cached inputs is decided here, once.
"""

from __future__ import annotations

import resource

import numpy as np


def used_items(n: int, batch_size: int, shuffle: bool) -> int:
    """The items an epoch uses out of `n`. A last training batch of one image cannot train
    BatchNorm (PyTorch refuses it): a shuffled part leaves it out of the epoch, a different
    image each time; an unshuffled part (evaluation) uses every item."""
    return n - (shuffle and n % batch_size == 1)


def num_batches(used: int, batch_size: int) -> int:
    """Batches in an epoch of `used` items (the last one may be short)."""
    return -(-used // batch_size)


def batch_items(i: int, used: int, batch_size: int) -> int:
    """The number of items in batch `i` of an epoch of `used` items (the last may be short)."""
    return min(batch_size, used - i * batch_size)


def load_file(path: str, size: int) -> np.ndarray:
    """One image file -> (size,size,3) uint8: PIL decode, RGB, bilinear resize, no crop (the
    seeds' flow_from_directory(target_size=...) resizes without cropping)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size, size), Image.BILINEAR))


def tile_indices(n: int, batch_size: int) -> np.ndarray:
    """Row indices that fill one batch from `n` cached inputs: the first `batch_size` rows,
    cycled from the start when there are fewer (a train part smaller than a batch)."""
    return np.arange(batch_size) % n


def host_peak_memory_mb() -> float:
    """The process's peak resident set in MiB (Linux reports KiB): host memory on a CPU run."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
