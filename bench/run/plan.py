"""A grid and the command's options -> a runnable plan, resolved once: the kind of device
every cell is stamped with, where the cells run (local slots, or a Ray cluster), and (once
the grid's experiment is open) which cells run and which are skipped as finished.

    --parallel auto   one cell per visible GPU (--gpus picks some); one at a time on a CPU
    --parallel N      N cells at once: N GPUs, or the CPU cores split into N equal sets
                      (each cell pinned to its cores, its framework's threads = its cores)
    --gpus 0,2,5      run on these GPUs only (indices among the visible ones), one cell each
    --ray ADDRESS     the cells as Ray tasks on a cluster; the cluster places each cell

The stamp is what makes a cell's identity name its device, so it comes before anything
looks up finished cells: a grid finished on the CPU and run again on a GPU runs again.
Nothing here starts a cell or writes to the tracking store.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from bench import devices
from bench.config.grid import Grid, parallel_problem
from bench.config.spec import RunSpec
from bench.run.task import Slot


class PlanError(ValueError):
    """Options this machine (or cluster) cannot honour; nothing has run."""


@dataclass(frozen=True)
class Options:
    """What the command line says about where cells run (None: the grid's own [run])."""

    device: str | None = None
    parallel: str | int | None = None
    gpus: list[int] | None = None  # indices among the visible GPUs, as cuda:<i> counts them
    ray: str | None = None  # a Ray address (`auto`: the cluster this machine belongs to)
    cpus_per_cell: float = 1
    rerun: bool = False


@dataclass
class Plan:
    """A grid stamped with its device kind and the executor its cells run in; `todo` and
    `skipped` are filled by look_up_finished once the experiment is open."""

    grid: Grid
    executor: object  # bench.run.pool.LocalPool or bench.run.cluster.RayExecutor
    rerun: bool = False
    todo: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)

    def where(self) -> str:
        """Where the cells run, in a phrase (--dry-run prints it)."""
        described = self.executor.describe()
        if described["executor"] != "local":
            return described["executor"]
        return f"{self.executor.width} at once ({described['slots']})"

    def look_up_finished(self, done: set[str]) -> Plan:
        """The cells to run and the cells skipped: a cell is skipped when `done` (the
        experiment's FINISHED hashes, which name the device kind; empty with rerun) holds
        its hash."""
        self.todo = [s for s in self.grid.specs if s.hash not in done]
        self.skipped = [s for s in self.grid.specs if s.hash in done]
        return self


def make_plan(grid: Grid, options: Options = Options(), launcher=None,
              executor=None) -> Plan:
    """The plan for `grid` under `options`: device kind resolved and stamped, slots or
    cluster chosen. `launcher` starts local cell processes (default: fork servers, else
    fresh interpreters); `executor` replaces the executor the options would choose (the
    grid is then stamped for its run.device here). Raises PlanError naming the option."""
    try:
        return _make_plan(grid, options, launcher, executor)
    except devices.DeviceError as e:
        raise PlanError(str(e)) from None


def _make_plan(grid: Grid, options: Options, launcher, executor) -> Plan:
    _check_options(options)
    if options.parallel is not None:
        grid = dataclasses.replace(grid, parallel=parse_parallel(options.parallel))
    if options.device:
        grid = dataclasses.replace(grid, device=options.device)
    if executor is not None:
        stamped = grid if grid.device_kind else on_device(grid)
        return Plan(stamped, executor, options.rerun)
    if options.ray:
        from bench.run import cluster

        try:
            ray_executor = cluster.RayExecutor.connect(options.ray, grid,
                                                       cpus_per_cell=options.cpus_per_cell)
        except cluster.ClusterError as e:
            raise PlanError(str(e)) from None
        return Plan(ray_executor.grid, ray_executor, options.rerun)
    from bench.run.forkserver import Launcher
    from bench.run.pool import LocalPool

    # --gpus stamps the model of the GPUs it picks; a grid stamped already keeps its kind
    restamp = options.device or (grid.device_kind is None and options.gpus is None)
    stamped = choose_gpus(on_device(grid) if restamp else grid, options.gpus)
    slots = slots_for(stamped, stamped.parallel, options.gpus)
    return Plan(stamped, LocalPool(slots, launcher or Launcher()), options.rerun)


def _check_options(options: Options) -> None:
    problem = devices.check(options.device) if options.device else None
    if problem:
        raise PlanError(f"--device {options.device!r}: {problem}")
    if options.cpus_per_cell <= 0:
        raise PlanError(f"--cpus-per-cell {options.cpus_per_cell:g}: allowed: > 0")
    if options.cpus_per_cell != 1 and not options.ray:
        raise PlanError("--cpus-per-cell is for --ray (on one machine --parallel N splits "
                        "the cores)")
    if options.ray and (options.gpus is not None or options.parallel is not None):
        raise PlanError("--gpus and --parallel place cells on this machine; on Ray the "
                        "cluster places each cell on a GPU (or cores) of its own: leave them "
                        "out")


