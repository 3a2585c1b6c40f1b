"""The JSON Schema (draft 2020-12) of a grid file, generated from the declarations grid
loading reads: the tables and keys of bench/config/grid.py, each RunSpec field's Constraint
(bench/config/spec.py), the [tune] table's (bench/config/tune.py), the dataset cards'
(bench/data/cards.py), the strategy registry and the backbone catalogue (strategies/).

    python -m bench.config.schema           writes bench/grids/grid.schema.json
    python -m bench.config.schema --check   exits 1 when the committed file differs

An editor validates and completes a grid file with it: Even Better TOML (taplo) reads a
first line `#:schema ./path/to/grid.schema.json`, or an association in .taplo.toml.

The schema is a superset of what `grid.load` accepts: it never refuses a grid that loads.
What needs the registries per cell or the data at load time (a depth within the
backbone's blocks, a backbone's frameworks, a dataset name that names a card, an image
folder that exists, a budget a strategy can split) is left to `bench run --dry-run`.

Also here: the descriptions the schema and the reference pages (bench/reference.py) share:
each field's comment in its declaration and the commented examples in the modules'
docstrings, read from the source, so neither restates them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import re
import sys
import tokenize
from dataclasses import MISSING
from functools import cache
from pathlib import Path

from bench import devices
from bench.config import grid as gridmod
from bench.config import pretrained
from bench.config import spec as specmod
from bench.config import tune as tunemod
from bench.config.cells import SPEC_FIELDS
from bench.data import cards as cardmod
from bench.data import sources as sourcemod
from bench.paths import PLAIN_NAME, grids_dir
from strategies import FRAMEWORKS, registry
from strategies import backbones as bb
from strategies.constraint import Constraint

SCHEMA_FILE = "grid.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
SCALAR = {"type": ["string", "integer", "number", "boolean"]}
# coupled axes ("backbone, image_size"): each field's column is typed at positions up to this
COUPLED_POSITIONS = 6
# [split] test's values: check_card's message names them ("official" | "val")
SPLIT_TESTS = ("official", "val")


def schema_path() -> Path:
    return grids_dir() / SCHEMA_FILE


def grid_fields() -> list[str]:
    """The RunSpec fields a grid file may set, in declaration order."""
    return [f for f in SPEC_FIELDS if f not in gridmod.SET_BY_RUNNER]


# ---- descriptions, read from the declarations ---------------------------------------------
@cache
def field_comments() -> dict[str, str]:
    """RunSpec field -> the comment that declares it in bench/config/spec.py: its trailing
    comment, else the comment lines right above it."""
    src = Path(specmod.__file__).read_text(encoding="utf-8")
    lines = src.splitlines()
    cls = next(n for n in ast.parse(src).body
               if isinstance(n, ast.ClassDef) and n.name == "RunSpec")
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = "\n".join(lines[node.lineno - 1:node.end_lineno])
        trailing = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                    if t.type == tokenize.COMMENT]
        above = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip())
            i -= 1
        comment = trailing or above
        if comment:
            out[node.target.id] = _join_comment(comment)
    return out


def _join_comment(lines: list[str]) -> str:
    return " ".join(line.lstrip("#").strip() for line in lines).strip()


_TABLE = re.compile(r"^\s*\[([\w.<>-]+)\]\s*(?:#\s?(.*))?$")
_KEY = re.compile(r'^\s*(?:"([^"]+)"|([A-Za-z_][\w-]*))\s*=\s*[^#]*?(?:#\s?(.*))?$')


def example_comments(doc: str | None) -> dict[tuple[str, str], str]:
    """(table, key) -> its comment, from a docstring's commented TOML example (table "" for
    top-level keys, the key "" for a table's own comment); a comment-only line continues the
    comment of the key above it."""
    out: dict[tuple[str, str], str] = {}
    table, last = "", None
    for line in (doc or "").splitlines():
        stripped = line.strip()
        if not stripped:
            last = None
            continue
        if stripped.startswith("#"):
            if last is not None:
                more = stripped.lstrip("#").strip().rstrip(":")
                out[last] = f"{out.get(last, '')} {more}".strip()
            continue
        m = _TABLE.match(line)
        if m:
            table, last = m.group(1), (m.group(1), "")
            if m.group(2):
                out.setdefault(last, m.group(2).strip().rstrip(":"))
            continue
        m = _KEY.match(line)
        if m:
            key = m.group(1) or m.group(2)
            last = (table, key)
            if m.group(3) and not out.get(last):
                out[last] = m.group(3).strip().rstrip(":")
            continue
        last = None
    return out


GRID_EXAMPLE = example_comments(gridmod.__doc__)
TUNE_EXAMPLE = example_comments(tunemod.__doc__)
CARD_EXAMPLE = example_comments(cardmod.__doc__)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return specmod.format_value(v)


def rule_text(c: Constraint) -> str:
    """A Constraint in words: `an integer >= 1`, `a string, one of adam, adamw, sgd`."""
    words = c.rule()
    if c.choices:
        words = f"{words}, one of " if words else "one of "
        words += ", ".join(toml_value(x) for x in c.choices)
    return words


def field_rule(name: str) -> str:
    """What a grid may give RunSpec field `name`: its Constraint, and the registry or card
    rules grid loading adds."""
    base = rule_text(specmod.CONSTRAINTS[name])
    if name == "framework":
        return f"{base}, one of {', '.join(sorted(FRAMEWORKS))}"
    if name == "backbone":
        return f"{base}, one of {', '.join(bb.BACKBONES)}"
    if name == "strategy":
        return (f"a registered strategy, its parameters in brackets (a comma sweeps values: "
                f"partial[depth=1,2]): {', '.join(registry.STRATEGIES)}")
    if name == "dataset":
        return (f"the name of a dataset card: shipped {', '.join(sorted(cardmod.shipped_cards()))}"
                f", or a [datasets.<name>] table of the grid")
    if name == "weights":
        return ('"imagenet", "none" (random init), "pretrained:<dataset>[k=v,...]" (k: '
                + ", ".join(pretrained.PARAMS) + ") or the path of a weights file")
    if name == "head":
        return base + " (" + "; ".join(
            f"{k}: " + ("no hidden layer" if not hidden else
                        "-".join(map(str, hidden)) + (f", dropout {p:g}" if p else ""))
            for k, (hidden, p) in bb.HEADS.items()) + ")"
    return base


def field_default(name: str) -> object:
    d = SPEC_FIELDS[name].default
    return None if d is MISSING else d


def field_help(name: str) -> str:
    """The field's own words: its Constraint's help, its declaration's comment, or the
    comment of the grid example (bench/config/grid.py) that sets it."""
    c = specmod.CONSTRAINTS[name]
    return (c.help or field_comments().get(name) or GRID_EXAMPLE.get(("axes", name))
            or GRID_EXAMPLE.get(("defaults", name)) or "")


def field_description(name: str) -> str:
    text = field_help(name)
    rule = field_rule(name)
    default = field_default(name)
    tail = rule + ("" if default is None else f"; default {toml_value(default)}")
    if default is None:
        tail += "; required: in [axes] or [defaults]" if name in gridmod.REQUIRED_AXES else ""
    if text:
        return f"{name}: {text}. {tail[0].upper() + tail[1:]}."
    return f"{name}: {tail}."


# ---- Constraint -> JSON Schema -------------------------------------------------------------
def constraint_schema(c: Constraint, description: str | None = None) -> dict:
    """kind -> type, bounds -> (exclusive)minimum/maximum, choices -> enum, also -> anyOf
    with const, help (or `description`) -> description."""
    s: dict = {}
    if c.kind is not None:
        s["type"] = TYPES[c.kind]
    if c.minimum is not None:
        s["exclusiveMinimum" if c.exclusive else "minimum"] = c.minimum
    if c.maximum is not None:
        s["exclusiveMaximum" if c.open_max else "maximum"] = c.maximum
    if c.choices:
        s["enum"] = list(c.choices)
    if c.also:
        s = {"anyOf": [*({"const": a} for a in c.also), s]}
    text = description if description is not None else c.help
    if text:
        s = {"description": text, **s}
    return s


def selector_pattern() -> str:
    """A strategy selector: a registered name, its own parameter names in brackets (what
    bench/config/selector.py parse_selector reads), or empty brackets for none."""
    alts = []
    for s in registry.STRATEGIES.values():
        if s.params:
            key = "|".join(re.escape(p.name) for p in s.params)
            token = rf"\s*(?:(?:{key})\s*=[^,\[\]]*|[^,=\[\]]*)"
            body = rf"\[{token}(?:,{token})*\]"
        else:
            body = r"\[[\s,]*\]"
        alts.append(rf"{re.escape(s.name)}\s*(?:{body})?")
    return rf"^\s*(?:{'|'.join(alts)})\s*$"


def _plain_name() -> dict:
    return {"type": "string", "pattern": f"^{PLAIN_NAME.pattern}$",
            "not": {"pattern": r"\.\."}}


def field_schema(name: str) -> dict:
    """One RunSpec field's value in a grid file."""
    s = constraint_schema(specmod.CONSTRAINTS[name], description=field_description(name))
    if name == "framework":
        s["enum"] = sorted(FRAMEWORKS)
    elif name == "backbone":
        s["enum"] = list(bb.BACKBONES)
    elif name == "strategy":
        s["pattern"] = selector_pattern()
        s["examples"] = [example_selector(x) for x in registry.STRATEGIES.values()]
    elif name == "dataset":
        s.update({k: v for k, v in _plain_name().items() if k != "type"})
        s["examples"] = sorted(cardmod.shipped_cards())
    elif name == "weights":
        s["examples"] = ["imagenet", "none", f"{pretrained.PREFIX}mnist5k[epochs=5]"]
    default = field_default(name)
    if default is not None:
        s["default"] = default
    return s


