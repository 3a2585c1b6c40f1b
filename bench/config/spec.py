"""RunSpec: one grid cell, frozen. Its whole identity: everything that logs, resumes or
reports goes through it.

    >>> s = RunSpec(framework="torch", backbone="resnet50", strategy="partial",
    ...             strategy_params=(("depth", 2),), dataset="flowers")
    >>> s.name
    'torch/resnet50/partial[depth=2]/flowers/seed0'
    >>> RunSpec.from_params(s.to_params()) == s
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields

from bench.config import pretrained
from bench.config.selector import parse_value
from strategies import backbones as _backbones
from strategies import registry as _registry
from strategies.constraint import Constraint

SPEC_VERSION = 1  # bump when a field's meaning changes: old hashes then stop matching

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "sgd")
AUGMENTATIONS = ("none", "flip", "flip_crop")
SELECTS = ("last", "best_val")  # which weights the test evaluates (bench/cell/loop.py)
HEADS = tuple(_backbones.HEADS)  # declared in strategies/backbones.py
HEAD_INITS = ("new", "source")  # the head's start: fresh, or the pretraining's trained head
ROLES = ("", "trial", "final")
TRAIN_ON = ("train", "train+val")


def _checked(default, **constraint):
    """A field's default and its constraint, declared together; the kind comes from the
    field's annotation (check_value)."""
    return field(default=default, metadata={"check": Constraint(**constraint)})


