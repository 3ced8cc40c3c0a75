"""A host's domains: their configs, their runner processes, and the state dir.

    STATE_DIR/domains/NAME.json   the config (written when the domain is created)
    STATE_DIR/domains/NAME.sock   the runner's control socket

Runners live in their own sessions: they outlive a toolstack that exits or
crashes, and `Host.reattach()` finds them again from the state dir.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess

import trio

from hypervisor import runner_command
from hypervisor._gen_stubs import AsyncRunnerStubs
from protocol import ProtocolError
from protocol import _gen_runner_msgs as msgs
from protocol._gen_control_msgs import DomainConfig, DomainInfo
from protocol.limits import PAGE_SIZE

from .async_channel import AsyncChannel, ChannelError

RUNNER_START_TIMEOUT = 30.0


class ToolstackError(Exception):
    """A user-facing failure of a toolstack operation, one line."""


def workload(config: DomainConfig) -> msgs.Workload:
    return msgs.Workload(config.dirty_rate, config.working_set, config.skew, config.seed)


def config_to_json(config: DomainConfig) -> bytes:
    """The form kept in the state dir and in save files."""
    return json.dumps(config.to_wire(), sort_keys=True, separators=(",", ":")).encode()


def config_from_json(raw: bytes | str, where: str = "domain config") -> DomainConfig:
    """A config read from a file or a peer, checked by the schema's rules."""
    try:
        return DomainConfig.from_wire(json.loads(raw), where)
    except (ValueError, RecursionError) as exc:  # not JSON
        raise ToolstackError(f"bad {where}: not JSON ({exc})") from None
    except ProtocolError as exc:
        raise ToolstackError(f"bad {exc}") from None


class Domain:
    """One domain of this host and the way to its runner."""

    def __init__(self, host: Host, config: DomainConfig) -> None:
        self.host = host
        self.config = config
        self.busy: str | None = None  # the job that owns it right now (save, migrate...)
        # The runner's process, so that destroy can wait until it is gone:
        # our child, or one an earlier toolstack started (re-attached).
        self.process: subprocess.Popen | AdoptedRunner | None = None
        # An incoming domain destroys itself when its last client leaves
        # before it ran; this connection is the toolstack's claim on it.
        self.keeper: RunnerLink | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def control_path(self) -> str:
        return self.host.path(self.name, "sock")

    async def connect(self) -> RunnerLink:
        """A connection of our own to the runner: `await link.pause()`."""
        try:
            stream = await trio.open_unix_socket(self.control_path)
        except OSError as exc:
            raise ToolstackError(
                f"domain {self.name}: runner unreachable ({exc.strerror})"
            ) from None
        return RunnerLink(_RunnerChannel(self.name, stream))

    @property
    def runner(self) -> AsyncRunnerStubs:
        """Hypercalls, each on a fresh connection (cheap: a unix socket):
        `await domain.runner.pause()`."""
        return AsyncRunnerStubs(_OneCallChannel(self))


