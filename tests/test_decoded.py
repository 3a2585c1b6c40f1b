"""The decoded cache (bench/data/decoded.py) on a folder of real images: the pixels of
batching.load_file bit for bit, reused without decoding, a damaged file rebuilt, a changed
source a new key, two racing builders one valid file, and cells (both frameworks, each in a
process of its own) that train to the same losses with the cache on and off."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import batching, decoded
from bench.paths import ROOT

SIZE = 32
BACKBONE_KERAS = "vgg16"  # few layers: the quickest to trace


def _write_folder(root: Path, per_class: int = 20) -> Path:
    """Two classes of photos-like images: odd sizes, one grey JPEG, one RGBA PNG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 37 + 7 * i, 53 + 5 * ((i * 3) % 11)
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([np.sin(x / (6 + c * 4) + i) * 60 + 120,
                             np.cos(y / (5 + c * 3)) * 50 + 100 + 40 * c,
                             (x + y) % 64 * 2.0 + 30], -1)
            img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            if i == 0 and c == 0:
                Image.fromarray(img[..., 0], "L").save(root / name / "grey.jpg", quality=90)
            elif i == 1 and c == 1:
                rgba = np.dstack([img, np.full((h, w), 200, np.uint8)])
                Image.fromarray(rgba, "RGBA").save(root / name / "alpha.png")
            else:
                Image.fromarray(img).save(root / name / f"img{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("decoded") / "pets")


@pytest.fixture
def files(folder, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The files the cache decodes (the real load_file, counted)."""
    seen, real = [], batching.load_file

    def counted(path, size):
        seen.append(path)
        return real(path, size)

    monkeypatch.setattr(decoded.batching, "load_file", counted)
    return seen


def test_cache_holds_load_files_pixels_and_is_reused(files, decodes):
    array, how = decoded.open_cache(files, SIZE)
    assert how.startswith("built") and len(decodes) == len(files)
    assert isinstance(array, np.memmap) and array.shape == (len(files), SIZE, SIZE, 3)
    expected = np.stack([batching.load_file(f, SIZE) for f in files])
    assert array.dtype == np.uint8 and np.array_equal(array, expected)
    assert {Image.open(f).mode for f in files} == {"RGB", "L", "RGBA"}

    decodes.clear()
    again, how = decoded.open_cache(files, SIZE)
    assert how == "reused" and decodes == [] and np.array_equal(again, expected)
    assert decoded.verify(files, SIZE, full=True)
    # another size is another cache
    other, how = decoded.open_cache(files, 24)
    assert how.startswith("built") and other.shape[1:] == (24, 24, 3)


def _npy(files) -> Path:
    return decoded.cache_dir() / "decoded" / f"{SIZE}px-{decoded.key(files, SIZE)}.npy"


@pytest.mark.parametrize("damage", ["flipped_row", "truncated", "no_meta"])
def test_damaged_cache_is_rebuilt(files, decodes, damage):
    good, _ = decoded.open_cache(files, SIZE)
    good = np.array(good)
    npy = _npy(files)
    if damage == "flipped_row":  # the last row: a sampled one
        with open(npy, "r+b") as fh:
            fh.seek(-10, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-10, os.SEEK_END)
            fh.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncated":
        os.truncate(npy, npy.stat().st_size - 1000)
    else:  # a build that died between the rename and the .json
        npy.with_suffix(".json").unlink()
    assert not decoded.verify(files, SIZE)
    decodes.clear()
    array, how = decoded.open_cache(files, SIZE)
    assert how.startswith("built") and len(decodes) == len(files)
    assert np.array_equal(array, good) and decoded.verify(files, SIZE)


def test_a_changed_source_file_is_a_new_key(files, decodes):
    decoded.open_cache(files, SIZE)
    k = decoded.key(files, SIZE)
    st = os.stat(files[3])
    try:
        os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert decoded.key(files, SIZE) != k
        decodes.clear()
        _, how = decoded.open_cache(files, SIZE)
        assert how.startswith("built") and len(decodes) == len(files)
    finally:
        os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert decoded.key(files, SIZE) == k


RACER = """
import hashlib, json, sys, time
from bench.data import decoded
files, start = json.loads(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
array, how = decoded.open_cache(files, {size})
print(json.dumps([how, hashlib.sha256(array.tobytes()).hexdigest()]))
"""


def test_two_processes_racing_build_one_valid_file(files):
    start = time.time() + 1.5  # both past their imports, then at the same moment
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(size=SIZE), json.dumps(files),
                               str(start)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(how.split()[0] for how, _ in outs) == ["built", "reused"]
    assert outs[0][1] == outs[1][1]
    expected = np.stack([batching.load_file(f, SIZE) for f in files])
    assert outs[0][1] == hashlib.sha256(expected.tobytes()).hexdigest()
    assert decoded.verify(files, SIZE, full=True)
    folder = decoded.cache_dir() / "decoded"
    assert not list(folder.glob(".*.tmp")) and len(list(folder.glob("*.npy"))) == 1


def test_decoded_rows_of_a_part(files):
    array, _ = decoded.open_cache(files, SIZE)
    parts = {"train": (files[5:], np.zeros(len(files) - 5)), "test": (files[:5], np.ones(5))}
    out, note = decoded.decoded_parts(parts, SIZE)
    assert note.startswith("reused: 40 images at 32 px")
    train = out["train"][0]
    assert isinstance(train, decoded.DecodedImages) and train.shape == (35, SIZE, SIZE, 3)
    assert np.array_equal(train.read(), array[5:]) and np.array_equal(train[2], array[7])
    sub = train[np.array([4, 0])]
    assert np.array_equal(sub.read(), array[[9, 5]]) and np.array_equal(sub.gather([1]),
                                                                        array[[5]])
    arrays = {"train": (np.zeros((3, 8, 8, 3), np.uint8), np.zeros(3))}
    assert decoded.decoded_parts(arrays, SIZE) == (arrays, decoded.NOT_NEEDED)


@pytest.mark.timeout(60)
def test_every_decoded_cache_note_is_in_the_vocabulary(files, monkeypatch):
    """Each value the code writes into `decoded_cache_used` (built, reused, an array dataset,
    a cache that cannot be written, off) is in one form of decoded.USED_FORMS, each form is
    reached, and the docs' MLflow reference lists every form."""
    parts = {"train": (files[5:], np.zeros(len(files) - 5)), "test": (files[:5], np.ones(5))}
    notes = [decoded.decoded_parts(parts, SIZE)[1], decoded.decoded_parts(parts, SIZE)[1]]
    arrays = {"train": (np.zeros((3, 8, 8, 3), np.uint8), np.zeros(3))}
    notes.append(decoded.decoded_parts(arrays, SIZE)[1])

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decoded, "_build", full_disk)
    notes.append(decoded.decoded_parts({"train": (files[:3], np.zeros(3))}, SIZE)[1])
    notes.append(decoded.OFF)  # what the cell loop writes with decoded_cache = false
    forms = [decoded.form_of(n) for n in notes]
    assert forms == ["built", "reused", "not needed", "failed", "off"], notes
    assert decoded.form_of("no files: an array dataset") is None  # the old, unlisted form
    from bench.reference import PAGES

    page = PAGES["reference/mlflow.md"]()  # the docs' generated MLflow reference
    missing = [f for f in decoded.USED_FORMS.values() if f"`{f}`" not in page]
    assert not missing, f"reference/mlflow.md does not list {missing}"


def test_a_cache_that_cannot_be_written_leaves_the_files(files, monkeypatch):
    (Path(decoded.cache_dir()) / "decoded").mkdir(parents=True)
    leftover = _npy(files).with_name(f".{_npy(files).name}.999.tmp")
    leftover.write_bytes(b"a killed builder's")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decoded, "_build", full_disk)
    parts = {"train": (files, np.zeros(len(files)))}
    assert decoded.decoded_parts(parts, SIZE) == (
        parts, "failed, files decoded every epoch: [Errno 28] No space left on device")
    assert not leftover.exists()


CELL = """
import json, os, sys
cpus = sorted(os.sched_getaffinity(0))  # a core each: no thread spins against the other's
os.sched_setaffinity(0, {{cpus[0] if "{fw}" == "torch" else cpus[-1]}})
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np
from helpers import RecordingContext
from bench.data import check_card, decoded, prepare
from bench.config.spec import RunSpec
from strategies import registry
from strategies.{fw}_backend import data, run_cell
card = check_card({{"name": "pets", "source": "image_folder", "root": sys.argv[1]}}, "x")
out = {{}}
for label, opts in [("off", {{"decoded_cache": False}}), ("on", {{}})]:
    spec = RunSpec(framework="{fw}", backbone="{backbone}", dataset="pets", strategy="full",
                   strategy_params=tuple(registry.get("full").with_defaults({{}}).items()),
                   weights="none", image_size=32, batch_size=8, epochs=2,
                   augmentation="flip", workers=0 if "{fw}" == "torch" else 1, **opts)
    ctx = RecordingContext()
    run_cell(spec, card, ctx)
    out[label] = {{"epochs": [m for _, m in ctx.epochs], "tags": ctx.tags,
                  "test": [f["test_loss"] for f in ctx.finals if "test_loss" in f]}}

# the train part's batches, two epochs: files, the cache resident, the cache per batch
files, labels = prepare(card, 0, 0).part("train")
rows = decoded.decoded_parts({{"train": (files, labels)}}, 32)[0]["train"][0]
def epochs(items):
    if "{fw}" == "torch":
        import torch
        b = data.Batches(items, labels, 32, 8, torch.device("cpu"), shuffle=True, seed=0,
                         workers=0)
    else:
        b = data.Batches(items, labels, 32, 8, shuffle=True, seed=0, augmentation="flip",
                         parallel=1)
    return b.data_path, [np.concatenate([np.asarray(x).ravel() for x, _ in b])
                         for _ in range(2)]
paths = {{}}
for name, items, limit in [("files", files, None), ("resident", rows, None),
                           ("per_batch", rows, 0)]:
    if limit is not None:
        data.IN_MEMORY_BYTES = limit
    paths[name], arrays = epochs(items)
    if name == "files":
        first = arrays
    else:
        assert all(np.array_equal(a, b) for a, b in zip(first, arrays)), name
assert not np.array_equal(*first)  # reshuffled
out["paths"] = paths
print(json.dumps(out))
"""


def test_cells_train_the_same_with_the_cache_on_and_off(folder, tmp_path):
    """Both frameworks at once, each in its own process: the file path and the decoded
    cache give the same losses epoch by epoch, and the same batches (flipped, in Keras)
    whether the cache is resident or read per batch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "TLBENCH_CACHE": str(tmp_path / "cache"), "TLBENCH_FORKSERVER": "0"}
    procs = {fw: subprocess.Popen(
        [sys.executable, "-c", CELL.format(fw=fw, backbone=bb), str(folder)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for fw, bb in (("torch", "resnet18"), ("keras", BACKBONE_KERAS))}
    notes = []
    for fw, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{fw}: {stderr[-3000:]}"
        runs = json.loads(stdout.strip().splitlines()[-1])
        off, on = runs["off"], runs["on"]
        assert runs["paths"] == {"files": "files", "resident": "decoded-resident",
                                 "per_batch": "decoded-per-batch"}
        assert off["tags"]["decoded_cache_used"] == "off: decoded_cache = false"
        assert on["tags"]["decoded_cache_used"].endswith(": 40 images at 32 px, 0 MiB")
        notes.append(on["tags"]["decoded_cache_used"].split(":")[0].split()[0])
        assert (off["tags"]["data_path"], on["tags"]["data_path"]) == ("files",
                                                                       "decoded-resident")
        assert off["tags"]["input_bound"].endswith("(files decoded every epoch)")
        assert "(decoded cache, resident" in on["tags"]["input_bound"]
        assert len(off["epochs"]) == 2
        for a, b in zip(off["epochs"], on["epochs"], strict=True):
            for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
                assert b[k] == a[k], (fw, k)
        assert on["test"] == off["test"], fw
    assert sorted(notes) == ["built", "reused"]  # one cache for both frameworks
