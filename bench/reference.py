"""The reference pages of the documentation site, generated from the code's declarations when
the docs build (docs/hooks.py), so they cannot drift from what they describe: the strategy
registry, the backbone catalogue, the grid file's tables and fields, the dataset cards, and
the params, metrics, tags and artifacts a cell records in MLflow.

    PAGES: {docs path: a function returning the page's Markdown}
    python -m bench.reference OUTDIR       writes every page under OUTDIR, to read them

Framework-free: the MLflow names are read from the source of the modules that record them
(parsed, never imported), so the backends' torch and tensorflow imports are never run.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import bench.data as datamod
from bench import tracking, tracking_names
from bench.config import grid as gridmod
from bench.config import pretrained
from bench.config import schema as schemamod
from bench.config import selector as selectormod
from bench.config import spec as specmod
from bench.config import tune as tunemod
from bench.data import cards as cardmod
from bench.data import decoded
from bench.data import sources as sourcemod
from bench.paths import ROOT, datasets_dir
from strategies import FRAMEWORKS, registry, transformers
from strategies import backbones as bb
from strategies import phases as phasemod

SCHEMA_RELPATH = f"bench/grids/{schemamod.SCHEMA_FILE}"


# ---- Markdown helpers --------------------------------------------------------------------
def esc(text: object) -> str:
    """Plain text for a Markdown table cell or paragraph: code spans (`...`) kept as they
    are, elsewhere `|`, `*`, `<` and `>` escaped, line breaks joined."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(p.replace("|", "\\|"))
        else:
            out.append(p.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
                       .replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def code(v: object) -> str:
    """A value as a grid file spells it, in a code span."""
    text = v if isinstance(v, str) and not isinstance(v, bool) else schemamod.toml_value(v)
    text = str(text).replace("|", "\\|")
    return f"``{text}``" if "`" in text else f"`{text}`"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell if cell else " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def generated(*modules: str) -> str:
    names = ", ".join(f"`{m}`" for m in modules)
    return (f"*Generated from {names} when the docs build (`bench/reference.py`); edit the "
            f"declarations, not this page.*")


def page(title: str, modules: tuple[str, ...], *blocks: str) -> str:
    return "\n\n".join([f"# {title}", generated(*modules), *(b for b in blocks if b)]) + "\n"


def first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def doc_markdown(doc: str | None, skip: int = 0, lang: str = "toml") -> str:
    """A docstring as Markdown, from its `skip`-th paragraph: each paragraph's text, then
    its indented example as a code block (`lang`)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n(?=\S)", inspect.cleandoc(doc or ""))[skip:]:
        lines = para.splitlines()
        i = next((k for k, line in enumerate(lines) if line.startswith("    ")), len(lines))
        if lines[:i]:
            out.append(esc(" ".join(lines[:i])))
        block = textwrap.dedent("\n".join(lines[i:])).strip("\n")
        if block:
            out.append(f"```{lang}\n{block}\n```")
    return "\n\n".join(out)


# ---- strategies ----------------------------------------------------------------------------
def param_allowed(p: registry.Param) -> str:
    if p.kind == "depth":
        return "`1`..n_blocks of the backbone, or `all`"
    if p.kind == "blocks":
        return "names of the backbone's blocks joined by `+` (`stem+stage1`)"
    rule = p.constraint
    words = rule.bound() if rule else ""
    if p.choices:
        words = ", ".join(code(c) for c in p.choices)
    return esc(words) if not p.choices else words


def _phase_text(ph: registry.Phase, n: int) -> str:
    if ph.blocks is not None:
        what = "the named blocks " + "+".join(ph.blocks)
    elif ph.trainable_blocks in (registry.ALL, "all"):
        what = "every block"
    elif ph.trainable_blocks == 0:
        what = ""
    else:
        what = f"the top {ph.trainable_blocks} block(s)"
    if not what:
        what = "the head alone" if ph.train_head else "nothing"
    else:
        what += " and the head" if ph.train_head else " (the head frozen)"
    extra = []
    if ph.only != "all":
        extra.append(f"only {ph.only} parameters")
    if ph.lr_scale != 1:
        extra.append(f"lr x {ph.lr_scale:g}")
    if ph.lr_decay != 1:
        extra.append(f"lr decay {ph.lr_decay:g} a block")
    if ph.l2sp:
        extra.append(f"L2-SP alpha {ph.l2sp[0]:g}, beta {ph.l2sp[1]:g}")
    if ph.lora:
        extra.append(f"LoRA rank {ph.lora[0]}, alpha {ph.lora[1]:g}")
    if ph.trainable_blocks != 0 or ph.blocks:
        extra.append(f"BatchNorm {ph.bn}")
    return (f"`{ph.name}`: {n} epoch(s), trains {what}" + (f" ({', '.join(extra)})"
                                                           if extra else ""))


EXAMPLE_EPOCHS = 10


def _runs_on(s: registry.Strategy) -> list[bb.BackboneInfo]:
    return [b for b in bb.BACKBONES.values()
            if s.backbone_problem is None or s.backbone_problem(b) is None]


def strategy_section(s: registry.Strategy) -> str:
    example = schemamod.example_selector(s)
    out = [f"## {s.name}", esc(s.description),
           f"Selector: {code(example)}" + (" (its required parameters given)" if "[" in example
                                         else "")]
    if s.params:
        rows = [[f"`{p.name}`", p.kind, "required" if p.default is None else code(p.default),
                 param_allowed(p), esc(p.help)] for p in s.params]
        out.append(table(["Parameter", "Kind", "Default", "Allowed", "Help"], rows))
    else:
        out.append("No parameters.")
    _, given = selectormod.parse_selector(example)
    params = {k: v[0] for k, v in given.items()}
    on = _runs_on(s)[0]
    try:
        phases = s.phases(params, EXAMPLE_EPOCHS, on.n_blocks)
        out.append(f"Phases of {code(example)} in a {EXAMPLE_EPOCHS}-epoch cell on "
                   f"`{on.name}` ({on.n_blocks} blocks):\n\n"
                   + "\n".join(f"- {_phase_text(ph, n)}" for ph, n in phases))
    except (ValueError, KeyError, TypeError):
        pass
    need = s.min_epochs(params)
    if need > 1:
        out.append(f"Needs at least {need} epochs ({code(example)}).")
    if s.reinit_depth(params):
        out.append(f"Re-initialises the top {s.reinit_depth(params)} block(s) before "
                   f"training.")
    refused = [b for b in bb.BACKBONES.values() if b not in _runs_on(s)]
    if refused:
        out.append("Runs on: " + ", ".join(f"`{b.name}`" for b in _runs_on(s))
                   + ". Refused when a grid loads on "
                   + ", ".join(f"`{b.name}`" for b in refused) + ", e.g.: "
                   + esc(s.backbone_problem(refused[0])))
    else:
        out.append("Runs on every backbone.")
    return "\n\n".join(out)


def strategies_page() -> str:
    rows = [[f"[`{s.name}`](#{s.name})", esc(re.split(r"\.\s+(?=[A-Z])", s.description)[0]
                                             .rstrip(".")) + ".",
             ", ".join(f"`{p.name}`" for p in s.params) or "none"]
            for s in registry.STRATEGIES.values()]
    doc = inspect.cleandoc(selectormod.parse_selector.__doc__ or "").split("\n\n")
    syntax = esc(" ".join(doc[-1].split()))
    return page(
        "Strategies", ("strategies/registry.py", "strategies/phases.py"),
        esc(first_paragraph(registry.__doc__)),
        f"A grid chooses strategies in its `strategy` field, as selectors "
        f"`name[key=value,...]`. {syntax} Parameters left out take their defaults; "
        f"a required one (default *required*) must be given. Depth counts the backbone's "
        f"named blocks ([backbones](backbones.md)), the same in both frameworks.",
        table(["Strategy", "What it does", "Parameters"], rows),
        "BatchNorm policies (`bn`): " + ", ".join(f"`{b}`" for b in registry.BN_POLICIES)
        + ". " + esc(first_paragraph(_attribute_doc(phasemod, "BN_POLICIES"))),
        *(strategy_section(s) for s in registry.STRATEGIES.values()))


def _attribute_doc(module, name: str) -> str:
    """The docstring written under a module-level assignment (`X = ...` then `\"\"\"...\"\"\"`)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    body = tree.body
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                 for t in node.targets)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            return nxt.value.value
    return ""


