"""Decode once: a file dataset's images decoded and resized a single time, kept in one
memory-mapped .npy, so that no epoch, seed or strategy decodes a JPEG again.

The unit is the set of files a cell uses (the union of its train, val and test parts),
sorted: a cell on the whole dataset uses every file whatever its seed, so every seed,
strategy and framework at one image size shares one cache; a subset (smoke) run decodes only
its own few hundred files, once. The cache's key is a checksum of what determines its pixels:
the format version, the image size and each file's path, byte size and mtime (a changed file
is a new key). Rows are exactly `bench.data.batching.load_file(path, size)` (PIL decode, RGB,
bilinear resize, no crop), so the cached and the file path give bit-identical pixels.

On disk, under cache_dir()/decoded/: <key>.npy ((N, size, size, 3) uint8; N*size*size*3
bytes: Flowers-102 at 224 px, 8189 images, is 1.23 GB) and <key>.json (the file list, the
.npy's byte size and a crc32 per row). Made once, under a file lock, by whichever process
gets there first: decoded into a temporary file (a thread pool over the cell's cores: PIL
releases the GIL while it decodes and resizes), renamed into place, then the .json written;
a .npy without its .json is not a cache. On open the byte size must match and the crc32 of
SAMPLE_ROWS rows spread over the array (the first and last included) must match: a truncated
or torn file (a size mismatch) or a damaged sampled row is rebuilt, not used. `verify(full)`
checks every row.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.data import batching
from bench.paths import atomic_write_text, cache_dir, file_lock

FORMAT_VERSION = 1
SAMPLE_ROWS = 64

# The tag `decoded_cache_used`: every value a cell can write starts with one of these forms
# (form_of reads it back); the docs' generated MLflow reference lists them (bench/reference.py).
USED_FORMS = {
    "built": "built in <s> s: <n> images at <size> px, <MiB> MiB",
    "reused": "reused: <n> images at <size> px, <MiB> MiB",
    "not needed": "not needed: the dataset is arrays already, nothing to decode",
    "failed": "failed, files decoded every epoch: <error>",
    "off": "off: decoded_cache = false",
}
NOT_NEEDED = USED_FORMS["not needed"]
OFF = USED_FORMS["off"]


def form_of(note: str) -> str | None:
    """The form (a key of USED_FORMS) a `decoded_cache_used` value is in, or None."""
    for form in USED_FORMS:
        if note == form or note.startswith((form + ":", form + ",", form + " in ")):
            return form
    return None


class DecodedImages:
    """Some rows of a decoded cache, read from the memmap on demand: a split part's images.

    `images[i]` is one (size, size, 3) uint8 image; `images[indices]` another
    DecodedImages (a lazy subset); `gather(indices)` and `read()` copy rows out."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, how: str = ""):
        self.array, self.rows, self.how = array, np.asarray(rows, dtype=np.int64), how

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, i):
        if np.ndim(i) == 0 and not isinstance(i, slice):
            return np.asarray(self.array[self.rows[i]])
        return DecodedImages(self.array, self.rows[i], self.how)

    def gather(self, indices) -> np.ndarray:
        """(len(indices), size, size, 3) uint8: these items' images, in this order."""
        return self.array[self.rows[np.asarray(indices, dtype=np.int64)]]

    def read(self) -> np.ndarray:
        """Every item's image, in item order, in memory."""
        return self.array[self.rows]


def key(files: list[str], size: int) -> str:
    """A checksum of what determines the cache's pixels: the format version, the size and
    each file's path, byte size and mtime (files sorted)."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, size]).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


def _sample_rows(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().astype(np.int64))


def _open(npy: Path, meta_path: Path, files: list[str], size: int, full: bool = False):
    """The cache's memmap if it is there and sound, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("version") != FORMAT_VERSION or meta.get("size") != size
                or meta.get("files") != files or npy.stat().st_size != meta["bytes"]):
            return None
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    if array.shape != (len(files), size, size, 3) or array.dtype != np.uint8:
        return None
    crcs = meta["crc32"]
    rows = range(len(files)) if full else _sample_rows(len(files))
    if any(_crc(array[r]) != crcs[r] for r in rows):
        return None
    return array


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _build(npy: Path, meta_path: Path, files: list[str], size: int) -> None:
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(files), size, size, 3))
    crcs = [0] * len(files)

    def one(i: int, out: np.ndarray = out) -> None:
        out[i] = batching.load_file(files[i], size)
        crcs[i] = _crc(out[i])

    try:
        with ThreadPoolExecutor(_workers()) as pool:
            list(pool.map(one, range(len(files))))
        out.flush()
        del out
        os.replace(tmp, npy)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(meta_path, json.dumps({
        "version": FORMAT_VERSION, "size": size, "bytes": npy.stat().st_size,
        "files": files, "crc32": crcs}))


def open_cache(files: list[str], size: int) -> tuple[np.ndarray, str]:
    """(the (len(files), size, size, 3) uint8 memmap of these sorted files, how it came:
    'reused' or 'built in <s> s'), made first if missing or unsound."""
    k = key(files, size)
    folder = cache_dir() / "decoded"
    npy, meta = folder / f"{size}px-{k}.npy", folder / f"{size}px-{k}.json"
    array = _open(npy, meta, files, size)
    if array is not None:
        return array, "reused"
    with file_lock(folder / f"{size}px-{k}.lock"):
        array = _open(npy, meta, files, size)  # another process may have made it meanwhile
        if array is not None:
            return array, "reused"
        meta.unlink(missing_ok=True)  # a .npy without its .json is not a cache
        for tmp in folder.glob(f".{npy.name}.*.tmp"):  # a killed builder's; we hold the lock
            tmp.unlink(missing_ok=True)
        t0 = time.perf_counter()
        _build(npy, meta, files, size)
        seconds = time.perf_counter() - t0
    array = _open(npy, meta, files, size)
    if array is None:
        raise OSError(f"decoded cache {npy} failed its check right after it was written")
    return array, f"built in {seconds:.1f} s"


def verify(files: list[str], size: int, full: bool = True) -> bool:
    """Whether the cache of these sorted files is there and sound (every row's crc32 when
    `full`, else the sampled rows open_cache checks)."""
    k = key(files, size)
    folder = cache_dir() / "decoded"
    return _open(folder / f"{size}px-{k}.npy", folder / f"{size}px-{k}.json", files, size,
                 full) is not None


def decoded_parts(parts: dict[str, tuple], size: int) -> tuple[dict[str, tuple], str]:
    """Split parts whose items are file paths -> the same parts with DecodedImages items
    (one cache for the union of their files), and a note for the cell's tags. Parts of an
    array dataset, or of one whose cache cannot be written, are returned as they are."""
    if not any(isinstance(items, list) for items, _ in parts.values()):
        return parts, NOT_NEEDED
    files = sorted({f for items, _ in parts.values() if isinstance(items, list) for f in items})
    try:
        array, how = open_cache(files, size)
    except OSError as e:  # a full disk, a read-only cache: the cell still runs, from files
        return parts, f"failed, files decoded every epoch: {e}"
    row = {f: i for i, f in enumerate(files)}
    out = {name: (DecodedImages(array, [row[f] for f in items], how), labels)
           if isinstance(items, list) else (items, labels)
           for name, (items, labels) in parts.items()}
    return out, f"{how}: {len(files)} images at {size} px, {array.nbytes / 2**20:.0f} MiB"
