"""A grid's axes -> its cells, every field of every cell checked: one combination of axis
values becomes its cells (a strategy selector may expand), each field against its declared
constraint, each strategy's parameters against the backbone's blocks, its budget, its head;
and a [tune] table against the cells it searches. bench/config/grid.py calls these; the
problems they collect become one GridError.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import fields
from pathlib import Path

import numpy as np

from bench.config import pretrained
from bench.config import spec as specmod
from bench.config import tune as tunemod
from bench.config.selector import SelectorError, parse_selector
from bench.config.spec import RunSpec
from bench.config.tune import Tune
from bench.data import DatasetError, card_digest, scan_image_folder
from bench.data.sources import class_count
from strategies import FRAMEWORKS, registry
from strategies import backbones as bb

SPEC_FIELDS = {f.name: f for f in fields(RunSpec) if f.name != "strategy_params"}


def expand(axes, defaults, overrides, cards, problems) -> tuple[list[RunSpec], tuple]:
    keys = list(axes)
    varying = tuple(n for k in keys for n in k if len(axes[k]) > 1)
    specs = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        values = dict(defaults)
        where = {}
        for names, row in zip(keys, combo, strict=True):
            for n, v in zip(names, row, strict=True):
                values[n] = v
                where[n] = f"axes.{', '.join(names) if len(names) > 1 else n}"
        over = dict(overrides)
        if "subset" in over and values.get("subset"):
            over["subset"] = min(values["subset"], over["subset"])
        values.update(over)
        where.update({n: f"smoke.{n}" for n in over})
        if overrides and pretrained.is_pretrained(str(values.get("weights", ""))):
            values["weights"] = pretrained.shrink(values["weights"], overrides)
        specs += _cells(values, where, cards, problems, smoke_epochs=overrides.get("epochs"))
    return specs, varying


def _cells(values: dict, where: dict, cards: dict, problems: list[str],
           smoke_epochs: int | None = None) -> list[RunSpec]:
    """One combination of axis values -> its cells (a strategy selector may expand).
    `smoke_epochs`: --smoke's epochs, raised per cell to what its strategy can train."""
    def loc(f):
        return where.get(f, f"defaults.{f}")

    ok = True
    for f, v in values.items():
        if f == "strategy":
            continue
        msg = _check_field(f, v, cards)
        if msg:
            problems.append(f"{loc(f)}: {f} = {v!r}: {msg}")
            ok = False
    selector = values.get("strategy", "feature_extraction")
    if not ok:
        if values.get("backbone") not in bb.BACKBONES:  # still report a bad strategy name
            _strategy_params(str(selector), None, loc("strategy"), problems)
        return []
    fw, backbone = values["framework"], values["backbone"]
    info = bb.get(backbone)
    if fw not in info.frameworks:
        problems.append(f"{loc('backbone')}: backbone = {backbone!r} is not available in "
                        f"framework {fw!r} (it has: {', '.join(info.frameworks)}); drop the "
                        f"pair with coupled axes \"framework, backbone\"")
        return []
    size = values.get("image_size", SPEC_FIELDS["image_size"].default)
    size_problem = bb.image_problem(backbone, int(size))
    if size_problem:
        problems.append(f"{loc('image_size')}: image_size = {size!r}: {size_problem}")
        return []
    weights = str(values.get("weights", SPEC_FIELDS["weights"].default))
    weights_problem = bb.weights_problem(backbone, weights)
    if weights_problem:
        problems.append(f"{loc('weights')}: weights = {weights!r}: {weights_problem}")
    combos = _strategy_params(str(selector), info, loc("strategy"), problems)
    if weights_problem:
        return []
    base = {k: v for k, v in values.items() if k != "strategy"}
    for k in ("lr", "weight_decay"):
        if k in base:
            base[k] = float(base[k])
    cells = []
    for sname, p in combos:
        epochs = _budget(sname, p, base.get("epochs", SPEC_FIELDS["epochs"].default),
                         smoke_epochs, f"{loc('epochs')}: epochs", str(selector), problems)
        if epochs is not None:
            cells.append(RunSpec(**{**base, "epochs": epochs}, strategy=sname,
                                 strategy_params=tuple(p.items()),
                                 card_digests=_card_digests(base, cards)))
    return cells


