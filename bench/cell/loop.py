"""The per-cell loop, written once for every framework: data -> model -> the strategy's phases
-> epochs -> history and best validation accuracy -> test metrics -> model-only rates.

A backend supplies a small `Session` (strategies/<framework>_backend) and calls
`run_cell(session, spec, card, ctx)`; every metric name and definition lives here, so the two
frameworks cannot drift apart. Framework-free: nothing here imports torch or tensorflow.

Throughput (bench.cell.timing): `train_images_per_sec` is the last phase's data-fed rate (median
over its steps, warm-up excluded, device synchronised before each clock read);
`model_only_train_images_per_sec` is the same train step on a synthetic batch already on the
device; a cell whose data-fed rate is under INPUT_BOUND_RATIO of its model-only rate is tagged
`input_bound`, with the data path that fed it (`data_path`).

Decoded cache (`decoded_cache`, on by default): a file dataset's images are decoded and
resized once into a memory-mapped array (bench/data/decoded.py), shared by every cell at that
size; the parts' items become its rows and take the array path (resident when they fit, else
read per batch), with the file path's pixels bit for bit. The tag `decoded_cache_used` says
whether it was built or reused.

Feature caching (`feature_cache`, on by default): a phase whose whole backbone is frozen, with
augmentation off, computes the head's inputs once (eval mode, the weights' preprocessing
included) and trains the head on them; a phase whose bottom blocks are frozen caches their
output when it fits in FEATURE_CACHE_MB and trains the blocks above. The same items in the
same seeded order reach the trained part, so accuracy is the uncached path's (tested). The
tag `feature_cache_used` says what each phase got, or why not; `train_rate_of` says what the
train rates measure (a cached phase trains only the part above the cut).

Equal budgets and fair records: every strategy trains exactly the cell's `epochs` (the
registry splits them over its phases) and the cell records the epochs and optimizer steps it
really took (`epochs_trained`, `optimizer_steps`). `select` says which weights the test sees:
the last epoch's, or (`best_val`) those of the best validation epoch, restored (`test_epoch`).
A non-finite train loss ends the cell at once (Diverged: "diverged at epoch e, step s"); a
cell whose final train loss is above its first epoch's is tagged `diverged`. The cell runs
deterministically when asked (tag `deterministic`), and a CpuProbe over its timed steps says
whether other processes shared the machine while its speed was measured (`contended`,
`contention_share`; bench/cell/contention.py).

Precise BatchNorm (`precise_bn = N`, off by default): the running averages a short training
leaves are a poor estimate of the final weights' statistics (a BatchNorm momentum of 0.01,
EfficientNet's, keeps 62% of the initial statistics after 48 steps), which wrecks evaluation
most for a network trained from scratch. With N > 0 the statistics of the BatchNorm layers
that train are recomputed from N training images (a fixed seeded sample) with the epoch's
final weights before each validation, and so before the test (the recipe of Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021; fvcore's PreciseBN). Training itself is unchanged:
a training step normalises with its batch's statistics.
"""

from __future__ import annotations

import json
import os
import time
from typing import Protocol

import numpy as np

from bench import checkpoints
from bench import data as bdata
from bench.cell.contention import CpuProbe
from bench.cell.timing import StepMeter
from bench.config.spec import RunSpec
from bench.data import decoded
from strategies import backbones as bb
from strategies import registry

WARMUP_STEPS = 3  # steps excluded from every throughput median
MODEL_ONLY_STEPS = 10
INPUT_BOUND_RATIO = 0.9
# Session.data_path -> the words the input_bound tag uses for it
DATA_PATHS = {
    "resident": "arrays resident",
    "arrays-resized-per-batch": "arrays resized every batch",
    "files": "files decoded every epoch",
    "decoded-resident": "decoded cache, resident",
    "decoded-per-batch": "decoded cache, read per batch",
}
FEATURE_CACHE_MB = 1024  # cached inputs held on the device at most (TLBENCH_FEATURE_CACHE_MB)


class CacheUnavailable(RuntimeError):
    """A backend cannot cache this cut (no single-tensor cut, too big); the message says why."""