def example_selector(s: registry.Strategy) -> str:
    shown = [f"{p.name}={p.default if p.default is not None else _param_example(p)}"
             for p in s.params if p.default is None]
    return f"{s.name}[{','.join(shown)}]" if shown else s.name


def _param_example(p: registry.Param) -> str:
    return {"depth": "1", "blocks": "stem+stage1"}.get(p.kind, "")


def _in_key(name: str) -> str:
    """A pattern matching an [axes] key that names `name` (alone or coupled)."""
    return rf"(?:^|,)\s*{re.escape(name)}\s*(?:,|$)"


# ---- the tables ----------------------------------------------------------------------------
def axes_schema(names: list[str]) -> dict:
    one = "|".join(re.escape(n) for n in names)
    key = rf"^\s*(?:{one})\s*(?:,\s*(?:{one})\s*)*$"
    pattern_props: dict[str, dict] = {
        rf"^\s*(?:{one})\s*$": {
            "description": "an axis: the values this field takes across the grid's cells",
            "type": "array", "minItems": 1, "items": SCALAR},
        ",": {"description": "coupled axes: fields that move together, one list per "
                             "combination, its values in the key's order",
              "type": "array", "minItems": 1,
              "items": {"type": "array", "items": SCALAR}},
    }
    for n in range(2, len(names) + 1):  # a row holds one value per name of the key
        pattern_props[rf"^[^,]*(?:,[^,]*){{{n - 1}}}$"] = {
            "description": f"coupled axes of {n} fields: each row holds {n} values",
            "items": {"minItems": n, "maxItems": n}}
    for i in range(COUPLED_POSITIONS):
        for f in names:
            at = rf"^\s*{re.escape(f)}\s*," if i == 0 else \
                rf"^[^,]*(?:,[^,]*){{{i - 1}}},\s*{re.escape(f)}\s*(?:,|$)"
            pattern_props[at] = {
                "description": f"coupled axes: column {i + 1} holds {f} values",
                "items": {"prefixItems": [{}] * i + [{"$ref": f"#/$defs/{f}"}]}}
    return {
        "description": _table_help("axes") + " Each key is a field (its list of values) or "
                       "several fields, comma-separated, that move together (a list of "
                       "rows, one value per field).",
        "type": "object",
        "propertyNames": {"pattern": key},
        "properties": {f: {"description": field_description(f), "type": "array",
                           "minItems": 1, "items": {"$ref": f"#/$defs/{f}"}} for f in names},
        "patternProperties": pattern_props,
        "additionalProperties": False,
    }


