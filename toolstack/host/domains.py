"""A host's domains: their configs, their runner processes, and the state dir.

    STATE_DIR/domains/NAME.json   the config (written when the domain is created)
    STATE_DIR/domains/NAME.sock   the runner's control socket

Runners live in their own sessions: they outlive a toolstack that exits or
crashes, and `Host.reattach()` finds them again from the state dir.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
from dataclasses import dataclass

import trio

from hypervisor import runner_command
from hypervisor._gen_stubs import AsyncRunnerStubs
from protocol import ProtocolError
from protocol import _gen_runner_msgs as msgs
from protocol._gen_control_msgs import DomainConfig, DomainInfo

from . import faults
from .async_channel import AsyncChannel, ChannelError
from .deadlines import DEADLINES

RUNNER_START_TIMEOUT = 30.0
MAX_SOCKET_PATH = 107  # octets in a unix socket path (sun_path less its NUL)
DEFAULT_MAX_OVERCOMMIT = 1.0  # guest memory at most the host's RAM
LONG_HYPERCALLS = (msgs.Digest, msgs.GuestCheck)  # they read all of guest RAM
log = logging.getLogger("ferry.host")


class ToolstackError(Exception):
    """A user-facing failure of a toolstack operation, one line."""


class RunnerGone(ToolstackError):
    """The domain's runner is not there any more (its socket refuses or vanished)."""


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


@dataclass(frozen=True)
class Hold:
    """Why a domain is out of operators' reach: `state` is what `ferry list`
    shows (in-doubt, postcopy-inconsistent), `why` a line, `command` what
    settles it, `allowed` the operations that may still touch it."""

    state: str
    why: str
    command: str
    allowed: frozenset = frozenset()


INCONSISTENT = "--postcopy-inconsistent"  # xl's suffix for a guest split between hosts


def inconsistent_hold(name: str) -> Hold:
    return Hold(
        "postcopy-inconsistent",
        "a postcopy migration ended without all of its pages on either host; kept for inspection",
        f"inspect it (ferry job, digest), then `ferry destroy {name}`",
        frozenset({"destroy"}),
    )