class Diverged(RuntimeError):
    """The train loss became NaN or infinite. A backend raises it with the step (1-based,
    within the epoch); the driver adds the epoch."""

    def __init__(self, step: int, loss: float, epoch: int | None = None):
        self.step, self.loss, self.epoch = step, loss, epoch
        where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        super().__init__(f"diverged at {where} (train loss {loss})")


class DeviceMismatch(RuntimeError):
    """The cell runs on another kind of device than its identity (RunSpec.device_kind) says."""


class Session(Protocol):
    """What a framework backend does for the driver. One session runs one cell.

    The call order (run_cell keeps it; OrderCheck refuses a call out of it):
    start, then determinism right after it; seed and build; load_backbone and reinit_top
    after build and before the first phase; per phase begin_phase, use_cache (if at all)
    right after it: the cache lives until the next begin_phase; then train_epoch,
    recalibrate_bn and evaluate. snapshot only right after an evaluate, restore only right
    before one (select = best_val). model_only_rates runs last: its synthetic steps move the
    weights, so after it only param_counts, peak_memory_mb and sync may come.
    """

    data_path: str  # how the training images reach the model: a key of DATA_PATHS
    # optional: tags a strategy's backend hook adds (LoRA's adapters and their merge), read
    # after model_only_rates
    notes: dict[str, str]

    def start(self, device: str) -> dict[str, str]:
        """Set the device up; return the tags device (its name: 'NVIDIA H200', 'cpu (...)'),
        device_type ('cpu', 'cuda' or 'gpu', 'mps') and versions."""

    def determinism(self, on: bool, spec: RunSpec) -> str:
        """Deterministic algorithms on or off (called once, right after start, before any
        work on the device); return the tag: 'true', or 'false: <why>' (also when an option
        of the cell excludes them)."""

    def seed(self, seed: int) -> None: ...

    def build(self, spec: RunSpec, num_classes: int, parts: dict) -> None:
        """The model (backbone, weights, new head) and the loaders of the split parts."""

    def load_backbone(self, path: str, head: bool = False) -> None:
        """Weights the harness pretrained (strategies/<framework>_backend/backbones.py); the
        head too when `head` (head_init = "source"), else it keeps its fresh init."""

    def reinit_top(self, depth: int | str) -> list[str]:
        """Re-initialise the top `depth` blocks (the AnB protocol); return their names."""

    def save_backbone(self, path: str) -> None: ...

    @property
    def n_blocks(self) -> int: ...

    def begin_phase(self, phase: registry.Phase, lr: float, optimizer: str,
                    weight_decay: float) -> int:
        """Freeze/unfreeze for the phase and make its optimizer; return the trainable
        parameter count. Drops the previous phase's feature cache."""

    def use_cache(self, kind: str, n_frozen: int, limit_bytes: int) -> None:
        """Cache the current phase's frozen part: kind 'features' (the head's inputs of the
        train, val and test parts) or 'prefix' (the bottom `n_frozen` blocks' output for the
        train part); until the next begin_phase, training (and evaluation, for 'features')
        runs on the cached inputs. Raises CacheUnavailable with the reason."""

    def train_epoch(self, meter: StepMeter, on_step) -> dict[str, float]:
        """One epoch of the current phase: {'train_loss', 'train_acc'}. `on_step(i)` after
        every optimizer step; Diverged(step, loss) as soon as a step's loss is not finite."""

    def evaluate(self, part: str, topk: int = 1) -> dict[str, float]:
        """{'loss', 'acc'} (and f'top{topk}' when topk > 1) on a split part."""

    def recalibrate_bn(self, indices) -> int:
        """Precise BatchNorm: recompute the statistics of the BatchNorm layers the current
        phase trains (frozen ones untouched) as the plain average over batches of the
        training images `indices` (no augmentation, dropout off, batch statistics in those
        layers as in training); the weights do not change. Return the number of layers."""

    def snapshot(self) -> object:
        """A copy of every weight and BatchNorm statistic of the model (select = best_val)."""

    def restore(self, state: object) -> None:
        """Put a snapshot back: what evaluate() sees is then the model it was taken of."""

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model as it is now."""

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        """Train and inference images/s on a synthetic batch already on the device, through
        the last phase's train step: {'model_only_train_images_per_sec',
        'inference_images_per_sec'}."""

    def peak_memory_mb(self) -> float: ...

    def sync(self) -> None:
        """Wait for the device (every clock read follows one)."""


class BackboneHandling:
    """The Session methods that hand the built backbone to the backend's backbones module
    (load_backbone, reinit_top, save_backbone) or read it (n_blocks, notes): the same
    delegation in every framework, written once. A session derives from it, names its
    backbones module in `backbone_module` and sets `backbone` in build."""

    backbone_module: object  # strategies/<framework>_backend/backbones.py
    backbone: object  # what build made: a TorchBackbone, a KerasBackbone

    # weights the harness pretrained (bench/config/pretrained.py)
    def load_backbone(self, path: str, head: bool = False) -> None:
        self.backbone_module.load_backbone(self.backbone, path, head=head)

    def reinit_top(self, depth: int | str) -> list[str]:
        return self.backbone_module.reinit_top_blocks(self.backbone, depth)

    def save_backbone(self, path: str) -> None:
        self.backbone_module.save_backbone(self.backbone, path)

    @property
    def n_blocks(self) -> int:
        return len(self.backbone.block_map.blocks)

    @property
    def notes(self) -> dict[str, str]:
        return self.backbone.notes


_AFTER_BUILD = {"load_backbone", "reinit_top", "save_backbone", "begin_phase", "evaluate",
                "snapshot", "restore", "param_counts"}
_IN_A_PHASE = {"use_cache", "train_epoch", "recalibrate_bn", "model_only_rates"}
_AFTER_MODEL_ONLY = {"param_counts", "peak_memory_mb"}  # they do not read the weights


def order_problem(calls: set[str], last: str | None, name: str) -> str | None:
    """Why calling `name` after the methods `calls` (`last` the latest) breaks the Session
    protocol's order, or None."""
    if last is None or name == "start":
        return None if last is None and name == "start" else "start comes first, once"
    if (name == "determinism") != (last == "start"):
        return "determinism comes right after start"
    if last == "restore" and name != "evaluate":
        return "restore is followed by evaluate"
    if "model_only_rates" in calls and name not in _AFTER_MODEL_ONLY:
        return "model_only_rates runs last (its synthetic steps move the weights)"
    if name in _AFTER_BUILD | _IN_A_PHASE and "build" not in calls:
        return "the model is not built yet (build first)"
    if name in ("load_backbone", "reinit_top") and "begin_phase" in calls:
        return "weights are loaded before the first begin_phase"
    if name in _IN_A_PHASE and "begin_phase" not in calls:
        return "no phase has begun (begin_phase first)"
    if name == "use_cache" and last != "begin_phase":
        return "use_cache comes right after begin_phase (the cache lives until the next one)"
    if name == "snapshot" and last != "evaluate":
        return "snapshot comes right after evaluate"
    if name == "restore" and "snapshot" not in calls:
        return "restore needs a snapshot"
    return None


