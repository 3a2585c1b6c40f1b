"""Start cells from a process that has already imported their framework.

A cell runs in a process of its own (DESIGN.md: a crash or an out-of-memory ends one cell,
not the grid, and the device's memory is returned in full between cells). Starting that
process fresh costs an import of PyTorch (~2.5 s here) or TensorFlow and Keras (~5.5 s) per
cell, a tenth of a short cell. So the runner keeps one fork server per framework for the
length of a grid: a process that imports the backend once (`python -m bench.run.forkserver
torch`) and forks a child per cell. The child is a separate process with its own memory,
exit status and device context, exactly as before; what it shares with its siblings is the
imported code, copy on write. This is multiprocessing's forkserver idea (and PyTorch's
DataLoader workers', and Android's zygote), with one server per framework so that torch and
TensorFlow never share a process.

The server must not touch a device before it forks (CUDA cannot be used in a forked child
once the parent initialised it): each backend's `fork_problem()` says whether it did, and the
server refuses to serve if so. A refused or crashed server, a platform without fork, or
TLBENCH_FORKSERVER=0 make the runner start each cell fresh (`python -m bench.cell.process`), as it
always could.

Protocol, over a Unix SOCK_SEQPACKET socket (one JSON message per packet):
    server -> runner   {"ready": seconds} | {"error": text}   once, after the import
    runner -> server   {"job": path}  plus one file descriptor: the pipe the cell writes to
    server -> runner   {"pid": pid}                        the child started
    server -> runner   {"exit": pid, "code": code}         the child ended (Popen's codes)
The child's stdout and stderr are the pipe, so the runner reads a forked cell exactly like a
spawned one (bench/cell/process.py's marked lines, everything else is the cell's log). Forked or
spawned, a cell leads a process group of its own, which the runner signals to end it.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench.paths import ROOT

POLL_S = 0.05  # how often the server looks for ended children while some run


def enabled() -> bool:
    return (hasattr(os, "fork") and sys.platform.startswith("linux")
            and os.environ.get("TLBENCH_FORKSERVER", "1") != "0")


def cell_env() -> dict[str, str]:
    """The environment of a cell process, forked or spawned."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def spawn(job: Path) -> subprocess.Popen:
    """A fresh interpreter for one cell: `python -m bench.cell.process job.json`, leading a process
    group of its own (as a forked cell does) so that the runner can end it with whatever it
    started."""
    return subprocess.Popen([sys.executable, "-m", "bench.cell.process", str(job)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cell_env(), bufsize=1,
                            errors="replace", process_group=0)


class ServerFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- runner side


class ForkedCell:
    """A forked cell, with the part of subprocess.Popen's interface the runner uses."""

    def __init__(self, server: ForkServer, pid: int, stdout_fd: int):
        self.server = server
        self.pid = pid
        self.stdout = os.fdopen(stdout_fd, "r", buffering=1, errors="replace")
        self.returncode: int | None = None
        self._waiting = threading.Lock()  # the cell's thread and a Ctrl-C may both wait

    def wait(self, timeout: float | None = None) -> int:
        if not self._waiting.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(f"forked cell {self.pid}", timeout)
        try:
            if self.returncode is None:
                self.returncode = self.server.wait_exit(self.pid, timeout)
        finally:
            self._waiting.release()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The runner's handle on one framework's fork server."""

    def __init__(self, framework: str):
        self.framework = framework
        self.log = Path(tempfile.mkstemp(prefix=f"tlbench-forkserver-{framework}-",
                                         suffix=".log")[1])
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.exits: dict[int, int] = {}  # exit messages that arrived for other children
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.run.forkserver", framework, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=cell_env(), cwd=os.getcwd())
        theirs.close()
        self._answers: queue.Queue = queue.Queue()
        self._exited = threading.Condition()
        self._starting = threading.Lock()
        self._gone = False
        msg = self._recv()
        if msg is None or "ready" not in msg:
            why = (msg or {}).get("error") or f"it ended: {self._log_tail()}"
            self.close()
            raise ServerFailed(f"the {framework} fork server did not start: {why}")
        self.import_seconds = msg["ready"]
        threading.Thread(target=self._read, name=f"tlbench-forkserver-{framework}",
                         daemon=True).start()

    def _recv(self) -> dict | None:
        try:
            data = self.sock.recv(1 << 16)
        except OSError:  # the server is gone, or close() shut the socket
            return None
        return json.loads(data) if data else None

    def _read(self) -> None:
        """The one reader of the server's messages (a thread): answers to start() go to its
        queue, exit statuses to wait_exit(); several slots share a server."""
        while True:
            msg = self._recv()
            if msg is None:
                with self._exited:
                    self._gone = True
                    self._exited.notify_all()
                self._answers.put(None)
                return
            if "exit" in msg:
                with self._exited:
                    self.exits[msg["exit"]] = msg["code"]
                    self._exited.notify_all()
            else:
                self._answers.put(msg)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None and not self._gone

    def start(self, job: Path) -> ForkedCell:
        read_fd, write_fd = os.pipe()
        with self._starting:  # one request and its answer at a time
            try:
                socket.send_fds(self.sock, [json.dumps({"job": str(job)}).encode()],
                                [write_fd])
            except OSError as e:
                os.close(read_fd)
                raise ServerFailed(f"the {self.framework} fork server is gone ({e})") from e
            finally:
                os.close(write_fd)
            msg = self._answers.get()
        if msg is None or "pid" not in msg:
            os.close(read_fd)
            raise ServerFailed(f"the {self.framework} fork server did not start the cell: "
                               f"{(msg or {}).get('error') or self._log_tail()}")
        return ForkedCell(self, msg["pid"], read_fd)

    def wait_exit(self, pid: int, timeout: float | None) -> int:
        with self._exited:
            self._exited.wait_for(lambda: pid in self.exits or self._gone, timeout)
            if pid in self.exits:
                return self.exits.pop(pid)
            if self._gone:  # the server ended; its children got SIGTERM (PR_SET_PDEATHSIG)
                return -signal.SIGTERM
        raise subprocess.TimeoutExpired(f"forked cell {pid}", timeout)

    def close(self) -> None:
        try:
            try:  # wakes the reader thread; the server reads end-of-file, ends its
                self.sock.shutdown(socket.SHUT_RDWR)  # children and exits
            except OSError:
                pass
            self.sock.close()
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.unlink(missing_ok=True)


class Launcher:
    """Starts cell processes for the runner: forked from a per-framework server when it can,
    fresh otherwise. `how` is what the last start did ("fork" or "spawn") and `note` why a
    server is not used, for the run's tags."""

    def __init__(self, use_fork: bool | None = None):
        self.use_fork = enabled() if use_fork is None else use_fork
        self.servers: dict[str, ForkServer] = {}
        self.refused: dict[str, str] = {}
        self._lock = threading.Lock()  # the slots of a pool start cells at once

    def start(self, framework: str, job: Path):
        with self._lock:
            server = self._server(framework)
        if server is not None:
            try:
                return server.start(job), "fork"
            except ServerFailed as e:
                with self._lock:
                    self.refused[framework] = str(e)
                    if self.servers.get(framework) is server:
                        self.servers.pop(framework).close()
        return spawn(job), "spawn"

    def prepare(self, frameworks: list[str]) -> None:
        """Start the fork servers of these frameworks now, from the calling thread (a
        server's life is tied to the thread that started it, PR_SET_PDEATHSIG)."""
        for framework in frameworks:
            with self._lock:
                self._server(framework)

    def _server(self, framework: str) -> ForkServer | None:
        if not self.use_fork or framework in self.refused:
            return None
        server = self.servers.get(framework)
        if server is not None and not server.alive():
            self.servers.pop(framework).close()
            server = None
        if server is None:
            try:
                server = self.servers[framework] = ForkServer(framework)
            except ServerFailed as e:
                self.refused[framework] = str(e)
                print(f"{e}\nstarting each {framework} cell in a fresh process instead",
                      file=sys.stderr)
                return None
        return server

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- server side


def _send(sock: socket.socket, **msg) -> None:
    sock.send(json.dumps(msg).encode())


def _child(sock: socket.socket, job: str, out_fd: int) -> None:
    """In the forked child: the pipe becomes stdout and stderr, then bench.cell.process runs."""
    code = 1
    try:
        # a process group of its own: the runner ends a cell (time limit, Ctrl-C) with
        # everything it started (DataLoader workers) by signalling the group
        try:
            os.setpgid(0, 0)
        except OSError:  # then the runner signals the cell alone, as it did before
            pass
        sock.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.close(devnull)
        sys.argv = ["bench.cell.process", job]
        from bench.cell import process

        code = process.main([job])
    except BaseException:  # noqa: BLE001 - reported on the cell's stderr, exit status 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - the pipe may be gone; exiting anyway
                pass
        os._exit(code)


def serve(framework: str, fd: int) -> int:
    from bench.cell.process import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the runner and the cells
    sock = socket.socket(fileno=fd)
    started = time.perf_counter()
    try:
        from bench import checkpoints, data  # noqa: F401 - what every cell imports
        from strategies import backend

        be = backend(framework)
        be.preload()
        problem = be.fork_problem()
    except BaseException:  # noqa: BLE001 - the runner falls back to fresh processes
        _send(sock, error=traceback.format_exc()[-2000:])
        return 1
    if problem:
        _send(sock, error=problem)
        return 1
    _send(sock, ready=time.perf_counter() - started)
    children: set[int] = set()
    try:
        while True:
            ready, _, _ = select.select([sock], [], [], POLL_S if children else None)
            if ready:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
                if not data:
                    break  # the runner closed the socket or died
                job = json.loads(data)["job"]
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(sock, job, fds[0])
                os.close(fds[0])
                children.add(pid)
                _send(sock, pid=pid)
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    _send(sock, exit=pid, code=os.waitstatus_to_exitcode(status))
    except (BrokenPipeError, ConnectionError):
        pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], int(sys.argv[2])))
