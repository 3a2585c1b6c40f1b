"""The input pipeline per CPU core at 224 px: can it feed a GPU?

On 256 generated photo-like JPEGs (500x375, quality 90), each framework in a process of its
own pinned to ONE core (sched_setaffinity; torch.set_num_threads(1); TensorFlow's thread
pools at 1 and tf.data at parallel = 1), one epoch of batch 32 of what the host does:
(a) a plain PIL loop (open, RGB, resize to 224: the seeds' way), (b) the harness's Batches
over the files (decoded every epoch), (c) its Batches over the decoded cache
(bench/data/decoded.py), resident and read per batch from the memmap. Keras' flip
augmentation runs in its tf.data pipeline on the host and is counted; PyTorch's runs in
Preprocess on the device (the GPU in a GPU cell) and is not. "Resident" on a GPU means on the
GPU, where the host does nothing per epoch; here the device is the CPU. Rows: images/s per
core, the ratio cached / files (target >= 5x), and the cores each path needs to feed an H100
training ResNet-50 at 3,500 images/s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.paths import ROOT

N_IMAGES, SIZE, BATCH, EPOCHS = 256, 224, 32, 2
H100_IMG_S = 3500  # ResNet-50 training at 224 px, bf16, on an H100


def _write_jpegs(root: Path) -> list[str]:
    """Photo-like content: smooth shapes and gradients, texture, sensor noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    files = []
    for i in range(N_IMAGES):
        y, x = np.mgrid[0:375, 0:500].astype(np.float32)
        c = rng.uniform(0, 255, 3)
        img = np.stack([c[k] * 0.5 + 60 * np.sin(x / rng.uniform(20, 90) + k)
                        + 40 * np.cos(y / rng.uniform(15, 70)) for k in range(3)], -1)
        im = Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255)
                             .astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, 450), rng.integers(0, 330)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 150)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = root / f"c{i % 4}" / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90)
        files.append(str(path))
    return files


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rates(epochs: dict) -> dict[str, float]:
    """images/s of each path: one untimed epoch each (warm-up, tracing), then EPOCHS rounds
    of one epoch of every path in turn (so a load that comes and goes hits all alike), the
    best of each path's rounds."""
    for run in epochs.values():
        run()
    times = {k: [] for k in epochs}
    for _ in range(EPOCHS):
        for k, run in epochs.items():
            times[k].append(_timed(run))
    return {k: N_IMAGES / min(v) for k, v in times.items()}


def measure(framework: str, files: list[str]) -> dict:
    """Run in a process of its own, pinned to one core."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from bench.data import batching, decoded

    labels = np.arange(N_IMAGES) % 4
    t0 = time.perf_counter()
    array, how = decoded.open_cache(files, SIZE)  # built by the first worker, then reused
    cache_s = time.perf_counter() - t0
    rows = decoded.DecodedImages(array, np.arange(N_IMAGES))
    if framework == "torch":
        import torch

        from strategies.torch_backend import data

        torch.set_num_threads(1)
        dev = torch.device("cpu")

        def epoch(items):  # the flip runs in Preprocess, on the GPU in a GPU cell
            b = data.Batches(items, labels, SIZE, BATCH, dev, shuffle=True, seed=0, workers=0)
            return lambda: list(b)
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from strategies.keras_backend import data

        def epoch(items):
            b = data.Batches(items, labels, SIZE, BATCH, shuffle=True, seed=0,
                             augmentation="flip", parallel=1)
            return lambda: [x.numpy() for x, _ in b]

    paths = {"pil": lambda: [batching.load_file(f, SIZE) for f in files],
             "files": epoch(files), "cached": epoch(rows)}
    data.IN_MEMORY_BYTES = 0
    paths["cached_per_batch"] = epoch(rows)
    out = {f"{k}_img_s": v for k, v in _rates(paths).items()}
    return {**out, f"decoded_cache_{how.split()[0]}_s": cache_s}


WORKER = ("import json, sys; sys.path.insert(0, 'benchmarks'); import test_5_input as t; "
          "print(json.dumps(t.measure(sys.argv[1], json.loads(sys.argv[2]))))")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("input")
    return _write_jpegs(root / "images"), root / "cache"


def test_input_pipeline_per_core(benchmark, report, jpegs):
    files, cache = jpegs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TLBENCH_CACHE": str(cache)}
    results = {}

    # a framework not installed here (the device tool's GPU machine has no TensorFlow) is
    # left out, not a failure of the other's numbers
    frameworks = [fw for fw, module in (("torch", "torch"), ("keras", "tensorflow"))
                  if importlib.util.find_spec(module) is not None]
    if not frameworks:
        pytest.skip("neither torch nor tensorflow is installed")

    def run_both():
        for fw in frameworks:
            r = subprocess.run([sys.executable, "-c", WORKER, fw, json.dumps(files)], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            results[fw] = json.loads(r.stdout.strip().splitlines()[-1])

    benchmark.pedantic(run_both, rounds=1, iterations=1)
    for fw, r in results.items():
        aug = "flip" if fw == "keras" else "flip on the device, not counted"
        pil_loop = r["pil_img_s"]
        report(f"input, {fw} Batches, decoded cache vs files ({SIZE} px, {aug}, 1 core)",
               pil_loop_img_s=r.pop("pil_img_s"), files_img_s=r["files_img_s"],
               cached_img_s=r["cached_img_s"], cached_per_batch_img_s=r["cached_per_batch_img_s"],
               ratio=r["cached_img_s"] / r["files_img_s"], target=">= 5",
               cores_for_h100_pil_loop=H100_IMG_S / pil_loop,
               cores_for_h100_files=H100_IMG_S / r["files_img_s"],
               cores_for_h100_cached=H100_IMG_S / r["cached_img_s"],
               cores_for_h100_cached_per_batch=H100_IMG_S / r["cached_per_batch_img_s"],
               **{k: v for k, v in r.items() if k.startswith("decoded_cache_")})
