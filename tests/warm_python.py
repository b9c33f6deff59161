"""``python <script> <args>`` as a separate process that skips the interpreter's imports.

A fresh interpreter spends about 6 CPU-seconds importing torch, Lightning (which pulls in
torchmetrics, torchvision and transformers) and Hydra before ``train.py`` reads its first
argument. The tests start a few dozen such processes. Here one server process per test worker
imports all that once, then forks a child per command: the child is a real process of its own
(its own pid, exit status, signals, file descriptors, environment and working folder) that runs
the script as ``python <script>`` would, from ``__main__``, and exits through the normal
interpreter shutdown. What differs from a fresh interpreter is only what is already imported, so
tests about start-up itself (what a run imports before it fails, how long that takes) start real
interpreters instead.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER = r'''
import json, os, runpy, socket, sys
# What every training run imports; a child forked after this starts with it done.
import torch, pytorch_lightning, hydra, omegaconf, wandb
import scalelong.cli.train, scalelong.data.module, scalelong.training.module, scalelong.training.callbacks
import scalelong.build
channel = socket.socket(fileno=int(sys.argv[1]))
# sys.path without this process's PYTHONPATH entries: each child puts its own in front.
ours = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
base_path = [p for p in sys.path[1:] if os.path.abspath(p) not in ours]
while True:
    message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
    if not message:
        break  # the tests are done
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:  # the child: become `python <script> <args>` in the request's environment
        channel.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        script = os.path.abspath(request["argv"][0])
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script), *extra, *base_path]
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        del message, fds, request, channel
        runpy.run_path(script, run_name="__main__")
        sys.exit(0)  # SystemExit and uncaught errors end the child as they end an interpreter
    for fd in fds:
        os.close(fd)
    channel.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    channel.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
'''


class _Server:
    """The pre-imported interpreter of this test process, started at first use. It runs one child
    at a time: it reports the child's pid, then waits for the child and reports its status."""

    _instance: _Server | None = None

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        # This process's environment: the server imports what a fresh interpreter started from here
        # would (scalelong from $PYTHONPATH, if it points at another checkout).
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL)
        theirs.close()
        self.channel = ours
        self.buffer = b""
        self.child: WarmProcess | None = None  # the child whose status is still to come
        atexit.register(self.close)

    @classmethod
    def get(cls) -> _Server:
        if cls._instance is None or cls._instance.process.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def reply(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([self.channel], [], [], left)[0]:
                raise TimeoutError
            chunk = self.channel.recv(4096)
            if not chunk:
                raise RuntimeError(f"the warm Python server stopped (exit status {self.process.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def end_child(self) -> None:
        """Kill and reap the child a test left running, if any."""
        if self.child is not None:
            self.child.kill()
            self.child.wait()

    def close(self) -> None:
        self.end_child()
        try:
            self.channel.shutdown(socket.SHUT_WR)
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


class WarmProcess:
    """The part of ``subprocess.Popen``'s interface the tests use (``stdout`` and ``stderr`` are
    text pipes), for ``python <argv>`` forked from the warm interpreter."""

    def __init__(self, argv: list[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self._server = server = _Server.get()
        server.end_child()  # one child at a time: one an earlier test left running ends first
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env)}
        try:
            socket.send_fds(server.channel, [json.dumps(request).encode()], [null, out_w, err_w])
        finally:
            for fd in (null, out_w, err_w):
                os.close(fd)
        self.stdout = open(out_r, encoding="utf-8", errors="replace")
        self.stderr = open(err_r, encoding="utf-8", errors="replace")
        self.args = argv
        self.pid = server.reply()["pid"]
        self.returncode: int | None = None
        server.child = self

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self._server.reply(timeout)["returncode"]
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._server.child = None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both outputs to their ends, read side by side (one full pipe would stall the child)."""
        texts = {}
        readers = [threading.Thread(target=lambda name=name, f=f: texts.__setitem__(name, f.read()), daemon=True)
                   for name, f in (("out", self.stdout), ("err", self.stderr))]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        self.stdout.close(), self.stderr.close()
        return texts["out"], texts["err"]


def run_warm(argv: list[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)`` on a
    warm child: its status and both outputs; killed if it outlives ``timeout``."""
    proc = WarmProcess(argv, cwd, env)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, *map(str, argv)], proc.returncode, out, err)
