"""The PyTorch side of tests/test_keras_backend.py, run there in a subprocess (torch and
tensorflow are never imported into one process): prints one JSON object.

    python tests/torch_reference.py '{"backbones": [...], "digits": {...}, "run": {...}}' OUT_DIR

backbones: per-block parameter counts (models built on the meta device: no init cost) and the
BatchNorm momentum of each; digits: the split manifest bench.data.prepare gives the PyTorch
side, and the first images as the PyTorch adapter resizes them; run: run_cell on a RunSpec,
every metric it reports. Each part lands in OUT_DIR/<part>.json when it is done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def block_counts(names: list[str]) -> dict:
    from strategies.torch_backend.backbones import build

    out = {}
    for name in names:
        with torch.device("meta"):
            tb = build(name, "none", 3)
        sizes = dict(tb.model.named_parameters())
        counts: dict[str, int] = {}
        for n, owner in tb.param_owner().items():
            counts[owner] = counts.get(owner, 0) + sizes[n].numel()
        momentum = sorted({m.momentum for m in tb.model.modules()
                           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        out[name] = {"counts": counts, "bn_momentum": momentum}
    return out


def digits(card: dict, seed: int, subset: int, size: int, n_images: int, out: str) -> dict:
    from bench import data as bdata
    from strategies.torch_backend.backbones import IMAGENET_MEAN, IMAGENET_STD
    from strategies.torch_backend.data import Preprocess, to_chw_uint8

    prepared = bdata.prepare(card, seed, subset)
    images, _ = prepared.part("train")
    x = to_chw_uint8(images[:n_images], size)
    np.save(out, x.permute(0, 2, 3, 1).numpy())  # NHWC, as the Keras side holds it
    pre = Preprocess(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))(x, train=False)
    return {"split": {k: v.tolist() for k, v in prepared.split.items()},
            "preprocessed_shape": list(pre.shape),
            "preprocessed_range": [float(pre.min()), float(pre.max())]}


class Recorder:
    def __init__(self):
        from bench.cell.process import CellContext

        self.ctx = CellContext("cpu", time.perf_counter())
        self.epochs, self.final, self.tags = [], {}, {}
        self.ctx.log_epoch = lambda step, m: self.epochs.append(dict(m))
        self.ctx.log_final = self.final.update
        self.ctx.set_tags = self.tags.update
        self.ctx.progress = lambda **state: None
        self.ctx.artifact = lambda name, text: None
        self.ctx.log_inputs = lambda inputs: None


def run(spec_params: dict, card: dict) -> dict:
    from bench.config.spec import RunSpec
    from strategies.torch_backend import run_cell

    rec = Recorder()
    run_cell(RunSpec.from_params(spec_params), card, rec.ctx)
    return {"epochs": rec.epochs, "final": rec.final, "tags": sorted(rec.tags)}


def main(args: dict, out_dir: Path) -> None:
    """Each part written to out_dir/<part>.json as soon as it is done (the quick ones first),
    so the test waiting for one does not wait for the training run."""
    torch.set_num_threads(1)  # the test process trains Keras on the other core
    parts = {"backbones": lambda: block_counts(args["backbones"]),
             "digits": lambda: digits(**args["digits"]),
             "run": lambda: run(**args["run"])}
    for name, fn in parts.items():
        if name in args:
            torch.manual_seed(0)
            tmp = out_dir / f".{name}.json.tmp"
            tmp.write_text(json.dumps(fn()))
            tmp.replace(out_dir / f"{name}.json")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))
