"""The Keras data adapter: split parts -> tf.data pipelines of uint8 image batches.

The same split parts as PyTorch (bench.data.prepare: one manifest), the same pixels where
possible: arrays are resized once with bilinear antialiasing (tf.image.resize, as torch's
F.interpolate(antialias=True)) and kept in host memory when they fit, else resized per batch;
files are decoded and resized with PIL exactly as the PyTorch side does (no crop), and the rows
of a decoded cache (bench/data/decoded.py: those files decoded once) are kept in host memory
when they fit, else read from the memmap per batch, already at size. Grey images
get three channels. Augmentation ('flip', 'flip_crop') has the PyTorch side's meaning and runs
per batch on uint8; the per-backbone preprocessing lives in the model (its `preprocess` layer),
so batches stay uint8 until they reach the device, as on the PyTorch side.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from bench.data import batching
from bench.data.decoded import DecodedImages

IN_MEMORY_BYTES = 1 << 30  # resized uint8 arrays up to 1 GiB are resized once and kept
_RESIZE_CHUNK = 2048


def resize_uint8(images, size: int) -> tf.Tensor:
    """(N,H,W,C) uint8, C in {1,3} -> (N,size,size,3) uint8, bilinear with antialiasing."""
    x = tf.convert_to_tensor(images)
    if x.shape[-1] == 1:
        x = tf.repeat(x, 3, axis=-1)
    if tuple(x.shape[1:3]) == (size, size):
        return x
    x = tf.image.resize(tf.cast(x, tf.float32), (size, size), method="bilinear",
                        antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def to_hwc_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """resize_uint8 over a whole array, in chunks (bounded float32 memory)."""
    chunks = [resize_uint8(images[i:i + _RESIZE_CHUNK], size).numpy()
              for i in range(0, len(images), _RESIZE_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)


# Augmentation draws from stateless random ops with a seed per batch, taken from a seeded
# stream that moves on every epoch (Dataset.random, rerandomize_each_iteration): the same
# cell gives the same augmented batches in every run, whatever the parallelism of the map.
def _seed(seed) -> tf.Tensor:
    return tf.constant([0, 0], tf.int64) if seed is None else tf.cast(seed, tf.int64)


def random_flip(x: tf.Tensor, seed=None) -> tf.Tensor:
    """Each image flipped left-right with probability 0.5; `seed`: a stateless seed pair."""
    flip = tf.cast(tf.random.stateless_uniform([tf.shape(x)[0]], _seed(seed)) < 0.5, tf.int32)
    # the flipped images apart, reversed, and stitched back in place: 3.6x the images/s of a
    # tf.where over the batch (which computes both sides) on one CPU core, same pixels
    parts = tf.dynamic_partition(x, flip, 2)
    where = tf.dynamic_partition(tf.range(tf.shape(x)[0]), flip, 2)
    return tf.dynamic_stitch(where, [parts[0], tf.reverse(parts[1], axis=[2])])


def random_translate(x: tf.Tensor, pad: int, seed=None) -> tf.Tensor:
    """Pad by `pad` (reflect) and crop back at a random offset per image (CIFAR-style)."""
    n, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    sy, sx = tf.unstack(tf.random.experimental.stateless_split(_seed(seed), 2))
    dy = tf.random.stateless_uniform([n], sy, 0, 2 * pad + 1, dtype=tf.int32)
    dx = tf.random.stateless_uniform([n], sx, 0, 2 * pad + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None, :]  # n,h
    cols = dx[:, None] + tf.range(w)[None, :]  # n,w
    out = tf.gather(padded, rows, axis=1, batch_dims=1)  # n,h,w+2p,c
    return tf.gather(out, cols, axis=2, batch_dims=1)  # n,h,w,c


def augment(x: tf.Tensor, augmentation: str, size: int, seed) -> tf.Tensor:
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if augmentation in ("flip", "flip_crop"):
        x = random_flip(x, flip_seed)
    if augmentation == "flip_crop":
        x = random_translate(x, max(1, size // 8), crop_seed)
    return x


class Batches:
    """A tf.data pipeline of (uint8 (n,size,size,3), int32 labels) batches for one split part,
    prefetched. Iterating it again reshuffles (seeded) when `shuffle`. `parallel`: the
    parallel calls of its map steps (tf.data.AUTOTUNE by default)."""

    def __init__(self, items, labels: np.ndarray, size: int, batch_size: int, shuffle: bool,
                 seed: int, augmentation: str = "none", parallel: int = tf.data.AUTOTUNE):
        self.n = len(labels)
        self.used = batching.used_items(self.n, batch_size, shuffle)
        self.batch_size = batch_size
        self.size = size
        self.parallel = parallel
        self.labels = np.asarray(labels, dtype=np.int32)
        if isinstance(items, DecodedImages):  # already at `size`: nothing to resize
            self.resident = self.n * 3 * size * size <= IN_MEMORY_BYTES
            self.items = items.read() if self.resident else items
            self.data_path = "decoded-resident" if self.resident else "decoded-per-batch"
        elif isinstance(items, np.ndarray):
            self.resident = self.n * 3 * size * size <= IN_MEMORY_BYTES
            self.items = to_hwc_uint8(items, size) if self.resident else items
            self.data_path = "resident" if self.resident else "arrays-resized-per-batch"
        else:
            self.resident = False
            self.items = list(items)
            self.data_path = "files"
        # one index dataset: the cached view (with_inputs) draws the same seeded orders
        self.order = self._order(shuffle, seed)
        ds = self._images(self.order)
        if augmentation != "none":
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda xy, s: (augment(xy[0], augmentation, size, s), xy[1]),
                num_parallel_calls=parallel)
        self.dataset = ds.prefetch(tf.data.AUTOTUNE)

    def _order(self, shuffle: bool, seed: int) -> tf.data.Dataset:
        ds = tf.data.Dataset.range(self.n)
        if shuffle:  # a full buffer: a uniform permutation, a new one per iteration
            ds = ds.shuffle(self.n, seed=seed, reshuffle_each_iteration=True)
        return ds.take(self.used)

    def _images(self, order: tf.data.Dataset) -> tf.data.Dataset:
        """Batches of the items `order` lists."""
        if isinstance(self.items, np.ndarray):
            with tf.device("/cpu:0"):
                x, y = tf.constant(self.items), tf.constant(self.labels)
            ds = order.batch(self.batch_size).map(lambda idx: (tf.gather(x, idx),
                                                               tf.gather(y, idx)))
            if not self.resident:
                ds = ds.map(lambda x, y: (resize_uint8(x, self.size), y),
                            num_parallel_calls=self.parallel)
            return ds
        size = self.size
        if isinstance(self.items, DecodedImages):
            rows, y = self.items, tf.constant(self.labels)

            def gather(idx):
                img = tf.numpy_function(rows.gather, [idx], tf.uint8, stateful=False)
                img.set_shape((None, size, size, 3))
                return img, tf.gather(y, idx)

            return order.batch(self.batch_size).map(gather, num_parallel_calls=self.parallel)
        paths, y = tf.constant(self.items), tf.constant(self.labels)

        def load(i):
            img = tf.numpy_function(lambda p: batching.load_file(p.decode(), size), [paths[i]],
                                    tf.uint8, stateful=False)
            img.set_shape((size, size, 3))
            return img, y[i]

        return order.map(load, num_parallel_calls=self.parallel).batch(self.batch_size)

    def ordered(self) -> tf.data.Dataset:
        """Every item once, in index order, unaugmented (what a feature cache is made of)."""
        return self._images(tf.data.Dataset.range(self.n)).prefetch(tf.data.AUTOTUNE)

    def with_inputs(self, inputs: np.ndarray) -> tf.data.Dataset:
        """This part's batches in the same seeded orders, each item replaced by `inputs[i]`
        (its cached features)."""
        with tf.device("/cpu:0"):
            x, y = tf.constant(inputs), tf.constant(self.labels)
        return (self.order.batch(self.batch_size)
                .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
                .prefetch(tf.data.AUTOTUNE))

    def __len__(self) -> int:
        return batching.num_batches(self.used, self.batch_size)

    def batch_items(self, i: int) -> int:
        """The number of images in batch `i` (the last one may be short)."""
        return batching.batch_items(i, self.used, self.batch_size)

    def __iter__(self):
        return iter(self.dataset)


class CachedBatches:
    """The batches of `base` (same items, same seeded orders) with each image replaced by
    its cached input to `model` (the layers above the cut)."""

    def __init__(self, base: Batches, inputs: np.ndarray, model):
        self.base, self.inputs, self.model = base, inputs, model
        self.dataset = base.with_inputs(inputs)
        self.batch_items = base.batch_items
        self.batch_size = base.batch_size

    def __len__(self) -> int:
        return len(self.base)