class _RunnerChannel:
    """An AsyncChannel to a runner whose failures are one-line ToolstackErrors."""

    def __init__(self, domain_name: str, stream) -> None:
        self.domain_name = domain_name
        self.channel = AsyncChannel(stream, msgs.TABLE, sends=msgs.DIRECTION, receives=None)

    async def call(self, message):
        try:
            return await self.channel.call(message)
        except ChannelError as exc:
            raise ToolstackError(f"domain {self.domain_name}: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise ToolstackError(f"domain {self.domain_name}: runner connection lost") from None

    async def aclose(self) -> None:
        await self.channel.aclose()


class _OneCallChannel:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    async def call(self, message):
        async with await self.domain.connect() as link:
            return await link.channel.call(message)


class RunnerLink(AsyncRunnerStubs):
    """A connection to a runner, closed by `async with`."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.channel.aclose()


class AdoptedRunner:
    """A runner started by an earlier toolstack, watched through a pidfd.

    It is not our child, so it cannot be waited for; a pidfd still says when
    it has exited, and cannot come to name another process that reuses the pid.
    Offers the part of Popen that destroy uses.
    """

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        readable, _, _ = select.select([self.fd], [], [], 0)
        return 0 if readable else None

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.fd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        if self.fd >= 0:
            select.select([self.fd], [], [])
            self.close()
        return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def peer_pid(stream: trio.SocketStream) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


def domain_path(state_dir: str, name: str, ext: str) -> str:
    """A domain's file in a host's state dir: its runner's socket (sock), ..."""
    return os.path.join(state_dir, "domains", f"{name}.{ext}")


class Host:
    """The domains of one host (one state dir)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(os.path.join(self.state_dir, "domains"), exist_ok=True)
        self.domains: dict[str, Domain] = {}

    def path(self, name: str, ext: str) -> str:
        return domain_path(self.state_dir, name, ext)

    def get(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise ToolstackError(f"no domain named {name!r}") from None

    async def create(
        self, config: DomainConfig, paused: bool = False, incoming: bool = False
    ) -> Domain:
        if config.name in self.domains:
            raise ToolstackError(f"a domain named {config.name!r} already exists")
        domain = Domain(self, config)
        self.domains[config.name] = domain  # reserved while the runner starts
        try:
            await self._start_runner(domain, paused, incoming)
        except BaseException:
            del self.domains[config.name]
            raise
        if incoming:
            domain.keeper = await domain.connect()
        else:
            self._save_config(domain)
        return domain

    async def commit(self, domain: Domain) -> None:
        """An incoming domain was unpaused (or paused for good): it is a real
        domain now, remembered across restarts."""
        self._save_config(domain)
        await self._drop_keeper(domain)

    async def _drop_keeper(self, domain: Domain) -> None:
        if domain.keeper is not None:
            with trio.CancelScope(shield=True):
                await domain.keeper.channel.aclose()
            domain.keeper = None

    def _save_config(self, domain: Domain) -> None:
        tmp = self.path(domain.name, "json.tmp")
        with open(tmp, "wb") as f:
            f.write(config_to_json(domain.config))
        os.rename(tmp, self.path(domain.name, "json"))

    async def _start_runner(self, domain: Domain, paused: bool, incoming: bool) -> None:
        c = domain.config
        cmd = runner_command(
            c.name, c.memory_bytes, domain.control_path, c.backend, workload(c), incoming, paused
        )
        proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            with trio.fail_after(RUNNER_START_TIMEOUT):
                while not os.path.exists(domain.control_path):
                    if proc.poll() is not None:
                        raise ToolstackError(
                            f"domain {c.name}: runner exited with status {proc.returncode}"
                        )
                    await trio.sleep(0.01)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            if isinstance(exc, trio.TooSlowError):
                raise ToolstackError(f"domain {c.name}: runner did not start") from None
            raise
        # Kept so that destroy can reap it: a runner is our child even in its
        # own session, and would stay a zombie until waited for.
        domain.process = proc

    async def destroy(self, domain: Domain) -> None:
        with trio.CancelScope(shield=True):
            await self._destroy(domain)

    async def _destroy(self, domain: Domain) -> None:
        try:
            await domain.runner.destroy()
        except ToolstackError:
            pass  # already gone
        await self._drop_keeper(domain)
        proc = domain.process
        if proc is not None:
            with trio.move_on_after(10):
                while proc.poll() is None:
                    await trio.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
            proc.wait()  # reaps a child; closes an adopted runner's pidfd
        self.forget(domain)

    def forget(self, domain: Domain) -> None:
        self.domains.pop(domain.name, None)
        for ext in ("json", "sock"):
            try:
                os.unlink(self.path(domain.name, ext))
            except FileNotFoundError:
                pass

    async def reattach(self) -> list[str]:
        """Find the domains a previous toolstack left running."""
        found = []
        folder = os.path.join(self.state_dir, "domains")
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, entry), "rb") as f:
                    config = config_from_json(f.read(), f"state file {entry}")
            except (OSError, ToolstackError):
                continue
            domain = Domain(self, config)
            try:
                domain.process = await self._adopt_runner(domain)
            except ToolstackError:
                self.forget(domain)  # its runner is gone
                continue
            self.domains[config.name] = domain
            found.append(config.name)
        return found

    async def _adopt_runner(self, domain: Domain) -> AdoptedRunner:
        link = await domain.connect()
        async with link:
            try:
                runner = AdoptedRunner(peer_pid(link.channel.channel.stream))
            except OSError as exc:
                raise ToolstackError(
                    f"domain {domain.name}: runner gone ({exc.strerror})"
                ) from None
            try:
                # Answering after the pidfd was opened proves the pid was
                # still the runner's, not a reused one.
                await link.getinfo()
            except BaseException:
                runner.close()
                raise
        return runner

    async def info(self, domain: Domain) -> DomainInfo:
        """What `ferry list` shows; a runner that does not answer is 'unreachable'."""
        try:
            info = await domain.runner.getinfo()
        except ToolstackError:
            return DomainInfo(
                name=domain.name,
                state="unreachable",
                backend=domain.config.backend,
                memory_bytes=domain.config.memory_bytes,
                job=domain.busy,
                config=domain.config,
            )
        return DomainInfo(
            name=domain.name,
            state=info.state.name.lower(),
            backend=info.backend,
            memory_bytes=info.pages * PAGE_SIZE,
            writes=info.writes,
            guest_check=info.guest_check,
            job=domain.busy,
            config=domain.config,
        )