# ---- backbones -----------------------------------------------------------------------------
def weights_text(info: bb.BackboneInfo) -> str:
    if info.family == "vit":
        t = transformers.TRANSFORMERS[info.name]
        return esc(t.source)
    return "`imagenet`: each framework's own ImageNet weights"


def image_text(info: bb.BackboneInfo) -> str:
    if info.family == "vit":
        t = transformers.TRANSFORMERS[info.name]
        return (f"a multiple of {t.patch_size} (its {t.patch_size}x{t.patch_size} patches); "
                f"checkpoint at {t.image_size}")
    return "any (`image_size` " + esc(schemamod.rule_text(specmod.CONSTRAINTS["image_size"])) \
        + ")"


def backbones_page() -> str:
    rows = [[f"`{b.name}`", b.family, ", ".join(b.frameworks), str(b.n_blocks),
             " → ".join(f"`{x}`" for x in b.blocks), weights_text(b), image_text(b)]
            for b in bb.BACKBONES.values()]
    vit_rows = [[f"`{t.name}`", f"{t.patch_size}", str(t.image_size), str(t.hidden),
                 str(t.layers), str(t.heads), str(t.mlp), t.kind,
                 f"`{t.repo}`" if t.repo else "none"]
                for t in transformers.TRANSFORMERS.values()]
    heads = [[f"`{k}`", " → ".join(map(str, hidden)) or "none (linear)",
              f"{p:g}" if hidden else "-"] for k, (hidden, p) in bb.HEADS.items()]
    frameworks = ", ".join(f"`{k}` ({v})" for k, v in FRAMEWORKS.items())
    return page(
        "Backbones", ("strategies/backbones.py", "strategies/transformers.py"),
        doc_markdown(bb.__doc__),
        f"Frameworks: {frameworks}. A grid that asks a backbone in a framework it does not "
        f"list is refused when it loads.",
        table(["Backbone", "Family", "Frameworks", "Blocks", "Blocks, input to output",
               "Weights (`weights = \"imagenet\"`)", "Image size"], rows),
        "Every backbone also starts from random weights (`weights = \"none\"`), from "
        "weights the harness pretrains itself (`pretrained:<dataset>`, see "
        "[grid files](grid.md)) or from a file.",
        "## Vision transformers\n\n" + esc(first_paragraph(transformers.__doc__)) + "\n\n"
        + table(["Name", "Patch", "Checkpoint size", "Width", "Blocks", "Heads", "MLP",
                 "Model type", "Hub repository"], vit_rows),
        "## Heads\n\nThe new classification head on top of the backbone (`head`): hidden "
        "widths (ReLU after each) and the dropout after each hidden layer, the same in "
        "both frameworks.\n\n" + table(["Head", "Hidden widths", "Dropout"], heads))


