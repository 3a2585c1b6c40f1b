"""Real processes for the fault tests (framework-free): a launcher whose cells are small
Python scripts that speak the cell protocol, and an `nvidia-smi` of our own on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.run.forkserver import cell_env

# a cell that finishes at once with a test accuracy
GOOD_CELL = """
import json, sys
from bench.cell.process import emit
job = json.load(open(sys.argv[1]))
emit("startup", seconds=0.0, pid=0)
emit("metrics", step=None, metrics={"test_acc": 0.5})
"""


class ScriptLauncher:
    """Starts each cell as `python -c CODE job.json`: a real child process, in a process
    group of its own like the harness's cells, that reads the runner's job file and reports
    through bench.cell.process's marked lines, without training anything."""

    def __init__(self, code: str = GOOD_CELL):
        self.code = textwrap.dedent(code)
        self.refused: dict[str, str] = {}
        self.started: list[subprocess.Popen] = []

    def start(self, framework: str, job: Path):
        proc = subprocess.Popen([sys.executable, "-c", self.code, str(job)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=cell_env(),
                                process_group=0)
        self.started.append(proc)
        return proc, "spawn"

    def close(self) -> None:
        for proc in self.started:  # nothing outlives a test, whatever the runner did
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def install_nvidia_smi(bin_dir: Path, gpus: list[str] | None, exit_code: int = 0,
                       hang: bool = False) -> Path:
    """An executable `nvidia-smi` in `bin_dir` that answers the query bench.devices makes:
    one `index, name` line per GPU; or fails with `exit_code`; or hangs."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{i}, {name}\\n" for i, name in enumerate(gpus or []))
    body = "exec sleep 60\n" if hang else (
        f"printf '{lines}'\n" if exit_code == 0 else
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA "
        f"driver.'\nexit {exit_code}\n")
    path = bin_dir / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_in(directory: Path) -> list[str]:
    """Command lines of the live processes (but this one) whose working directory is
    `directory`."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and int(proc.name) != os.getpid()
                    and (proc / "cwd").resolve() == directory.resolve()
                    and alive(int(proc.name))):
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours
            continue
    return out
