"""The vocabulary strategies are written in, framework-free: a Phase (which blocks and
parameters train, for how much of the budget, at what learning rate), a strategy's Params, the
Strategy itself, how a budget splits over phases, and which named blocks a phase trains.
strategies/registry.py declares every strategy in these terms; the backends read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from strategies.constraint import Constraint

ALL = -1
"""`trainable_blocks` value meaning every block of the backbone."""

BN_POLICIES = ("train", "frozen")
"""BatchNorm in *trainable* blocks: 'train' updates running statistics (PyTorch train mode,
Keras training=True); 'frozen' keeps them in inference mode, as the Keras transfer-learning
guide recommends after unfreezing."""

ONLY = ("all", "bias", "norm", "lora", "prompt", "adapter")
"""Which parameters of a phase's trainable blocks train: all of them; the biases ('bias':
every additive bias, the convolutions' and linear layers' and the norm layers' beta, which
PyTorch names `bias` too); the normalisation layers' affine gamma and beta ('norm':
BatchNorm, LayerNorm, GroupNorm); or the low-rank adapters the backend adds to them ('lora',
with Phase.lora set: strategies/lora.py); a vision transformer's prompt tokens ('prompt',
VPT) or bottleneck adapters ('adapter'), which the model is built with (Strategy.additions).
The head trains whole, or not at all (Phase.train_head False)."""


@dataclass(frozen=True)
class Phase:
    trainable_blocks: int  # top blocks trainable besides the head; 0 = head only, ALL = all
    epoch_share: float = 1.0  # share of the cell's epochs (> 0: at least one; 0: skipped)
    lr_scale: float = 1.0
    bn: str = "train"
    name: str = "train"
    blocks: tuple[str, ...] | None = None  # these named blocks trainable; None: the top ones
    only: str = "all"  # which parameters of the trainable blocks train (ONLY)
    # layer-wise lr decay: the head at lr, the block d blocks below it at lr * lr_decay**d
    # (the top block d = 1); 1.0 = one lr for everything (block_lr_scales)
    lr_decay: float = 1.0
    # L2-SP: (alpha, beta) adds alpha * (w - w0) to the backbone's gradients (w0 = the
    # weights at the phase's start) and beta * w to the head's; None = no penalty
    l2sp: tuple[float, float] | None = None
    # LoRA: (rank, alpha) adapters added to the trainable blocks' convolutions and linear
    # layers when the phase begins (strategies/lora.py); trains them with only='lora'
    lora: tuple[int, float] | None = None
    # the head trains (default); False keeps it as loaded, bit for bit (blocks[head=frozen]
    # with head_init="source": the source's head, the paper's "Block 1" arm)
    train_head: bool = True

    def __post_init__(self):
        if (self.only == "lora") != (self.lora is not None):
            raise ValueError("only='lora' and lora=(rank, alpha) go together")
        if not self.train_head and self.blocks is None and self.trainable_blocks == 0:
            raise ValueError("a phase with a frozen head and no trainable block trains "
                             "nothing")
        if not self.train_head and self.blocks == ():
            raise ValueError("a phase with a frozen head and no named block trains nothing")


@dataclass(frozen=True)
class Param:
    """A strategy parameter. `kind` is 'depth' (an int in 1..n_blocks or 'all'), 'blocks' (a
    set of the backbone's block names joined by '+', stored in backbone order), 'float',
    'int' or 'choice'."""

    name: str
    kind: str
    default: object = None  # None = required
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    @property
    def constraint(self) -> Constraint | None:
        """The rule of a 'float', 'int' or 'choice' parameter; None for 'depth' and
        'blocks', whose values depend on the backbone (bench/config/grid.py checks them)."""
        kinds = {"float": float, "int": int, "choice": None}
        if self.kind not in kinds:
            return None
        return Constraint(kinds[self.kind], minimum=self.minimum, maximum=self.maximum,
                          choices=self.choices, help=self.help)


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    build_phases: Callable[[dict], list[Phase]]
    params: tuple[Param, ...] = field(default=())
    # top blocks re-initialised (random, as weights='none') before training; None = none
    build_reinit: Callable[[dict], int | str] | None = None
    # why the strategy cannot run on a backbone (BackboneInfo), or None; checked at grid load
    backbone_problem: Callable[[object], str | None] | None = None
    # phases that depend on the budget (gradual unfreezing): (params, epochs, n_blocks or
    # None) -> phases whose epoch_share is their epoch count; replaces build_phases, and
    # min_budget(params) says the fewest epochs it can train
    build_schedule: Callable[[dict, int, int | None], list[Phase]] | None = None
    min_budget: Callable[[dict], int] | None = None
    # what the model is built with besides the backbone (vision transformers): {"prompts":
    # (length, deep)} for VPT, {"adapters": width}; None = nothing
    build_additions: Callable[[dict], dict] | None = None

    def additions(self, params: dict) -> dict:
        """The new modules the backends build into the model for this strategy."""
        return self.build_additions(self.with_defaults(params)) if self.build_additions else {}

    def reinit_depth(self, params: dict) -> int | str:
        """How many top blocks start from random init instead of the loaded weights (0 =
        none, 'all' = every block)."""
        return self.build_reinit(self.with_defaults(params)) if self.build_reinit else 0

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def with_defaults(self, params: dict) -> dict:
        """`params` with every parameter that has a default filled in."""
        return {**{p.name: p.default for p in self.params if p.default is not None}, **params}

    def min_epochs(self, params: dict) -> int:
        """The smallest budget this strategy can train: one epoch per phase with a share
        (a schedule: its min_budget)."""
        if self.build_schedule:
            return self.min_budget(self.with_defaults(params))
        return max(1, sum(ph.epoch_share > 0 for ph in self.build_phases(
            self.with_defaults(params))))

    def budget_problem(self, params: dict, epochs: int) -> str | None:
        """Why `epochs` cannot be split over the phases, or None."""
        need = self.min_epochs(params)
        if epochs >= need:
            return None
        if self.build_schedule:
            return (f"{self.name} unfreezes its first block after the head-only epochs; "
                    f"allowed: epochs >= {need}")
        names = [ph.name for ph in self.build_phases(self.with_defaults(params))
                 if ph.epoch_share > 0]
        return (f"{self.name} trains {len(names)} phases ({', '.join(names)}) of at least "
                f"one epoch each; allowed: epochs >= {need}")

    def phases(self, params: dict, epochs: int,
               n_blocks: int | None = None) -> list[tuple[Phase, int]]:
        """The phases with their epoch counts for a cell of `epochs` epochs: the counts sum
        to `epochs` exactly (every strategy trains the cell's whole budget, no more), each
        phase with a share > 0 gets at least one epoch, the rest go by largest remainder of
        share x epochs (ties to the later phase: 5 epochs at 0.5/0.5 are 2 + 3).
        `n_blocks` (the backbone's) caps a schedule's depths: the phases past the last
        block become one 'all' phase; without it a schedule's depths are not capped (fine
        for budget checks; a run passes it)."""
        problem = self.budget_problem(params, epochs)
        if problem:
            raise BudgetError(f"epochs = {epochs}: {problem}")
        if self.build_schedule:
            phases = self.build_schedule(self.with_defaults(params), epochs, n_blocks)
        else:
            phases = self.build_phases(self.with_defaults(params))
        out = []
        for ph, n in zip(phases, split_epochs([ph.epoch_share for ph in phases], epochs),
                         strict=True):
            if out and replace(out[-1][0], epoch_share=1) == replace(ph, epoch_share=1):
                n += out.pop()[1]  # equal consecutive phases are one phase
                ph = replace(ph, epoch_share=n)
            out.append((ph, n))
        return out


class BudgetError(ValueError):
    """A cell's epochs cannot cover its strategy's phases."""


def split_epochs(shares: list[float], epochs: int) -> list[int]:
    """`epochs` split over phases in proportion to `shares` (normalised): the counts sum to
    `epochs`, a share > 0 gets at least one, a share of 0 none. Largest remainder, ties to
    the later phase. Needs epochs >= the number of shares > 0."""
    total = sum(shares)
    ideal = [s / total * epochs if total > 0 else 0.0 for s in shares]
    counts = [max(1, int(x)) if s > 0 else 0 for s, x in zip(shares, ideal, strict=True)]
    while sum(counts) < epochs:  # the largest shortfall first; ties to the later phase
        i = max((i for i, s in enumerate(shares) if s > 0),
                key=lambda i: (ideal[i] - counts[i], i))
        counts[i] += 1
    while sum(counts) > epochs:  # minimum-one rounding overshot: take from the largest excess
        i = max((i for i, c in enumerate(counts) if c > 1),
                key=lambda i: (counts[i] - ideal[i], -i))
        counts[i] -= 1
    return counts


def resolve_depth(depth: int | str, n_blocks: int) -> int:
    """'all' (or ALL) -> n_blocks; an int stays as it is (validated elsewhere)."""
    return n_blocks if depth in ("all", ALL) else int(depth)


def top_blocks(blocks: list[str], depth: int | str, backbone: str) -> list[str]:
    """The top `depth` of a backbone's named blocks (input to output order): what a phase
    unfreezes or reinit_top re-initialises, the same in every framework."""
    k = resolve_depth(depth, len(blocks))
    if not 0 <= k <= len(blocks):
        raise ValueError(f"{backbone}: {k} top blocks asked, it has {len(blocks)}: "
                         f"{', '.join(blocks)}")
    return list(blocks[len(blocks) - k:]) if k else []


def phase_blocks(phase: Phase, blocks: list[str] | tuple[str, ...], backbone: str) -> list[str]:
    """The blocks a phase trains (all or, with `only`, some of their parameters), input to
    output order: its named `blocks`, else the top `trainable_blocks`."""
    if phase.blocks is None:
        return top_blocks(list(blocks), phase.trainable_blocks, backbone)
    unknown = [b for b in phase.blocks if b not in blocks]
    if unknown:
        raise ValueError(f"{backbone}: unknown block(s) {', '.join(unknown)}; its blocks: "
                         f"{', '.join(blocks)}")
    return [b for b in blocks if b in phase.blocks]


def frozen_bottom(phase: Phase, blocks: list[str] | tuple[str, ...], backbone: str) -> int:
    """How many bottom blocks the phase leaves wholly frozen (what a prefix cache may skip)."""
    trained = phase_blocks(phase, blocks, backbone)
    return list(blocks).index(trained[0]) if trained else len(blocks)


def split_blocks(value: str) -> tuple[str, ...]:
    """A 'blocks' parameter's value, 'stem+stage1', as its names."""
    return tuple(b.strip() for b in str(value).split("+"))


def block_lr_scales(blocks: list[str], phase: Phase) -> dict[str, float]:
    """Each named block's lr relative to the phase's lr, and the head's (1.0): the top block
    at lr_decay, the next at lr_decay**2, ... (timm's layer_decay counted in named blocks)."""
    n = len(blocks)
    scales = {b: phase.lr_decay ** (n - i) for i, b in enumerate(blocks)}
    return {**scales, "head": 1.0}


def block_lrs_tag(blocks: list[str], phase: Phase, lr: float) -> str:
    """'stem=2.4e-05, ..., head=0.001': the learning rates a phase trains each block at."""
    return ", ".join(f"{b}={lr * s:.4g}" for b, s in block_lr_scales(blocks, phase).items())