def scalars_schema(names: list[str], table: str, extra: str = "") -> dict:
    """[defaults] or [smoke]: a field's scalar. Its value is typed by a rule of the whole
    grid (`defaults_rules`): grid loading checks a default only where no axis overrides it,
    and [smoke]'s values only under --smoke."""
    return {"description": _table_help(table) + extra, "type": "object",
            "properties": {f: {"description": field_description(f),
                               "not": {"type": "array"}} for f in names},
            "additionalProperties": False}


def defaults_rules(names: list[str]) -> list[dict]:
    """A [defaults] value is checked where no axis sets the field (an axis overrides it in
    every cell, and grid loading checks the values the cells get)."""
    return [{"description": f"defaults.{f} is checked unless an axis sets {f}",
             "if": {"required": ["axes"], "properties": {"axes": _names_field(f)}},
             "else": {"properties": {"defaults": {"properties": {f: {
                 "$ref": f"#/$defs/{f}"}}}}}} for f in names]


def _names_field(f: str) -> dict:
    """An [axes] table with a key that names field `f` (alone or coupled)."""
    return {"not": {"propertyNames": {"not": {"pattern": _in_key(f)}}}}


def run_schema() -> dict:
    props = {"device": {"description": _run_help("device", f"one of {devices.ALLOWED}"),
                        "type": "string", "pattern": f"^(?:{devices._DEVICE.pattern})$",
                        "default": "auto"}}
    for key, rule in gridmod.RUN_RULES.items():
        props[key] = constraint_schema(rule, description=_run_help(key, rule_text(rule),
                                                                   rule.help))
    missing = gridmod.RUN_KEYS - set(props)
    assert not missing, f"[run] keys without a schema: {missing}"
    return {"description": _table_help("run"), "type": "object",
            "properties": {k: props[k] for k in sorted(props)},
            "additionalProperties": False}