def check_tune(table: object, axes: dict, specs: list[RunSpec], varying: tuple, cards: dict,
          problems: list[str]) -> tuple[Tune | None, list[RunSpec], tuple]:
    """[tune] checked against the grid (a searched field that is also an axis, a strategy's
    searched parameter its selector fixes, each searched value of a strategy parameter on
    each backbone, a refit that needs a validation part), and the studies' cells: the
    grid's cells at the trial seed. The searched fields join the varying ones (labels)."""
    axis_fields = {n for k in axes for n in k}
    has_val = all(_has_val(cards[s.dataset]) for s in specs)
    strategies = sorted({s.strategy for s in specs})
    try:
        tune = tunemod.parse(table, axis_fields, strategies, has_val)
    except tunemod.TuneError as e:
        problems.append(str(e))
        return None, specs, varying
    fixed = _selector_params(axes)
    for s in specs:
        for k, space in tune.strategy_space.get(s.strategy, {}).items():
            if k in fixed.get(s.strategy, ()):
                problems.append(f"tune.{s.strategy}.{k}: {k} is searched and also set by "
                                f"axes.strategy ({s.strategy}[{k}=...]); search it or set "
                                f"it, not both")
            for v in space.values or (space.low, space.high):
                _strategy_params(f"{s.strategy}[{k}={v}]", bb.get(s.backbone),
                                 f"tune.{s.strategy}.{k}", problems)
    studies = [dataclasses.replace(s, seed=tune.trial_seed) for s in specs]
    return tune, studies, varying + tuple(f for f in tune.space if f not in varying)


def searched_filled(axes: dict, table: object) -> dict:
    """The axes with each strategy parameter a [tune.<strategy>] table searches and its
    selector leaves out set to the first searched value, so the grid expands (`partial`
    needs a depth); the trials then set it. A malformed table is left to check_tune."""
    if not isinstance(table, dict):
        return axes
    out = {}
    for names, rows in axes.items():
        if "strategy" not in names:
            out[names] = rows
            continue
        i = names.index("strategy")
        out[names] = [row[:i] + (_fill(str(row[i]), table),) + row[i + 1:] for row in rows]
    return out


def _fill(selector: str, table: dict) -> str:
    try:
        name, given = parse_selector(selector)
    except SelectorError:
        return selector
    own = table.get(name)
    if not isinstance(own, dict):
        return selector
    first = {}
    for k, v in own.items():
        if k not in given:
            v = v if isinstance(v, list) else next(iter(v.values()), None) \
                if isinstance(v, dict) else None
            if isinstance(v, list) and v:
                first[k] = v[0]
    if not first:
        return selector
    extra = ",".join(f"{k}={v}" for k, v in first.items())
    return selector[:-1] + f",{extra}]" if selector.endswith("]") else f"{selector}[{extra}]"


def _selector_params(axes: dict) -> dict[str, set[str]]:
    """{strategy: the parameters its axes selectors spell out}."""
    out: dict[str, set[str]] = {}
    for names, rows in axes.items():
        if "strategy" in names:
            i = names.index("strategy")
            for row in rows:
                try:
                    name, params = parse_selector(str(row[i]))
                except SelectorError:
                    continue
                out.setdefault(name, set()).update(params)
    return out


def _has_val(card: dict) -> bool:
    """Whether a card's split holds out a validation part that is not its test part."""
    split = card.get("split", {})
    if split.get("test") == "val":
        return False
    return bool(split.get("val_fraction") or split.get("val_size"))


def _card_digests(values: dict, cards: dict) -> str:
    """`name=digest` of the cell's dataset card and its pretraining's source card."""
    names = {values["dataset"]}
    if pretrained.is_pretrained(str(values.get("weights", ""))):
        names.add(pretrained.parse(values["weights"])[0])
    return ",".join(f"{n}={card_digest(cards[n])}" for n in sorted(names))


def _budget(sname: str, params: dict, epochs: int, smoke_epochs: int | None, where: str,
            selector: str, problems: list[str]) -> int | None:
    """The cell's epochs, or None (the problem noted) when its strategy cannot train in them.
    Under --smoke a cell gets the fewest epochs its strategy can train (two_stage: one per
    phase), so shrinking a grid never makes it invalid."""
    strat = registry.get(sname)
    if smoke_epochs is not None:
        return max(smoke_epochs, strat.min_epochs(params))
    problem = strat.budget_problem(params, epochs)
    if problem:
        problems.append(f"{where} = {epochs!r} is too few for strategy = {selector!r}: "
                        f"{problem}")
        return None
    return epochs


