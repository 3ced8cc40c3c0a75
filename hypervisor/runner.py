"""The domain runner: one process per domain, answering hypercalls.

    python -m hypervisor.runner --name vm1 --memory 1GiB --control /run/vm1.sock \\
        [--backend sim|kvm] [--dirty-rate N] [--working-set F] [--skew F] [--seed N]
        [--incoming] [--paused]

It holds guest RAM in a memfd, runs the guest backend, and serves the
control socket: one thread per connection, any number of connections (the
toolstack, a save helper).  When the toolstack goes away the guest stays as
it is and a new toolstack can connect.  An incoming domain whose clients all
leave before it was ever unpaused destroys itself: nobody is left to finish
the restore.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

import numpy as np

from protocol import Call, RemoteProtocolError
from protocol import _gen_runner_msgs as msgs
from protocol._gen_runner_msgs import DomainInfo, DomainState, Workload
from protocol.limits import PAGE_SIZE

from . import uffd
from ._gen_dispatch import RunnerHandlers
from .backend import BackendError
from .channel import ChannelClosed, SyncChannel
from .memory import GuestMemory
from .sizes import parse_size

ORPHAN_TIMEOUT = 30.0  # an incoming runner nobody connects to within this destroys itself


class Runner(RunnerHandlers):
    def __init__(self, name: str, pages: int, backend: str, workload: Workload, incoming: bool):
        self.name = name
        self.lock = threading.Lock()
        self.memory = GuestMemory(pages, name=name)
        self.backend = make_backend(backend, self.memory, workload, self.lock)
        self.incoming = incoming
        self.state = DomainState.INCOMING if incoming else DomainState.PAUSED
        self.restored = False  # RAM and context came from a stream; not started yet
        self.logdirty_on = False
        self.guest_check_result = ""
        self.clients = 0
        self.uffd: int | None = None  # postcopy: kept for the domain's whole life
        self.postcopy_set = b""  # postcopy: the pages still to come, for a new helper
        self.ever_connected = threading.Event()
        self.finished = threading.Event()
        self.state_lock = threading.Lock()  # serialises state changes between clients

    # -- hypercalls -------------------------------------------------------
    def on_getinfo(self) -> DomainInfo:
        return DomainInfo(
            self.name,
            self.backend.name,
            self.state,
            self.memory.pages,
            self.backend.workload,
            self.backend.writes(),
            self.guest_check_result,
            self.logdirty_on,
        )

    def on_pause(self) -> None:
        with self.state_lock:
            if self.state == DomainState.RUNNING:
                self.backend.stop()
            elif self.state == DomainState.INCOMING:
                # A restore finished but the guest stays paused: from now on
                # it is an ordinary domain, no longer removed when orphaned.
                self.restored = True
            self.state = DomainState.PAUSED

    def on_unpause(self) -> None:
        with self.state_lock:
            if self.state == DomainState.RUNNING:
                return
            restored = self.restored or self.state == DomainState.INCOMING
            self.backend.start(incoming=restored)
            self.restored = False
            self.state = DomainState.RUNNING

    def on_logdirty_enable(self) -> None:
        self.backend.logdirty(True)
        self.logdirty_on = True

    def on_logdirty_disable(self) -> None:
        self.backend.logdirty(False)
        self.logdirty_on = False

    def on_logdirty_clean(self) -> msgs.DirtyLog:
        return self._dirty_log(clear=True)

    def on_logdirty_peek(self) -> msgs.DirtyLog:
        return self._dirty_log(clear=False)

    def _dirty_log(self, clear: bool) -> msgs.DirtyLog:
        if not self.logdirty_on:
            raise BackendError("log-dirty mode is off")
        count, bitmap = self.backend.dirty_bitmap(clear)
        return msgs.DirtyLog(count, bitmap)

    def on_get_context(self) -> bytes:
        self._require_stopped("get_context")
        return self.backend.get_context()

    def on_set_context(self, blob: bytes) -> None:
        self._require_stopped("set_context")
        self.backend.set_context(blob)

    def on_map_memory(self) -> int:
        return self.memory.pages  # the fd travels with the reply (passes_fd)

    def on_digest(self) -> str:
        self._require_stopped("digest")
        self._require_all_pages("digest")
        return self.memory.digest()

    def on_guest_check(self) -> str:
        self._require_all_pages("guest_check")
        self.guest_check_result = self.backend.guest_check()
        return self.guest_check_result

    def on_postcopy_register(self) -> int:
        with self.state_lock:
            if self.uffd is None:
                if self.state != DomainState.INCOMING:
                    raise BackendError("postcopy_register needs an incoming domain")
                self.uffd = uffd.create()
                self.memory.drop_mappings()  # precopy's pages stay in the memfd, unmapped
                uffd.register(self.uffd, self.memory.address, self.memory.size)
                self.memory.pages_pending = True
        return self.memory.address  # the fd travels with the reply (passes_fd)

    def on_postcopy_mapped(self) -> bytes:
        """Which pages are in place under the guest (a bitmap, bit p for page p)."""
        if not self.memory.pages_pending:
            raise BackendError("no postcopy in progress")
        return np.packbits(self.memory.mapped(), bitorder="little").tobytes()

    def on_postcopy_set(self, bitmap: bytes) -> None:
        if len(bitmap) != -(-self.memory.pages // 8):
            raise BackendError(
                f"a postcopy set of {len(bitmap)} octets for {self.memory.pages} pages"
            )
        self.postcopy_set = bitmap

    def on_postcopy_pending(self) -> bytes:
        return self.postcopy_set if self.memory.pages_pending else b""

    def on_postcopy_done(self) -> None:
        """Every page of the set is in place.  The range is unregistered: a page
        outside the set the guest has never touched faults to the kernel now
        (a zero page), not to a helper that has stopped listening."""
        with self.state_lock:
            if self.uffd is not None and self.memory.pages_pending:
                uffd.unregister(self.uffd, self.memory.address, self.memory.size)
            self.memory.pages_pending = False
            self.postcopy_set = b""

    def _require_all_pages(self, what: str) -> None:
        if self.memory.pages_pending:
            raise BackendError(f"{what} needs every page; postcopy is still bringing them")

    def on_destroy(self) -> None:
        pass  # the runner ends once the reply is out (see _answer)

    def _require_stopped(self, what: str) -> None:
        if self.state == DomainState.RUNNING:
            raise BackendError(f"{what} needs a paused domain; {self.name} is running")

    # -- serving ----------------------------------------------------------
    def serve_client(self, sock: socket.socket) -> None:
        channel = SyncChannel(sock, msgs.TABLE, sends=None, receives=msgs.DIRECTION)
        try:
            while not self.finished.is_set():
                try:
                    event = channel.next_event()
                except RemoteProtocolError as exc:
                    # Frames are length-delimited, so the line is still in
                    # step: say what was wrong and keep serving.
                    channel.send(channel.conn.send_protocol_error(exc))
                    if channel.conn.broken:
                        break  # ...unless the length itself was the lie
                    continue
                if not isinstance(event, Call):
                    break
                self._answer(channel, event.message)
        except (ChannelClosed, OSError):
            pass
        finally:
            channel.close()
            self._client_left()

    def _answer(self, channel: SyncChannel, message) -> None:
        try:
            value = self.dispatch(message)
        except (BackendError, ValueError) as exc:
            channel.send(channel.conn.send_error(str(exc)))
            return
        reply = channel.conn.send_reply(value)
        channel.send(reply, [self._fd_for(message)] if message.SPEC.passes_fd else None)
        if isinstance(message, msgs.Destroy):
            self.finished.set()

    def _fd_for(self, message) -> int:
        return self.uffd if isinstance(message, msgs.PostcopyRegister) else self.memory.fd

    def _client_left(self) -> None:
        with self.state_lock:
            self.clients -= 1
            orphaned = self.clients == 0 and self.state == DomainState.INCOMING
        if orphaned:
            self.finished.set()

    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        if self.incoming and not self.ever_connected.wait(ORPHAN_TIMEOUT):
            self.finished.set()
        self.finished.wait()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self.finished.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with self.state_lock:
                self.clients += 1
            self.ever_connected.set()
            threading.Thread(target=self.serve_client, args=(sock,), daemon=True).start()

    def shutdown(self) -> None:
        if self.memory.pages_pending:
            # A guest thread may be waiting in the kernel for a page that will not
            # come now: stopping it would wait forever.  Leaving ends it.
            os._exit(0)
        self.backend.close()
        self.state = DomainState.DEAD


def make_backend(kind: str, memory: GuestMemory, workload: Workload, lock: threading.Lock):
    if kind == "sim":
        from .sim import SimGuest

        return SimGuest(memory, workload, lock)
    if kind == "kvm":
        from .kvm import KvmGuest

        return KvmGuest(memory, workload, lock)
    raise ValueError(f"unknown backend {kind!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hypervisor.runner")
    p.add_argument("--name", required=True)
    p.add_argument("--memory", required=True, type=parse_size)
    p.add_argument("--control", required=True, help="control socket path")
    p.add_argument("--backend", default="sim", choices=["sim", "kvm"])
    p.add_argument("--dirty-rate", type=float, default=0.0)
    p.add_argument("--working-set", type=float, default=1.0)
    p.add_argument("--skew", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--incoming", action="store_true", help="wait for a restore, paused")
    p.add_argument("--paused", action="store_true", help="do not start the guest")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workload = Workload(args.dirty_rate, args.working_set, args.skew, args.seed)
    try:
        runner = Runner(args.name, args.memory // PAGE_SIZE, args.backend, workload, args.incoming)
    except (ValueError, OSError, BackendError) as exc:
        print(f"runner {args.name}: {exc}", file=sys.stderr)
        return 1
    if not args.incoming and not args.paused:
        runner.on_unpause()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(args.control)
    except FileNotFoundError:
        pass
    # Bind under a temporary name and rename: a client that sees the path
    # can connect at once.  The temporary name is no longer than the final
    # one (a unix socket's path has room for 107 octets).
    tmp = os.path.join(os.path.dirname(args.control), f".{os.getpid()}.tmp")
    listener.bind(tmp)
    listener.listen(16)
    os.rename(tmp, args.control)
    signal.signal(signal.SIGTERM, lambda *_: runner.finished.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at the toolstack is not for guests
    try:
        runner.serve(listener)
    finally:
        listener.close()
        try:
            os.unlink(args.control)
        except FileNotFoundError:
            pass
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