def _run_help(key: str, rule: str, help_: str = "") -> str:
    text = GRID_EXAMPLE.get(("run", key), "")
    words = "; ".join(x for x in (text, help_) if x)
    return f"{key}: {words + '. ' if words else ''}{rule[0].upper() + rule[1:]}."


def _table_help(table: str) -> str:
    """`[table]: ` and the comment on the table in the grid example (bench/config/grid.py);
    `datasets.<name>`: the example's [datasets.<some name>]."""
    text = GRID_EXAMPLE.get((table, ""), "") or next(
        (v for (t, k), v in GRID_EXAMPLE.items() if not k and table.endswith(".<name>")
         and t.startswith(table[:-len("<name>")])), "")
    return f"[{table}]: {text}." if text else f"[{table}]."


def space_schema() -> dict:
    """A [tune] search: a list of numbers, { log = [low, high] } or { range = [low, high] }
    (bench/config/tune.py _space)."""
    def bounds(low: dict) -> dict:
        return {"type": "array", "minItems": 2, "maxItems": 2,
                "prefixItems": [{"type": "number", **low}], "items": {"type": "number"}}

    return {"description": "a list of values, { log = [low, high] } or { range = [low, high] }",
            "anyOf": [
                {"type": "array", "minItems": 1, "items": {"type": "number"}},
                {"type": "object", "minProperties": 1, "maxProperties": 1,
                 "properties": {"log": {"description": "log-uniform between low and high "
                                                      "(low > 0)",
                                        **bounds({"exclusiveMinimum": 0})},
                                "range": {"description": "uniform between low and high",
                                          **bounds({})}},
                 "additionalProperties": False}]}


def _searched(description: str, rule: Constraint | None = None) -> dict:
    """A searched field or parameter: a space, and with `rule` each value and bound
    satisfies it (what tune._strategy_space checks)."""
    s: dict = {"description": description, "$ref": "#/$defs/space"}
    if rule is not None:
        each = {k: v for k, v in constraint_schema(rule).items() if k != "description"}
        s["anyOf"] = [{"type": "array", "items": each},
                      {"type": "object", "additionalProperties": {"items": each}}]
    return s


# the [tune] settings' defaults (the Tune dataclass); trials has none of its own (tune._budget)
TUNE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(tunemod.Tune)
                 if f.default is not MISSING and f.name != "trials"}


def tune_schema() -> dict:
    props: dict[str, dict] = {}
    for key, rule in tunemod.SETTINGS.items():
        text = TUNE_EXAMPLE.get(("tune", key), "")
        if rule is None:  # final_seeds: checked in tune._seeds
            seeds = ", ".join(map(str, TUNE_DEFAULTS.get(key, ())))
            props[key] = {"description": f"{key}: {text} (default [{seeds}]). A non-empty "
                                         f"list of distinct seeds >= 0.",
                          "type": "array", "minItems": 1, "uniqueItems": True,
                          "items": {"type": "integer", "minimum": 0}}
            continue
        # the rule's help; the example's comment where it has none, or to state a default
        words = rule.help or text
        if rule.help and "default" in text:
            words += " " + (text[len(rule.help):].strip() if text.startswith(rule.help)
                            else f"({text})")
        default = TUNE_DEFAULTS.get(key)
        if default is not None and "default" not in words:
            words += f" (default {toml_value(default)})"
        props[key] = constraint_schema(
            rule, description=f"{key}: {words}. {rule_text(rule)[0].upper()}"
                              f"{rule_text(rule)[1:]}.")
    for key in tunemod.SEARCHABLE:
        text = TUNE_EXAMPLE.get(("tune", key), "")
        props[key] = _searched(f"{key}, searched: {text or 'a search space'}. The field "
                               f"{field_description(key)}")
    for s in registry.STRATEGIES.values():
        params = {}
        for p in s.params:
            params[p.name] = _searched(f"{s.name}'s {p.name}, searched: {p.help or p.kind}",
                                       p.constraint)
        props[s.name] = {"description": f"[tune.{s.name}]: {s.name}'s own parameters, "
                                        f"searched for its studies alone",
                         "type": "object", "properties": params,
                         "additionalProperties": False}
    searched = [*tunemod.SEARCHABLE, *registry.STRATEGIES]
    return {"description": _tune_help(), "type": "object", "properties": props,
            "additionalProperties": False,
            "anyOf": [{"required": [k]} for k in searched]}