class OrderCheck:
    """A Session that checks the protocol's call order (order_problem) and forwards every
    call to the session it wraps; `calls` keeps the method names in the order called.
    Attributes and properties (data_path, n_blocks) and sync (harmless at any time, and
    inside the timed steps) pass through unchecked and unrecorded."""

    def __init__(self, session: Session):
        self.session = session
        self.calls: list[str] = []
        self._seen: set[str] = set()

    def __getattr__(self, name: str):
        if name in ("session", "calls", "_seen"):  # not set yet (a copy): no recursion
            raise AttributeError(name)
        attr = getattr(self.session, name)
        if not callable(attr) or name.startswith("_") or name == "sync":
            return attr

        def checked(*args, **kwargs):
            why = order_problem(self._seen, self.calls[-1] if self.calls else None, name)
            if why:
                recent = ", ".join(self.calls[-3:]) or "nothing"
                raise RuntimeError(f"Session.{name} called out of order: {why} "
                                   f"(after {recent})")
            self.calls.append(name)
            self._seen.add(name)
            return attr(*args, **kwargs)

        return checked


def device_kind(tags: dict[str, str]) -> str:
    """The kind of device a session started on (RunSpec.device_kind's vocabulary): cpu, mps
    or cuda:<model>."""
    kind = tags["device_type"]
    if kind in ("cuda", "gpu"):
        return f"cuda:{tags['device']}"
    return kind


