"""Command line: `python -m bench run|report|list ...` (nox sessions call these).

    python -m bench run [GRID] [--smoke] [--dry-run] [--rerun] [--device DEV]
                        [--parallel auto|N] [--gpus 0,2,5] [--ray auto|ADDRESS]
                        [--cpus-per-cell N]
    python -m bench report [GRID-or-EXPERIMENT-or-RUN_ID] [--parent RUN_ID] [--all]
                           [--out reports/] [--curves BACKBONE] [--no-log]
    python -m bench plan [GRID] [--gpu-counts 1,8,32] [--from EXPERIMENT] [--overhead-s S]
                         [--images-per-s N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.config import grid as gridmod
from bench.paths import REPORT_MARKER, name_problem, report_out_problem
from bench.run.preflight import bound_http_retries


def _run(args) -> int:
    """Load the grid, make the plan from the command's options, list it (--dry-run) or run
    it, then print the comparison and what did not finish."""
    from bench.run import plan as planmod

    try:
        g = gridmod.load(args.grid, smoke=args.smoke, check_data=not args.dry_run)
    except gridmod.GridError as e:
        print(e, file=sys.stderr)
        return 2
    for warning in g.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.dry_run and _store_problem():
        return 2
    try:
        plan = planmod.make_plan(g, _run_options(args))
    except planmod.PlanError as e:
        print(f"grid {g.path}: {e}; nothing was run", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_dry_run(plan)
        return 0
    return _run_plan(plan, args)


def _run_options(args):
    from bench.run import plan as planmod

    return planmod.Options(
        device=args.device, rerun=args.rerun, cpus_per_cell=args.cpus_per_cell,
        parallel=args.parallel, ray=planmod.ray_address(args.ray),
        gpus=planmod.parse_gpus(args.gpus) if args.gpus else None)


def _print_dry_run(plan) -> None:
    g = plan.grid
    what = (f"{len(g.specs)} studies ({g.tune.describe()}: up to "
            f"{len(g.specs) * (g.tune.trials + len(g.tune.final_seeds))} cells)"
            if g.tune else f"{len(g.specs)} cells")
    print(f"grid {g.name!r} ({g.path}): {what} on {g.device_kind} (device {g.device}), "
          f"{plan.where()}" + (f" ({g.duplicates} duplicates removed)" if g.duplicates else ""))
    for s in g.specs:  # a tuned grid's: each study, named by its cell at the trial seed
        print(f"  {s.hash}  {g.label(s)}")
    for problem in g.data_problems:
        print(f"not runnable here yet: {problem}")
    plan.executor.close()


def _run_plan(plan, args) -> int:
    from bench import tracking
    from bench.report import frame, tables
    from bench.run import runner
    from bench.run.preflight import StoreDown

    g = plan.grid
    runner.install_sigterm_handler()
    try:
        result = runner.run_plan(plan, Path(g.path).read_text())
    except StoreDown as e:
        print(f"{e}: the grid stopped; cells that finished before are safely recorded there. "
              f"Start the server again and rerun `python -m bench run {args.grid}` to resume "
              f"(finished cells are skipped)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: the running cells are marked KILLED; finished cells are kept "
              "and will be skipped when the grid is started again", file=sys.stderr)
        return 130
    expected = (tracking.expected_cells(result.parent_run_id) if result.parent_run_id
                else None) or tracking.cell_list(g)
    df = frame.runs_frame(result.experiment_id, expected=expected)
    print()
    print(tables.compact(df))
    print(f"full report (tables, figures, report.md): python -m bench report {args.grid}"
          + (" --smoke" if args.smoke else ""), file=sys.stderr)
    if not result.failed:
        return 0
    print(f"{len(result.failed)} cell(s) did not finish:", file=sys.stderr)
    for o in result.failed:
        print(f"  {o.status}: {g.label(o.spec)}\n      {o.error.splitlines()[0][:300]}",
              file=sys.stderr)
    print(f"details: the runs' error.txt artifacts (nox -s ui), experiment "
          f"{g.name!r} at {tracking.tracking_uri()}", file=sys.stderr)
    return 1


def _out_problem(folder: Path, whole: bool = True) -> bool:
    """Where a report would go is refused, in one line, unless missing, empty or a previous
    report's folder (checked before any work); whole=False: --out itself, which holds one
    folder per experiment, need only be a folder (or missing)."""
    problem = report_out_problem(folder) if whole else \
        report_out_problem(folder / "x") if not folder.is_dir() else None
    if problem:
        print(f"{problem}; no report written", file=sys.stderr)
    return problem is not None


def _store_problem() -> bool:
    """The tracking store checked once before anything starts: True (and the one line that
    says why printed) when it cannot be reached or written."""
    from bench import tracking
    from bench.run.preflight import store_problem

    problem = store_problem(tracking.tracking_uri())
    if problem:
        print(f"{problem}; nothing was run", file=sys.stderr)
    return problem is not None


def _report(args) -> int:
    from bench import tracking
    from bench.report import build as report
    from bench.report import figures, frame, tables

    if _out_problem(Path(args.out), whole=False) or _store_problem():
        return 2
    parent, grid, exp_id, sel = args.parent, None, None, args.selection
    if sel and not parent and _looks_like_run_id(sel):
        parent, sel = sel, None
    if parent:
        run = tracking.get_run(parent)
        if run is None:
            print(f"no MLflow run {parent!r} at {tracking.tracking_uri()}", file=sys.stderr)
            return 2
        exp_id = tracking.run_row(run)["experiment_id"]
    if exp_id is None:
        sel = sel or "default"
        try:  # a grid file or shipped grid name -> its experiment; else an experiment name
            grid = gridmod.load(sel, smoke=args.smoke)
            name = grid.name
        except gridmod.GridError:
            name = sel
        exp_id, restored = tracking.open_experiment(name, create=False)
        if exp_id is None:
            print(f"no MLflow experiment named {name!r} at {tracking.tracking_uri()}",
                  file=sys.stderr)
            return 2
        if restored:
            print(f"experiment {name!r} (id {exp_id}) had been deleted; restored it to "
                  f"report on it", file=sys.stderr)
        if not args.all:
            latest = tracking.latest_parent(exp_id)
            parent = latest.info.run_id if latest else None
    expected = tracking.expected_cells(parent) if parent else None
    if expected is None and parent:  # a parent from before cells.json: its grid file
        grid = _parent_grid(parent) or grid
    if expected is None and grid is not None:
        # the cells as the invocation ran them: stamped with the device kind it recorded
        # (none before the kind was recorded: the CPU, the field's default)
        ref = tracking.get_run(parent) if parent else tracking.latest_parent(exp_id)
        kind = (ref.data.tags.get(tracking.TAG + "device_kind") if ref else None) or "cpu"
        expected = tracking.cell_list(grid.with_device_kind(kind))
    experiment = tracking.client().get_experiment(exp_id).name
    if name_problem(experiment) is None and _out_problem(Path(args.out) / experiment):
        return 2
    data = frame.load(exp_id, parent, expected)
    data.command = "python -m bench report " + " ".join(args.argv)
    print(tables.compact(data.frame))
    fails = tables.failures(data.frame)
    if fails:
        print("Not finished:\n" + "\n".join(f"- {f}" for f in fails))
    problem = name_problem(data.experiment)
    if problem:  # a store's experiment named like a path: the report stays under --out
        print(f"experiment {data.experiment!r}: its name {problem}; no report written",
              file=sys.stderr)
        return 2
    out = Path(args.out) / data.experiment
    figs = figures.all_figures(data, out / "figures", args.curves)
    written = report.write(data, out, figs, log=not args.no_log)
    (out / REPORT_MARKER).write_text("written by python -m bench report; it may rewrite "
                                     "this folder\n")
    print(f"report: {out / 'report.md'} ({len(written.files)} files in {out}/: runs.csv, "
          f"runs.parquet, tables/*.md|tex|csv, figures/*.png|svg)", file=sys.stderr)
    if written.logged_to:
        print(f"logged to parent run {written.logged_to} (experiment {data.experiment!r}) "
              f"as report.md: nox -s ui", file=sys.stderr)
    elif not args.no_log:
        print("not logged to MLflow: the selection has no grid invocation (parent run)",
              file=sys.stderr)
    return 0


def _parent_grid(parent: str):
    """The grid a parent run logged as grid.toml, or None if it is gone or no longer valid
    (an image folder moved, a backbone renamed)."""
    import tomllib

    from bench import tracking

    text = tracking.grid_text(parent)
    run = tracking.get_run(parent)
    if text is None or run is None:
        return None
    row = tracking.run_row(run)
    try:
        return gridmod.from_dict(tomllib.loads(text), row.get("t_grid_path") or "<grid>",
                                 smoke=row.get("t_smoke") == "True")
    except (gridmod.GridError, tomllib.TOMLDecodeError):
        return None


def _plan(args) -> int:
    from bench.run import sizing

    try:
        g = gridmod.load(args.grid)
        gpus = sizing.parse_gpu_counts(args.gpu_counts)
        # measured costs: --from, else the grid's own experiment where the store has it
        p = sizing.estimate(g, args.from_ or g.name, args.overhead_s, args.images_per_s,
                           must_exist=bool(args.from_))
    except (gridmod.GridError, sizing.SizingError) as e:
        print(e, file=sys.stderr)
        return 2
    print(sizing.render(p, gpus))
    return 0


def _ui(args) -> int:
    """The MLflow UI with one worker (a local store needs no more; each is ~285 MB), after a
    direct link per experiment to its runs (the model-training view)."""
    from bench import tracking

    base = f"http://{args.host}:{args.port}"
    links = tracking.ui_links(base)
    for name, url in links:
        print(f"  {name}: {url}")
    if not links:
        print(f"  no experiments yet in {tracking.tracking_uri()}: `nox -s bench` makes one")
    print(f"MLflow UI on {base} (store {tracking.tracking_uri()}); Ctrl-C stops it",
          flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port",
           str(args.port), "--workers", str(args.workers), "--backend-store-uri",
           tracking.tracking_uri(), *args.extra]
    if args.print_only:
        print(" ".join(cmd))
        return 0
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _looks_like_run_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a grid (default: the offline default grid)")
    r.add_argument("grid", nargs="?", default="default",
                   help="a grid file, or the name of a shipped grid (default, gpu)")
    r.add_argument("--smoke", action="store_true", help="shrink the grid: few samples, 1 epoch")
    r.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    r.add_argument("--rerun", action="store_true", help="run finished cells again too")
    r.add_argument("--device", help="override the grid's run.device (auto, cpu, cuda:0, ...)")
    r.add_argument("--parallel", metavar="auto|N",
                   help="cells at once on this machine (overrides run.parallel): auto = one "
                        "per visible GPU, one at a time on a CPU; N = N GPUs, or the CPU "
                        "cores split into N sets")
    r.add_argument("--gpus", metavar="0,2,5",
                   help="run on these GPUs only (indices among the visible ones, as cuda:<i> "
                        "counts them), one cell per GPU")
    r.add_argument("--ray", metavar="auto|ADDRESS",
                   help="run the cells as Ray tasks on a Ray cluster (default: RAY_ADDRESS "
                        "if set; `off` to ignore it); needs the ray extra: pip install "
                        "'tlbench[ray]'")
    r.add_argument("--cpus-per-cell", type=float, default=1, metavar="N",
                   help="with --ray: CPUs each cell asks Ray for (a CPU grid's cells use "
                        "that many threads; default 1)")
    r.set_defaults(fn=_run)
    p = sub.add_parser("report", help="tables, figures and report.md from MLflow")
    p.add_argument("selection", nargs="?",
                   help="a grid file/name, an MLflow experiment name, or a parent run id "
                        "(default: the default grid; its latest invocation)")
    p.add_argument("--parent", help="the grid invocation (parent run id) to report on "
                                    "(default: the experiment's latest)")
    p.add_argument("--all", action="store_true",
                   help="every cell run of the experiment (newest finished per cell) "
                        "instead of one invocation")
    p.add_argument("--smoke", action="store_true", help="the smoke variant of the grid")
    p.add_argument("--out", default="reports",
                   help="folder; the report goes to OUT/<experiment>/ (default reports)")
    p.add_argument("--curves", metavar="BACKBONE",
                   help="backbone for the learning-curve figure (default: the one with the "
                        "most finished cells)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log report.md to the parent run")
    p.set_defaults(fn=_report)
    from bench.run import sizing  # framework-free, no MLflow at import: its defaults

    q = sub.add_parser("plan", help="expected wall time of a grid on 1, 8, 32 GPUs")
    q.add_argument("grid", nargs="?", default="gpu",
                   help="a grid file, or the name of a shipped grid (default: gpu)")
    q.add_argument("--gpu-counts", default=",".join(map(str, sizing.DEFAULT_GPUS)),
                   metavar="1,8,32",
                   help="GPU counts to plan for (default 1,8,32)")
    q.add_argument("--from", dest="from_", metavar="EXPERIMENT",
                   help="MLflow experiment whose finished cells' cell_seconds replace the "
                        "model (default: the grid's own experiment, if the store has it)")
    q.add_argument("--overhead-s", type=float, default=sizing.SCHEDULING_OVERHEAD_S,
                   metavar="S", help="scheduling overhead per cell in seconds (default "
                                     "%(default)s, from benchmarks/test_4_scale.py)")
    q.add_argument("--images-per-s", type=float, default=sizing.TRAIN_IMAGES_PER_S_RESNET50,
                   metavar="N", help="the model's anchor: ResNet-50 full training images/s "
                                     "on one GPU (default %(default)g)")
    q.set_defaults(fn=_plan)
    u = sub.add_parser("ui", help="the MLflow UI (one worker), after a link per experiment")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=int(os.environ.get("MLFLOW_PORT", "5000")))
    u.add_argument("--workers", type=int, default=1)
    u.add_argument("--print-only", action="store_true",
                   help="print the links and the mlflow command, start nothing")
    u.add_argument("extra", nargs=argparse.REMAINDER, help="more `mlflow ui` options")
    u.set_defaults(fn=_ui)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    bound_http_retries()  # a server that dies mid-command costs seconds, not minutes
    args.argv = argv[1:]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