def head_problems(s: RunSpec, cards: dict) -> list[str]:
    """Why a cell's head_init / blocks[head=frozen] cannot run: the source's head exists only
    for `pretrained:` weights, is linear (pretrain_spec), and fits the target only with as
    many classes; a frozen head that is not the source's is a fixed random projection."""
    out = []
    frozen = s.strategy == "blocks" and s.params.get("head") == "frozen"
    if frozen and s.head_init != "source":
        out.append(f"strategy = {s.strategy_label!r} with head_init = {s.head_init!r}: a "
                   f"frozen new head is a fixed random projection of the features, never "
                   f"trained; allowed: head_init = \"source\" (the pretraining's trained "
                   f"head) or head=train")
    if s.head_init != "source":
        return out
    if not pretrained.is_pretrained(s.weights):
        out.append(f"head_init = 'source' with weights = {s.weights!r}: only weights the "
                   f"harness pretrained have a source head; allowed: weights = "
                   f"\"pretrained:<dataset>[...]\", or head_init = \"new\"")
        return out
    if s.head != "linear":
        out.append(f"head_init = 'source' with head = {s.head!r}: the pretraining trains a "
                   f"linear head; allowed: head = \"linear\", or head_init = \"new\"")
    try:
        source = pretrained.parse(s.weights)[0]
    except pretrained.WeightsError:
        return out  # reported with the weights field
    if source not in cards or s.dataset not in cards:
        return out  # reported with the weights / dataset field
    have, want = class_count(cards[source]), class_count(cards[s.dataset])
    if have is None or want is None:
        unknown = source if have is None else s.dataset
        out.append(f"head_init = 'source' with weights = {s.weights!r} and dataset = "
                   f"{s.dataset!r}: the class count of dataset {unknown!r} cannot be known "
                   f"here without its data (give its card `classes = [...]`), so the "
                   f"source head's fit cannot be checked; allowed: head_init = \"new\"")
    elif have != want:
        out.append(f"head_init = 'source' with weights = {s.weights!r}: the source {source!r} "
                   f"has {have} classes, dataset {s.dataset!r} has {want}; the source's head "
                   f"fits only a target with the same classes; allowed: head_init = \"new\"")
    return out


def _check_field(f: str, v, cards: dict) -> str | None:
    """None if `v` is a valid value of RunSpec field `f`, else what is allowed. The field's
    declared constraint first (bench/config/spec.py), then what needs the registries and cards."""
    msg = specmod.check_value(f, v)
    if msg:
        return msg
    if f == "framework" and v not in FRAMEWORKS:
        return f"unknown framework; allowed: {', '.join(sorted(FRAMEWORKS))}"
    if f == "backbone" and v not in bb.BACKBONES:
        return f"unknown backbone; allowed: {', '.join(sorted(bb.BACKBONES))}"
    if f == "dataset":
        if v not in cards:
            return (f"unknown dataset; allowed: {', '.join(sorted(cards))} (or add a "
                    f"[datasets.{v}] table)")
        if cards[v]["source"] == "image_folder":
            return folder_problem(cards[v])
    if f == "weights" and pretrained.is_pretrained(v):
        try:
            source, _ = pretrained.parse(v)
        except pretrained.WeightsError as e:
            return str(e)
        if source not in cards:
            return (f"unknown source dataset {source!r}; allowed: {', '.join(sorted(cards))} "
                    f"(or add a [datasets.{source}] table)")
        if cards[source]["source"] == "image_folder":
            return folder_problem(cards[source])
    elif f == "weights" and v not in ("imagenet", "none") and not Path(v).expanduser().exists():
        return ("allowed: 'imagenet', 'none', 'pretrained:<dataset>[epochs=..,seed=..,"
                "subset=..,lr=..]' or the path of an existing weights file (a vision "
                "transformer: a checkpoint folder)")
    return None


