"""Who made a run and from what code: host, process, heartbeat, the project's git commit
(tags tlbench.host, pid, heartbeat, git_commit and mlflow.source.*, bench/tracking.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

from bench.paths import ROOT


def _git(*args: str) -> str:
    """A git command's output in the project's checkout; "" where there is none."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    commit = _git("rev-parse", "--short", "HEAD")
    return commit + ("-dirty" if commit and _git("status", "--porcelain", "-uno") else "")


def _full_commit() -> str:
    return _git("rev-parse", "HEAD")


def host_tags(prefix: str) -> dict[str, str]:
    """Who owns the run (bench/run/claims.py): host, process, last heartbeat; and the code (also
    in MLflow's own source tags, which fill the UI's "Source" and "Git commit")."""
    tags = {prefix + "host": socket.gethostname(), prefix + "pid": str(os.getpid()),
            prefix + "heartbeat": f"{time.time():.0f}", prefix + "git_commit": git_commit(),
            "mlflow.source.type": "LOCAL"}
    commit = _full_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