# ---- grid files ----------------------------------------------------------------------------
def _type_name(name: str) -> str:
    kind = specmod.CONSTRAINTS[name].kind
    return schemamod.TYPES.get(kind, "string")


def _description(schema: dict) -> str:
    return schema.get("description", "")


def _after_colon(text: str) -> str:
    """`key: what it is` -> `what it is`."""
    return text.split(": ", 1)[1] if ": " in text else text


def grid_page() -> str:
    schema = schemamod.grid_schema()
    props = schema["properties"]
    doc = gridmod.__doc__ or ""
    order = sorted(props, key=lambda k: (doc.find(f"[{k}") if f"[{k}" in doc
                                         else doc.find(f"{k} =") % len(doc)))
    top = [[f"`{k}`" if k in ("name", "description") else f"`[{k}]`"
            if k != "datasets" else "`[datasets.<name>]`",
            esc(_after_colon(_description(props[k])))] for k in order]
    names = schemamod.grid_fields()
    rows = []
    for f in names:
        default = schemamod.field_default(f)
        rows.append([f"`{f}`", _type_name(f), "required" if default is None else code(default),
                     esc(schemamod.field_rule(f)), esc(schemamod.field_help(f))])
    runner = [[f"`{k}`", esc(why)] for k, why in gridmod.SET_BY_RUNNER.items()]
    run = [[f"`{k}`", esc(_after_colon(_description(v)))]
           for k, v in props["run"]["properties"].items()]
    tune_props = props["tune"]["properties"]
    tune_rows = [[f"`{k}`", esc(_after_colon(_description(tune_props[k])))]
                 for k in (*tunemod.SETTINGS, *tunemod.SEARCHABLE)]
    metrics = ", ".join(f"`{m}` ({d})" for m, d in tunemod.METRICS.items())
    weights = [[f"`{k}`", "the cell's" if p.default is None else code(p.default),
                esc(schemamod.rule_text(p.check)), esc(p.check.help)]
               for k, p in pretrained.PARAMS.items()]
    return page(
        "Grid files", ("bench/config/grid.py", "bench/config/spec.py",
                       "bench/config/tune.py", "bench/config/pretrained.py"),
        doc_markdown(gridmod.__doc__),
        "`python -m bench run <grid> --dry-run` loads a grid file and lists its cells "
        "without running anything. The shipped grids are in `bench/grids/`.",
        "## Tables\n\n" + table(["Key", "What it is"], top),
        "## Cell fields\n\nEvery field of a cell (`RunSpec`), set in `[axes]` (a list of "
        "values) or `[defaults]` (one value); `[smoke]` overrides some under `--smoke`. The "
        "fields a grid varies show in its cells' labels and run names.\n\n"
        + table(["Field", "Type", "Default", "Allowed", "What it is"], rows),
        "Set by the harness, never in a grid file:\n\n" + table(["Field", "Why"], runner),
        "## [axes]\n\n" + esc(_after_colon(_description(props["axes"]))) + " Coupled axes: "
        "`\"backbone, image_size\" = [[\"resnet50\", 224], [\"resnet18\", 32]]` makes two "
        "cells, not four. A strategy selector with swept parameters (`partial[depth=1,2]`) "
        "makes one cell per value.",
        f"## [smoke]\n\n{esc(_after_colon(_description(props['smoke'])))}",
        "## [run]\n\n" + esc(_after_colon(_description(props["run"]))) + "\n\n"
        + table(["Key", "What it is"], run),
        "## [datasets.&lt;name&gt;]\n\nA dataset card local to the grid, with the keys of "
        "a card in `datasets/`: see [dataset cards](datasets.md).",
        "## [tune]\n\n" + doc_markdown(tunemod.__doc__) + "\n\n"
        + table(["Key", "What it is"], tune_rows)
        + f"\n\nMetrics that may choose: {metrics}. A strategy's own parameters are searched "
          f"in `[tune.<strategy>]` (e.g. `[tune.partial]` with `depth = [1, 2, 3]`): "
          f"numbers only, each within the parameter's range.",
        "## Weights\n\n" + esc(first_paragraph(pretrained.__doc__)) + " Its parameters "
        "(`pretrained:<dataset>[k=v,...]`):\n\n"
        + table(["Parameter", "Default", "Allowed", "Help"], weights),
        schema_section())


