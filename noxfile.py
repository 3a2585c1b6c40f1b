"""Sessions: tests, bench, report, ui, perf, docs, samples, lint.

    nox -s bench                      # the offline default grid (bench/grids/default.toml)
    nox -s bench -- path/to/grid.toml # another grid; add --smoke, --dry-run, --device cuda:1
    nox -s report                     # report of the default grid's latest invocation
    nox -s report -- gpu --parent RUN # another grid / invocation; --all, --out DIR
    nox -s ui                         # the MLflow UI on http://127.0.0.1:5000
    nox -s tests                      # the test suite
    nox -s perf                       # benchmarks/: the harness's overheads as ratios
    nox -s perf -- --device cuda      # ... plus the GPU benchmark (ResNet-50, 224 px, bf16)
    nox -s perf -- -k scale           # scheduling overhead (local, Ray), --parallel 2
    nox -s docs                       # the documentation site into site/ (--strict)
    nox -s samples -- default         # regenerate reports/sample/default from the code
    nox -s lint

Every session shares one environment, .nox/tlbench, installed from pyproject.toml and
re-installed only when pyproject.toml changes: PyTorch is several GB, and installing it once
per session would make every command slow.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
ENV = ROOT / ".nox" / "tlbench"
EXTRAS = "torch,keras,ray,test,lint,docs"
nox.options.sessions = ["tests"]


def _python(session: nox.Session) -> str:
    """The shared environment's python, created or updated as pyproject.toml requires."""
    py = ENV / "bin" / "python"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    stamp = ENV / ".installed"
    if not py.exists():
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
    if not stamp.exists() or stamp.read_text() != want:
        session.run(str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip",
                    external=True)
        session.run(str(py), "-m", "pip", "install", "--quiet", "-e", f".[{EXTRAS}]",
                    external=True)
        stamp.write_text(want)
    return str(py)


def _run(session: nox.Session, *args: str) -> None:
    env = {"PYTHONPATH": str(ROOT)}
    session.run(_python(session), *args, external=True, env=env)


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite (pytest; pass pytest options after --)."""
    _run(session, "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Run a grid (default: bench/grids/default.toml) and print the comparison table."""
    args = session.posargs
    if not args or args[0].startswith("-"):
        args = ["default", *args]
    _run(session, "-m", "bench", "run", *args)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """Tables, figures and report.md from MLflow into reports/<experiment>/ (default: the
    default grid's latest invocation); report.md is also logged to the grid's parent run."""
    _run(session, "-m", "bench", "report", *session.posargs)


@nox.session(python=False)
def ui(session: nox.Session) -> None:
    """The MLflow UI on 127.0.0.1:5000 with one worker (MLFLOW_TRACKING_URI or the default
    local store), after a direct link to each experiment's runs; `-- --port 5001`."""
    _run(session, "-m", "bench", "ui", *session.posargs)


@nox.session(python=False)
def perf(session: nox.Session) -> None:
    """The benchmarks (pytest-benchmark): train step vs a hand-written loop (PyTorch) and
    plain model.fit (Keras), cached vs recomputed feature extraction, per-cell start-up,
    scheduling overhead and --parallel 2 on the default grid (`-- -k scale`, ~12 min),
    input pipelines per core from JPEG files and from the decoded cache (`-- -k input`);
    ratios printed at the end. `-- --device cuda` adds the GPU benchmark (and
    benchmarks/gpu_check.sh runs it with the gpu_check grid)."""
    _run(session, "-m", "pytest", "benchmarks", "--benchmark-only", "-p", "no:cacheprovider",
         "--benchmark-columns=median,min,max,rounds", *session.posargs)


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs Material) into site/, built --strict: a broken link or
    a page missing from the navigation fails; `-- serve` serves it on 127.0.0.1:8000."""
    if session.posargs[:1] == ["serve"]:
        _run(session, "-m", "mkdocs", "serve", *session.posargs[1:])
    else:
        _run(session, "-m", "mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=False)
def samples(session: nox.Session) -> None:
    """Regenerate a committed report under reports/sample/ from the code: runs its grid in a
    fresh store and reports it there (`-- default`, `-- tuned`; `-- --list` names them)."""
    _run(session, "-m", "bench.report.sample", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff on the code and tests."""
    _run(session, "-m", "ruff", "check", "bench", "strategies", "tests", "benchmarks",
         "noxfile.py")
