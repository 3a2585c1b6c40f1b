"""`python -m bench plan [GRID]`: how long a grid takes on 1, 8, 32 GPUs, before running it.

    python -m bench plan gpu --gpu-counts 1,8,32
    python -m bench plan gpu --from gpu          # measured cell_seconds where the store has them

Per-cell cost. A cell whose run is in the tracking store (FINISHED, with `cell_seconds`) costs
what it measured: the run of the same cell (the same spec on any device kind; the newest
if several), else the mean of the runs that share its framework, backbone, strategy label,
dataset, image size and epochs (another seed, another learning rate). Every other cell is
*modelled* (`modelled_seconds`):

    full-step images = sum over the strategy's phases of
                           epochs_in_phase x (train x step_cost(phase) + val x FORWARD_SHARE)
                       + test x FORWARD_SHARE
    step_cost(phase) = FORWARD_SHARE + (1 - FORWARD_SHARE) x trained_blocks / blocks
    seconds          = full-step images / (train_rate(backbone) x (224 / image_size)^-2)

A forward pass is about a third of a training step (the backward pass costs about twice the
forward), so a frozen backbone (feature_extraction; a two_stage head phase) costs
FORWARD_SHARE per image and a fully trained one 1. Partial fine-tuning sits in between by the
share of the backbone's named blocks (strategies/backbones.py) that train: the backward pass
stops at the lowest trained block. Blocks are not equal in FLOPs (a ResNet stem is cheap,
its stage 3 is not), so this is coarse. A phase whose whole backbone is frozen, with the
features cached (bench/cell/loop.py: feature_cache on, augmentation off), runs the backbone once
over train and val instead of every epoch; the frozen-prefix cache of partial phases is not
modelled (such cells are overestimated). Data loading is assumed to keep up; precision is
not modelled (the rates are bf16).

Rates: TRAIN_IMAGES_PER_S_RESNET50 (overridable with --images-per-s) scaled by the ratio of
GFLOPs in BACKBONE_GFLOPS, capped at MAX_SPEEDUP: small networks do not run their FLOPs
ratio faster on a big GPU (memory bound, kernel launches), so MobileNet-V2 is taken 4x, not
13x, ResNet-50's rate.

Dataset sizes: the harness's own split rule (bench/data/split.py: make_split) applied to
each card's split and the cell's subset. Torchvision datasets are only known after a
download, so their official sizes are declared once, with the sources
(bench/data/sources.py OFFICIAL_SIZES); offline sources and image folders are read.

Scheduling: the cells placed longest-first (LPT) on N identical GPUs, each cell holding its
GPU for its cost plus its process start-up (STARTUP_S, modelled cells only: a measured
cell_seconds includes it) plus the scheduling overhead per cell (SCHEDULING_OVERHEAD_S,
--overhead-s). Wall time is the makespan; utilisation is the cells' own compute over
N x wall; the overhead share is start-up and scheduling over N x wall. The runner itself
hands cells out in grid order, which `grid order` shows next to LPT.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config.spec import RunSpec
from bench.data.sources import OFFICIAL_SIZES
from bench.data.split import make_split
from strategies import backbones as bb
from strategies import registry

# ---- the model's assumptions, in one place -------------------------------------------------
TRAIN_IMAGES_PER_S_RESNET50 = 3500.0
"""The anchor: ResNet-50 full fine-tuning at 224 px in bf16 on one H100-class GPU, images per
second of training steps (forward + backward + update), as the project's issues assume."""

BACKBONE_GFLOPS = {
    # forward GFLOPs (multiply-adds) per 224 px image, as torchvision's model cards state
    "resnet18": 1.8,
    "resnet50": 4.1,
    "vgg16": 15.5,
    "mobilenet_v2": 0.3,
    "mobilenet_v3_small": 0.06,
    "efficientnet_b0": 0.39,
    "efficientnet_lite0": 0.4,
    "convnext_tiny": 4.5,
    # vision transformers: timm's/torchvision's model cards at 224 px (ViT-B/16 17.6;
    # DINOv2 ViT-S/14, 256 patches, ~6.1); vit_tiny (4x4 patches) counted at its 32 px
    # (0.058 GMACs) scaled by the pixel ratio, as the CNNs are: its attention grows with the
    # square of the tokens, so a 224 px vit_tiny would cost far more than this says
    "vit_b16": 17.6,
    "dinov2_s14": 6.1,
    "vit_tiny": 2.8,
}

