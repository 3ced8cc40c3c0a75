"""The trio side of an RPC channel: RpcConnection over a trio stream."""

from __future__ import annotations

import trio

from protocol import NEED_DATA, Call, ErrorReply, Reply, RpcConnection


class ChannelError(Exception):
    """The peer answered with an error, broke the protocol, or went away."""


class AsyncChannel:
    def __init__(self, stream: trio.abc.Stream, table, sends: str | None, receives: str | None):
        self.stream = stream
        self.conn = RpcConnection(table, sends=sends, receives=receives)
        self._lock = trio.Lock()  # one call at a time on a synchronous protocol

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
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
