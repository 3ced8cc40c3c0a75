"""One migration connection, as trio sees it: frames of the handshake and
the raw migration stream between them, on the same TCP stream.

`MigrationLink` does the I/O around `protocol.handshake.Handshake` (which
decides what may come when): it reads exactly as many octets as the next
frame needs, so stream octets after a frame stay in the socket for the
helper that reads them, and every wait has a deadline.
"""

from __future__ import annotations

import trio

from protocol import NEED_DATA, ProtocolError, RemoteProtocolError
from protocol.handshake import Handshake
from protocol.rpc import Call, ErrorReply, Reply

from ..host import ToolstackError


class LinkError(ToolstackError):
    """The peer went away, stalled past a deadline, broke the protocol or refused."""


class PeerRefused(LinkError):
    """The peer answered with an error reply; the message is its reason."""


class MigrationLink:
    def __init__(self, stream: trio.SocketStream, role: str) -> None:
        self.stream = stream
        self.handshake = Handshake(role)
        self.closed = trio.Event()  # set by aclose: whoever holds the link is done with it

    @property
    def fileno(self) -> int:
        return self.stream.socket.fileno()

    async def call(self, message, timeout: float, what: str = ""):
        """Send a call and wait (up to `timeout` s) for its reply's value."""
        await self.send_frame(self.handshake.send_call(message))
        return await self.reply(timeout, what or message.SPEC.name)

    async def send_call(self, message) -> None:
        """Send a call whose reply comes later (`stream`: the octets go first)."""
        await self.send_frame(self.handshake.send_call(message))

    async def reply(self, timeout: float, what: str):
        event = await self.next_event(timeout, what)
        if isinstance(event, ErrorReply):
            raise PeerRefused(event.text)
        if not isinstance(event, Reply):
            raise LinkError(f"expected the reply to {what}, got a call")
        return event.value

    async def next_call(self, timeout: float, what: str) -> Call:
        event = await self.next_event(timeout, what)
        if not isinstance(event, Call):
            raise LinkError(f"expected {what}, got a reply")
        return event

    async def answer(self, value=None) -> None:
        await self.send_frame(self.handshake.send_reply(value))

    async def refuse(self, text: str) -> None:
        """An error reply to the call being served; never raises (the peer may be gone)."""
        try:
            await self.send_frame(self.handshake.send_error(text))
        except (LinkError, ProtocolError):
            pass

    async def next_event(self, timeout: float, what: str):
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    event = self.handshake.next_event()
                except RemoteProtocolError as exc:
                    await self._tell_peer(exc)
                    raise LinkError(f"the peer broke the handshake: {exc}") from None
                if event is not NEED_DATA:
                    return event
                self.handshake.receive_data(await self.receive_exact(self.handshake.wanted))
        if scope.cancelled_caught:
            raise LinkError(f"no {what} from the peer within {timeout:g} s")

    async def _tell_peer(self, error: RemoteProtocolError) -> None:
        """Say which rule the peer broke before the line ends (best effort)."""
        try:
            with trio.move_on_after(1):
                await self.send_raw(self.handshake.send_protocol_error(error))
        except LinkError:
            pass

    async def receive_exact(self, n: int) -> bytes:
        """Exactly n octets: never more, so raw stream octets after them stay unread."""
        parts, got = [], 0
        while got < n:
            try:
                chunk = await self.stream.receive_some(n - got)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                chunk = b""
            if not chunk:
                raise LinkError(f"the connection closed ({got} of {n} octets received)")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    async def send_frame(self, data: bytes) -> None:
        await self.send_raw(data)

    async def send_raw(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise LinkError(f"the connection broke while sending ({exc})") from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
        self.closed.set()
