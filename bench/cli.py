"""Command line: `python -m bench run|report|list ...` (nox sessions call these).

    python -m bench run [GRID] [--smoke] [--dry-run] [--rerun] [--device DEV]
    python -m bench report [GRID-or-EXPERIMENT] [--parent RUN_ID] [--out reports/]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import grid as gridmod


def _run(args) -> int:
    try:
        g = gridmod.load(args.grid, smoke=args.smoke)
    except gridmod.GridError as e:
        print(e, file=sys.stderr)
        return 2
    if args.device:
        if args.device.split(":")[0] not in gridmod.DEVICE_PREFIXES:
            print(f"--device {args.device!r}: allowed: auto, cpu, cuda, cuda:<i>, mps",
                  file=sys.stderr)
            return 2
        g.device = args.device
    if args.dry_run:
        print(f"grid {g.name!r} ({g.path}): {len(g.specs)} cells"
              + (f" ({g.duplicates} duplicates removed)" if g.duplicates else ""))
        for s in g.specs:
            print(f"  {s.hash}  {g.label(s)}")
        return 0
    from bench import report, runner, tracking

    runner.install_sigterm_handler()
    text = Path(g.path).read_text()
    try:
        result = runner.run_grid(g, text, rerun=args.rerun)
    except KeyboardInterrupt:
        print("\ninterrupted: the running cell is marked KILLED; finished cells are kept and "
              "will be skipped when the grid is started again", file=sys.stderr)
        return 130
    df = report.runs_frame(result.experiment_id)
    df = df[df["spec_hash"].isin({s.hash for s in g.specs})] if not df.empty else df
    print()
    print(report.markdown(report.comparison_tables(df)))
    if result.failed:
        print(f"{len(result.failed)} cell(s) did not finish:", file=sys.stderr)
        for o in result.failed:
            print(f"  {o.status}: {g.label(o.spec)}\n      {o.error.splitlines()[0][:300]}",
                  file=sys.stderr)
        print(f"details: the runs' error.txt artifacts (nox -s ui), experiment "
              f"{g.name!r} at {tracking.tracking_uri()}", file=sys.stderr)
        return 1
    return 0


def _report(args) -> int:
    from bench import report, tracking

    try:  # a grid file or shipped grid name -> its experiment; else an experiment name
        name = gridmod.load(args.selection, smoke=args.smoke).name
    except gridmod.GridError:
        name = args.selection
    exp_id = tracking.experiment_id(name, create=False)
    if exp_id is None:
        print(f"no MLflow experiment named {name!r} at {tracking.tracking_uri()}",
              file=sys.stderr)
        return 2
    df = report.runs_frame(exp_id, args.parent)
    md = report.markdown(report.comparison_tables(df))
    fails = report.failures(df)
    text = f"## {name}\n\n{md}" + ("\nNot finished:\n" + "\n".join(f"- {f}" for f in fails)
                                     if fails else "")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text + "\n")
        df.to_csv(out / f"{name}.csv", index=False)
        print(f"written: {out / (name + '.md')}, {out / (name + '.csv')}", file=sys.stderr)
    return 0


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
    r.set_defaults(fn=_run)
    p = sub.add_parser("report", help="comparison tables from MLflow")
    p.add_argument("selection", nargs="?", default="default",
                   help="a grid file/name or an MLflow experiment name")
    p.add_argument("--parent", help="only the cells of this parent (grid invocation) run id")
    p.add_argument("--smoke", action="store_true", help="the smoke variant of the grid")
    p.add_argument("--out", default="reports", help="folder for the .md and .csv")
    p.set_defaults(fn=_report)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