MAX_SPEEDUP = 4.0
"""A backbone with fewer GFLOPs than ResNet-50 trains at most this many times its rate."""

FORWARD_SHARE = 1 / 3
"""A forward pass (frozen blocks, val, test) as a share of a full training step per image."""

STARTUP_S = 5.0
"""A modelled cell's fixed cost besides its images: its process (forked from the warm fork
server: ~0.01 s, benchmarks/test_3_startup.py), the CUDA context, building the model and
loading its weights, starting the data loaders. A guess until a GPU run of the grid measures
it (a measured cell_seconds includes it: --from)."""

SCHEDULING_OVERHEAD_S = 0.33
"""Per cell: claiming it, its MLflow run, handing its device to the next cell. Measured by
benchmarks/test_4_scale.py on the offline default grid, one cell at a time on 2 idle CPU
cores: 0.24 s a cell in the local pool, 0.33 s as a Ray task (the larger is taken)."""

DEFAULT_GPUS = (1, 8, 32)


class SizingError(ValueError):
    """A plan that cannot be made (bad --gpu-counts, a dataset whose size is unknown)."""


# ---- sizes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    test: int


def split_sizes(card: dict, subset: int = 0) -> Sizes:
    """The train / val / test sizes the harness uses for `card` and `subset` (seed 0: the
    counts do not depend on the seed), from the split rule itself on labels of the dataset's
    size."""
    labels, official_test = _labels(card)
    m = make_split(labels, 0, subset, card["split"], official_test)
    return Sizes(len(m["train"]), len(m["val"]), len(m["test"]))


def _labels(card: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels with the dataset's size and classes (balanced where only the totals are
    declared), and its official test mask."""
    if card["source"] in OFFICIAL_SIZES:
        pool, test, k = OFFICIAL_SIZES[card["source"]]
        if card.get("classes"):  # a class subset: its share of the declared totals
            pool, test, k = (pool * len(card["classes"]) // k,
                             test * len(card["classes"]) // k, len(card["classes"]))
        labels = np.r_[np.arange(pool) % k, np.arange(test) % k]
        return labels, np.r_[np.zeros(pool, bool), np.ones(test, bool)]
    from bench.data import DatasetError, sources

    try:
        if card["source"] == "image_folder":
            _, labels, _ = sources.scan_image_folder(card["root"], verify=False)
            return labels, None
        src = sources.load(card)
    except DatasetError as e:
        raise SizingError(f"dataset {card['name']!r}: its size is unknown ({e})") from None
    return src.labels, src.official_test


# ---- the model -----------------------------------------------------------------------------
def train_rate(backbone: str, images_per_s: float = TRAIN_IMAGES_PER_S_RESNET50) -> float:
    """Full-training images/s of `backbone` at 224 px, from the ResNet-50 anchor."""
    if backbone not in BACKBONE_GFLOPS:
        raise SizingError(f"backbone {backbone!r} has no GFLOPs in bench/run/sizing.py "
                        f"BACKBONE_GFLOPS; known: {', '.join(sorted(BACKBONE_GFLOPS))}")
    speedup = BACKBONE_GFLOPS["resnet50"] / BACKBONE_GFLOPS[backbone]
    return images_per_s * min(speedup, MAX_SPEEDUP)


def step_cost(trained_blocks: int, blocks: int) -> float:
    """A training step's cost per image, a full training step = 1."""
    return FORWARD_SHARE + (1 - FORWARD_SHARE) * trained_blocks / blocks