def _tune_help() -> str:
    first = (tunemod.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return f"[tune]: {first}"


def card_schema() -> dict:
    """A dataset card (bench/data/cards.py check_card)."""
    def ex(key: str, table: str = "") -> str:
        return CARD_EXAMPLE.get((table, key), "")

    source_help = ", ".join(sorted(sourcemod.SOURCES))
    props = {
        "name": {"description": "the card's name: the [datasets.<name>] key sets it"},
        "description": {"description": "what the dataset is (shown in the reference)"},
        "source": {"description": f"source: how the data is read: {source_help}",
                   "type": "string", "enum": sorted(sourcemod.SOURCES)},
        "root": {"description": f"root: {ex('root')}"},
        "url": {"description": "where the data comes from (recorded, not read)"},
        "classes": {"description": f"classes: {ex('classes')}; at least two distinct "
                                   f"class names (ints allowed)",
                    "type": "array", "minItems": 2, "uniqueItems": True,
                    "items": {"type": ["integer", "string"]}},
        "label_permutation": constraint_schema(
            cardmod.LABEL_PERMUTATION,
            description=_card_key_help("label_permutation", "", cardmod.LABEL_PERMUTATION)),
        "corruption": {
            "description": f"[corruption]: {ex('', 'corruption')}; it must change something "
                           f"(noise_std > 0 or invert = true), and needs a source whose "
                           f"images load into memory: {', '.join(sourcemod.ARRAY_SOURCES)}",
            "type": "object",
            "properties": {k: constraint_schema(r, description=_card_key_help(
                k, "corruption", r)) for k, r in cardmod.CORRUPTION.items()},
            "additionalProperties": False,
            "anyOf": [{"required": ["noise_std"], "properties": {"noise_std": {
                          "exclusiveMinimum": 0}}},
                      {"required": ["invert"], "properties": {"invert": {"const": True}}}]},
        "split": {
            "description": "[split]: the split rule of the split manifest. val_fraction and "
                           "test_fraction default to 0.2 and must sum below 1; train_size + "
                           "val_size (together) instead of val_fraction: the VTAB-1k "
                           "protocol",
            "type": "object",
            "properties": {
                **{k: constraint_schema(r, description=_card_key_help(k, "split", r))
                   for k, r in cardmod.SPLIT_NUMBERS.items()},
                "test": {"description": 'test: "official": the dataset\'s own test split; '
                                        '"val": none held out, the validation part is '
                                        'tested (check_card); without it test_fraction '
                                        'holds out a test part',
                         "enum": list(SPLIT_TESTS)}},
            "additionalProperties": False,
            "dependentRequired": {"train_size": ["val_size"], "val_size": ["train_size"]},
            "dependentSchemas": {"train_size": {"not": {"required": ["val_fraction"]}}},
            "if": {"required": ["test"], "properties": {"test": {"const": "val"}}},
            "then": {"not": {"required": ["test_fraction"]}}},
    }
    missing = cardmod.CARD_KEYS - set(props)
    assert not missing, f"card keys without a schema: {missing}"
    return {"description": "a dataset card: the same keys as datasets/<name>.toml",
            "type": "object", "properties": {k: props[k] for k in sorted(props)},
            "required": ["source"], "additionalProperties": False,
            "allOf": [
                {"if": {"required": ["source"], "properties": {"source": {
                    "const": "image_folder"}}},
                 "then": {"required": ["root"], "properties": {"root": {"type": "string"}}}},
                {"if": {"required": ["corruption"]},
                 "then": {"properties": {"source": {"enum": list(sourcemod.ARRAY_SOURCES)}}}}]}


def _card_key_help(key: str, table: str, rule: Constraint | None = None) -> str:
    text = "; ".join(x for x in (CARD_EXAMPLE.get((table, key), ""),
                                 rule.help if rule else "") if x)
    words = rule_text(rule) if rule else ""
    words = words[:1].upper() + words[1:] + "." if words else ""
    return f"{key}: " + " ".join(x for x in (text + "." if text else "", words) if x)


# ---- the whole schema ----------------------------------------------------------------------
def grid_schema() -> dict:
    """The JSON Schema of a grid file."""
    names = grid_fields()
    smoke = ", ".join(f"{k} = {v}" for k, v in gridmod.SMOKE_DEFAULTS.items())
    top = {
        "name": {**_plain_name(), "description": "name: " + GRID_EXAMPLE.get(
            ("", "name"), "the grid's name") + " (default: the file's name)"},
        "description": {"description": "description: what the grid compares (the MLflow "
                                       "experiment's note, the report's heading)"},
        "axes": axes_schema(names),
        "defaults": scalars_schema(names, "defaults"),
        "smoke": scalars_schema(names, "smoke", f" Without it: {smoke}. Its values are "
                                f"checked when --smoke applies them: python -m bench run "
                                f"<grid> --smoke --dry-run."),
        "run": run_schema(),
        "datasets": {"description": _table_help("datasets.<name>") + " One table per "
                                    "name; a shipped card of that name is replaced.",
                     "type": "object", "propertyNames": _plain_name(),
                     "additionalProperties": {"$ref": "#/$defs/card"}},
        "tune": tune_schema(),
    }
    missing = gridmod.TOP_KEYS - set(top)
    assert not missing, f"top-level keys without a schema: {missing}"
    rules = []
    for r in gridmod.REQUIRED_AXES:  # grid.py _require_axes
        rules.append({"description": f"every grid names a {r}: an axis or a default",
                      "anyOf": [{"required": ["defaults"],
                                 "properties": {"defaults": {"required": [r]}}},
                                {"required": ["axes"],
                                 "properties": {"axes": _names_field(r)}}]})
    for f in tunemod.SEARCHABLE:  # tune.parse: searched or swept, not both
        rules.append({"description": f"a field searched by [tune] is not also an axis: {f}",
                      "if": {"required": ["tune"], "properties": {"tune": {"required": [f]}}},
                      "then": {"properties": {"axes": {"propertyNames": {"not": {
                          "pattern": _in_key(f)}}}}}})
    rules += defaults_rules(names)
    rules.append({"description": "with [tune] the seeds are tune.final_seeds: no seed axis",
                  "if": {"required": ["tune"]},
                  "then": {"properties": {"axes": {"propertyNames": {"not": {
                      "pattern": _in_key("seed")}}}}}})
    return {
        "$schema": DRAFT,
        "title": "tlbench grid file",
        "description": (
            "A tlbench grid file (TOML): the cells `python -m bench run <grid>` runs. "
            "Generated by `python -m bench.config.schema` from the declarations grid loading "
            "uses (bench/config/grid.py, spec.py, tune.py, bench/data/cards.py, "
            "strategies/registry.py, strategies/backbones.py); do not edit. A superset of "
            "what grid loading accepts: it never refuses a grid that loads, but rules that "
            "need the registries per cell or the data at load time (a depth within the "
            "backbone's blocks, a backbone's frameworks, a dataset name that names a card, "
            "an image folder, a budget the strategy can split, val_fraction + test_fraction "
            "below 1) are checked by `python -m bench run <grid> --dry-run`."),
        "type": "object",
        "properties": {k: top[k] for k in sorted(top)},
        "additionalProperties": False,
        "allOf": rules,
        "$defs": {**{f: field_schema(f) for f in names}, "card": card_schema(),
                  "space": space_schema()},
    }


def render() -> str:
    return json.dumps(grid_schema(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.config.schema",
                                 description=f"write bench/grids/{SCHEMA_FILE}, the JSON "
                                             f"Schema of grid files")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when the committed file differs from what the code makes")
    args = ap.parse_args(argv)
    text, path = render(), schema_path()
    if args.check:
        if path.exists() and path.read_text(encoding="utf-8") == text:
            print(f"{path}: up to date")
            return 0
        print(f"{path}: differs from the declarations; run python -m bench.config.schema",
              file=sys.stderr)
        return 1
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