@dataclass(frozen=True)
class RunSpec:
    framework: str  # which framework trains the cell: torch or keras
    backbone: str  # a backbone of the catalogue (strategies/backbones.py)
    dataset: str
    # a registered strategy (strategies/registry.py); its parameters are strategy_params
    strategy: str = "feature_extraction"
    strategy_params: tuple[tuple[str, object], ...] = ()
    weights: str = "imagenet"
    # samples drawn (stratified) from the dataset before splitting; 0 = all
    subset: int = _checked(0, minimum=0)
    # the square input size in pixels every image is resized to (a vision transformer's
    # must be a multiple of its patch size)
    image_size: int = _checked(224, minimum=8)
    batch_size: int = _checked(32, minimum=1)  # training batch, images
    # the cell's whole training budget, split over its strategy's phases
    epochs: int = _checked(10, minimum=1)
    optimizer: str = _checked("adam", choices=OPTIMIZERS)  # the optimizer; sgd with momentum 0.9
    # the learning rate (the head's; a phase or block may scale it: two_stage, llrd)
    lr: float = _checked(1e-3, minimum=0, exclusive=True)
    weight_decay: float = _checked(0.0, minimum=0)  # decoupled with adamw, L2 otherwise
    head: str = _checked("linear", choices=HEADS)  # the new classifier on the features
    # "source": the head starts as the `pretrained:` source's trained head (same classes),
    # so a label shift is one the head must undo (Lee et al. 2023); "new": a fresh head
    head_init: str = _checked("new", choices=HEAD_INITS)
    # training arithmetic: bf16 / fp16 autocast (mixed precision), fp32 everywhere
    precision: str = _checked("fp32", choices=PRECISIONS)
    # per-batch random flips (and crops), seeded: a rerun draws the same
    augmentation: str = _checked("none", choices=AUGMENTATIONS)
    seed: int = _checked(0, minimum=0)  # seeds the split, the init, the batch order, augmentation
    # BatchNorm statistics recomputed before every evaluation from this many training images
    # (0 = off: the running averages training left; bench/cell/loop.py)
    precise_bn: int = _checked(0, minimum=0)
    # the weights tested: the last epoch's, or those of the best validation epoch (restored)
    select: str = _checked("last", choices=SELECTS)
    # the kind of device the cell is measured on (bench/devices.py): cpu, mps or
    # cuda:<model>. Part of the identity: a cell on another device is another measurement.
    device_kind: str = "cpu"
    # `name=digest,...` of every dataset card the cell reads (its dataset and a pretraining's
    # source; bench/data/cards.py card_digest), set by the grid: editing a card's split or
    # shift options changes the cell's identity. "" for a spec made without a grid.
    card_digests: str = ""
    # speed options (canonical() omits defaults, so cells without them keep their hashes)
    feature_cache: bool = True  # frozen backbone/prefix computed once (bench/cell/loop.py)
    decoded_cache: bool = True  # image files decoded once into a memmap (bench/data/decoded.py)
    channels_last: bool = False  # PyTorch NHWC memory format (Keras is NHWC already)
    compile: bool = False  # torch.compile / Keras jit_compile (XLA)
    # loader workers (PyTorch) / tf.data parallel calls; -1 = auto
    workers: int = _checked(-1, minimum=-1)
    # a tuned comparison's cells (bench/run/tune.py): "" an ordinary cell, "trial" one
    # trial of a study, "final" the chosen setting re-run on a final seed
    role: str = _checked("", choices=ROLES)
    # what the cell trains on: its train part, or train + val (tune.refit = "train+val":
    # VTAB's refit of the chosen setting on all its labelled images)
    train_on: str = _checked("train", choices=TRAIN_ON)

    def __post_init__(self):
        # defaults filled in and sorted, so equal cells compare and hash equal however they
        # were written (`two_stage[depth=2]` with or without its lr_scale spelled out)
        params = dict(self.strategy_params)
        if self.strategy in _registry.STRATEGIES:
            params = _registry.get(self.strategy).with_defaults(params)
        object.__setattr__(self, "strategy_params", tuple(sorted(params.items())))
        for f in ("lr", "weight_decay"):  # lr=1 and lr=1.0 are one cell with one hash
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "weights", pretrained.normalize(self.weights))

    # ---- names -------------------------------------------------------------------------
    @property
    def strategy_label(self) -> str:
        """`partial[depth=2]`: the strategy and its parameters that differ from defaults."""
        shown = [f"{k}={_fmt(v)}" for k, v in self._non_default_params()]
        return f"{self.strategy}[{','.join(shown)}]" if shown else self.strategy

    @property
    def name(self) -> str:
        ds = self.dataset if not self.subset else f"{self.dataset}[n={self.subset}]"
        role = f"/{self.role}" if self.role else ""
        return (f"{self.framework}/{self.backbone}/{self.strategy_label}/{ds}/seed{self.seed}"
                + role)

    def label(self, fields_shown: tuple[str, ...] = ()) -> str:
        """The name plus the fields a grid varies beyond the name's own (`[weights=none]`)."""
        extra = [f"{f}={_fmt(getattr(self, f))}" for f in fields_shown
                 if f not in _NAMED_FIELDS]
        return self.name + (f" [{','.join(extra)}]" if extra else "")

    # ---- identity ----------------------------------------------------------------------
    def canonical(self) -> dict:
        """Fields that differ from their defaults (required ones always): a field added
        later with a default leaves every existing hash unchanged."""
        d = {"spec_version": SPEC_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.default is dataclasses.MISSING or v != f.default:
                d[f.name] = v
        # strategy parameters likewise: only those that differ from the strategy's defaults
        d["strategy_params"] = dict(self._non_default_params())
        if not d["strategy_params"]:
            del d["strategy_params"]
        return d

    def _non_default_params(self) -> list[tuple[str, object]]:
        strat = _registry.STRATEGIES.get(self.strategy)
        order = [p.name for p in strat.params] if strat else []
        out = []
        # in declaration order (depth first), so labels read `partial[depth=2,bn=frozen]`
        for k, v in sorted(self.strategy_params,
                           key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0])):
            try:
                default = strat.param(k).default if strat else None
            except KeyError:
                default = None
            if default is None or v != default:
                out.append((k, v))
        return out

    @property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def params(self) -> dict:
        return dict(self.strategy_params)

    def additions(self) -> dict:
        """What the model is built with besides the backbone (VPT's prompts, adapters)."""
        return _registry.get(self.strategy).additions(self.params)

    # ---- MLflow params -----------------------------------------------------------------
    def to_params(self) -> dict[str, str]:
        """Flat string params for MLflow: one key per field, `strategy.<k>` per parameter."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name != "strategy_params":
                out[f.name] = _fmt(getattr(self, f.name))
        for k, v in self.strategy_params:
            out[f"strategy.{k}"] = _fmt(v)
        out["strategy_label"] = self.strategy_label
        return out

    @classmethod
    def from_params(cls, params: dict[str, str]) -> RunSpec:
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            if f.name != "strategy_params" and f.name in params:
                kwargs[f.name] = _parse(params[f.name], _HINTS[f.name])
        sparams = tuple((k[len("strategy."):], parse_value(v)) for k, v in params.items()
                        if k.startswith("strategy."))
        return cls(**kwargs, strategy_params=sparams)

    def to_json(self) -> str:
        return json.dumps(self.to_params(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_params(json.loads(text))


_HINTS = typing.get_type_hints(RunSpec)  # field -> its real type (int, not "int")
# every field's constraint (a scalar field without one is still checked for its kind)
CONSTRAINTS: dict[str, Constraint] = {
    f.name: f.metadata.get("check", Constraint()).with_kind(_HINTS[f.name])
    for f in fields(RunSpec) if f.name != "strategy_params"}


def check_value(name: str, value: object) -> str | None:
    """None if `value` satisfies the constraint declared on RunSpec field `name`, else what
    is allowed. Checks needing registries or dataset cards (framework, backbone, dataset,
    weights) are bench/config/grid.py's."""
    return CONSTRAINTS[name].problem(value)


_NAMED_FIELDS = ("framework", "backbone", "strategy", "strategy_params", "dataset", "subset",
                 "seed")


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


format_value = _fmt  # how a field's value reads in names and labels (bench/config/grid.py)


def _parse(text: str, typ: type) -> object:
    if typ is bool:
        if text not in ("true", "false"):
            raise ValueError(f"expected 'true' or 'false', got {text!r}")
        return text == "true"
    if typ in (int, float):
        return typ(text)
    return text