def modelled_seconds(spec: RunSpec, sizes: Sizes,
                     images_per_s: float = TRAIN_IMAGES_PER_S_RESNET50) -> float:
    """The modelled GPU seconds of one cell's training and evaluation (start-up excluded)."""
    from bench.cell.loop import cache_plan

    n_blocks = bb.get(spec.backbone).n_blocks
    units = sizes.test * FORWARD_SHARE
    for phase, epochs in registry.get(spec.strategy).phases(spec.params, spec.epochs,
                                                         n_blocks):
        # backward through every block above the lowest trained one
        trained = n_blocks - registry.frozen_bottom(phase, bb.get(spec.backbone).blocks,
                                                    spec.backbone)
        cached = cache_plan(spec, phase, n_blocks)
        if isinstance(cached, tuple) and cached[0] == "features":
            units += (sizes.train + sizes.val) * FORWARD_SHARE  # once; the head is ~free
            continue
        train, val = ((sizes.train + sizes.val, 0) if spec.train_on == "train+val"
                      else (sizes.train, sizes.val))
        units += epochs * (train * step_cost(trained, n_blocks) + val * FORWARD_SHARE)
    rate = train_rate(spec.backbone, images_per_s) * (224 / spec.image_size) ** 2
    return units / rate


# ---- measured costs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    seconds: float  # the cell's own time: cell_seconds less its start-up where recorded
    startup: float  # startup_seconds where recorded, else 0 (then inside `seconds`)
    device_kind: str
    end_time: int


def _similar_key(s: RunSpec) -> tuple:
    return (s.framework, s.backbone, s.strategy_label, s.dataset, s.image_size, s.epochs)


def _same_cell(s: RunSpec) -> str:
    """The cell's hash whatever device kind it ran on: a plan is made before the grid is
    stamped with one (bench/run/plan.py on_device)."""
    return dataclasses.replace(s, device_kind="cpu").hash


def measured_runs(exp_id: str) -> tuple[dict[str, Measured], dict[tuple, list[Measured]]]:
    """FINISHED cell runs with cell_seconds in the experiment: by same-cell hash (the newest
    run), and by the looser key of _similar_key."""
    from bench import tracking

    by_cell: dict[str, Measured] = {}
    similar: dict[tuple, list[Measured]] = defaultdict(list)
    for run in tracking.cell_runs(exp_id, tracking.FINISHED):
        row = tracking.run_row(run)
        if row.get("cell_seconds") is None:
            continue
        try:
            spec = RunSpec.from_params({k[2:]: v for k, v in row.items()
                                        if k.startswith("p_") and isinstance(v, str)})
        except (TypeError, ValueError):  # a run of an older, incompatible spec
            continue
        startup = float(row.get("startup_seconds") or 0.0)
        m = Measured(max(float(row["cell_seconds"]) - startup, 0.0), startup,
                     spec.device_kind, int(row.get("end_time") or 0))
        key = _same_cell(spec)
        if key not in by_cell or m.end_time > by_cell[key].end_time:
            by_cell[key] = m
        similar[_similar_key(spec)].append(m)
    return by_cell, dict(similar)


# ---- scheduling ----------------------------------------------------------------------------
def lpt_makespan(costs: list[float], gpus: int) -> float:
    """The makespan of `costs` placed longest-first, each on the GPU that frees first."""
    return list_makespan(sorted(costs, reverse=True), gpus)


def list_makespan(costs: list[float], gpus: int) -> float:
    """The makespan of `costs` handed out in the order given, each to the GPU free first."""
    if gpus < 1:
        raise SizingError(f"gpus = {gpus}: must be >= 1")
    loads = [0.0] * min(gpus, max(len(costs), 1))
    heapq.heapify(loads)
    for c in costs:
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads)


def parse_gpu_counts(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); anything else a SizingError naming --gpu-counts."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SizingError(f"--gpu-counts {text!r}: allowed: a comma-separated list of positive "
                        f"integers (GPU counts), e.g. --gpu-counts 1,8,32")
    return tuple(dict.fromkeys(int(p) for p in parts))


# ---- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellCost:
    spec: RunSpec
    seconds: float  # compute on the GPU
    startup: float
    source: str  # "measured", "similar" or "modelled"

    def slot_seconds(self, overhead_s: float) -> float:
        return self.seconds + self.startup + overhead_s


