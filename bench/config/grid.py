"""A grid file (TOML) -> a validated list of RunSpec. Nothing runs and nothing is written
until every field of every cell is valid; a bad grid gets one message listing each bad field
with its value and what is allowed.

Schema (see bench/grids/default.toml for a commented example):

    name = "default"                     # MLflow experiment name (smoke runs: "<name>-smoke")
    description = "..."

    [axes]                               # the cartesian product of these lists
    framework = ["torch"]
    backbone  = ["resnet18", "mobilenet_v3_small"]
    weights   = ["imagenet", "none"]     # imagenet | none | pretrained:<dataset> | a file
    strategy  = ["feature_extraction", "partial[depth=1,2,3]", "full", "two_stage[depth=2]"]
    dataset   = ["digits"]               # a card in datasets/ or a [datasets.<name>] table
    seed      = [0, 1, 2]
    "backbone, image_size" = [["resnet50", 224], ["resnet18", 32]]   # coupled axes

    [defaults]                           # scalars shared by every cell (any RunSpec field)
    epochs = 4
    batch_size = 64
    lr = 1e-3
    precise_bn = 0                       # BatchNorm stats recomputed from N train images
    feature_cache = true                 # speed options, recorded as params like any field:
    decoded_cache = true                 # image files decoded once, kept in a memmap
    channels_last = false                # PyTorch NHWC memory format
    compile = false                      # torch.compile / Keras jit_compile
    workers = -1                         # loader workers / tf.data parallel calls; -1 auto

    [smoke]                              # applied by --smoke: shrinks any grid
    subset = 120
    epochs = 1

    [run]                                # how the grid runs; not part of any cell's identity
    device = "auto"                      # auto (GPU if present) | cpu | cuda | cuda:1 | mps
    timeout_minutes = 30                 # a cell running longer is killed, recorded FAILED
    deterministic = "auto"               # deterministic algorithms: true | false | "auto"
                                         # (auto: on for the CPU, off on a GPU: they cost speed)
    parallel = "auto"                    # cells at once: auto (one per visible GPU; one at a
                                         # time on a CPU) | N (N GPUs, or the cores split in N)

    [datasets.mypets]                    # a grid-local dataset card
    source = "image_folder"
    root = "~/data/pets"
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from bench import devices
from bench.config import pretrained
from bench.config import spec as specmod
from bench.config import tune as tunemod
from bench.config.selector import SelectorError, parse_selector
from bench.config.spec import RunSpec
from bench.config.tune import Tune
from bench.data import (
    CardError,
    DatasetError,
    card_digest,
    check_card,
    scan_image_folder,
    shipped_cards,
)
from bench.data.sources import class_count
from bench.paths import grids_dir
from strategies import FRAMEWORKS, registry
from strategies import backbones as bb
from strategies.constraint import Constraint

TOP_KEYS = {"name", "description", "axes", "defaults", "smoke", "run", "datasets", "tune"}
RUN_KEYS = {"device", "timeout_minutes", "deterministic", "parallel"}
SMOKE_DEFAULTS = {"subset": 120, "epochs": 1}
SPEC_FIELDS = {f.name: f for f in fields(RunSpec) if f.name != "strategy_params"}
# RunSpec fields the harness sets itself, never a grid file: why, for the refusal
SET_BY_RUNNER = {"device_kind": "it is set from run.device / --device (the kind of device "
                                "the cell runs on: cpu, mps or cuda:<model>)",
                 "card_digests": "it is computed from the dataset cards the cell reads "
                                 "(edit the card: [datasets.<name>] or datasets/<name>.toml)",
                 "role": "it is set by a [tune] table (trial and final cells)",
                 "train_on": "it is set by tune.refit (the final cells of a [tune] table)"}
REQUIRED_AXES = ("framework", "backbone", "dataset")
RUN_NAME_LAST = ("framework", "backbone", "dataset", "subset", "seed")  # end of a run name


class GridError(ValueError):
    """A grid file that cannot run. `problems` lists one line per bad field."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"grid {path} is invalid, nothing was run:\n  - "
                         + "\n  - ".join(problems))


