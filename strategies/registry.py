"""The strategy registry: every transfer-learning strategy, declared once, framework-free.

A strategy is a short list of phases. Each phase says how many of the backbone's top blocks
are trainable (0 = the new head only, ALL = everything), what share of the cell's epochs it
gets, the learning-rate scale relative to the cell's lr, and what BatchNorm does in the
trainable blocks; optionally which named blocks train instead of the top ones (`blocks`),
which of their parameters (`only`: biases, norm layers' affine, LoRA adapters), a per-block
learning-rate decay (`lr_decay`) and an L2-SP penalty (`l2sp`). BatchNorm in frozen blocks
never updates: frozen means frozen.

Adding a strategy (gradual unfreezing, BN-only tuning, ...) is one `register(...)` call here
plus, at most, a small hook per framework backend.

    feature_extraction            frozen backbone, new head            (seed: stage 1)
    partial[depth=k]              top k named blocks + head trainable
    full                          everything trainable
    two_stage[depth=k,lr_scale=s] head first, then top k blocks at lr*s (seed: VGG16 recipe;
                                  LP-FT in the literature)
    reinit_top[depth=k,copied=c]  top k blocks re-initialised and trained, the bottom ones
                                  copied and frozen (c=frozen) or fine-tuned (c=finetune):
                                  Yosinski et al. 2014's AnB / AnB+ with n = blocks - k
    blocks[names=a+b]             the named blocks + head trainable, any set (surgical
                                  fine-tuning, Lee et al. 2023); `+` joins one set, a comma
                                  sweeps sets as everywhere: names=stem,stage4 is two cells;
                                  head=frozen keeps the head as loaded (needs
                                  head_init="source": the pretraining's head)
    bitfit                        only the biases (every block) + head (Ben Zaken et al. 2022)
    norm                          only the norm layers' gamma/beta (every block) + head
    llrd[decay=d]                 everything trainable, the head at lr, the block d blocks
                                  below it at lr*decay^d (timm's layer_decay)
    l2sp[alpha=a,beta=b]          everything trainable, penalty a/2 ||w - w0||^2 on the
                                  backbone and b/2 ||w||^2 on the head (Li et al. 2018)
    gradual[every=e]              the head alone, then one more top block every e epochs
                                  (ULMFiT's gradual unfreezing): phases from the budget
    lora[rank=r,alpha=a,depth=k]  low-rank adapters on the convolutions and linear layers of
                                  the top k blocks, backbone frozen (Hu et al. 2022;
                                  strategies/lora.py)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from strategies.constraint import Constraint, lookup

ALL = -1
"""`trainable_blocks` value meaning every block of the backbone."""

BN_POLICIES = ("train", "frozen")
"""BatchNorm in *trainable* blocks: 'train' updates running statistics (PyTorch train mode,
Keras training=True); 'frozen' keeps them in inference mode, as the Keras transfer-learning
guide recommends after unfreezing."""

ONLY = ("all", "bias", "norm", "lora")
"""Which parameters of a phase's trainable blocks train: all of them; the biases ('bias':
every additive bias, the convolutions' and linear layers' and the norm layers' beta, which
PyTorch names `bias` too); the normalisation layers' affine gamma and beta ('norm':
BatchNorm, LayerNorm, GroupNorm); or the low-rank adapters the backend adds to them ('lora',
with Phase.lora set: strategies/lora.py). The head trains whole, or not at all
(Phase.train_head False)."""


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


class UnknownStrategy(KeyError):
    pass


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    return lookup(STRATEGIES, name, "strategy", UnknownStrategy)


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


def _gradual(p: dict, epochs: int, n_blocks: int | None) -> list[Phase]:
    """The head alone for `every` epochs, then one more top block every `every` epochs;
    the last phase takes what is left of the budget."""
    every, out, i = p["every"], [], 0
    while every * i < epochs:
        depth = i if n_blocks is None or i < n_blocks else ALL
        name = "head" if i == 0 else "all" if depth == ALL else f"top{i}"
        out.append(Phase(depth, epoch_share=min(every, epochs - every * i),
                         bn=p["bn"], name=name))
        i += 1
    return out


_DEPTH = Param("depth", "depth", help="top named blocks to unfreeze (1..n_blocks or 'all')")
_BN = Param("bn", "choice", default="train", choices=BN_POLICIES,
            help="BatchNorm in the unfrozen blocks")

register(Strategy(
    name="feature_extraction",
    description="Frozen backbone, new head trained on its features.",
    build_phases=lambda p: [Phase(0, name="head")],
))

register(Strategy(
    name="partial",
    description="Top `depth` named blocks and the head trainable, the rest frozen.",
    params=(_DEPTH, _BN),
    build_phases=lambda p: [Phase(p["depth"], bn=p["bn"], name="finetune")],
))

register(Strategy(
    name="full",
    description="Every block trainable.",
    params=(_BN,),
    build_phases=lambda p: [Phase(ALL, bn=p["bn"], name="finetune")],
))

register(Strategy(
    name="two_stage",
    description=(
        "Train the head on a frozen backbone, then unfreeze the top `depth` blocks at "
        "lr*lr_scale (the seed's VGG16 recipe: Adam 1e-3, then 1e-5; LP-FT)."
    ),
    params=(
        Param("depth", "depth", default="all", help="top blocks unfrozen in stage 2"),
        Param("lr_scale", "float", default=0.01, minimum=1e-8, maximum=1.0,
              help="stage-2 lr = lr * lr_scale (the seed: 1e-3 -> 1e-5)"),
        Param("head_share", "float", default=0.5, minimum=0.05, maximum=0.95,
              help="share of the epochs spent on the head-only stage"),
        # The Keras guide keeps BatchNorm in inference mode after unfreezing so the head's
        # input statistics do not shift under it; 'train' is the other arm of that choice.
        Param("bn", "choice", default="frozen", choices=BN_POLICIES,
              help="BatchNorm in the unfrozen blocks during stage 2"),
    ),
    build_phases=lambda p: [
        Phase(0, epoch_share=p["head_share"], name="head"),
        Phase(p["depth"], epoch_share=1 - p["head_share"], lr_scale=p["lr_scale"],
              bn=p["bn"], name="finetune"),
    ],
))

register(Strategy(
    name="reinit_top",
    description=(
        "Yosinski et al. 2014's transfer protocol: keep the bottom blocks of the loaded "
        "weights, re-initialise the top `depth` blocks and train them; the copied blocks stay "
        "frozen (AnB, BnB) or are fine-tuned too (copied=finetune: AnB+, BnB+)."
    ),
    params=(
        Param("depth", "depth", help="top blocks re-initialised (n = blocks - depth copied)"),
        Param("copied", "choice", default="frozen", choices=("frozen", "finetune"),
              help="the copied bottom blocks: frozen (AnB) or fine-tuned (AnB+)"),
    ),
    build_phases=lambda p: [Phase(p["depth"] if p["copied"] == "frozen" else ALL,
                                  name="finetune")],
    build_reinit=lambda p: p["depth"],
))

register(Strategy(
    name="blocks",
    description=(
        "Surgical fine-tuning (Lee et al., ICLR 2023): the named blocks and the head "
        "trainable, any set, the rest frozen. `names=stem+stage1` is one set; head=frozen "
        "trains the named blocks alone under the source's head (head_init='source')."
    ),
    params=(
        Param("names", "blocks", help="the blocks to train, '+'-joined: stem+stage1"),
        _BN,
        Param("head", "choice", default="train", choices=("train", "frozen"),
              help="the head: trained, or frozen as loaded (needs head_init='source')"),
    ),
    build_phases=lambda p: [Phase(0, blocks=split_blocks(p["names"]), bn=p["bn"],
                                  name="finetune", train_head=p["head"] == "train")],
))

# Running statistics are state outside the trained set: frozen (inference mode) by default
# keeps "only the biases / only gamma and beta change" literally true; bn=train is the other
# arm (Frankle et al. 2021 train BatchNorm's affine parameters with batch statistics).
_BN_FROZEN = Param("bn", "choice", default="frozen", choices=BN_POLICIES,
                   help="BatchNorm running statistics while the biases / affine params train")


def _no_norm_layers(info) -> str | None:
    if info.family == "vgg":
        return (f"{info.name} has no normalisation layers: norm would train the head only "
                f"(use feature_extraction)")
    return None


register(Strategy(
    name="bitfit",
    description=(
        "BitFit (Ben Zaken et al., ACL 2022) on a CNN: only the bias terms of every block "
        "(convolutions', linear layers', norm layers' beta) and the head train."
    ),
    params=(_BN_FROZEN,),
    build_phases=lambda p: [Phase(ALL, bn=p["bn"], only="bias", name="finetune")],
))

register(Strategy(
    name="norm",
    description=(
        "Only the normalisation layers' affine parameters (BatchNorm/LayerNorm gamma and "
        "beta, every block) and the head train (Frankle et al., ICLR 2021: 'Training "
        "BatchNorm and only BatchNorm')."
    ),
    params=(_BN_FROZEN,),
    build_phases=lambda p: [Phase(ALL, bn=p["bn"], only="norm", name="finetune")],
    backbone_problem=_no_norm_layers,
))

register(Strategy(
    name="llrd",
    description=(
        "Layer-wise learning-rate decay (timm's layer_decay; fastai's discriminative rates): "
        "everything trainable, the head at lr, each named block below at lr*decay^distance."
    ),
    params=(
        Param("decay", "float", default=0.7, minimum=1e-3, maximum=1.0,
              help="lr ratio between a block and the one above it (1.0 = full)"),
        _BN,
    ),
    build_phases=lambda p: [Phase(ALL, bn=p["bn"], lr_decay=p["decay"], name="finetune")],
))

register(Strategy(
    name="l2sp",
    description=(
        "L2-SP (Li et al., ICML 2018): everything trainable, the backbone pulled toward its "
        "starting weights (alpha/2 ||w - w0||^2), the head toward zero (beta/2 ||w||^2)."
    ),
    params=(
        Param("alpha", "float", default=0.01, minimum=0.0, maximum=10.0,
              help="weight of the penalty toward the starting backbone weights"),
        Param("beta", "float", default=0.01, minimum=0.0, maximum=10.0,
              help="weight of the plain L2 penalty on the head"),
        _BN,
    ),
    build_phases=lambda p: [Phase(ALL, bn=p["bn"], l2sp=(p["alpha"], p["beta"]),
                                  name="finetune")],
))

register(Strategy(
    name="gradual",
    description=(
        "Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the head alone for `every` "
        "epochs, then one more top block every `every` epochs until all train or the budget "
        "ends; a fresh optimizer at each unfreezing. Needs epochs >= every + 1."
    ),
    params=(
        Param("every", "int", default=1, minimum=1, maximum=100,
              help="epochs between two unfreezings"),
        _BN,
    ),
    build_phases=lambda p: [],  # unused: the phases come from the budget
    build_schedule=_gradual,
    min_budget=lambda p: p["every"] + 1,
))


register(Strategy(
    name="lora",
    description=(
        "LoRA (Hu et al., ICLR 2022) on a CNN: low-rank adapters W + (alpha/rank) B A on the "
        "convolutions and linear layers of the top `depth` blocks (grouped/depthwise "
        "convolutions left out), backbone frozen, BatchNorm in inference mode, the head "
        "trained; merged into the weights for the inference-speed measurement."
    ),
    params=(
        Param("rank", "int", default=4, minimum=1, maximum=256, help="the adapters' rank"),
        Param("alpha", "float", default=8.0, minimum=1e-6, maximum=1e4,
              help="scale: the delta is (alpha/rank) * B @ A"),
        Param("depth", "depth", help="top named blocks adapted (1..n_blocks or 'all')"),
    ),
    build_phases=lambda p: [Phase(p["depth"], bn="frozen", only="lora",
                                  lora=(int(p["rank"]), float(p["alpha"])), name="lora")],
))
