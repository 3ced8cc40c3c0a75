"""Local daemons: several ferryd processes on loopback, each a "host" with
its own state dir, in one temporary root.  `ferry demo`, `ferry bench` and
the test suite all start their daemons here.

    with LocalHosts() as hosts:
        a = hosts.start("host-a")
        b = hosts.start("host-b", listen=True)
        with a.client() as daemon:
            daemon.migrate(name="vm1", address=b.address)

Everything started is ended on exit: domains destroyed, daemons stopped
(SIGTERM, then SIGKILL after a deadline), the root removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..cli.daemon_client import DaemonClient, DaemonError

START_TIMEOUT = 30.0  # s for a daemon to answer its first ping
STOP_TIMEOUT = 20.0  # s for a daemon to stop on SIGTERM before it is killed
DESTROY_ATTEMPTS = 10  # rounds of destroy_all: an abort first, the renamed domain next


class HarnessError(Exception):
    pass


def executable(name: str, module: str) -> list[str]:
    """The installed console script beside this Python, else `python -m module`."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


class LocalDaemon:
    def __init__(self, hosts: LocalHosts, name: str, listen: bool, key: str, args: list[str]):
        self.name = name
        self.state = os.path.join(hosts.root, name)
        self.socket = os.path.join(self.state, "control.sock")
        if "--control" in args:  # the daemon listens where it was told to
            self.socket = args[args.index("--control") + 1]
        self.log = os.path.join(hosts.root, f"{name}.log")
        self.cmd = [*executable("ferryd", "toolstack.daemon"), "--state-dir", self.state]
        self.cmd += ["--auth-key", key, *args]
        if listen:
            self.cmd += ["--listen", "127.0.0.1:0"]
        self.env = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: dict | None = None) -> LocalDaemon:
        """Start (or restart) the daemon; a restart listens on the same port,
        as a real host's daemon does."""
        if env is not None:
            self.env = env
        if self.port is not None and "127.0.0.1:0" in self.cmd:
            self.cmd[self.cmd.index("127.0.0.1:0")] = self.address
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env
            )
        self.port = self._wait_until_serving().listen_port
        return self

    def _wait_until_serving(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"ferryd {self.name} exited with status {self.proc.returncode} at start: "
                    f"{self.last_log_line()}"
                )
            try:
                with DaemonClient(self.socket) as daemon:
                    return daemon.ping()
            except DaemonError:
                time.sleep(0.05)
        raise HarnessError(f"ferryd {self.name} did not start within {START_TIMEOUT:g} s")

    def last_log_line(self) -> str:
        try:
            with open(self.log) as f:
                lines = f.read().strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def client(self, on_progress=None) -> DaemonClient:
        return DaemonClient(self.socket, on_progress=on_progress)

    def call(self, operation: str, **fields):
        """One control API operation on a connection of its own: `a.call("list")`."""
        with self.client() as daemon:
            return getattr(daemon, operation)(**fields)

    def destroy_all(self) -> None:
        """Every domain of this daemon gone: a job still holding one (a paused
        postcopy, say) is aborted first, an in-doubt one force-destroyed."""
        if not self.running:
            return
        try:
            with self.client() as daemon:
                for _ in range(DESTROY_ATTEMPTS):
                    domains = daemon.list()
                    if not domains:
                        return
                    aborted = False
                    for domain in domains:
                        try:
                            if domain.state == "in-doubt":
                                daemon.migrate_resolve(name=domain.name, force="destroy")
                            elif domain.job is not None:
                                daemon.job_control(name=domain.name, action="abort")
                                aborted = True
                            else:
                                daemon.destroy(name=domain.name)
                        except DaemonError:
                            aborted = True  # busy (a job ending): look again shortly
                    if aborted:
                        time.sleep(0.2)  # aborted jobs end, renamed domains show up
        except DaemonError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send `sig` and wait for the daemon to exit (killed past the deadline)."""
        self.signal(sig)
        return self.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the daemon to exit (killed past the deadline)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class LocalHosts:
    """`root`: a directory the caller owns (kept on close); by default a new
    temporary one (removed on close)."""

    def __init__(self, prefix: str = "ferry-hosts-", root: str | None = None) -> None:
        self.owns_root = root is None
        self.root = root or tempfile.mkdtemp(prefix=prefix)
        self.key = self.write_key("auth.key", secrets.token_hex(32))
        self.daemons: list[LocalDaemon] = []

    def write_key(self, name: str, text: str) -> str:
        """A key file in the root, private to its owner (ferryd refuses others)."""
        path = os.path.join(self.root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def start(
        self,
        name: str,
        listen: bool = True,
        key: str | None = None,
        args: list[str] | tuple = (),
        env: dict | None = None,
    ) -> LocalDaemon:
        daemon = LocalDaemon(self, name, listen, key or self.key, list(args))
        self.daemons.append(daemon)
        return daemon.start(env)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.destroy_all()
        for daemon in self.daemons:  # all at once: they end side by side
            daemon.signal()
        for daemon in self.daemons:
            daemon.wait()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
