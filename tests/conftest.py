"""Fixtures that start real runner processes and always end them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading

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
    from toolstack.host import Host

    h = Host(os.path.join(short_tmp, "host"))
    yield h
    for domain in list(h.domains.values()):
        await h.destroy(domain)
    leaked = kill_all_mentioning(short_tmp)
    assert not leaked, f"processes left behind: {leaked}"


FERRY = os.path.join(os.path.dirname(sys.executable), "ferry")


def ferry(daemon, *args, check=True, timeout=180, env=None):
    """Run the installed `ferry` executable against `daemon`; never a traceback."""
    cmd = [FERRY] if os.path.exists(FERRY) else [sys.executable, "-m", "toolstack"]
    r = subprocess.run(
        [*cmd, "--connect", daemon.socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert "Traceback" not in r.stderr, r.stderr
    if check:
        assert r.returncode == 0, r.stderr
    return r


def migrate_in_background(daemon, address, *flags, name="vm1"):
    """`ferry migrate NAME ADDRESS FLAGS...` in a thread; its outcome in a dict."""
    outcome = {}

    def run():
        r = ferry(daemon, "migrate", name, address, *flags, check=False)
        outcome.update(code=r.returncode, stdout=r.stdout, stderr=r.stderr)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


class Cluster:
    """Daemons on loopback in a test's private directory (each a real ferryd
    process), started by the same harness as the demo and the bench."""

    def __init__(self, root: str) -> None:
        from toolstack.harness import LocalHosts

        self.hosts = LocalHosts(root=root)
        self.root, self.key = root, self.hosts.key

    def write_key(self, name: str, text: str) -> str:
        return self.hosts.write_key(name, text)

    def daemon(self, name: str, listen: bool = True, key: str | None = None, args=(), env=None):
        return self.hosts.start(name, listen=listen, key=key, args=args, env=env)

    def cleanup(self) -> None:
        self.hosts.close()


@pytest.fixture
def cluster(short_tmp):
    c = Cluster(short_tmp)
    yield c
    c.cleanup()
    leaked = kill_all_mentioning(short_tmp)
    assert not leaked, f"processes left behind: {leaked}"