@dataclass(frozen=True)
class Row:
    gpus: int
    wall_s: float
    grid_order_s: float
    utilisation: float
    overhead_share: float


@dataclass
class Plan:
    grid: object
    cells: list[CellCost]
    overhead_s: float
    images_per_s: float
    experiment: str | None = None
    device_kinds: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        out = {"measured": 0, "similar": 0, "modelled": 0}
        for c in self.cells:
            out[c.source] += 1
        return out

    def row(self, gpus: int) -> Row:
        slots = [c.slot_seconds(self.overhead_s) for c in self.cells]
        wall = lpt_makespan(slots, gpus)
        capacity = gpus * wall if wall else 1.0
        compute = sum(c.seconds for c in self.cells)
        return Row(gpus, wall, list_makespan(slots, gpus), compute / capacity,
                   (sum(slots) - compute) / capacity)


def estimate(grid, experiment: str | None = None, overhead_s: float = SCHEDULING_OVERHEAD_S,
              images_per_s: float = TRAIN_IMAGES_PER_S_RESNET50,
              must_exist: bool = False) -> Plan:
    """Every cell of `grid` costed: measured from `experiment`'s runs where it has them (no
    experiment, or none in the store: all modelled; a SizingError if `must_exist`)."""
    if not overhead_s >= 0 or not math.isfinite(overhead_s):
        raise SizingError(f"--overhead-s {overhead_s!r}: allowed: seconds >= 0")
    if not images_per_s > 0 or not math.isfinite(images_per_s):
        raise SizingError(f"--images-per-s {images_per_s!r}: allowed: images per second > 0")
    by_cell, similar = _lookup(experiment, must_exist) if experiment else ({}, {})
    sizes: dict[tuple[str, int], Sizes] = {}
    cells, kinds = [], set()
    for s in planned_specs(grid):
        m = by_cell.get(_same_cell(s))
        if m is not None:
            cells.append(CellCost(s, m.seconds, m.startup, "measured"))
            kinds.add(m.device_kind)
            continue
        ms = similar.get(_similar_key(s))
        if ms:
            cells.append(CellCost(s, float(np.mean([x.seconds for x in ms])),
                                  float(np.mean([x.startup for x in ms])), "similar"))
            kinds.update(x.device_kind for x in ms)
            continue
        key = (s.dataset, s.subset)
        if key not in sizes:
            sizes[key] = split_sizes(grid.cards[s.dataset], s.subset)
        cells.append(CellCost(s, modelled_seconds(s, sizes[key], images_per_s), STARTUP_S,
                              "modelled"))
    return Plan(grid, cells, overhead_s, images_per_s, experiment, tuple(sorted(kinds)))


def planned_specs(grid) -> list[RunSpec]:
    """The cells a grid runs: its specs; on a tuned grid each study's full budget, `trials`
    trial cells at the base setting (their searched values are not known before the run)
    and one final cell per final seed (an upper bound: a pruned trial stops early)."""
    from bench.run.tune import TRIAL, final_spec

    t = grid.tune
    if t is None:
        return list(grid.specs)
    out = []
    for s in grid.specs:
        trial = dataclasses.replace(s, role=TRIAL, seed=t.trial_seed)
        out += [trial] * t.trials + [final_spec(trial, seed, t.refit) for seed in t.final_seeds]
    return out


def _lookup(experiment: str, must_exist: bool):
    from bench import tracking

    exp_id = None
    if store_exists():  # looking in a missing sqlite store would create it
        exp_id = tracking.experiment_id(experiment, create=False)
    if exp_id is None and must_exist:
        raise SizingError(f"--from {experiment!r}: no MLflow experiment of that name at "
                        f"{tracking.tracking_uri()}")
    return measured_runs(exp_id) if exp_id else ({}, {})


def store_exists() -> bool:
    """False when the tracking store is a local sqlite file that is not there: looking in it
    would create it."""
    from bench import tracking

    path = tracking._sqlite_path(tracking.tracking_uri())
    return path is None or path.exists()