@dataclass
class Grid:
    name: str
    path: str
    specs: list[RunSpec]
    cards: dict[str, dict]
    device: str = "auto"
    varying: tuple[str, ...] = ()  # fields that take more than one value (for labels)
    description: str = ""
    smoke: bool = False
    duplicates: int = 0
    timeout_minutes: float | None = None  # per cell; None: no limit
    deterministic: str | bool = "auto"
    parallel: str | int = "auto"  # cells at once on one machine (bench/run/pool.py)
    device_kind: str | None = None  # the kind every spec is stamped with (bench/run/plan.py)
    # what keeps the grid's data from being read here (an image folder not there yet), when
    # loaded with check_data=False (--dry-run lists the cells and says so; a run refuses)
    data_problems: tuple[str, ...] = ()
    # the [tune] table (bench/config/tune.py): then `specs` are the studies' cells at the
    # trial seed, and bench/run/tune.py makes their trial and final cells
    tune: Tune | None = None

    def label(self, s: RunSpec) -> str:
        return s.label(self.varying)

    def run_name(self, s: RunSpec) -> str:
        """The cell's MLflow run name: what tells it apart from the grid's other cells first
        (strategy, then the fields the grid varies), the framework, and the seed where seeds
        vary: `partial[depth=3,bn=frozen] · imagenet · lr=0.001 · torch`. The UI's run list
        cuts names at ~20 characters, so what is the same in every cell (the backbone and
        dataset of a one-backbone, one-dataset grid) is left to the label (tag
        tlbench.label, the run's description)."""
        parts = [s.strategy_label]
        for f in self.varying:
            if f in RUN_NAME_LAST or f in ("strategy", "strategy_params"):
                continue
            v = getattr(s, f)
            parts.append(str(v) if f == "weights" else f"{f}={specmod.format_value(v)}")
        parts += [getattr(s, f) for f in ("backbone", "dataset") if f in self.varying]
        if "subset" in self.varying:
            parts.append(f"n={s.subset}")
        parts.append(s.framework)
        if "seed" in self.varying or s.role == "final":
            parts.append(f"seed{s.seed}")
        if s.role:
            parts.append(s.role)
        return " · ".join(parts)

    def config(self, s: RunSpec) -> str:
        """What a cell is across frameworks and seeds (tag tlbench.config, MLflow's "Group
        by"): its name and varied fields without framework and seed, plus a short hash of
        every other field, so cells that differ in anything else never share a group."""
        shown = [f for f in self.varying if f not in ("framework", "seed")]
        rest = {k: v for k, v in s.canonical().items() if k not in ("framework", "seed")}
        digest = hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode())
        name = s.label(tuple(shown)).replace(f"{s.framework}/", "", 1)
        name = name.replace(f"/seed{s.seed}", "", 1)
        return f"{name} #{digest.hexdigest()[:6]}"

    def with_device_kind(self, kind: str, device: str | None = None) -> Grid:
        """Every cell stamped with `kind` as it is (a kind recorded by an earlier run)."""
        specs = [dataclasses.replace(s, device_kind=kind) for s in self.specs]
        return dataclasses.replace(self, device=device or self.device, device_kind=kind,
                                   specs=specs)


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given, or the name of a shipped grid (`default`, `gpu`)."""
    p = Path(path)
    if p.is_file():  # a folder of that name (./strategies, the package) is not a grid
        return p
    shipped = grids_dir() / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.exists() and len(p.parts) == 1:
        return shipped
    available = ", ".join(sorted(q.stem for q in grids_dir().glob("*.toml")))
    raise GridError(str(path), [f"file {str(path)!r} not found (shipped grids: {available})"])


def load(path: str | os.PathLike, smoke: bool = False, check_data: bool = True) -> Grid:
    """The grid file at `path` (or a shipped grid's name), every cell validated. With
    `check_data=False` an image folder that is missing or unreadable is not a GridError but
    one of the grid's `data_problems` (what --dry-run shows)."""
    p = resolve_path(path)
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise GridError(str(p), [f"not valid TOML: {e}"]) from None
    return from_dict(doc, str(p), smoke=smoke, check_data=check_data)


def from_dict(doc: dict, where: str = "<grid>", smoke: bool = False,
              check_data: bool = True) -> Grid:
    problems: list[str] = []
    bad = sorted(set(doc) - TOP_KEYS)
    if bad:
        problems.append(f"unknown top-level key(s) {bad}; allowed: {sorted(TOP_KEYS)}")
    name = doc.get("name") or Path(where).stem
    if not isinstance(name, str):
        problems.append(f"name = {name!r}: must be a string")
        name = Path(where).stem

    sections = {}
    for key in ("datasets", "axes", "defaults", "smoke", "run"):
        sections[key] = doc.get(key, {})
        if not isinstance(sections[key], dict):
            problems.append(f"{key} = {sections[key]!r}: must be a table ([{key}])")
            sections[key] = {}
    cards = _cards(sections["datasets"], problems)
    if not check_data:
        for card in cards.values():
            card.setdefault("_problem", None)  # folders are looked at below, not per cell
    axes = _axes(sections["axes"], problems)
    defaults = _scalars(sections["defaults"], "defaults", problems)
    smoke_over = {**SMOKE_DEFAULTS, **_scalars(sections["smoke"], "smoke", problems)}
    run = _run_table(sections["run"], problems)
    missing = [r for r in REQUIRED_AXES if not any(r in k for k in axes) and r not in defaults]
    for req in missing:
        problems.append(f"axes.{req} is missing: every grid names at least one {req}")
    if missing:
        raise GridError(where, problems)

    # expansion checks every field of every cell, so one report lists every problem
    specs, varying = _expand(_searched_filled(axes, doc.get("tune")), defaults,
                             smoke_over if smoke else {}, cards, problems)
    for s in specs:  # the weights tested must not be chosen on the part that is tested
        if s.select == "best_val" and cards.get(s.dataset, {}).get("split", {}).get(
                "test") == "val":
            problems.append(f"select = 'best_val' with dataset = {s.dataset!r}, whose split "
                            f"has test = \"val\": the weights would be chosen on the part "
                            f"they are tested on; allowed: select = \"last\", or a card "
                            f"that holds out a test split")
        problems += _head_problems(s, cards)
    tune = None
    if "tune" in doc and not problems:
        tune, specs, varying = _tune(doc["tune"], axes, specs, varying, cards, problems)
    if problems:
        raise GridError(where, _unique(problems))
    unique, seen = [], set()
    for s in specs:
        if s.hash not in seen:
            seen.add(s.hash)
            unique.append(s)
    used = {s.dataset for s in unique} | {pretrained.pretrain_spec(s).dataset for s in unique
                                          if pretrained.is_pretrained(s.weights)}
    data_problems = []
    if not check_data:
        for k in sorted(used):
            if cards[k]["source"] == "image_folder":
                cards[k].pop("_problem", None)
                if _folder_problem(cards[k]):
                    data_problems.append(f"dataset {k!r}: {cards[k]['_problem']}")
    return Grid(name=f"{name}-smoke" if smoke else name, path=where, specs=unique,
                cards={k: {f: x for f, x in v.items() if f != "_problem"}
                       for k, v in cards.items() if k in used}, varying=varying,
                description=str(doc.get("description", "")), smoke=smoke,
                duplicates=len(specs) - len(unique), data_problems=tuple(data_problems),
                tune=tune, **run)


# ---- pieces ------------------------------------------------------------------------------
# the [run] table's rules (device: bench/devices.py check)
RUN_RULES = {
    "timeout_minutes": Constraint(float, minimum=0, exclusive=True, unit="minutes",
                                  help="leave it out for no limit"),
    "deterministic": Constraint(bool, also=("auto",)),
    "parallel": Constraint(int, minimum=1, also=("auto",),
                           help="auto: one cell per visible GPU, one at a time on a CPU; "
                                "N: N cells at once"),
}


def _run_table(run: dict, problems: list[str]) -> dict:
    """[run]: how the grid runs (not part of any cell's identity) -> Grid keyword arguments."""
    bad = sorted(set(run) - RUN_KEYS)
    if bad:
        problems.append(f"run: unknown key(s) {bad}; allowed: {sorted(RUN_KEYS)}")
    out = {"device": run.get("device", "auto"), "timeout_minutes": run.get("timeout_minutes"),
           "deterministic": run.get("deterministic", "auto"),
           "parallel": run.get("parallel", "auto")}
    msg = devices.check(out["device"])
    if msg:
        problems.append(f"run.device = {out['device']!r}: {msg}")
    for key, rule in RUN_RULES.items():
        msg = None if out[key] is None else rule.check(out[key])  # None: no timeout
        if msg:
            problems.append(f"run.{key} = {out[key]!r}: {msg}")
    return out


def parallel_problem(value: object) -> str | None:
    """None for `auto` or a count of cells >= 1; else what is allowed."""
    return RUN_RULES["parallel"].check(value)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _cards(local: dict, problems: list[str]) -> dict[str, dict]:
    cards = {}
    for n, c in {**shipped_cards(), **local}.items():
        where = f"datasets.{n}" if n in local else f"datasets/{n}.toml"
        if not isinstance(c, dict):
            problems.append(f"{where} = {c!r}: a dataset card is a table ([{where}])")
            continue
        try:
            cards[n] = check_card({**c, "name": n}, where)
        except CardError as e:
            problems.append(str(e))
    return cards


def _axes(axes: dict, problems: list[str]) -> dict[tuple[str, ...], list]:
    """{'backbone': [...], 'backbone, image_size': [[..], ..]} -> {(fields...): [tuples]}"""
    out: dict[tuple[str, ...], list] = {}
    for key, values in axes.items():
        names = tuple(k.strip() for k in key.split(","))
        unknown = [n for n in names if _field_problem(n, "axes", problems)]
        if unknown:
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"axes.{key} = {values!r}: must be a non-empty list")
            continue
        rows = []
        for i, v in enumerate(values):
            if len(names) == 1:
                rows.append((v,))
            elif isinstance(v, list) and len(v) == len(names):
                rows.append(tuple(v))
            else:
                problems.append(f"axes.{key}[{i}] = {v!r}: coupled axes take lists of "
                                f"{len(names)} values")
        out[names] = rows
    return out


