"""The device kind (bench/devices.py) and how it enters every cell's identity: resolved from
the run device with a real `nvidia-smi` executable of our own first on PATH, stamped on the
grid's cells before finished ones are looked up, so a grid finished on the CPU runs again on
a GPU. The runner's cells here are small scripts (fault_helpers.ScriptLauncher): no training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_helpers import ScriptLauncher, install_nvidia_smi

from bench import devices, tracking
from bench.config import grid as gridmod
from bench.paths import ROOT
from bench.run import runner
from bench.run.plan import Plan, on_device

H200, A100 = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"

GRID = """
name = "{name}"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
strategy = ["feature_extraction", "full"]
dataset = ["digits"]
[defaults]
subset = 40
image_size = 16
epochs = 1
[run]
device = "{device}"
"""


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    """Two NVIDIA GPUs, as nvidia-smi lists them; PATH keeps only that nvidia-smi."""
    bin_dir = tmp_path / "bin"
    install_nvidia_smi(bin_dir, [H200, A100])
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


@pytest.fixture
def no_gpu(tmp_path, monkeypatch):
    """A machine whose nvidia-smi finds no driver (as on a CPU box with the tools)."""
    bin_dir = tmp_path / "bin-nogpu"
    install_nvidia_smi(bin_dir, None, exit_code=9)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


def test_kinds_with_gpus(gpus, monkeypatch):
    assert devices.resolve_kind("cpu") == "cpu"
    assert devices.resolve_kind("auto") == f"cuda:{H200}"
    assert devices.resolve_kind("cuda") == f"cuda:{H200}"
    assert devices.resolve_kind("cuda:0") == f"cuda:{H200}"
    assert devices.resolve_kind("cuda:1") == f"cuda:{A100}"
    with pytest.raises(devices.DeviceError, match=r"only 2 NVIDIA GPU\(s\).*cuda:0..cuda:1"):
        devices.resolve_kind("cuda:2")
    # CUDA_VISIBLE_DEVICES renumbers: cuda:0 is the first GPU it lists
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert devices.resolve_kind("cuda") == f"cuda:{A100}"
    assert devices.resolve_kind("cuda:1") == f"cuda:{H200}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert devices.resolve_kind("auto") == f"cuda:{A100}"
    with pytest.raises(devices.DeviceError, match="cuda:0..cuda:0"):
        devices.resolve_kind("cuda:1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU
    assert devices.resolve_kind("auto") == "cpu"
    with pytest.raises(devices.DeviceError, match="CUDA_VISIBLE_DEVICES='' hides them"):
        devices.resolve_kind("cuda")


def test_kinds_without_a_gpu(no_gpu, tmp_path, monkeypatch):
    assert devices.resolve_kind("auto") == "cpu"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(devices.DeviceError) as e:
            devices.resolve_kind(asked)
        assert f"device {asked!r} requested but no NVIDIA GPU is visible" in str(e.value)
        assert "--device cpu" in str(e.value)
    with pytest.raises(devices.DeviceError, match="not a Mac with Apple silicon"):
        devices.resolve_kind("mps")
    with pytest.raises(devices.DeviceError, match="allowed: auto, cpu, cuda, cuda:<i>, mps"):
        devices.resolve_kind("tpu")
    # no nvidia-smi at all
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert devices.resolve_kind("auto") == "cpu"
    with pytest.raises(devices.DeviceError):
        devices.resolve_kind("cuda")


def test_a_hanging_nvidia_smi_is_given_up_on(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    install_nvidia_smi(bin_dir, None, hang=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setattr(devices, "NVIDIA_SMI_TIMEOUT_S", 1.0)
    started = time.monotonic()
    assert devices.resolve_kind("auto") == "cpu"
    assert time.monotonic() - started < 20


def test_devices_imports_no_framework():
    code = ("import sys, bench.devices\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr


def write_grid(dir: Path, name: str, device: str = "auto") -> Path:
    path = dir / f"{name}.toml"
    path.write_text(GRID.format(name=name, device=device))
    return path


def test_on_device_stamps_every_cell(gpus, tmp_path):
    g = gridmod.load(write_grid(tmp_path, "g"))
    assert g.device_kind is None and {s.device_kind for s in g.specs} == {"cpu"}
    on_cpu, on_gpu = on_device(g, "cpu"), on_device(g)  # run.device = auto: the H200
    assert on_cpu.device_kind == "cpu" and on_gpu.device_kind == f"cuda:{H200}"
    assert {s.device_kind for s in on_gpu.specs} == {f"cuda:{H200}"}
    assert on_gpu.device == "auto" and on_device(g, "cuda:1").device == "cuda:1"
    # the CPU kind is the field's default: hashes from before the field are kept
    assert [s.hash for s in on_cpu.specs] == [s.hash for s in g.specs]
    cpu_hashes, gpu_hashes = {s.hash for s in on_cpu.specs}, {s.hash for s in on_gpu.specs}
    assert len(gpu_hashes) == 2 and not cpu_hashes & gpu_hashes
    assert not gpu_hashes & {s.hash for s in on_device(g, "cuda:1").specs}  # H200 vs A100
    assert [s.name for s in on_gpu.specs] == [s.name for s in g.specs]


def test_a_grid_finished_on_the_cpu_runs_again_on_a_gpu(store, gpus):
    path = write_grid(store, "dk", device="cpu")
    text = path.read_text()
    first = runner.run_grid(gridmod.load(path), text, stream=sys.stdout,
                            launcher=ScriptLauncher())
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    again = runner.run_grid(on_device(gridmod.load(path), "cpu"), text, stream=sys.stdout,
                            launcher=ScriptLauncher())
    assert [o.status for o in again.outcomes] == ["SKIPPED", "SKIPPED"]

    on_gpu = on_device(gridmod.load(path), "cuda")
    planned = Plan(on_gpu, executor=None).look_up_finished(
        tracking.finished_hashes(first.experiment_id))
    assert len(planned.todo) == 2 and not planned.skipped
    second = runner.run_grid(on_gpu, text, stream=sys.stdout, launcher=ScriptLauncher())
    assert [o.status for o in second.outcomes] == ["FINISHED", "FINISHED"]
    runs = tracking.cell_runs(first.experiment_id, "FINISHED")
    assert sorted(r.data.params["device_kind"] for r in runs) == \
        ["cpu", "cpu", f"cuda:{H200}", f"cuda:{H200}"]
    assert {r.data.tags["tlbench.device_requested"] for r in runs} == {"cpu", "cuda"}


def cli(store: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "bench", "run", *args], cwd=store, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_cuda_without_a_gpu_stops_before_anything_runs(store, no_gpu):
    path = write_grid(store, "nogpu", device="cpu")
    done = cli(store, str(path), "--device", "cuda", path=os.environ["PATH"])
    assert done.returncode == 2, done.stderr
    assert "device 'cuda' requested but no NVIDIA GPU is visible" in done.stderr
    assert "nothing was run" in done.stderr
    assert not (store / "mlflow.db").exists() and not (store / "mlruns").exists()
    done = cli(store, str(write_grid(store, "nogpu2", device="cuda:0")),
               path=os.environ["PATH"])  # the grid's own run.device, likewise
    assert done.returncode == 2 and "'cuda:0' requested" in done.stderr


def test_cli_dry_run_shows_the_kind_and_its_hashes(store, gpus):
    path = str(write_grid(store, "dry", device="cpu"))
    on_cpu = cli(store, path, "--dry-run", path=os.environ["PATH"])
    on_gpu = cli(store, path, "--dry-run", "--device", "cuda", path=os.environ["PATH"])
    assert on_cpu.returncode == on_gpu.returncode == 0, on_gpu.stderr
    assert "2 cells on cpu (device cpu)" in on_cpu.stdout
    assert f"2 cells on cuda:{H200} (device cuda)" in on_gpu.stdout

    def hashes(out):
        return {line.split()[0] for line in out.splitlines()[1:]}

    assert len(hashes(on_gpu.stdout)) == 2 and not hashes(on_cpu.stdout) & hashes(on_gpu.stdout)
    assert not (store / "mlflow.db").exists()


def test_report_all_expects_the_cells_on_the_kind_they_ran_on(store, gpus, capsys):
    path = write_grid(store, "rep", device="cuda")
    result = runner.run_grid(gridmod.load(path), path.read_text(), stream=sys.stdout,
                             launcher=ScriptLauncher())
    assert [o.status for o in result.outcomes] == ["FINISHED", "FINISHED"]
    parent = tracking.get_run(result.parent_run_id)
    assert parent.data.tags["tlbench.device_kind"] == f"cuda:{H200}"
    from bench import cli

    assert cli.main(["report", str(path), "--all", "--no-log", "--out",
                     str(store / "reports")]) == 0
    out = capsys.readouterr().out
    assert "0.500 (n=1)" in out and "MISSING" not in out  # the GPU cells, found by hash