def schema_section() -> str:
    return f"""## Checking a grid file in the editor

`{SCHEMA_RELPATH}` is the JSON Schema (draft 2020-12) of grid files, generated from the same
declarations as this page (`python -m bench.config.schema`; `--check` says whether the
committed file is current, and a test holds it to the code). With the Even Better TOML
extension in VS Code (taplo underneath), a grid file gets completion, the descriptions above
on hover, and errors as you type (an unknown key, a value of the wrong type, an unknown
backbone or strategy). Either put the schema on the file's first line:

```toml
#:schema ./path/to/{schemamod.SCHEMA_FILE}
name = "mygrid"
```

(the path is relative to the grid file: `#:schema ./{schemamod.SCHEMA_FILE}` beside the shipped
grids), or associate it once for every grid in a `.taplo.toml` at the root of the workspace:

```toml
[[rule]]
include = ["bench/grids/*.toml", "grids/**/*.toml"]

[rule.schema]
path = "./{SCHEMA_RELPATH}"
```

The schema accepts every grid that loads; it cannot check what needs the registries per cell
or the data (a depth within a backbone's blocks, a backbone's frameworks, a dataset name that
names a card, an image folder, an epoch budget a strategy can split, `[smoke]`'s values):
`python -m bench run <grid> --dry-run` checks those. The columns of coupled axes are typed
with draft 2020-12's `prefixItems`, which taplo 0.9 does not read: there an unknown backbone
in `"backbone, image_size"` shows only when the grid loads."""


# ---- dataset cards -------------------------------------------------------------------------
def split_text(card: dict) -> str:
    s = card["split"]
    parts = []
    if "train_size" in s:
        parts.append(f"train {s['train_size']} + val {s['val_size']}")
    elif "val_fraction" in s:
        parts.append(f"val {s['val_fraction']:g}")
    if s.get("test") == "official":
        parts.append("official test split")
    elif s.get("test") == "val":
        parts.append("no test (val tested)")
    else:
        parts.append(f"test {s.get('test_fraction', 0):g}")
    return ", ".join(parts)


def shift_text(card: dict) -> str:
    out = []
    if "corruption" in card:
        c = card["corruption"]
        out.append("corruption: " + ", ".join(f"{k} = {schemamod.toml_value(v)}"
                                               for k, v in c.items()))
    if "label_permutation" in card:
        out.append(f"label permutation (seed {card['label_permutation']})")
    return esc("; ".join(out)) or "-"


def classes_text(card: dict) -> str:
    if card.get("classes"):
        return f"{len(card['classes'])}: " + ", ".join(map(str, card["classes"]))
    n = sourcemod.class_count(card)
    return str(n) if n is not None else "the folders'"


