"""How closely PyTorch and Keras agree on one transformer checkpoint: a figure per backbone.

    python benchmarks/vit_parity.py [--out reports/vit_parity] [--backbones vit_tiny ...]
        [--size PX] [--folder BACKBONE=PATH ...]

For each backbone: a checkpoint folder in the Hugging Face layout (config.json +
model.safetensors; `--folder` names a real one, e.g. a Hub snapshot; without it the script
writes one with transformers' random init, seed 0), 16 images (seeded uint8) at the
checkpoint's size (DINOv2: 224 px, its 518 px position grid resized), the class-token
features and the logits of one linear head (seeded weights, the same numbers for both) in
PyTorch (this process) and in Keras (a
subprocess: torch and tensorflow never share one). Writes <backbone>.png (Keras against
PyTorch, every feature and logit, with the identity line and the largest difference) and
parity.json / parity.md with max and mean |difference|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from strategies import transformers as tr  # noqa: E402 - framework-free, after the path

N_IMAGES, N_CLASSES = 16, 10

KERAS = """
import json, sys
import numpy as np, keras
from strategies.keras_backend.backbones import build
name, folder, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
x = np.load(out + "/x.npy")
kb = build(name, folder, 1, image_size=size)
feats = keras.Model(kb.model.inputs, kb.model.get_layer("vit_norm").output)(x).numpy()
np.save(out + "/keras.npy", feats)
"""


def _features_torch(name: str, folder: str, size: int, x: np.ndarray) -> np.ndarray:
    import torch

    from strategies.torch_backend import backbones, cache

    tb = backbones.build(name, folder, 1, image_size=size)
    tb.model.eval()
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    t = (t - torch.tensor(tb.mean)[:, None, None]) / torch.tensor(tb.std)[:, None, None]
    with torch.no_grad():
        return cache.head_inputs(tb, t).numpy()


def _random_checkpoint(name: str, folder: Path) -> None:
    import torch

    from strategies.torch_backend.vit import vit_model

    torch.manual_seed(0)
    vit_model(name, "none", tr.info(name).image_size).save_pretrained(folder)


def compare(name: str, folder: str | None, work: Path, args_size: int | None = None) -> dict:
    if folder is None:
        folder = str(work / f"{name}_random")
        _random_checkpoint(name, Path(folder))
    # DINOv2 is published at 518 px and used at 224: its position grid resized (37 -> 16)
    size = args_size or (224 if tr.info(name).kind == "dinov2"
                         else tr.read_config(Path(folder))["image_size"])
    x = np.random.default_rng(0).integers(0, 256, (N_IMAGES, size, size, 3), dtype=np.uint8)
    np.save(work / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", KERAS, name, folder, str(size), str(work)],
                   check=True, env=env, cwd=ROOT)
    ours, theirs = _features_torch(name, folder, size, x), np.load(work / "keras.npy")
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1 / np.sqrt(ours.shape[1]), (ours.shape[1], N_CLASSES)).astype("f4")
    logits = (ours @ w, theirs @ w)
    diff_f, diff_l = np.abs(ours - theirs), np.abs(logits[0] - logits[1])
    return {"backbone": name, "checkpoint": folder if "_random" not in folder else
            "random init (transformers, seed 0), written in the Hub layout",
            "image_size": size, "images": N_IMAGES,
            "features_max_abs_diff": float(diff_f.max()),
            "features_mean_abs_diff": float(diff_f.mean()),
            "logits_max_abs_diff": float(diff_l.max()),
            "logits_mean_abs_diff": float(diff_l.mean()),
            "_arrays": (ours, theirs, *logits)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, theirs, lt, lk = result.pop("_arrays")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, a, b, what, key in ((axes[0], ours, theirs, "class-token features", "features"),
                                (axes[1], lt, lk, "logits (one seeded linear head)",
                                 "logits")):
        ax.scatter(a.ravel(), b.ravel(), s=3, alpha=0.5)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="identity")
        ax.set_xlabel("PyTorch (transformers)")
        ax.set_ylabel("Keras (keras_hub)")
        ax.set_title(f"{what}\nmax |diff| {result[key + '_max_abs_diff']:.2g}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{result['backbone']} at {result['image_size']} px, {result['images']} "
                 f"images, float32", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "vit_parity"))
    ap.add_argument("--backbones", nargs="+", default=["vit_tiny", "vit_b16", "dinov2_s14"])
    ap.add_argument("--size", type=int, help="image size (default: the checkpoint's)")
    ap.add_argument("--folder", action="append", default=[],
                    help="BACKBONE=PATH: a real checkpoint folder for that backbone")
    args = ap.parse_args(argv)
    folders = dict(f.split("=", 1) for f in args.folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            r = compare(name, folders.get(name), Path(tmp), args.size)
            plot(r, out / f"{name}.png")
            results.append(r)
    (out / "parity.json").write_text(json.dumps(results, indent=1))
    lines = ["| backbone | checkpoint | px | features max / mean abs diff | logits max / "
             "mean abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['checkpoint']} | {r['image_size']} | "
              f"{r['features_max_abs_diff']:.2g} / {r['features_mean_abs_diff']:.2g} | "
              f"{r['logits_max_abs_diff']:.2g} / {r['logits_mean_abs_diff']:.2g} |"
              for r in results]
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
