"""A blocking RPC channel over a stream socket: the I/O around RpcConnection.

Used by the helper (to the toolstack and to the domain runner) and by the
runner itself.  One call at a time; file descriptors that arrive with a
reply (SCM_RIGHTS) are kept in `fds` for the caller to take.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

from protocol import NEED_DATA, Call, ErrorReply, Reply, RpcConnection


class RpcError(Exception):
    """The other end answered a call with an error, or the channel broke."""


class ChannelClosed(RpcError):
    pass


class SyncChannel:
    """`spin_ns` > 0: wait for a reply by polling the socket for up to that
    long before sleeping in recv, as long as replies keep coming within it.

    On a virtual machine a process that sleeps takes tens of microseconds
    to wake, so a caller whose replies are due within microseconds (the
    helper asking its policy) keeps its CPU instead.  A socket wake-up tends
    to put the answering process on this CPU, expecting the caller to
    sleep, so every poll yields the CPU to it.  A reply later than `spin_ns`
    (the CPUs are busy anyway) switches spinning off until one comes within
    it again."""

    def __init__(
        self,
        sock: socket.socket,
        table,
        sends: str | None,
        receives: str | None,
        spin_ns: int = 0,
        on_call=None,
    ):
        self.sock = sock
        self.conn = RpcConnection(table, sends=sends, receives=receives)
        # Calls the peer may send while we wait for a reply (notifications
        # that want none, like a daemon's progress): on_call(message).
        self.on_call = on_call
        self.fds: list[int] = []
        self.spin_ns = spin_ns
        self.spinning = spin_ns > 0  # whether the next wait for a reply starts by polling
        self._held: list[bytes] | None = None  # frames kept for one write (`together`)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()

    def send_call(self, message) -> None:
        """Send a call without waiting for its reply: collect it with `reply_to`."""
        self.send(self.conn.send_call(message))

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if self._held is not None and not fds:
            self._held.append(data)
            return
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    @contextmanager
    def together(self):
        """Frames sent within leave in one write at the end: the peer wakes
        once for all of them instead of once each."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held:
                self.sock.sendall(b"".join(held))

    def call(self, message):
        """Send `message`; when it wants a reply, block for it and return its value."""
        if self._held is not None and message.SPEC.wants_reply:
            raise RuntimeError(f"{message.SPEC.name} waits for a reply: not inside together()")
        self.send(self.conn.send_call(message))
        if not message.SPEC.wants_reply:
            return None
        return self.reply_to(message)

    def reply_to(self, message):
        """Block for the reply to `message` (or to a call of its class), sent
        earlier with `send_call` while the caller did other work meanwhile,
        and return its value."""
        event = self.next_event()
        while isinstance(event, Call) and self.on_call is not None:
            self.on_call(event.message)
            event = self.next_event()
        if isinstance(event, ErrorReply):
            raise RpcError(f"{message.SPEC.name}: {event.text}")
        if not isinstance(event, Reply):
            raise RpcError(f"{message.SPEC.name}: expected a reply, got {event!r}")
        return event.value

    def next_event(self) -> Call | Reply | ErrorReply:
        """Block until one whole event has arrived (raises ChannelClosed at EOF)."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            data = self._receive(max(self.conn.wanted, 65536))
            if not data:
                raise ChannelClosed("the other end closed the channel")
            self.conn.receive_data(data)

    def _receive(self, size: int) -> bytes:
        if self.spinning:
            deadline = time.monotonic_ns() + self.spin_ns
            while time.monotonic_ns() < deadline:
                try:
                    return self.sock.recv(size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    os.sched_yield()  # a toolstack woken onto this CPU runs now
            self.spinning = False  # too slow to be worth a CPU: sleep from now on
        started = time.monotonic_ns()
        data, fds, _flags, _addr = socket.recv_fds(self.sock, size, 4)
        self.fds.extend(fds)
        if self.spin_ns and time.monotonic_ns() - started < self.spin_ns:
            self.spinning = True  # answers are quick again
        return data

    def take_fd(self) -> int:
        if not self.fds:
            raise RpcError("expected a file descriptor with the reply, got none")
        return self.fds.pop(0)
