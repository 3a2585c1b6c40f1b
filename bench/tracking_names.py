"""What the MLflow UI shows of a cell: its run name (input_schema: its Datasets panel).

The run list shows about NAME_WIDTH characters of a name.

A name tells a cell apart from the grid's other cells within that width: the strategy in a
short form (`feat`, `partial[d3,bn=frz]`, `2stage[d3,lrs=0.1]`), then each field the grid
varies, in short forms (`lr1e-4`, `pbn320`, `scratch`), the seed (`s1`) and the framework
(`pt` PyTorch, `tf` Keras on TensorFlow). A varied field's value that most of the grid's cells
share (more than half) is left out: in the default grid `lr1e-3`, `pbn0` and `imagenet`
go unsaid, so the names read `full lr1e-4 pt`, `full scratch pbn320 tf`. The full label (tag
tlbench.label, the run's description) keeps every field. tests/test_ui.py checks that every
shipped grid's names are unique within NAME_WIDTH characters.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from bench.config.spec import RunSpec, format_value

NAME_WIDTH = 25  # characters of a run name MLflow 3's run list shows by default

FRAMEWORK = {"torch": "pt", "keras": "tf"}
STRATEGY = {"feature_extraction": "feat", "two_stage": "2stage", "reinit_top": "reinit"}
# a strategy parameter -> its short key; "" shows the value alone
PARAM = {"depth": "d", "names": "", "lr_scale": "lrs", "head_share": "hshare", "copied": "",
         "length": "L", "rank": "r"}
VALUE = {"frozen": "frz", "finetune": "ft", "train": "trn"}
# a RunSpec field -> the prefix of its value in a name; "" shows the value alone
FIELD = {"lr": "lr", "precise_bn": "pbn", "batch_size": "bs", "epochs": "ep",
         "image_size": "px", "subset": "n", "weight_decay": "wd", "weights": "",
         "backbone": "", "dataset": "", "augmentation": "aug", "optimizer": "",
         "precision": "", "select": "sel", "head_init": "head"}
LAST = ("strategy", "strategy_params", "framework", "seed")  # placed by run_name itself


def number(v: object) -> str:
    """0.001 -> 1e-3, 0.0005 -> 5e-4, 0.1 -> 0.1, 320 -> 320."""
    if isinstance(v, float) and v and abs(v) < 0.01:
        mant, exp = f"{v:.0e}".split("e")
        return f"{mant}e{int(exp)}"
    return format_value(v)


def strategy(s: RunSpec, elide: dict[str, str] | None = None) -> str:
    """`partial[depth=3,bn=frozen]` -> `partial[d3,bn=frz]`; a parameter whose value is in
    `elide` (the same in every cell of the grid that has it) is left out."""
    name = STRATEGY.get(s.strategy, s.strategy)
    shown = []
    for k, v in s._non_default_params():  # the label's parameters, in declaration order
        if (elide or {}).get(k) == str(v):
            continue
        key = PARAM.get(k, k)
        val = VALUE.get(str(v), number(v))
        if isinstance(v, bool):
            val, key = ("" if v else "no-"), key or k
            shown.append(f"{val}{key}")
            continue
        shown.append(val if not key else f"{key}{val}" if len(key) == 1 else f"{key}={val}")
    return f"{name}[{','.join(shown)}]" if shown else name


def _common_params(specs: list[RunSpec]) -> dict[str, str]:
    """Strategy parameters with words for values (bn, head, not depth) that are the same in
    every cell whose strategy has them: saying them tells no cell apart."""
    seen: dict[str, set[str]] = {}
    for s in specs:
        for k, v in s.strategy_params:
            seen.setdefault(k, set()).add(str(v))
    return {k: next(iter(v)) for k, v in seen.items()
            if len(v) == 1 and not next(iter(v)).replace(".", "").isdigit()
            and k not in ("depth", "names")}


def _weights(v: str, short: bool = False) -> str:
    """none -> scratch; pretrained:mnist_a -> pre:mnist_a (`short`: mnist_a)."""
    return {"none": "scratch"}.get(v, v.replace("pretrained:", "" if short else "pre:"))


def _word(values: list[str], short: bool = False) -> dict[str, str]:
    """Each value cut to its fewest leading `_`-pieces that keep the values apart
    (flowers102_vtab1k, oxford_pet_vtab1k -> flowers102, oxford); `short`: to its fewest
    leading characters (at least 3) that do (convnext, resnet50 -> con, res)."""
    if short:
        pieces = [v.split("_") for v in values]
        while len(values) > 1 and all(len(p) > 1 and p[0] == pieces[0][0] for p in pieces):
            pieces = [p[1:] for p in pieces]  # mnist5k_c, mnist5k_perm -> c, perm
        stripped = ["_".join(p) for p in pieces]
        for n in range(3, max(map(len, stripped)) + 1):
            cut = {v: w[:n] for v, w in zip(values, stripped, strict=True)}
            if len(set(cut.values())) == len(values):
                return cut
    for n in range(1, max(v.count("_") for v in values) + 2):
        cut = {v: "_".join(v.split("_")[:n]) for v in values}
        if len(set(cut.values())) == len(values):
            return cut
    return {v: v for v in values}


def field_token(field: str, value: object, words: dict[str, str], short: bool = False) -> str:
    if field == "weights":
        return _weights(str(value), short)
    text = words.get(str(value), str(value)) if field in ("backbone", "dataset") else number(
        value)
    prefix = FIELD.get(field, field)
    return f"{prefix}{text}" if prefix else text


def run_names(varying: tuple[str, ...], specs: list[RunSpec],
              width: int = NAME_WIDTH) -> dict[str, str]:
    """spec hash -> run name for a grid's cells (`varying`: the fields it varies), in the
    first of these forms whose names are all different within `width` characters: the
    strategy first; the seed and framework first (a long strategy or field no longer cuts
    them off); then also words cut short (`res`, `flo`) and block names compact
    (`stem+s1+s2`); then the fields before the strategy; last, the cell's number in the
    grid first (`#07 ...`)."""
    return _names(varying, specs, width)[0]


def _names(varying: tuple[str, ...], specs: list[RunSpec],
           width: int) -> tuple[dict[str, str], Form]:
    fields = [f for f in varying if f not in LAST]
    usual = {}
    for f in fields:
        values = [str(getattr(s, f)) for s in specs]
        value, count = Counter(values).most_common(1)[0]
        if count * 2 > len(values) or (f == "weights" and value == "imagenet"
                                       and count * 2 == len(values)):
            usual[f] = value
    common = _common_params(specs)
    for level in range(5):
        words = {f: _word(sorted({str(getattr(s, f)) for s in specs}), short=level >= 2)
                 for f in fields}
        form = Form(fields, usual, words, common, "seed" in varying, level)
        names = {s.hash: form.name(s) for s in specs}
        if level == 4:
            digits = len(str(len(specs)))
            names = {h: f"#{i:0{digits}d} {n}" for i, (h, n) in enumerate(names.items(), 1)}
        if len({n[:width] for n in names.values()}) == len(names):
            break
    return names, form


def grid_run_name(grid, spec: RunSpec) -> str:
    """The run name of one of `grid`'s cells (worked out once per grid, kept on it), or of a
    cell it makes later (a tuned grid's trial or final: in the grid's form, with its role)."""
    cached = getattr(grid, "_run_names", None)
    if cached is None:
        cached = _names(grid.varying, grid.specs, NAME_WIDTH) if grid.specs else ({}, None)
        object.__setattr__(grid, "_run_names", cached)
    names, form = cached
    if spec.hash in names:
        return names[spec.hash]
    if form is None:
        return strategy(spec)
    return form.name(spec)


@dataclass
class Form:
    """How one grid's names are written (run_names picks the level)."""

    fields: list[str]  # varied fields, in the grid's order
    usual: dict[str, str]  # field -> the value left unsaid
    words: dict[str, dict[str, str]]  # field -> value -> its word
    common: dict[str, str]  # strategy parameters left unsaid
    seeds: bool  # whether the grid varies the seed
    level: int = 0

    def name(self, s: RunSpec) -> str:
        tail = [FRAMEWORK.get(s.framework, s.framework)]
        if self.seeds or s.role == "final":
            tail.append(f"s{s.seed}")
        body = [strategy(s, self.common)]
        if self.level >= 2:
            body[0] = compact_blocks(body[0])
        body += [field_token(f, getattr(s, f), self.words.get(f, {}), self.level >= 2)
                 for f in self.fields
                 if self.usual.get(f) != str(getattr(s, f))]
        if self.level >= 3:  # the fields, short words, before a long strategy
            body = body[1:] + body[:1]
        parts = tail + body if self.level >= 1 else body + tail[1:] + tail[:1]
        if s.role:
            parts.append(s.role)
        return " ".join(parts)


