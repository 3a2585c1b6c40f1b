"""Where things live. The repository root holds datasets/ (cards) and its .cache/."""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import re
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# a name that becomes a folder or an MLflow experiment (a grid's, a dataset card's): plain
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def name_problem(name: object) -> str | None:
    """None for a plain name; else why not: a grid or card name becomes an experiment and a
    folder (reports/<name>/), and must not lead outside it."""
    if isinstance(name, str) and PLAIN_NAME.fullmatch(name) and ".." not in name:
        return None
    return ("must be a plain name: letters, digits, '_', '.' and '-', starting with a letter "
            "or digit, no '/' or '..' (it names an MLflow experiment and a folder under "
            "reports/)")


# written into every report folder: what marks a folder `bench report` may rewrite
REPORT_MARKER = ".tlbench-report"


def report_out_problem(folder: Path) -> str | None:
    """None when `bench report` may write into `folder`: missing, empty, or holding a previous
    report (its marker, or a report.md from before the marker); else one line why not. An
    existing file or a folder of someone else's files is never written over."""
    if not folder.exists():
        parent = next((p for p in folder.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"--out: {parent} is a file, not a folder; give a folder"
        return None
    if not folder.is_dir():
        return f"--out: {folder} is a file, not a folder; give a folder"
    if not any(folder.iterdir()) or (folder / REPORT_MARKER).is_file() \
            or (folder / "report.md").is_file():
        return None
    return (f"--out: {folder} holds files no report wrote (no {REPORT_MARKER}); give an "
            f"empty or missing folder, or one that holds a previous report")


def inside(folder: Path, path: Path) -> Path:
    """`path`, once resolved, if it lies under `folder` (resolved); else ValueError: what a
    cache or the reporter writes never leads out of the folder it owns."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ValueError(f"{path} resolves to {resolved}, outside {folder}; refused")
    return resolved


def datasets_dir() -> Path:
    return Path(os.environ.get("TLBENCH_DATASETS", ROOT / "datasets"))


def cache_dir() -> Path:
    """Split manifests, folder checks, downloaded datasets. TLBENCH_CACHE overrides."""
    return Path(os.environ.get("TLBENCH_CACHE", datasets_dir() / ".cache"))


def grids_dir() -> Path:
    return ROOT / "bench" / "grids"


@contextmanager
def file_lock(path: Path):
    """An exclusive lock across the processes of this host (fcntl on `path`, made if
    missing), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class PackageFileError(ValueError):
    """A data file an installed distribution should ship is not there."""


def package_file(dist: str, suffix: str) -> Path:
    """A data file inside an installed distribution, found without importing it."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise PackageFileError(f"package {dist!r} is not installed; `pip install {dist}` "
                               f"(it ships {suffix})") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise PackageFileError(f"package {dist!r} does not contain {suffix}")