class Domain:
    """One domain of this host and the way to its runner."""

    def __init__(self, host: Host, config: DomainConfig) -> None:
        self.host = host
        self.config = config
        self.owner = None  # the Job that owns it right now (save, migrate, migrate-receive...)
        # The runner's process, so that destroy can wait until it is gone:
        # our child, or one an earlier toolstack started (re-attached).
        self.process: subprocess.Popen | AdoptedRunner | None = None
        # An incoming domain destroys itself when its last client leaves
        # before it ran; this connection is the toolstack's claim on it.
        self.keeper: RunnerLink | None = None
        # A migration left the domain in a state no ordinary command may touch
        # (see migration/resolve.py): None, or a Hold saying which and why.
        self.hold: Hold | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def busy(self) -> str | None:
        """The kind of job that owns the domain, or None."""
        return self.owner.kind if self.owner is not None else None

    @property
    def control_path(self) -> str:
        return self.host.path(self.name, "sock")

    async def connect(self) -> RunnerLink:
        """A connection of our own to the runner: `await link.pause()`."""
        try:
            stream = await trio.open_unix_socket(self.control_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RunnerGone(f"domain {self.name}: runner gone ({exc.strerror})") from None
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
        limit = DEADLINES.runner_long if isinstance(message, LONG_HYPERCALLS) else DEADLINES.runner
        try:
            with trio.fail_after(limit):
                return await self.channel.call(message)
        except trio.TooSlowError:
            raise ToolstackError(
                f"domain {self.domain_name}: its runner did not answer "
                f"{message.SPEC.name} within {limit:g} s"
            ) from None
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
    """The domains of one host (one state dir).

    `max_overcommit`: guest memory this host admits, as a multiple of its RAM
    (create, restore and incoming migrations alike)."""

    def __init__(self, state_dir: str, max_overcommit: float = DEFAULT_MAX_OVERCOMMIT) -> None:
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(os.path.join(self.state_dir, "domains"), mode=0o700, exist_ok=True)
        self.max_overcommit = max_overcommit
        self.domains: dict[str, Domain] = {}

    def path(self, name: str, ext: str) -> str:
        return domain_path(self.state_dir, name, ext)

    def get(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise ToolstackError(f"no domain named {name!r}") from None

    # -- creating ---------------------------------------------------------------------
    async def create(
        self, config: DomainConfig, paused: bool = False, incoming: bool = False
    ) -> Domain:
        """Start a domain's runner.  An ordinary domain's state file is written
        before this returns (or the runner is gone again); an incoming one gets
        its state file when its job commits."""
        if config.name in self.domains:
            raise ToolstackError(f"a domain named {config.name!r} already exists")
        self.check_socket_fits(config.name)
        self.admit(config)
        domain = Domain(self, config)
        self.domains[config.name] = domain  # reserved while the runner starts
        try:
            await self._start_runner(domain, paused, incoming)
        except BaseException:
            del self.domains[config.name]
            raise
        try:
            if incoming:
                domain.keeper = await domain.connect()
            else:
                await self.save_state(domain)
        except BaseException:
            await self.destroy(domain)  # no runner without the daemon knowing it
            raise
        return domain

    def check_socket_fits(self, name: str) -> None:
        """A runner listens on STATE_DIR/domains/NAME.sock, and a unix socket's
        path has room for MAX_SOCKET_PATH octets: refuse the name up front, not
        after a runner failed to bind."""
        path = os.fsencode(self.path(name, "sock"))
        length = max(len(path), len(os.path.dirname(path)) + len(b"/.4194304.tmp"))  # runner.py
        if length > MAX_SOCKET_PATH:
            raise ToolstackError(
                f"domain name {name!r} is too long for this state directory: its runner's "
                f"socket path would be {length} octets, a unix socket allows {MAX_SOCKET_PATH}"
            )

    def admit(self, config: DomainConfig) -> None:
        """Refuse a domain whose memory would overcommit this host."""
        ram = host_ram()
        limit = int(ram * self.max_overcommit)
        total = config.memory_bytes + sum(d.config.memory_bytes for d in self.domains.values())
        if total > limit:
            raise ToolstackError(
                f"not enough memory for {config.name}: its {_gib(config.memory_bytes)} would bring "
                f"guest memory to {_gib(total)}, above the {_gib(limit)} this host admits "
                f"({self.max_overcommit:g} x {_gib(ram)} of RAM, ferryd --max-overcommit)"
            )

    async def save_state(self, domain: Domain) -> None:
        """The domain's state file: from now on a restarted daemon knows it.
        ToolstackError (no space, no fds...) when it cannot be written."""
        try:
            await trio.to_thread.run_sync(self._write_state, domain)
        except OSError as exc:
            raise ToolstackError(
                f"cannot write the state of {domain.name}: {exc.strerror or exc}"
            ) from None

    def _write_state(self, domain: Domain) -> None:
        faults.point("state:write")
        write_private_file(self.path(domain.name, "json"), config_to_json(domain.config))

    async def commit(self, domain: Domain) -> None:
        """An incoming domain ran (or was paused for good): it is an ordinary
        domain now, remembered across restarts."""
        await self.save_state(domain)
        await self.release(domain)

    async def release(self, domain: Domain) -> None:
        """An incoming domain whose state file is written no longer needs the
        connection that kept it from removing itself."""
        await self._drop_keeper(domain)

    async def _drop_keeper(self, domain: Domain) -> None:
        if domain.keeper is not None:
            with trio.CancelScope(shield=True):
                await domain.keeper.channel.aclose()
            domain.keeper = None

    async def _start_runner(self, domain: Domain, paused: bool, incoming: bool) -> None:
        c = domain.config
        cmd = runner_command(
            c.name, c.memory_bytes, domain.control_path, c.backend, workload(c), incoming, paused
        )
        await faults.reached("runner:start")
        try:
            proc = await trio.to_thread.run_sync(
                lambda: subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
            )
        except OSError as exc:
            raise ToolstackError(f"domain {c.name}: cannot start its runner: {exc}") from None
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
            await trio.to_thread.run_sync(proc.wait)
            if isinstance(exc, trio.TooSlowError):
                raise ToolstackError(f"domain {c.name}: runner did not start") from None
            raise
        # Kept so that destroy can reap it: a runner is our child even in its
        # own session, and would stay a zombie until waited for.
        domain.process = proc

    # -- ending -----------------------------------------------------------------------
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
            await trio.to_thread.run_sync(proc.wait)  # reaps a child; closes a pidfd
        self.forget(domain)

    async def rename(self, domain: Domain, name: str) -> None:
        """`domain` under another name: its state file and its runner's socket
        move (the runner keeps listening on the renamed path)."""
        if name in self.domains:
            raise ToolstackError(f"cannot rename {domain.name}: {name} exists")
        self.check_socket_fits(name)
        config = DomainConfig.from_wire({**domain.config.to_wire(), "name": name}, "rename")
        old = domain.name

        def move() -> None:
            os.rename(self.path(old, "sock"), self.path(name, "sock"))
            write_private_file(self.path(name, "json"), config_to_json(config))
            try:
                os.unlink(self.path(old, "json"))
            except FileNotFoundError:
                pass

        await trio.to_thread.run_sync(move)
        del self.domains[old]
        domain.config = config
        self.domains[name] = domain

    def forget(self, domain: Domain) -> None:
        self.domains.pop(domain.name, None)
        for ext in ("json", "sock"):
            try:
                os.unlink(self.path(domain.name, ext))
            except FileNotFoundError:
                pass

    # -- after a restart -----------------------------------------------------------------
    async def reattach(self) -> list[str]:
        """Find the domains a previous toolstack left running."""
        found = []
        folder = os.path.join(self.state_dir, "domains")
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".json"):
                continue
            try:
                config = config_from_json(read_private_file(os.path.join(folder, entry)), entry)
            except (OSError, ToolstackError) as exc:
                log.warning("state file %s ignored: %s", entry, exc)
                continue
            if f"{config.name}.json" != entry:
                log.warning("state file %s ignored: it describes %r", entry, config.name)
                continue
            domain = Domain(self, config)
            try:
                domain.process = await self._adopt_runner(domain)
            except ToolstackError:
                self.forget(domain)  # its runner is gone
                continue
            if config.name.endswith(INCONSISTENT):
                domain.hold = inconsistent_hold(config.name)
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
                info = await link.getinfo()
                if info.state == msgs.DomainState.INCOMING:
                    # an incoming runner whose job died with the old daemon
                    await link.destroy()
                    raise ToolstackError(f"domain {domain.name}: an unfinished incoming domain")
            except BaseException:
                runner.close()
                raise
        return runner

    async def info(self, domain: Domain) -> DomainInfo:
        """What `ferry list` shows; a runner that does not answer is 'unreachable'."""
        info, state = None, "unreachable"
        with trio.move_on_after(DEADLINES.status):  # one stalled runner must not stall list
            try:
                info = await domain.runner.getinfo()
                state = info.state.name.lower()
            except ToolstackError:
                pass
        if domain.hold is not None:
            state = domain.hold.state
        elif domain.owner is not None and domain.owner.pause_reason is not None:
            state = "postcopy-paused"
        return DomainInfo(
            name=domain.name,
            state=state,
            backend=domain.config.backend,
            memory_bytes=domain.config.memory_bytes,
            writes=info.writes if info else None,
            guest_check=info.guest_check if info else "",
            job=domain.busy,
            config=domain.config,
        )


def host_ram() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(octets: int) -> str:
    return f"{octets / 2**30:.2f} GiB" if octets >= 2**30 else f"{octets / 2**20:.0f} MiB"


def write_private_file(path: str, data: bytes) -> None:
    """`data` at `path`, durably and atomically: a fresh temporary file created
    exclusively (never through a link someone placed), private to its owner,
    fsynced, renamed over `path`, and the directory fsynced.  A failure leaves
    no temporary file behind."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)  # a leftover of a crash; unlink does not follow links
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    sync_dir(os.path.dirname(path))


def sync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: str, limit: int = 1 << 20) -> bytes:
    """A state file's contents, not through a link, not from a FIFO or a device
    (opened without blocking, then checked), at most `limit` octets."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.path.basename(path)} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(f"larger than {limit} octets")
    return data