def run_cell(session: Session, spec: RunSpec, card: dict, ctx) -> None:
    session = session if isinstance(session, OrderCheck) else OrderCheck(session)
    tags = session.start(ctx.device)
    ctx.set_tags(tags)
    actual = device_kind(tags)
    if " ".join(actual.split()) != " ".join(spec.device_kind.split()):
        raise DeviceMismatch(
            f"this cell's identity says device_kind = {spec.device_kind!r} but device "
            f"{ctx.device!r} resolved to {actual!r} in this process; a measurement on "
            f"another device is another cell (run the grid with --device for that device)")
    deterministic = getattr(ctx, "deterministic", None)
    if deterministic is None:  # auto: free on a CPU, costs speed on a GPU
        deterministic = actual == "cpu"
    ctx.set_tags({"deterministic": session.determinism(deterministic, spec)})
    session.seed(spec.seed)

    prepared = bdata.prepare(card, spec.seed, spec.subset, spec.train_on)
    ctx.log_inputs(bdata.dataset_inputs(card, prepared, spec.seed, spec.subset))
    num_classes = prepared.source.num_classes
    parts = {k: prepared.part(k) for k in ("train", "val", "test")}
    if spec.decoded_cache:
        t0 = time.perf_counter()
        parts, note = decoded.decoded_parts(parts, spec.image_size)
        ctx.log_final({"decoded_cache_seconds": time.perf_counter() - t0})
    else:
        note = "off: decoded_cache = false"
    ctx.set_tags({"decoded_cache_used": note})
    n_train = len(parts["train"][1])
    ctx.log_final({"n_train": n_train, "n_val": len(parts["val"][1]),
                   "n_test": len(parts["test"][1]), "num_classes": num_classes})

    strategy = registry.get(spec.strategy)
    session.build(spec, num_classes, parts)
    # weights pretrained by the harness on a source dataset, then the AnB re-initialisation
    checkpoint = checkpoints.checkpoint_for(spec, ctx)
    if checkpoint:
        session.load_backbone(checkpoint, head=spec.head_init == "source")
    depth = strategy.reinit_depth(spec.params)
    if depth:
        ctx.set_tags({"reinit_blocks": ",".join(session.reinit_top(depth))})
    ctx.set_tags({"data_path": session.data_path})

    phases = strategy.phases(spec.params, spec.epochs, session.n_blocks)
    # the schedule (gradual unfreezing's unfreezings) and each phase's per-block lrs (llrd)
    ctx.set_tags({"phases": ", ".join(f"{ph.name}={n}" for ph, n in phases)})
    block_lrs = {ph.name: registry.block_lrs_tag(list(bb.get(spec.backbone).blocks), ph,
                                                 spec.lr * ph.lr_scale)
                 for ph, _ in phases if ph.lr_decay != 1.0}
    if block_lrs:
        ctx.set_tags({"block_lrs": _cache_tag(block_lrs)})
    total_epochs = sum(e for _, e in phases)
    steps_per_epoch = -(-n_train // spec.batch_size)
    history, best, epoch, best_state = [], (-1.0, 0), 0, None
    meter, probe, steps = None, CpuProbe(), [0]
    cache_labels, cache_seconds, rate_of = {}, 0.0, "whole model"
    bn_sample = precise_bn_sample(spec, n_train)
    bn_seconds, bn_layers = 0.0, set()
    for phase, n_epochs in phases:
        lr = spec.lr * phase.lr_scale
        trainable = session.begin_phase(phase, lr, spec.optimizer, spec.weight_decay)
        cache_labels[phase.name], rate_of, seconds = _cache_phase(session, spec, phase)
        cache_seconds += seconds
        if epoch == 0 and spec.head_init == "source":
            # the source model, its head included, on the target before any step: what
            # transfer gains over no adaptation (Lee et al. 2023's "No adaptation" row).
            # After the first begin_phase: a Keras model evaluates only once compiled
            before = session.evaluate("test", topk=test_topk(num_classes))
            ctx.log_final({"source_test_acc": before["acc"],
                           "source_test_loss": before["loss"]})
        # steady state of this phase
        meter = StepMeter(session.sync, warmup=WARMUP_STEPS, probe=probe)
        for _ in range(n_epochs):
            epoch += 1
            t0 = time.perf_counter()
            row = _train_epoch(session, meter, steps, epoch, ctx.step_progress(
                phase.name, epoch, total_epochs, steps_per_epoch), ctx)
            seconds = time.perf_counter() - t0
            if bn_sample is not None:  # statistics of the weights this epoch ended with
                t1 = time.perf_counter()
                bn_layers.add(session.recalibrate_bn(bn_sample))
                bn_seconds += time.perf_counter() - t1
            val = session.evaluate("val")
            row.update(val_loss=val["loss"], val_acc=val["acc"], epoch_seconds=seconds,
                       epoch_train_images_per_sec=n_train / seconds, lr=lr,
                       trainable_params=trainable, trainable_blocks=registry.resolve_depth(
                           phase.trainable_blocks, session.n_blocks))
            ctx.log_epoch(epoch, row)
            history.append({"epoch": epoch, "phase": phase.name, **row})
            if val["acc"] > best[0]:
                best = (val["acc"], epoch)
                if spec.select == "best_val":
                    best_state = session.snapshot()
            ctx.progress(phase=phase.name, epoch=epoch, epochs=total_epochs,
                         fraction=epoch / total_epochs, val_acc=val["acc"])

    test_epoch = epoch
    if best_state is not None and best[1] != epoch:  # select = best_val
        session.restore(best_state)
        test_epoch = best[1]
    topk = test_topk(num_classes)
    test = session.evaluate("test", topk=topk)
    trainable, total = session.param_counts()
    final = {"test_acc": test["acc"], "test_loss": test["loss"], "best_val_acc": best[0],
             "best_val_epoch": best[1], "test_epoch": test_epoch,
             "epochs_trained": epoch, "optimizer_steps": steps[0],
             "train_images_per_sec": meter.median if meter else None,
             "trainable_params": trainable, "total_params": total}
    if topk > 1:
        final["test_top5"] = test[f"top{topk}"]
    # saved before the model-only rates, whose synthetic steps move the weights
    if getattr(ctx, "save_backbone_to", None):
        session.save_backbone(ctx.save_backbone_to)
    # after the test evaluation, on the last phase's trainable set: it cannot touch a
    # reported accuracy
    probe.begin()
    final.update(session.model_only_rates(MODEL_ONLY_STEPS, WARMUP_STEPS))
    probe.end()
    final["feature_cache_seconds"] = cache_seconds
    final["contention_share"] = probe.share
    data_fed, model_only = final["train_images_per_sec"], final.get(
        "model_only_train_images_per_sec")
    tags = {"feature_cache_used": _cache_tag(cache_labels), "train_rate_of": rate_of,
            "contended": probe.tag(), "diverged": diverged_tag(history)}
    # what a strategy's backend hook did (LoRA: its adapters, their merge for inference)
    tags.update(getattr(session, "notes", None) or {})
    if bn_sample is not None:
        final["precise_bn_seconds"] = bn_seconds
        layers = max(bn_layers, default=0)
        tags["precise_bn"] = (f"{layers} BatchNorm layers from {len(bn_sample)} train images"
                              if layers else "no BatchNorm layer trains")
    fed_by = DATA_PATHS.get(session.data_path, session.data_path)
    tags["input_bound"] = (f"{str(data_fed < INPUT_BOUND_RATIO * model_only).lower()} "
                           f"({fed_by})" if data_fed and model_only else
                           f"unknown: the last phase ran no steps past the {WARMUP_STEPS} "
                           f"warm-up steps ({fed_by})")
    ctx.set_tags(tags)
    final["wall_seconds"] = ctx.elapsed()
    final["peak_memory_mb"] = session.peak_memory_mb()
    ctx.log_final(final)
    ctx.artifact("history.json", json.dumps(history, indent=1))


def _train_epoch(session: Session, meter: StepMeter, steps: list[int], epoch: int, on_step,
                 ctx) -> dict[str, float]:
    """One epoch: optimizer steps counted into `steps[0]`, a non-finite loss raised as
    Diverged with its epoch (the `diverged` tag says so too)."""
    before = steps[0]

    def counted(i: int) -> None:
        steps[0] += 1
        on_step(i)

    try:
        row = session.train_epoch(meter, counted)
        if not np.isfinite(row["train_loss"]):  # seen only in the epoch's mean: its end
            raise Diverged(steps[0] - before, row["train_loss"])
    except Diverged as e:
        err = Diverged(e.step, e.loss, epoch)
        ctx.set_tags({"diverged": f"true: {err}"})
        raise err from None
    session.sync()
    meter.stop()
    return row


def test_topk(num_classes: int) -> int:
    """The k of the test top-k accuracy reported besides top-1: 5 when there are more than
    5 classes, else 1 (no top-k)."""
    return 5 if num_classes > 5 else 1


def diverged_tag(history: list[dict]) -> str:
    """`diverged`: 'true: ...' when the last epoch's train loss is above the first's (the
    cell trained away from its start), else 'false'."""
    if len(history) < 2:
        return "false"
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    if last > first:
        return (f"true: final train loss {last:.4g} above the first epoch's {first:.4g} "
                f"(epoch {history[-1]['epoch']} vs 1)")
    return "false"


def precise_bn_sample(spec: RunSpec, n_train: int) -> np.ndarray | None:
    """The training images precise BatchNorm uses: `spec.precise_bn` of them (all when
    fewer), drawn once with the cell's seed, in that random order (batches of mixed
    classes); a lone last image is left out (batch statistics need two). None when off."""
    if spec.precise_bn <= 0:
        return None
    n = min(spec.precise_bn, n_train)
    if n % spec.batch_size == 1 and n > 1:
        n -= 1
    return np.random.default_rng(spec.seed).permutation(n_train)[:n]


def take(part: tuple, indices) -> tuple:
    """(items, labels) of a split part at `indices`: arrays (and decoded-cache rows) indexed,
    file lists picked."""
    items, labels = part
    items = (items[indices] if isinstance(items, (np.ndarray, decoded.DecodedImages))
             else [items[i] for i in indices])
    return items, np.asarray(labels)[indices]


def cache_plan(spec: RunSpec, phase: registry.Phase, n_blocks: int) -> tuple[str, int] | str:
    """('features', n_blocks) when the whole backbone is frozen, ('prefix', n_frozen) when
    the bottom blocks are, else the reason there is nothing to cache."""
    if not spec.feature_cache:
        return "feature_cache = false"
    if spec.augmentation != "none":
        return f"augmentation = {spec.augmentation!r} changes the inputs every epoch"
    blocks = bb.get(spec.backbone).blocks
    n_frozen = registry.frozen_bottom(phase, blocks, spec.backbone)
    if n_frozen == n_blocks:
        return "features", n_blocks
    if n_frozen == 0:
        return ("every block trains" if phase.blocks is None
                else f"the bottom block ({blocks[0]}) trains")
    return "prefix", n_frozen


def cache_limit_bytes() -> int:
    return int(float(os.environ.get("TLBENCH_FEATURE_CACHE_MB", FEATURE_CACHE_MB)) * 2**20)


def _cache_phase(session: Session, spec: RunSpec,
                 phase: registry.Phase) -> tuple[str, str, float]:
    """Cache what the phase allows: (the tag's label for it, what its train rate measures,
    the seconds spent caching)."""
    plan = cache_plan(spec, phase, session.n_blocks)
    if isinstance(plan, str):
        return f"off: {plan}", "whole model", 0.0
    kind, n_frozen = plan
    what = "features" if kind == "features" else f"the bottom {n_frozen} blocks' output"
    t0 = time.perf_counter()
    try:
        session.use_cache(kind, n_frozen, cache_limit_bytes())
    except CacheUnavailable as e:
        return f"off: {what} not cached: {e}", "whole model", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if kind == "features":
        return "features", "head only (cached features)", seconds
    return f"prefix:{n_frozen} blocks", f"blocks above the cached bottom {n_frozen}", seconds


def _cache_tag(labels: dict[str, str]) -> str:
    if len(set(labels.values())) == 1:
        return next(iter(labels.values()))
    return "; ".join(f"{name}={label}" for name, label in labels.items())