def compact_blocks(text: str) -> str:
    """Block names in a strategy's parameters, shorter: stage2 -> s2, top_conv -> top,
    block11 -> b11."""
    return re.sub(r"\bstage(\d+)", r"s\1", re.sub(r"\bblock(\d+)", r"b\1", text)
                  ).replace("top_conv", "top")


def input_schema(size: int, num_classes: int) -> str:
    """A split part's schema as MLflow's Datasets panel shows it (a table of columns): what
    reaches the model, images at the cell's size and integer labels."""
    return json.dumps({"mlflow_colspec": [
        {"name": f"image: uint8 RGB {size}x{size}x3", "type": "binary", "required": True},
        {"name": f"label: class index 0..{num_classes - 1}", "type": "long",
         "required": True}]})


def input_profile(inp: dict) -> str:
    """A split part's profile with its card and split rule added: the Datasets panel shows a
    profile's fields (it does not show the source)."""
    profile, source = json.loads(inp.get("profile") or "{}"), json.loads(inp["source"])
    split = source.get("split")
    rule = (", ".join(f"{k} {v}" for k, v in split.items()) if isinstance(split, dict)
            else str(split))
    subset = f", subset {source['subset']}" if source.get("subset") else ""
    return json.dumps({**profile, "card": f"{source.get('card')} ({source.get('source')})",
                       "split rule": f"{rule}, seed {source.get('seed')}{subset}"})