def datasets_page() -> str:
    card_schema = schemamod.card_schema()
    props = card_schema["properties"]
    keys = [[f"`{k}`" if k not in ("split", "corruption") else f"`[{k}]`",
             "yes" if k in card_schema["required"] else "",
             esc(_after_colon(_description(v)))] for k, v in props.items()]
    sub = {t: [[f"`{k}`", esc(_after_colon(_description(v)))]
               for k, v in props[t]["properties"].items()] for t in ("split", "corruption")}
    sources = []
    for kind in sorted(sourcemod.SOURCES):
        sizes = sourcemod.OFFICIAL_SIZES.get(kind)
        sources.append([f"`{kind}`",
                        "yes" if kind in sourcemod.ARRAY_SOURCES else "no (files)",
                        str(sourcemod.CLASS_COUNTS.get(kind, "its folders")),
                        f"{sizes[0]} + {sizes[1]} test" if sizes else "-"])
    shipped = []
    for name, raw in sorted(cardmod.shipped_cards().items()):
        card = cardmod.check_card(raw, f"datasets/{name}.toml")
        url = f"<{card['url']}>" if str(card.get("url", "")).startswith("http") else ""
        shipped.append([f"`{name}`", f"`{card['source']}`", classes_text(card),
                        esc(split_text(card)), shift_text(card),
                        esc(card.get("description", "")) + (f" {url}" if url else "")])
    return page(
        "Dataset cards", ("bench/data/cards.py", "bench/data/sources.py", "datasets/*.toml"),
        doc_markdown(cardmod.__doc__),
        "## Keys\n\n" + table(["Key", "Required", "What it is"], keys),
        "### [split]\n\n" + esc(_after_colon(_description(props["split"]))) + "\n\n"
        + table(["Key", "What it is"], sub["split"]),
        "### [corruption]\n\n" + esc(_after_colon(_description(props["corruption"])))
        + "\n\n" + table(["Key", "What it is"], sub["corruption"]),
        "## Sources\n\n" + esc(first_paragraph(sourcemod.__doc__)) + "\n\n"
        + table(["Source", "Loads into memory (corruption allowed)", "Classes",
                 "Official train + test images"], sources),
        f"## Shipped cards\n\nThe cards in `{_rel(datasets_dir())}/`; a grid names them "
        f"in its `dataset` field, or as the source of `pretrained:<dataset>` weights.\n\n"
        + table(["Card", "Source", "Classes", "Split", "Shift", "Description"], shipped))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---- MLflow names, read from the code that records them -----------------------------------
# where a cell's record is written: parsed, never imported (the backends import frameworks)
RECORDING_CODE = ("bench", "strategies/torch_backend", "strategies/keras_backend")
METRIC_CALLS = {"log_epoch": "epoch", "log_final": "final", "log_metrics": "final"}
TAG_CALLS = {"set_tags"}
ARTIFACT_CALLS = {"log_text": -1, "artifact": 0, "log_artifact": 2}
NOT_RUN_TAGS = {"create_experiment"}  # tags of an experiment, not of a run
SESSION_MODULE = "bench/cell/session.py"  # the Session protocol: its methods' declared keys


@dataclass(frozen=True)
class Recorded:
    name: str
    kind: str  # epoch, final, tag, artifact
    run: str  # cell or parent
    where: str  # module (function) of the literal that names it


@dataclass
class _Func:
    node: ast.AST
    module: str  # path relative to the repository


class _Code:
    """The parsed modules: their functions by name, module-level string constants, the
    keys assigned through `x.<attr>["key"] = ...`, the Session protocol's declared keys."""

    def __init__(self, paths: list[Path]):
        self.funcs: dict[str, list[_Func]] = {}
        self.consts: dict[str, str] = {}
        self.attr_keys: dict[str, list[tuple[str, str]]] = {}
        self.trees: dict[str, ast.Module] = {}
        for path in paths:
            rel = _rel(path)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            self.trees[rel] = tree
            for node in tree.body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)
                        and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)):
                    self.consts.setdefault(node.targets[0].id, node.value.value)
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    self.funcs.setdefault(node.name, []).append(_Func(node, rel))
                    for sub in _own_nodes(node):
                        if isinstance(sub, ast.Assign):
                            for t in sub.targets:
                                if (isinstance(t, ast.Subscript)
                                        and isinstance(t.value, ast.Attribute)):
                                    key = _const(t.slice) or (
                                        _const(t.slice.right)
                                        if isinstance(t.slice, ast.BinOp) else None)
                                    if key:
                                        self.attr_keys.setdefault(t.value.attr, []).append(
                                            (key, f"{rel} ({node.name})"))
        self.session = self._session_keys()

    def _session_keys(self) -> dict[str, set[str]]:
        """Session method -> the keys its docstring declares (`{'train_loss', 'train_acc'}`)."""
        out: dict[str, set[str]] = {}
        tree = self.trees.get(SESSION_MODULE)
        cls = next((n for n in (tree.body if tree else ()) if isinstance(n, ast.ClassDef)
                    and n.name == "Session"), None)
        for node in cls.body if cls else ():
            if isinstance(node, ast.FunctionDef):
                doc = ast.get_docstring(node) or ""
                for group in re.findall(r"\{([^{}]*)\}", doc):
                    out.setdefault(node.name, set()).update(
                        re.findall(r"'([A-Za-z_]\w*)'", group))
        return out


