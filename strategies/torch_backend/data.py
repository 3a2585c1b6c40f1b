"""The PyTorch data adapter: split parts -> uint8 batches on the device -> normalised floats.

Small array datasets, and the rows of a decoded cache (bench/data/decoded.py: files decoded
once), are resized once and kept on the device as uint8 (no DataLoader, no per-epoch
decoding); file lists, decoded rows and arrays too big for that go through a DataLoader with
workers and pinned memory (decoded rows: read from the memmap, already at size).
Normalisation and augmentation run on the device, per batch, the same for every path.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench.data import batching
from bench.data.decoded import DecodedImages

IN_MEMORY_BYTES = 1 << 30  # resized uint8 tensors up to 1 GiB stay resident on the device


def to_chw_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """(N,H,W,C) uint8, C in {1,3} -> (N,3,size,size) uint8, bilinear with antialiasing."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        out = []
        for chunk in x.split(2048):
            out.append(F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                                     antialias=True, align_corners=False)
                       .round_().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


class _ItemDataset(Dataset):
    """Items decoded and resized one at a time (files, or arrays too large to pre-resize)."""

    def __init__(self, items, labels: np.ndarray, size: int):
        self.items, self.labels, self.size = items, labels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, str):
            arr = batching.load_file(item, self.size)
            x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        else:
            x = to_chw_uint8(item[None], self.size)[0]
        return x, int(self.labels[i])


class _EpochOrder(torch.utils.data.Sampler):
    """The DataLoader's sampler: each epoch, the Batches' order()."""

    def __init__(self, batches: Batches):
        self.batches = batches

    def __len__(self) -> int:
        return self.batches.used

    def __iter__(self):
        return iter(self.batches.order().tolist())


class Batches:
    """Batches of (uint8 images on the device, labels on the device) for one split part."""

    def __init__(self, items, labels: np.ndarray, size: int, batch_size: int,
                 device: torch.device, shuffle: bool, seed: int, workers: int | None = None):
        self.n = len(labels)
        self.used = batching.used_items(self.n, batch_size, shuffle)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        decoded = isinstance(items, DecodedImages)  # rows of a decoded cache, at `size`
        arrays = decoded or isinstance(items, np.ndarray)
        resident = arrays and self.n * 3 * size * size <= IN_MEMORY_BYTES
        if decoded:
            self.data_path = "decoded-resident" if resident else "decoded-per-batch"
        elif arrays:
            self.data_path = "resident" if resident else "arrays-resized-per-batch"
        else:
            self.data_path = "files"
        self.loader = None
        if resident:
            self.x = to_chw_uint8(items.read() if decoded else items, size).to(device)
            self.y = self.labels.to(device)
        else:
            if workers is None:
                workers = min(8, max(0, (os.cpu_count() or 1) - 1))
            # the sampler draws this epoch's order() (the resident path's, so the same part
            # sees the same batches through either path); the loader's own generator only
            # seeds its workers, and leaves the global RNG alone
            self.loader = DataLoader(
                _ItemDataset(items, np.asarray(labels), size), batch_size=batch_size,
                sampler=_EpochOrder(self), generator=torch.Generator().manual_seed(seed),
                num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)

    @property
    def resident(self) -> bool:
        return self.loader is None

    def __len__(self) -> int:
        return batching.num_batches(self.used, self.batch_size)

    def order(self) -> torch.Tensor:
        """This epoch's item order: a seeded permutation drawn from this part's generator
        (the DataLoader's sampler draws it too), so a cached view of the same items
        (CachedBatches) sees the same batches in the same order."""
        return (torch.randperm(self.n, generator=self.gen)[:self.used] if self.shuffle
                else torch.arange(self.n))

    def __iter__(self):
        if self.loader is not None:
            for x, y in self.loader:
                yield (x.to(self.device, non_blocking=True),
                       y.to(self.device, non_blocking=True))
            return
        order = self.order().to(self.device)
        for i in range(0, self.used, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def ordered(self):
        """Every item once, in index order, without drawing from the shuffling generator."""
        if self.loader is None:
            for i in range(0, self.n, self.batch_size):
                yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
            return
        loader = DataLoader(self.loader.dataset, batch_size=self.batch_size, shuffle=False,
                            num_workers=self.loader.num_workers,
                            pin_memory=self.loader.pin_memory, generator=torch.Generator())
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class CachedBatches:
    """The batches of `base` (same items, same seeded order, epoch by epoch) with each image
    replaced by a cached, already preprocessed input (features of the frozen part), and the
    module that takes those inputs (`forward`: the head, or the model above the cut)."""

    preprocessed = True

    def __init__(self, base: Batches, inputs: torch.Tensor, forward):
        self.base, self.inputs, self.forward = base, inputs, forward
        self.y = base.labels.to(inputs.device)
        self.batch_size = base.batch_size

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        order = self.base.order().to(self.inputs.device)
        for i in range(0, self.base.used, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.inputs[idx], self.y[idx]


class Preprocess:
    """uint8 (N,3,H,W) -> float normalised with the weights' mean/std, plus augmentation,
    drawn from its own generator seeded with the cell's seed (so the augmentation of a batch
    does not depend on what else drew random numbers before it)."""

    def __init__(self, mean, std, device: torch.device, augmentation: str = "none",
                 channels_last: bool = False, seed: int = 0):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.augmentation = augmentation
        self.channels_last = channels_last
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.augmentation in ("flip", "flip_crop"):
            flip = torch.rand(x.shape[0], device=x.device, generator=self.gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if train and self.augmentation == "flip_crop":
            x = random_translate(x, max(1, x.shape[-1] // 8), self.gen)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def random_translate(x: torch.Tensor, pad: int,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """Pad by `pad` (reflect) and crop back at a random offset per image (CIFAR-style)."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # n,h
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # n,w
    idx_b = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_b, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()
