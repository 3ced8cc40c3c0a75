"""Fixtures that start real runner processes and always end them."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile

import pytest

from hypervisor import RunnerClient, start_runner


@pytest.fixture
def short_tmp():
    # AF_UNIX paths are limited to 108 octets; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ferry-") as d:
        yield d


class Runners:
    """Start runners; on teardown kill any still alive and check none leaked."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str = "vm", memory: int = 16 << 20, **kwargs):
        path = os.path.join(self.root, f"{name}.sock")
        proc = start_runner(name, memory, path, **kwargs)
        self.procs.append(proc)
        return proc, path

    def client(self, path: str) -> RunnerClient:
        return RunnerClient(path, timeout=30)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def runners(short_tmp):
    r = Runners(short_tmp)
    yield r
    r.cleanup()


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (a test's private directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(pid))
    return found


def kill_all_mentioning(text: str) -> list[int]:
    pids = processes_mentioning(text)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@pytest.fixture
async def host(short_tmp):
    """A Host in a private state dir; every runner it started is gone afterwards."""
    from toolstack.domains import Host

    h = Host(os.path.join(short_tmp, "host"))
    yield h
    for domain in list(h.domains.values()):
        await h.destroy(domain)
    leaked = kill_all_mentioning(short_tmp)
    assert not leaked, f"processes left behind: {leaked}"


class DaemonHandle:
    def __init__(self, root: str, name: str, key: str, listen: bool) -> None:
        import sys

        self.state = os.path.join(root, name)
        self.socket = os.path.join(self.state, "control.sock")
        self.log = os.path.join(root, f"{name}.log")
        self.cmd = [
            sys.executable,
            "-m",
            "toolstack.daemon",
            "--state-dir",
            self.state,
            "--auth-key",
            key,
        ]
        if listen:
            self.cmd += ["--listen", "127.0.0.1:0"]
        self.proc = None
        self.port = None

    def start(self):
        from toolstack.demo import wait_for_daemon

        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_for_daemon(self.proc, self.socket)
        self.port = self.request("ping")["listen_port"]
        return self

    def request(self, op: str, **fields) -> dict:
        from toolstack.client import DaemonClient

        with DaemonClient(self.socket) as c:
            return c.request(op, **fields)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


class Cluster:
    """Daemons on loopback in a private directory (each a real ferryd process)."""

    def __init__(self, root: str) -> None:
        import secrets

        self.root = root
        self.key = self.write_key("auth.key", secrets.token_hex(32))
        self.daemons: list[DaemonHandle] = []

    def write_key(self, name: str, text: str) -> str:
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def daemon(self, name: str, listen: bool = True, key: str | None = None) -> DaemonHandle:
        handle = DaemonHandle(self.root, name, key or self.key, listen).start()
        self.daemons.append(handle)
        return handle

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                try:
                    for dom in d.request("list")["domains"]:
                        d.request("destroy", name=dom["name"])
                except Exception:
                    pass
                d.proc.send_signal(signal.SIGTERM)
                try:
                    d.proc.wait(20)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait()


@pytest.fixture
def cluster(short_tmp):
    c = Cluster(short_tmp)
    yield c
    c.cleanup()
    leaked = kill_all_mentioning(short_tmp)
    assert not leaked, f"processes left behind: {leaked}"
