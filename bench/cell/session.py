"""The seam between the per-cell loop (bench/cell/loop.py) and a framework backend: the
Session protocol a backend implements, OrderCheck that holds a session to the protocol's call
order, and BackboneHandling, the Session methods every backend delegates the same way.
Framework-free: nothing here imports torch or tensorflow."""

from __future__ import annotations

from typing import Protocol

from bench.cell.timing import StepMeter
from bench.config.spec import RunSpec
from strategies import registry


class Session(Protocol):
    """What a framework backend does for the cell loop. One session runs one cell.

    The call order (bench.cell.loop.run_cell keeps it; OrderCheck refuses a call out of it):
    start, then determinism right after it; seed and build; load_backbone and reinit_top
    after build and before the first phase; per phase begin_phase, use_cache (if at all)
    right after it: the cache lives until the next begin_phase; then train_epoch,
    recalibrate_bn and evaluate. snapshot only right after an evaluate, restore only right
    before one (select = best_val). model_only_rates runs last: its synthetic steps move the
    weights, so after it only param_counts, peak_memory_mb and sync may come.
    """

    data_path: str  # how the training images reach the model: a key of timing.DATA_PATHS
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