# ---- rendering -----------------------------------------------------------------------------
def hmm(seconds: float) -> str:
    """Seconds as h:mm, rounded up to the minute (a plan should not promise too little)."""
    minutes = math.ceil(seconds / 60 - 1e-9)
    return f"{minutes // 60}:{minutes % 60:02d}"


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.2f}" if m < 1 else f"{m:.1f}"


def render(plan: Plan, gpus: tuple[int, ...]) -> str:
    g, counts = plan.grid, plan.counts()
    n = len(plan.cells)
    lines = [f"Plan for grid {g.name!r} ({Path(g.path).name}): {n} cells", ""]
    if g.tune is not None:
        lines[0] += (f" ({len(g.specs)} studies x ({g.tune.trials} trials + "
                     f"{len(g.tune.final_seeds)} finals), trials costed at each study's base "
                     f"setting, none pruned)")
    sources = [f"{counts['measured']} measured"]
    if counts["similar"]:
        sources.append(f"{counts['similar']} from runs of a similar cell (another seed or "
                       f"setting)")
    sources.append(f"{counts['modelled']} modelled")
    where = (f" from experiment {plan.experiment!r}"
             + (f" on {', '.join(plan.device_kinds)}" if plan.device_kinds else "")
             if plan.experiment and counts["modelled"] < n else "")
    lines.append(f"Per-cell costs: {', '.join(sources)}{where}.")
    if counts["modelled"]:
        lines.append(f"Modelled: ResNet-50 full training at {plan.images_per_s:,.0f} images/s "
                     f"(224 px, bf16, one GPU), other backbones by GFLOPs (at most "
                     f"{MAX_SPEEDUP:g}x), plus {STARTUP_S:g} s process start-up a cell.")
    lines.append(f"Scheduling overhead: {plan.overhead_s:g} s a cell. Cells placed "
                 f"longest-first; `grid order` is the runner's order (first free GPU takes "
                 f"the next cell).")
    lines += ["", "| GPUs | expected wall time (h:mm) | GPU utilisation | overhead share "
                  "| grid order (h:mm) |",
              "|---:|---:|---:|---:|---:|"]
    for k in gpus:
        r = plan.row(k)
        lines.append(f"| {k} | {hmm(r.wall_s)} | {r.utilisation:.0%} | "
                     f"{r.overhead_share:.1%} | {hmm(r.grid_order_s)} |")
    lines += ["", "Where the time goes: minutes per cell (its own compute), by dataset; "
                  "GPU-hours over the grid (start-up and overhead included).", ""]
    datasets = list(dict.fromkeys(c.spec.dataset for c in plan.cells))
    # a framework column when the grid has several: measured costs differ between them
    frameworks = len({c.spec.framework for c in plan.cells}) > 1
    fw_head, fw_rule = ("framework | ", "---|") if frameworks else ("", "")
    lines += [f"| {fw_head}backbone | strategy | cells | "
              + " | ".join(f"{d} min" for d in datasets) + " | GPU-h | share |",
              f"|{fw_rule}---|---|---:|" + "---:|" * len(datasets) + "---:|---:|"]
    groups: dict[tuple[str, ...], list[CellCost]] = defaultdict(list)
    for c in plan.cells:
        key = (c.spec.framework,) if frameworks else ()
        groups[(*key, c.spec.backbone, c.spec.strategy)].append(c)
    total = sum(c.slot_seconds(plan.overhead_s) for c in plan.cells) or 1.0
    for key, cs in groups.items():
        per = []
        for d in datasets:
            secs = [c.seconds for c in cs if c.spec.dataset == d]
            per.append(_minutes(np.mean(secs)) if secs else "—")
        gpu_s = sum(c.slot_seconds(plan.overhead_s) for c in cs)
        lines.append(f"| {' | '.join(key)} | {len(cs)} | " + " | ".join(per)
                     + f" | {gpu_s / 3600:.1f} | {gpu_s / total:.0%} |")
    lines.append(f"| **all** | {'| ' if frameworks else ''}| {n} | "
                 + " | ".join("" for _ in datasets) + f" | {total / 3600:.1f} | 100% |")
    return "\n".join(lines)
