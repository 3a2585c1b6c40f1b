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
                                  strategies/lora.py); on a vision transformer:
                                  attention's query and value projections
    vpt[length=n,deep=true]       n prompt tokens before every block (deep) or the first,
                                  backbone frozen (Jia et al. 2022; vision transformers)
    adapter[width=w]              a bottleneck after every block's MLP, backbone frozen
                                  (Houlsby et al. 2019; vision transformers)
"""

from __future__ import annotations

from strategies.constraint import lookup

# the vocabulary (strategies/phases.py), also reached as registry.<name> by the backends
from strategies.phases import (
    ALL,
    BN_POLICIES,
    ONLY,
    BudgetError,
    Param,
    Phase,
    Strategy,
    block_lr_scales,
    block_lrs_tag,
    frozen_bottom,
    phase_blocks,
    resolve_depth,
    split_blocks,
    split_epochs,
    top_blocks,
)

__all__ = ["ALL", "BN_POLICIES", "ONLY", "STRATEGIES", "BudgetError", "Param", "Phase",
           "Strategy", "UnknownStrategy", "block_lr_scales", "block_lrs_tag", "frozen_bottom",
           "get", "phase_blocks", "register", "resolve_depth", "split_blocks", "split_epochs",
           "top_blocks"]


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


def _transformers_only(method: str):
    def problem(info) -> str | None:
        if info.family != "vit":
            from strategies.backbones import BACKBONES

            vits = ", ".join(b.name for b in BACKBONES.values() if b.family == "vit")
            return (f"{method} inserts into transformer blocks; {info.name} is a "
                    f"{info.family} CNN (use a vision transformer: {vits})")
        return None
    return problem


def _no_norm_layers(info) -> str | None:
    if info.family == "vgg":
        return (f"{info.name} has no normalisation layers: norm would train the head only "
                f"(use feature_extraction)")
    return None


register(Strategy(
    name="bitfit",
    description=(
        "BitFit (Ben Zaken et al., ACL 2022): only the bias terms of every block "
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
        "LoRA (Hu et al., ICLR 2022): low-rank adapters W + (alpha/rank) B A on the "
        "convolutions and linear layers of the top `depth` blocks of a CNN (grouped/depthwise "
        "convolutions left out), on a vision transformer's attention query and value "
        "projections; backbone frozen, BatchNorm in inference mode, the head trained; merged "
        "into the weights for the inference-speed measurement."
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


register(Strategy(
    name="vpt",
    description=(
        "Visual Prompt Tuning (Jia et al., ECCV 2022): `length` learnable tokens after the "
        "class token, before the first block (shallow) or before every block (deep, each "
        "block its own, replacing the previous block's); backbone frozen, head trained."
    ),
    params=(
        Param("length", "int", default=10, minimum=1, maximum=200,
              help="prompt tokens per prompted block"),
        Param("deep", "choice", default=True, choices=(True, False),
              help="a prompt before every block (VPT-deep) or only the first (VPT-shallow)"),
    ),
    build_phases=lambda p: [Phase(ALL, bn="frozen", only="prompt", name="prompt")],
    build_additions=lambda p: {"prompts": (int(p["length"]), bool(p["deep"]))},
    backbone_problem=_transformers_only("vpt"),
))

register(Strategy(
    name="adapter",
    description=(
        "Bottleneck adapters (Houlsby et al., ICML 2019; the Pfeiffer placement): in every "
        "block the MLP's output y becomes y + up(GELU(down(y))), width `width`, up at zero so "
        "training starts from the loaded model; backbone frozen, head trained."
    ),
    params=(Param("width", "int", default=8, minimum=1, maximum=4096,
                  help="the adapters' bottleneck width"),),
    build_phases=lambda p: [Phase(ALL, bn="frozen", only="adapter", name="adapter")],
    build_additions=lambda p: {"adapters": int(p["width"])},
    backbone_problem=_transformers_only("adapter"),
))
