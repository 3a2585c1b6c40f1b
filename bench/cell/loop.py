"""The per-cell loop, written once for every framework: data -> model -> the strategy's phases
-> epochs -> history and best validation accuracy -> test metrics -> model-only rates.

A backend supplies a small `Session` (strategies/<framework>_backend) and calls
`run_cell(session, spec, card, ctx)`; every metric name and definition lives here, so the two
frameworks cannot drift apart. Framework-free: nothing here imports torch or tensorflow.

Throughput (bench.cell.timing): `train_images_per_sec` is the last phase's data-fed rate (median
over its steps, warm-up excluded, device synchronised before each clock read);
`model_only_train_images_per_sec` is the same train step on a synthetic batch already on the
device, timed over as many steps as the data-fed median had (`model_only_steps`, 10 to 30); a
cell whose data-fed rate is under timing.INPUT_BOUND_RATIO of its model-only rate is tagged
`input_bound`, with the data path that fed it (`data_path`). A data-fed rate above the
model-only one (by more than the medians' noise) cannot be a measurement of the same steps: the
tag `rate_check` says `suspect: ...` and the cell's log gets a warning. Each timed window has
its own CpuProbe (`contention_share`, `contention_share_model_only`; `contended` names both).

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
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from bench import checkpoints, tracking_names
from bench import data as bdata
from bench.cell.contention import CpuProbe
from bench.cell.session import OrderCheck, Session
from bench.cell.timing import StepMeter, input_bound_tag, model_only_steps, rate_check
from bench.config.spec import RunSpec
from bench.data import decoded
from strategies import backbones as bb
from strategies import registry

WARMUP_STEPS = 3  # steps excluded from every throughput median
MODEL_ONLY_STEPS = 10  # timed model-only steps at least (as many as the data-fed median's, to 30)
FEATURE_CACHE_MB = 1024  # cached inputs held on the device at most (TLBENCH_FEATURE_CACHE_MB)


class CacheUnavailable(RuntimeError):
    """A backend cannot cache this cut (no single-tensor cut, too big); the message says why."""


class Diverged(RuntimeError):
    """The train loss became NaN or infinite. A backend raises it with the step (1-based,
    within the epoch); the cell loop adds the epoch."""

    def __init__(self, step: int, loss: float, epoch: int | None = None):
        self.step, self.loss, self.epoch = step, loss, epoch
        where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        super().__init__(f"diverged at {where} (train loss {loss})")


class DeviceMismatch(RuntimeError):
    """The cell runs on another kind of device than its identity (RunSpec.device_kind) says."""



def device_kind(tags: dict[str, str]) -> str:
    """The kind of device a session started on (RunSpec.device_kind's vocabulary): cpu, mps
    or cuda:<model>."""
    kind = tags["device_type"]
    if kind in ("cuda", "gpu"):
        return f"cuda:{tags['device']}"
    return kind


def run_cell(session: Session, spec: RunSpec, card: dict, ctx) -> None:
    """One cell, step by step; the Session calls keep the protocol's order (OrderCheck)."""
    session = session if isinstance(session, OrderCheck) else OrderCheck(session)
    prepare_device(session, spec, ctx)
    parts, num_classes = load_data(spec, card, ctx)
    strategy = registry.get(spec.strategy)
    build_model(session, spec, strategy, num_classes, parts, ctx)
    phases = plan_phases(session, spec, strategy, ctx)
    training = train_phases(session, spec, phases, num_classes, len(parts["train"][1]), ctx)
    if training.pruned:  # a tuned trial stopped early: never tested, never a result
        ctx.set_tags({"trial_state": "pruned", "pruned": training.pruned})
        ctx.log_final({"epochs_trained": training.epoch,
                       "optimizer_steps": training.steps[0]})
        return
    final = evaluate_test(session, training, num_classes)
    # saved before the model-only rates, whose synthetic steps move the weights
    if getattr(ctx, "save_backbone_to", None):
        session.save_backbone(ctx.save_backbone_to)
    measure_model_only(session, training, final)
    record(session, training, final, ctx)


def prepare_device(session: Session, spec: RunSpec, ctx) -> None:
    """Start the session on the cell's device (refused when it is not the device the cell's
    identity names), deterministic algorithms on or off, the seed."""
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


def load_data(spec: RunSpec, card: dict, ctx) -> tuple[dict, int]:
    """The split parts (through the decoded cache when on) and the number of classes."""
    prepared = bdata.prepare(card, spec.seed, spec.subset, spec.train_on)
    num_classes = prepared.source.num_classes
    ctx.log_inputs([{**d, "schema": tracking_names.input_schema(spec.image_size, num_classes),
                     "profile": tracking_names.input_profile(d)}
                    for d in bdata.dataset_inputs(card, prepared, spec.seed, spec.subset)])
    parts = {k: prepared.part(k) for k in ("train", "val", "test")}
    if spec.decoded_cache:
        t0 = time.perf_counter()
        parts, note = decoded.decoded_parts(parts, spec.image_size)
        ctx.log_final({"decoded_cache_seconds": time.perf_counter() - t0})
    else:
        note = decoded.OFF
    ctx.set_tags({"decoded_cache_used": note})
    ctx.log_final({"n_train": len(parts["train"][1]), "n_val": len(parts["val"][1]),
                   "n_test": len(parts["test"][1]), "num_classes": num_classes})
    return parts, num_classes


def build_model(session: Session, spec: RunSpec, strategy: registry.Strategy,
                num_classes: int, parts: dict, ctx) -> None:
    """The model and its loaders, with the harness's pretrained weights when the cell names
    them."""
    session.build(spec, num_classes, parts)
    # weights pretrained by the harness on a source dataset, then the AnB re-initialisation
    checkpoint = checkpoints.checkpoint_for(spec, ctx)
    if checkpoint:
        session.load_backbone(checkpoint, head=spec.head_init == "source")
    depth = strategy.reinit_depth(spec.params)
    if depth:
        ctx.set_tags({"reinit_blocks": ",".join(session.reinit_top(depth))})
    ctx.set_tags({"data_path": session.data_path})


def plan_phases(session: Session, spec: RunSpec, strategy: registry.Strategy,
                ctx) -> list[tuple[registry.Phase, int]]:
    """The strategy's phases with their epochs, tagged."""
    phases = strategy.phases(spec.params, spec.epochs, session.n_blocks)
    # the schedule (gradual unfreezing's unfreezings) and each phase's per-block lrs (llrd)
    ctx.set_tags({"phases": ", ".join(f"{ph.name}={n}" for ph, n in phases)})
    block_lrs = {ph.name: registry.block_lrs_tag(list(bb.get(spec.backbone).blocks), ph,
                                                 spec.lr * ph.lr_scale)
                 for ph, _ in phases if ph.lr_decay != 1.0}
    if block_lrs:
        ctx.set_tags({"block_lrs": _cache_tag(block_lrs)})
    return phases


@dataclass
class Training:
    """What the epoch loop carries from epoch to epoch, and hands to the test and the
    records."""

    n_train: int
    total_epochs: int
    bn_sample: np.ndarray | None  # precise BatchNorm's images (None: off)
    history: list[dict] = field(default_factory=list)
    best: tuple[float, int] = (-1.0, 0)  # (val accuracy, epoch)
    best_state: object = None  # a snapshot of the best epoch (select = best_val)
    epoch: int = 0
    steps: list[int] = field(default_factory=lambda: [0])  # optimizer steps so far
    meter: StepMeter | None = None  # the current phase's: the last one's at the end
    probe: CpuProbe = field(default_factory=CpuProbe)  # over the data-fed timed steps
    model_only_probe: CpuProbe = field(default_factory=CpuProbe)  # over the model-only ones
    cache_labels: dict[str, str] = field(default_factory=dict)  # phase -> feature cache
    cache_seconds: float = 0.0
    rate_of: str = "whole model"  # what the train rates measure
    bn_seconds: float = 0.0
    bn_layers: set[int] = field(default_factory=set)
    pruned: str = ""  # why a tuned trial stopped early (median pruning), else ""
    num_classes: int = 0


def train_phases(session: Session, spec: RunSpec, phases: list[tuple[registry.Phase, int]],
                 num_classes: int, n_train: int, ctx) -> Training:
    """Every phase's epochs, in order."""
    training = Training(n_train, sum(e for _, e in phases), precise_bn_sample(spec, n_train),
                        num_classes=num_classes)
    steps_per_epoch = -(-n_train // spec.batch_size)
    for phase, n_epochs in phases:
        lr = spec.lr * phase.lr_scale
        trainable = session.begin_phase(phase, lr, spec.optimizer, spec.weight_decay)
        label, training.rate_of, seconds = _cache_phase(session, spec, phase)
        training.cache_labels[phase.name] = label
        training.cache_seconds += seconds
        if training.epoch == 0 and spec.head_init == "source":
            # the source model, its head included, on the target before any step: what
            # transfer gains over no adaptation (Lee et al. 2023's "No adaptation" row).
            # After the first begin_phase: a Keras model evaluates only once compiled
            before = session.evaluate("test", topk=test_topk(num_classes))
            ctx.log_final({"source_test_acc": before["acc"],
                           "source_test_loss": before["loss"]})
        # steady state of this phase
        training.meter = StepMeter(session.sync, warmup=WARMUP_STEPS, probe=training.probe)
        for _ in range(n_epochs):
            run_epoch(session, spec, phase, lr, trainable, training, steps_per_epoch, ctx)
            if training.pruned:
                return training
    return training


def run_epoch(session: Session, spec: RunSpec, phase: registry.Phase, lr: float,
              trainable: int, training: Training, steps_per_epoch: int, ctx) -> None:
    """Train one epoch, recalibrate BatchNorm (precise_bn), validate, record, keep the best."""
    training.epoch += 1
    epoch = training.epoch
    t0 = time.perf_counter()
    row = _train_epoch(session, training.meter, training.steps, epoch, ctx.step_progress(
        phase.name, epoch, training.total_epochs, steps_per_epoch), ctx)
    seconds = time.perf_counter() - t0
    recalibrate_bn(session, training)
    val = session.evaluate("val")
    row.update(val_loss=val["loss"], val_acc=val["acc"], epoch_seconds=seconds,
               epoch_train_images_per_sec=training.n_train / seconds, lr=lr,
               trainable_params=trainable, trainable_blocks=registry.resolve_depth(
                   phase.trainable_blocks, session.n_blocks))
    ctx.log_epoch(epoch, row)
    training.history.append({"epoch": epoch, "phase": phase.name, **row})
    keep_best(session, spec, training, val["acc"])
    below = getattr(ctx, "prune_below", {}).get(epoch)
    if below is not None and val["acc"] < below:
        training.pruned = (f"epoch {epoch}: val_acc {val['acc']:.4f} < {below:.4f}, the median "
                           f"of the study's finished trials at this epoch")
    ctx.progress(phase=phase.name, epoch=epoch, epochs=training.total_epochs,
                 fraction=epoch / training.total_epochs, val_acc=val["acc"])


def recalibrate_bn(session: Session, training: Training) -> None:
    """Precise BatchNorm, when on: the statistics of the weights this epoch ended with."""
    if training.bn_sample is None:
        return
    t0 = time.perf_counter()
    training.bn_layers.add(session.recalibrate_bn(training.bn_sample))
    training.bn_seconds += time.perf_counter() - t0


def keep_best(session: Session, spec: RunSpec, training: Training, val_acc: float) -> None:
    """The best validation accuracy and its epoch; with select = best_val, its weights."""
    if val_acc > training.best[0]:
        training.best = (val_acc, training.epoch)
        if spec.select == "best_val":
            training.best_state = session.snapshot()


def evaluate_test(session: Session, training: Training, num_classes: int) -> dict:
    """The test metrics of the weights `select` chose (the best epoch's, restored), with the
    budget trained and the parameter counts: the cell's final metrics so far."""
    test_epoch = training.epoch
    if training.best_state is not None and training.best[1] != training.epoch:
        # select = best_val
        session.restore(training.best_state)
        test_epoch = training.best[1]
    topk = test_topk(num_classes)
    result = session.evaluate("test", topk=topk)
    trainable, total = session.param_counts()
    final = {"test_acc": result["acc"], "test_loss": result["loss"],
             "best_val_acc": training.best[0], "best_val_epoch": training.best[1],
             "test_epoch": test_epoch, "epochs_trained": training.epoch,
             "optimizer_steps": training.steps[0],
             "train_images_per_sec": training.meter.median if training.meter else None,
             "trainable_params": trainable, "total_params": total}
    if topk > 1:
        final["test_top5"] = result[f"top{topk}"]
    return final


def measure_model_only(session: Session, training: Training, final: dict) -> None:
    """Model-only train and inference rates into `final`. After the test evaluation, on the
    last phase's trainable set: it cannot touch a reported accuracy. Timed over as many steps
    as the data-fed median had (MODEL_ONLY_STEPS to 30): a median of 10 steps, taken in one
    burst at the cell's end, read a momentary slowdown as the model's speed, and the data-fed
    rate came out above it. Its own CpuProbe: a busy machine in that short window is not
    diluted by the long data-fed one."""
    steps = model_only_steps(training.meter, MODEL_ONLY_STEPS)
    training.model_only_probe.begin()
    final.update(session.model_only_rates(steps, WARMUP_STEPS))
    training.model_only_probe.end()
    final["model_only_steps"] = steps


def record(session: Session, training: Training, final: dict, ctx) -> None:
    """The final tags, metrics and history."""
    final["feature_cache_seconds"] = training.cache_seconds
    final["contention_share"] = training.probe.share
    final["contention_share_model_only"] = training.model_only_probe.share
    tags = {"feature_cache_used": _cache_tag(training.cache_labels),
            "train_rate_of": training.rate_of,
            "contended": contended_tag(training.probe, training.model_only_probe),
            "diverged": diverged_tag(training.history, training.num_classes)}
    # what a strategy's backend hook did (LoRA: its adapters, their merge for inference)
    tags.update(getattr(session, "notes", None) or {})
    if training.bn_sample is not None:
        final["precise_bn_seconds"] = training.bn_seconds
        layers = max(training.bn_layers, default=0)
        tags["precise_bn"] = (f"{layers} BatchNorm layers from {len(training.bn_sample)} "
                              f"train images" if layers else "no BatchNorm layer trains")
    tags["input_bound"] = input_bound_tag(session.data_path, final["train_images_per_sec"],
                                          final.get("model_only_train_images_per_sec"),
                                          WARMUP_STEPS)
    tags["rate_check"] = rate_check(final["train_images_per_sec"],
                                    final.get("model_only_train_images_per_sec"))
    if tags["rate_check"].startswith("suspect"):  # into the cell's log (cell.log)
        print(f"WARNING: {tags['rate_check']}", file=sys.stderr, flush=True)
    ctx.set_tags(tags)
    final["wall_seconds"] = ctx.elapsed()
    final["peak_memory_mb"] = session.peak_memory_mb()
    ctx.log_final(final)
    ctx.artifact("history.json", json.dumps(training.history, indent=1))


def contended_tag(data_fed: CpuProbe, model_only: CpuProbe) -> str:
    """`contended`: true when other processes took more than CONTENDED_SHARE of the machine
    in either timed window (the data-fed steps, the model-only steps), with both shares."""
    tags = [data_fed.tag(), model_only.tag()]
    if model_only.share is None:
        return tags[0]
    verdict = "true" if any(t.startswith("true") for t in tags) else tags[0].split(":")[0]
    return (f"{verdict}: data-fed steps: {tags[0].split(': ', 1)[1]}; model-only steps: "
            f"{tags[1].split(': ', 1)[1]}")


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


CHANCE_FACTOR = 10  # a final train loss this many times chance's (ln K) is divergence


def diverged_tag(history: list[dict], num_classes: int = 0) -> str:
    """`diverged`: 'true: ...' when the last epoch's train loss is above the first's (the
    cell trained away from its start) or far above the chance level of the task
    (CHANCE_FACTOR x ln K: lr 1000 ends near 1e6 while its loss still fell), else 'false'.
    A test accuracy at chance alone is not divergence: evaluation with BatchNorm statistics
    that never caught up (the default grid's from-scratch trap) trains fine."""
    if not history:
        return "false"
    last = history[-1]["train_loss"]
    chance = math.log(num_classes) if num_classes > 1 else math.inf
    if last > CHANCE_FACTOR * chance:
        return (f"true: final train loss {last:.4g} is over {CHANCE_FACTOR}x the chance "
                f"level ln {num_classes} = {chance:.3g}")
    if len(history) < 2:
        return "false"
    first = history[0]["train_loss"]
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