def _strategy_params(selector: str, info: bb.BackboneInfo | None, where: str,
                     problems: list[str]) -> list[tuple[str, dict]]:
    """The (strategy, params) cells a selector expands to. `info` None: check the name and
    parameter names only (the backbone is bad, so depths cannot be checked)."""
    try:
        sname, given = parse_selector(selector)
    except SelectorError as e:
        problems.append(f"{where}: strategy = {selector!r}: {e}")
        return []
    if sname not in registry.STRATEGIES:
        problems.append(f"{where}: strategy = {selector!r}: unknown strategy; allowed: "
                        f"{', '.join(sorted(registry.STRATEGIES))}")
        return []
    strat = registry.get(sname)
    allowed = [p.name for p in strat.params]
    for k in given:
        if k not in allowed:
            problems.append(f"{where}: strategy = {selector!r}: unknown parameter {k!r} of "
                            f"{sname}; allowed: {', '.join(allowed) or 'none'}")
    if info is None:
        return []
    lists = {}
    for p in strat.params:
        vals = given.get(p.name, [] if p.default is None else [p.default])
        if not vals:
            problems.append(f"{where}: strategy = {selector!r}: {sname} needs {p.name} "
                            f"({p.help})")
        for v in vals:
            msg = _check_param(p, v, info)
            if msg:
                problems.append(f"{where}: strategy = {selector!r}: {p.name} = {v!r}: {msg}")
        lists[p.name] = [_normalise(p, v, info) if not msg else v
                         for v, msg in ((v, _check_param(p, v, info)) for v in vals)]
    problem = strat.backbone_problem(info) if strat.backbone_problem else None
    if problem:
        problems.append(f"{where}: strategy = {selector!r}: {problem}")
    if any(k not in allowed for k in given) or not all(lists.values()) or problem:
        return []
    names = list(lists)
    return [(sname, dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*(lists[n] for n in names))]


def _normalise(p: registry.Param, v, info: bb.BackboneInfo):
    """A valid value in its stored form: floats as floats, a block set in backbone order (so
    stage1+stem and stem+stage1 are one cell)."""
    if p.kind == "float":
        return float(v)
    if p.kind == "blocks":
        names = registry.split_blocks(v)
        return "+".join(b for b in info.blocks if b in names)
    return v


def _check_param(p: registry.Param, v, info: bb.BackboneInfo) -> str | None:
    if p.kind == "blocks":
        names = registry.split_blocks(v) if isinstance(v, str) else (str(v),)
        unknown = [b for b in names if b not in info.blocks]
        if unknown or len(set(names)) != len(names):
            what = (f"unknown block(s) {', '.join(map(repr, unknown))}" if unknown
                    else "a block named twice")
            return (f"{what}; allowed: '+'-joined names of {info.name}'s blocks: "
                    f"{', '.join(info.blocks)} (a comma sweeps sets: names=stem,stage1 is "
                    f"two cells, names=stem+stage1 one)")
    elif p.kind == "depth":
        if v == "all":
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= info.n_blocks:
            return (f"allowed: 1..{info.n_blocks} or 'all' ({info.name} has {info.n_blocks} "
                    f"blocks: {', '.join(info.blocks)})")
    else:  # float, int, choice: the Param's own constraint
        return p.constraint.problem(v)
    return None


def small_classes(card: dict) -> list[str]:
    """An image folder's classes too small for its split: with fewer images than parts
    (train, val, a held-out test), the stratified split leaves the class out of a part. A
    warning per class, naming it and its count (the run goes on; the report's numbers then
    lack that class in a part)."""
    split = card.get("split", {})
    if card.get("source") != "image_folder" or "train_size" in split:
        return []
    parts = ["train"] + (["val"] if split.get("val_fraction") else []) + \
        (["test"] if split.get("test_fraction") and split.get("test") is None else [])
    try:
        _, labels, classes = scan_image_folder(card["root"], verify=False)
    except DatasetError:
        return []  # folder_problem says what is wrong
    counts = np.bincount(labels, minlength=len(classes))
    return [f"dataset {card['name']!r}: class {c!r} has {n} image(s), fewer than its split's "
            f"{len(parts)} parts ({', '.join(parts)}): the split leaves it out of "
            f"{len(parts) - n} of them; add images or drop the class folder"
            for c, n in zip(classes, counts, strict=True) if n < len(parts)]


def folder_problem(card: dict) -> str | None:
    """Scan (and verify every image of) an image folder once per grid load, not per cell."""
    if "_problem" not in card:
        try:
            scan_image_folder(card["root"], verify=True)
            card["_problem"] = None
        except DatasetError as e:
            card["_problem"] = str(e)
    return card["_problem"]
