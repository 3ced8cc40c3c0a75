"""Talking to a domain runner: start one, connect, call its hypercalls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from protocol import _gen_runner_msgs as msgs
from protocol._gen_runner_msgs import Workload

from ._gen_stubs import RunnerStubs
from .channel import RpcError, SyncChannel
from .memory import GuestMemory


class RunnerClient(RunnerStubs):
    """Blocking client: `client.pause()`, `client.logdirty_clean()`, ..."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        super().__init__(SyncChannel(sock, msgs.TABLE, sends=msgs.DIRECTION, receives=None))

    def map_guest_memory(self, writable: bool = False) -> GuestMemory:
        """Map the domain's RAM here (the runner passes its memfd)."""
        pages = self.map_memory()
        fd = self.channel.take_fd()
        return GuestMemory(pages, fd=fd, writable=writable)

    def register_postcopy(self) -> tuple[int, int]:
        """Postcopy: (the domain's userfaultfd, the address of guest RAM in the runner)."""
        address = self.postcopy_register()
        return self.channel.take_fd(), address

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def runner_command(
    name: str,
    memory_bytes: int,
    control: str,
    backend: str = "sim",
    workload: Workload | None = None,
    incoming: bool = False,
    paused: bool = False,
) -> list[str]:
    w = workload or Workload(0.0, 1.0, 0.0, 1)
    cmd = [
        sys.executable,
        "-m",
        "hypervisor.runner",
        "--name",
        name,
        "--memory",
        str(memory_bytes),
        "--control",
        control,
        "--backend",
        backend,
        "--dirty-rate",
        repr(w.dirty_rate),
        "--working-set",
        repr(w.working_set),
        "--skew",
        repr(w.skew),
        "--seed",
        str(w.seed),
    ]
    if incoming:
        cmd.append("--incoming")
    if paused:
        cmd.append("--paused")
    return cmd


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Block until the runner's control socket exists (it is renamed into place when listening)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RpcError(f"domain runner exited with status {proc.returncode} before it listened")
        if time.monotonic() > deadline:
            raise RpcError(f"domain runner did not listen on {path} within {timeout:.0f}s")
        time.sleep(0.01)


def start_runner(name: str, memory_bytes: int, control: str, **kwargs) -> subprocess.Popen:
    """Start a runner in its own session (it outlives the toolstack) and wait until it listens."""
    proc = subprocess.Popen(
        runner_command(name, memory_bytes, control, **kwargs),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_socket(control, proc)
    except RpcError:
        proc.kill()
        proc.wait()
        raise
    return proc
