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