def ray_address(flag: str | None) -> str | None:
    """--ray's address: the flag, else RAY_ADDRESS; `off` ignores both."""
    if flag == "off":
        return None
    return flag or os.environ.get("RAY_ADDRESS") or None


def on_device(grid: Grid, device: str | None = None) -> Grid:
    """`grid` run on `device` (default: its run.device), every cell stamped with the kind
    of device that resolves to here (bench/devices.py: cpu, mps, cuda:<model>). Raises
    devices.DeviceError when the device is not here."""
    device = device or grid.device
    return grid.with_device_kind(devices.resolve_kind(device), device)


# ---- local slots -----------------------------------------------------------------------------
def cpu_list() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def parse_parallel(value: object) -> str | int:
    """`auto` or a count >= 1 (from the command line or [run] parallel)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    problem = parallel_problem(value)
    if problem:
        raise PlanError(f"parallel = {value!r}: {problem}")
    return value


def parse_gpus(text: str) -> list[int]:
    """`0,2,5` -> [0, 2, 5]: indices among the visible GPUs, as cuda:<i> counts them."""
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise PlanError(f"--gpus {text!r}: allowed: distinct GPU indices separated by commas, "
                        f"as cuda:<i> counts the visible GPUs (e.g. 0,2,5)")
    return out


def choose_gpus(grid: Grid, gpus: list[int] | None) -> Grid:
    """The grid stamped for the GPUs `--gpus` picks (their model must be one), else as it
    is. Raises PlanError when they are not here or mix models."""
    if gpus is None:
        return grid
    if grid.device not in ("auto", "cuda") and not grid.device.startswith("cuda:"):
        raise PlanError(f"--gpus needs a GPU device; this grid runs on {grid.device!r} "
                        f"(run.device or --device: auto, cuda)")
    visible = devices.visible_gpus()
    listed = ",".join(map(str, gpus))
    bad = [i for i in gpus if i >= len(visible)]
    if bad:
        raise PlanError(f"--gpus {listed}: {len(visible)} NVIDIA GPU(s) are visible here "
                        f"({', '.join(visible) or 'none'}); allowed: 0..{len(visible) - 1}"
                        if visible else f"--gpus {listed}: no NVIDIA GPU is visible here")
    models = sorted({visible[i] for i in gpus})
    if len(models) > 1:
        raise PlanError(f"--gpus {listed} mixes GPU models ({', '.join(models)}): a grid's "
                        f"cells are measured on one kind of device; pick GPUs of one model, "
                        f"or run the grid once per model")
    return grid.with_device_kind(f"cuda:{models[0]}", "cuda")


def slots_for(grid: Grid, parallel: object = "auto", gpus: list[int] | None = None) -> list[Slot]:
    """The slots a grid stamped with its device kind runs in on this machine."""
    parallel = parse_parallel(parallel)
    kind = grid.device_kind or "cpu"
    if kind.startswith("cuda:"):
        return _gpu_slots(grid, parallel, gpus)
    if gpus is not None:
        raise PlanError(f"--gpus needs a GPU device; this grid runs on {kind}")
    cpus = cpu_list()
    n = 1 if parallel == "auto" else parallel
    if kind != "cpu" and n > 1:
        raise PlanError(f"--parallel {n}: the {kind} device runs one cell at a time")
    if n > len(cpus):
        raise PlanError(f"--parallel {n}: this machine has {len(cpus)} CPU core(s) for the "
                        f"cells; allowed: 1..{len(cpus)}")
    if n == 1:
        return [Slot("local")]
    return [Slot(f"cpus {_span(c)}", None, c) for c in _split(cpus, n)]


def _gpu_slots(grid: Grid, parallel: str | int, gpus: list[int] | None) -> list[Slot]:
    entries = devices.visible_entries()
    chosen = gpus is not None
    if not chosen:
        if grid.device.startswith("cuda:"):  # one named GPU
            gpus = [int(grid.device.split(":")[1])]
        else:
            gpus = list(range(len(entries))) if parallel == "auto" else \
                list(range(min(parallel, len(entries))))
    n = len(gpus) if parallel == "auto" else parallel
    if n > len(gpus):
        raise PlanError(f"--parallel {n}: {len(gpus)} GPU(s) to run on (one cell per GPU); "
                        f"allowed: 1..{len(gpus)}, or auto")
    if n == 1 and not chosen:
        return [Slot("local")]  # one cell at a time on run.device's GPU: as always
    share = _split(cpu_list(), n) if n > 1 else [()] * n
    return [Slot(f"gpu {entries[g]}", entries[g], share[i]) for i, g in enumerate(gpus[:n])]


def _split(cpus: list[int], n: int) -> list[tuple[int, ...]]:
    k = len(cpus) // n
    return [tuple(cpus[i * k:(i + 1) * k]) for i in range(n)] if k else [()] * n


def _span(cpus: tuple[int, ...]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