def _own_nodes(fn: ast.AST):
    """The nodes of a function, without those of the functions defined in it."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))


def _const(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


class _Keys:
    """The string keys of the dictionary an expression evaluates to, followed through
    names, function returns and the Session protocol, each with where it is written."""

    def __init__(self, code_: _Code):
        self.code = code_
        self.seen: set[tuple[int, str]] = set()

    def of(self, expr: ast.AST | None, fn: _Func, depth: int = 0) -> list[tuple[str, str]]:
        if expr is None or depth > 6:
            return []
        where = f"{fn.module} ({getattr(fn.node, 'name', '')})"
        out: list[tuple[str, str]] = []
        if isinstance(expr, ast.Dict):
            for k, v in zip(expr.keys, expr.values, strict=True):
                if k is None:
                    out += self.of(v, fn, depth + 1)
                else:
                    key = self.key(k)
                    if key:
                        out.append((key, where))
        elif isinstance(expr, ast.BoolOp):
            for v in expr.values:
                out += self.of(v, fn, depth + 1)
        elif isinstance(expr, ast.IfExp):
            out += self.of(expr.body, fn, depth + 1) + self.of(expr.orelse, fn, depth + 1)
        elif isinstance(expr, ast.Name):
            out += self.of_name(expr.id, fn, depth + 1)
        elif isinstance(expr, ast.Attribute):
            out += self.code.attr_keys.get(expr.attr, [])
        elif isinstance(expr, ast.Call):
            out += self.of_call(expr, fn, depth + 1)
        return out

    def key(self, k: ast.AST) -> str | None:
        """A dictionary key: a string, a module constant, or `PREFIX + "name"`."""
        if isinstance(k, ast.Name):
            return self.code.consts.get(k.id)
        if isinstance(k, ast.BinOp) and isinstance(k.op, ast.Add):
            right = _const(k.right)
            left = self.code.consts.get(k.left.id) if isinstance(k.left, ast.Name) else None
            return None if right is None else (left or "") + right
        return _const(k)

    def of_call(self, call: ast.Call, fn: _Func, depth: int) -> list[tuple[str, str]]:
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) \
            else None
        if name == "dict":
            where = f"{fn.module} ({getattr(fn.node, 'name', '')})"
            return [(k.arg, where) for k in call.keywords if k.arg]
        if name == "getattr" and len(call.args) >= 2 and _const(call.args[1]):
            return self.code.attr_keys.get(_const(call.args[1]), [])
        out = []
        if name in self.code.session:
            out += [(k, f"{SESSION_MODULE} (Session.{name})")
                    for k in sorted(self.code.session[name])]
        for g in self.code.funcs.get(name, []) if name else ():
            backend = g.module.startswith("strategies/")
            for node in _own_nodes(g.node):
                if isinstance(node, ast.Return) and (not backend or
                                                     isinstance(node.value, ast.Dict)):
                    mark = (id(node), "return")
                    if mark not in self.seen:
                        self.seen.add(mark)
                        out += self.of(node.value, g, depth + 1)
        return out

    def of_name(self, var: str, fn: _Func, depth: int) -> list[tuple[str, str]]:
        """What is assigned to `var` in `fn` (and, for a parameter of `fn`, in every
        function of its module): whole dictionaries, `var[key] = `, `var.update(...)`."""
        mark = (id(fn.node), var)
        if mark in self.seen:
            return []
        self.seen.add(mark)
        scopes = [fn]
        args = getattr(fn.node, "args", None)
        if args and var in {a.arg for a in (*args.args, *args.kwonlyargs)}:
            scopes = [g for gs in self.code.funcs.values() for g in gs
                      if g.module == fn.module]
        out = []
        for scope in scopes:
            where = f"{scope.module} ({getattr(scope.node, 'name', '')})"
            for node in _own_nodes(scope.node):
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id == var:
                            out += self.of(node.value, scope, depth + 1)
                        elif (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                              and t.value.id == var and self.key(t.slice)):
                            out.append((self.key(t.slice), where))
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and isinstance(node.func.value, ast.Name) and node.func.value.id == var):
                    if node.func.attr == "update":
                        out += [(k.arg, where) for k in node.keywords if k.arg]
                        for a in node.args:
                            out += self.of(a, scope, depth + 1)
                    elif node.func.attr == "setdefault" and node.args and _const(node.args[0]):
                        out.append((_const(node.args[0]), where))
        return out


def _run_of(call: ast.Call, fn: _Func) -> str:
    """`parent` when the call records on the grid's parent run (its run argument or its
    function says so), else `cell`."""
    if "parent" in getattr(fn.node, "name", ""):
        return "parent"
    if len(call.args) >= 2:
        names = {n.id for n in ast.walk(call.args[0]) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(call.args[0]) if isinstance(n, ast.Attribute)}
        if any("parent" in n for n in names):
            return "parent"
    return "cell"


def _tag_name(key: str) -> str:
    """How bench/tracking.py names a tag: the harness's own under its prefix, MLflow's
    (a dotted name) as they are."""
    return key if "." in key else tracking.TAG + key


@cache
def recorded() -> tuple[Recorded, ...]:
    """Every metric, tag and artifact name the recording code writes with a literal name."""
    paths = sorted(p for d in RECORDING_CODE for p in (ROOT / d).rglob("*.py")
                   if p.name != "reference.py")
    code_ = _Code(paths)
    keys = _Keys(code_)
    out: set[Recorded] = set()
    for fns in code_.funcs.values():
        for fn in fns:
            if fn.module.startswith("strategies/"):
                continue  # the backends record through the cell loop, read above
            for call in (n for n in _own_nodes(fn.node) if isinstance(n, ast.Call)):
                keys.seen.clear()  # each record followed afresh
                out |= _recorded_by(call, fn, keys)
    return tuple(sorted(out, key=lambda r: (r.kind, r.name, r.where)))


def _recorded_by(call: ast.Call, fn: _Func, keys: _Keys) -> set[Recorded]:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) \
        else ""
    run = _run_of(call, fn)
    out: set[Recorded] = set()
    arg = call.args[1] if len(call.args) >= 2 else call.args[0] if call.args else None
    if name in METRIC_CALLS:
        out |= {Recorded(k, METRIC_CALLS[name], run, w) for k, w in keys.of(arg, fn)}
    if name in TAG_CALLS:
        out |= {Recorded(_tag_name(k), "tag", run, w) for k, w in keys.of(arg, fn)}
    if name not in NOT_RUN_TAGS:  # a run's tags passed on: start_cell(tags=...), claim(...)
        for kw in call.keywords:
            if kw.arg == "tags":
                found = keys.of(kw.value, fn)
            elif kw.arg is None:  # **run_names(...): the "tags" entry of what it returns
                found = [x for d in _returned_dicts(kw.value, keys.code)
                         for k, v in zip(d[0].keys, d[0].values, strict=True)
                         if _const(k) == "tags" for x in keys.of(v, d[1])]
            else:
                continue
            out |= {Recorded(_tag_name(k), "tag", run, w) for k, w in found}
    if name in ARTIFACT_CALLS:
        i = ARTIFACT_CALLS[name]
        node = next((k.value for k in call.keywords if k.arg in ("name", "artifact_path")),
                    None)
        if node is None and len(call.args) > (i if i >= 0 else -i - 1):
            node = call.args[i]
        art = _const(node) if node is not None else None
        if art is None and isinstance(node, ast.Name):
            art = keys.code.consts.get(node.id)
        if art:
            out.add(Recorded(art, "artifact", run, f"{fn.module} ({fn.node.name})"))
    return out


def _returned_dicts(expr: ast.AST, code_: _Code) -> list[tuple[ast.Dict, _Func]]:
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name | ast.Attribute)):
        return []
    name = expr.func.id if isinstance(expr.func, ast.Name) else expr.func.attr
    return [(n.value, g) for g in code_.funcs.get(name, []) for n in _own_nodes(g.node)
            if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict)]


def _names_table(items: list[Recorded], head: str) -> str:
    by_name: dict[str, set[str]] = {}
    for r in items:
        by_name.setdefault(r.name, set()).add(r.where)
    rows = [[f"`{n}`", "; ".join(f"`{w}`" for w in sorted(ws))]
            for n, ws in sorted(by_name.items())]
    return table([head, "Recorded in"], rows)


def mlflow_page() -> str:
    rec = recorded()

    def pick(kind: str, run: str) -> list[Recorded]:
        return [r for r in rec if r.kind == kind and r.run == run]

    spec_fields = [f for f in fields(specmod.RunSpec) if f.name != "strategy_params"]
    params = [[f"`{f.name}`", schemamod.TYPES.get(specmod.CONSTRAINTS[f.name].kind, "string"),
               esc(schemamod.field_help(f.name) or gridmod.SET_BY_RUNNER.get(f.name, "")
                   or schemamod.field_rule(f.name))]
              for f in spec_fields]
    sparams: dict[str, list[str]] = {}
    for s in registry.STRATEGIES.values():
        for p in s.params:
            sparams.setdefault(p.name, []).append(s.name)
    params += [[f"`strategy.{k}`", "string",
                "the strategy's parameter (" + ", ".join(f"`{x}`" for x in v) + ")"]
               for k, v in sorted(sparams.items())]
    params.append(["`strategy_label`", "string", "the strategy with the parameters that "
                   "differ from its defaults: `partial[depth=2]`"])
    sections = [
        doc_markdown("\n\n".join(p for p in (tracking.__doc__ or "").split("\n\n")[1:]
                                   if "this file" not in p)),
        "The lists below are read from the code that records them (every name written as a "
        "literal where a dictionary of metrics or tags is handed to MLflow, followed through "
        "the cell loop and the `Session` protocol the backends implement), so they are what "
        "the code writes. A name computed at run time (a key made in a loop) is not listed.",
        "## Params\n\nOne param per field of the cell's `RunSpec` (`RunSpec.to_params`: "
        "`RunSpec.from_params` reads them back into the same spec), one per strategy "
        "parameter, and the strategy label; MLflow holds each as a string. The fields are "
        "those of [grid files](grid.md#cell-fields).\n\n"
        + table(["Param", "Field type", "What it is"], params),
        "## Metrics per epoch\n\nLogged with `step` = the epoch (1, 2, ...).\n\n"
        + _names_table(pick("epoch", "cell"), "Metric"),
        "## Metrics once per cell\n\n" + _names_table(pick("final", "cell"), "Metric"),
        f"## Tags of a cell\n\nThe harness's own tags carry the prefix "
        f"`{tracking.TAG}`; MLflow's (`mlflow.*`) are its own.\n\n"
        + _names_table(pick("tag", "cell"), "Tag"),
        f"## Tag values in one vocabulary\n\n`{tracking.TAG}decoded_cache_used` (whether the "
        f"image files were decoded once into a memmap) is in one of these forms "
        f"(`bench/data/decoded.py` `USED_FORMS`; `form_of` reads a value back):\n\n"
        + table(["Form", "Value"], [[k, f"`{v}`"] for k, v in decoded.USED_FORMS.items()]),
        "## Artifacts of a cell\n\n" + _names_table(pick("artifact", "cell"), "Artifact")
        + "\n\nAnd the cell's log (its process's output), under the log file's name.",
        "## Datasets and system metrics\n\n"
        + esc(first_paragraph(datamod.dataset_inputs.__doc__)) + "\n\n"
        + esc(first_paragraph(tracking.system_metrics.__doc__)),
        "## The grid's parent run\n\nOne parent run per invocation of a grid; the cells are "
        "its nested runs (tag `mlflow.parentRunId`).\n\n"
        + _names_table(pick("tag", "parent"), "Tag") + "\n\n"
        + _names_table(pick("final", "parent"), "Metric") + "\n\n"
        + _names_table(pick("artifact", "parent"), "Artifact"),
        "## Run names\n\n" + esc(first_paragraph(tracking_names.__doc__)) + " "
        + esc(tracking_names.__doc__.split("\n\n")[2] if tracking_names.__doc__.count(
            "\n\n") >= 2 else ""),
    ]
    return page("What a cell records in MLflow",
                ("bench/tracking.py", "bench/cell/loop.py", "bench/config/spec.py",
                 "bench/run/"), *sections)


# ---- the pages -----------------------------------------------------------------------------
PAGES: dict[str, Callable[[], str]] = {
    "reference/strategies.md": strategies_page,
    "reference/backbones.md": backbones_page,
    "reference/grid.md": grid_page,
    "reference/datasets.md": datasets_page,
    "reference/mlflow.md": mlflow_page,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reference",
                                 description="write the generated reference pages")
    ap.add_argument("outdir", type=Path, help="folder to write reference/*.md into")
    args = ap.parse_args(argv)
    for rel, make in PAGES.items():
        path = args.outdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make(), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