def _field_problem(name: str, where: str, problems: list[str]) -> bool:
    """True (and the problem noted) when `name` is not a field a grid file may set."""
    if name in SET_BY_RUNNER:
        problems.append(f"{where}.{name}: not a grid field: {SET_BY_RUNNER[name]}")
        return True
    if name not in SPEC_FIELDS:
        allowed = ", ".join(f for f in SPEC_FIELDS if f not in SET_BY_RUNNER)
        problems.append(f"{where}.{name}: unknown field; allowed: {allowed}")
        return True
    return False


def _scalars(table: dict, where: str, problems: list[str]) -> dict:
    out = {}
    for k, v in table.items():
        if _field_problem(k, where, problems):
            continue
        if isinstance(v, list):
            problems.append(f"{where}.{k} = {v!r}: a list belongs under [axes]")
        else:
            out[k] = v
    return out


def _expand(axes, defaults, overrides, cards, problems) -> tuple[list[RunSpec], tuple]:
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
    combos = _strategy_params(str(selector), info, loc("strategy"), problems)
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


def _tune(table: object, axes: dict, specs: list[RunSpec], varying: tuple, cards: dict,
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


def _searched_filled(axes: dict, table: object) -> dict:
    """The axes with each strategy parameter a [tune.<strategy>] table searches and its
    selector leaves out set to the first searched value, so the grid expands (`partial`
    needs a depth); the trials then set it. A malformed table is left to _tune."""
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


def _head_problems(s: RunSpec, cards: dict) -> list[str]:
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


def _folder_problem(card: dict) -> str | None:
    """Scan (and verify every image of) an image folder once per grid load, not per cell."""
    if "_problem" not in card:
        try:
            scan_image_folder(card["root"], verify=True)
            card["_problem"] = None
        except DatasetError as e:
            card["_problem"] = str(e)
    return card["_problem"]


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
            return _folder_problem(cards[v])
    if f == "weights" and pretrained.is_pretrained(v):
        try:
            source, _ = pretrained.parse(v)
        except pretrained.WeightsError as e:
            return str(e)
        if source not in cards:
            return (f"unknown source dataset {source!r}; allowed: {', '.join(sorted(cards))} "
                    f"(or add a [datasets.{source}] table)")
        if cards[source]["source"] == "image_folder":
            return _folder_problem(cards[source])
    elif f == "weights" and v not in ("imagenet", "none") and not Path(v).expanduser().is_file():
        return ("allowed: 'imagenet', 'none', 'pretrained:<dataset>[epochs=..,seed=..,"
                "subset=..,lr=..]' or the path of an existing weights file")
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
