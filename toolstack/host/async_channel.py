"""The trio side of an RPC channel: RpcConnection over a trio stream.

ferryd talks to runners, helpers and control clients through it;
the blocking side of the same thing is hypervisor.channel.SyncChannel."""

from __future__ import annotations

import socket

import trio

from protocol import NEED_DATA, Call, ErrorReply, Reply, RpcConnection


class ChannelError(Exception):
    """The peer answered with an error, broke the protocol, or went away."""


class AsyncChannel:
    """`sock`, the stream's own socket when it has one, lets `send` write a
    small frame directly (see there)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        table,
        sends: str | None,
        receives: str | None,
        sock: socket.socket | None = None,
    ):
        self.stream = stream
        self.conn = RpcConnection(table, sends=sends, receives=receives)
        self._lock = trio.Lock()  # one call at a time on a synchronous protocol
        self._sock = sock

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        """Send all of `data`.  A reply of a few dozen octets nearly always
        fits in the socket buffer: one non-blocking send() then, without the
        trip through trio's scheduler that send_all makes after writing (the
        caller's next receive is its checkpoint).  Only the one task that
        serves the channel may send on it."""
        if self._sock is not None:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc.strerror or exc}") from None
            if sent == len(data):
                return
            data = data[sent:]
        await self.stream.send_all(data)

    async def next_event(self) -> Call | Reply | ErrorReply:
        """The next whole event; ChannelError at end of stream."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(max(self.conn.wanted, 65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ChannelError("the other end closed the channel")
            self.conn.receive_data(data)

    async def call(self, message):
        async with self._lock:
            await self.send(self.conn.send_call(message))
            if not message.SPEC.wants_reply:
                return None
            event = await self.next_event()
        if isinstance(event, ErrorReply):
            raise ChannelError(f"{message.SPEC.name}: {event.text}")
        return event.value
