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
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench import devices, tracking_names
from bench.config import pretrained
from bench.config.cells import (
    SPEC_FIELDS,
    check_tune,
    expand,
    folder_problem,
    head_problems,
    searched_filled,
    small_classes,
)
from bench.config.spec import RunSpec, check_value
from bench.config.tune import Tune
from bench.data import (
    CardError,
    check_card,
    shipped_cards,
)
from bench.paths import grids_dir, name_problem
from strategies.constraint import Constraint

TOP_KEYS = {"name", "description", "axes", "defaults", "smoke", "run", "datasets", "tune"}
RUN_KEYS = {"device", "timeout_minutes", "deterministic", "parallel"}
SMOKE_DEFAULTS = {"subset": 120, "epochs": 1}
# RunSpec fields the harness sets itself, never a grid file: why, for the refusal
SET_BY_RUNNER = {"device_kind": "it is set from run.device / --device (the kind of device "
                                "the cell runs on: cpu, mps or cuda:<model>)",
                 "card_digests": "it is computed from the dataset cards the cell reads "
                                 "(edit the card: [datasets.<name>] or datasets/<name>.toml)",
                 "role": "it is set by a [tune] table (trial and final cells)",
                 "train_on": "it is set by tune.refit (the final cells of a [tune] table)"}
REQUIRED_AXES = ("framework", "backbone", "dataset")


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
    # what the run goes on with but the user should know first (an image folder's class
    # too small for its split: bench/config/cells.py small_classes)
    warnings: tuple[str, ...] = ()
    # the [tune] table (bench/config/tune.py): then `specs` are the studies' cells at the
    # trial seed, and bench/run/tune.py makes their trial and final cells
    tune: Tune | None = None

    def label(self, s: RunSpec) -> str:
        return s.label(self.varying)

    def run_name(self, s: RunSpec) -> str:
        """The cell's MLflow run name, told apart from the grid's other cells within the
        ~25 characters the UI's run list shows: `partial[d3,bn=frz] pt`, `full scratch
        pbn320 tf` (bench/tracking_names.py). The label (tag tlbench.label, the run's
        description) keeps every field."""
        return tracking_names.grid_run_name(self, s)

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
    """A grid file's table -> a Grid, in steps: its sections, its cells (every field of
    every cell checked, so one GridError lists every problem), its [tune] table, then the
    cells deduplicated and the data they read."""
    problems: list[str] = []
    name, sections = _sections(doc, where, problems)
    cards = _cards(sections["datasets"], problems)
    if not check_data:
        for card in cards.values():
            card.setdefault("_problem", None)  # folders are looked at below, not per cell
    axes = _axes(sections["axes"], problems)
    defaults = _scalars(sections["defaults"], "defaults", problems)
    smoke_over = {**SMOKE_DEFAULTS, **_scalars(sections["smoke"], "smoke", problems)}
    run = _run_table(sections["run"], problems)
    _unexpanded_values(axes, defaults, {} if smoke else sections["smoke"], problems)
    _require_axes(axes, defaults, where, problems)
    specs, varying = expand(searched_filled(axes, doc.get("tune")), defaults,
                            smoke_over if smoke else {}, cards, problems)
    problems += _cell_problems(specs, cards)
    tune = None
    if "tune" in doc and not problems:
        tune, specs, varying = check_tune(doc["tune"], axes, specs, varying, cards, problems)
    if problems:
        raise GridError(where, _unique(problems))
    first: dict[str, RunSpec] = {}
    for s in specs:  # equal cells run once, in the order of their first appearance
        first.setdefault(s.hash, s)
    unique = list(first.values())
    used = {s.dataset for s in unique} | {pretrained.pretrain_spec(s).dataset for s in unique
                                          if pretrained.is_pretrained(s.weights)}
    return Grid(name=f"{name}-smoke" if smoke else name, path=where, specs=unique,
                cards={k: {f: x for f, x in v.items() if f != "_problem"}
                       for k, v in cards.items() if k in used}, varying=varying,
                description=str(doc.get("description", "")), smoke=smoke,
                duplicates=len(specs) - len(unique),
                data_problems=() if check_data else _data_problems(cards, used),
                warnings=tuple(w for k in sorted(used) for w in small_classes(cards[k])),
                tune=tune, **run)


def _sections(doc: dict, where: str, problems: list[str]) -> tuple[str, dict[str, dict]]:
    """The grid's name and its tables ([datasets], [axes], [defaults], [smoke], [run])."""
    bad = sorted(set(doc) - TOP_KEYS)
    if bad:
        problems.append(f"unknown top-level key(s) {bad}; allowed: {sorted(TOP_KEYS)}")
    name = doc.get("name")
    msg = None if name is None else name_problem(name)
    if msg:
        problems.append(f"name = {name!r}: {msg}")
    if name is None or msg:  # the file's name, made plain
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(where).stem).strip("._-") or "grid"
    sections = {}
    for key in ("datasets", "axes", "defaults", "smoke", "run"):
        sections[key] = doc.get(key, {})
        if not isinstance(sections[key], dict):
            problems.append(f"{key} = {sections[key]!r}: must be a table ([{key}])")
            sections[key] = {}
    return name, sections


def _unexpanded_values(axes: dict, defaults: dict, smoke: dict, problems: list[str]) -> None:
    """Values no cell is built from, checked against their field's rule all the same: a
    default an axis overrides, and [smoke]'s without --smoke (a grid that loads must not
    fail later under --smoke, nor hide a typo behind an axis)."""
    swept = {f for names in axes for f in names}  # keys: tuples of (coupled) field names
    for table, values in (("defaults", {k: v for k, v in defaults.items() if k in swept}),
                          ("smoke", smoke)):
        for k, v in values.items():
            if k in SPEC_FIELDS and k not in SET_BY_RUNNER and not isinstance(v, list):
                msg = check_value(k, v)
                if msg:
                    problems.append(f"{table}.{k}: {k} = {v!r}: {msg}")


def _require_axes(axes: dict, defaults: dict, where: str, problems: list[str]) -> None:
    """Every grid names a framework, a backbone and a dataset; without them nothing expands,
    so the problems so far are raised here."""
    missing = [r for r in REQUIRED_AXES if not any(r in k for k in axes) and r not in defaults]
    for req in missing:
        problems.append(f"axes.{req} is missing: every grid names at least one {req}")
    if missing:
        raise GridError(where, problems)


def _cell_problems(specs: list[RunSpec], cards: dict) -> list[str]:
    """What no single field shows: weights chosen on the part they are tested on, a head
    that cannot start from the source's."""
    problems = []
    for s in specs:
        if s.select == "best_val" and cards.get(s.dataset, {}).get("split", {}).get(
                "test") == "val":
            problems.append(f"select = 'best_val' with dataset = {s.dataset!r}, whose split "
                            f"has test = \"val\": the weights would be chosen on the part "
                            f"they are tested on; allowed: select = \"last\", or a card "
                            f"that holds out a test split")
        problems += head_problems(s, cards)
    return problems


def _data_problems(cards: dict, used: set[str]) -> tuple[str, ...]:
    """With check_data=False: the image folders of the grid that cannot be read yet."""
    out = []
    for k in sorted(used):
        if cards[k]["source"] == "image_folder":
            cards[k].pop("_problem", None)
            if folder_problem(cards[k]):
                out.append(f"dataset {k!r}: {cards[k]['_problem']}")
    return tuple(out)


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
        msg = name_problem(n)
        if msg:
            problems.append(f"{where}: dataset name {n!r} {msg}")
            continue
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


