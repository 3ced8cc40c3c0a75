"""A blocking RPC channel over a stream socket: the I/O around RpcConnection.

Used by the helper (to the toolstack and to the domain runner) and by the
runner itself.  One call at a time; file descriptors that arrive with a
reply (SCM_RIGHTS) are kept in `fds` for the caller to take.
"""

from __future__ import annotations

import os
import socket

from protocol import NEED_DATA, Call, ErrorReply, Reply, RpcConnection


class RpcError(Exception):
    """The other end answered a call with an error, or the channel broke."""


class ChannelClosed(RpcError):
    pass


class SyncChannel:
    def __init__(self, sock: socket.socket, table, sends: str | None, receives: str | None):
        self.sock = sock
        self.conn = RpcConnection(table, sends=sends, receives=receives)
        self.fds: list[int] = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def call(self, message):
        """Send `message`; when it wants a reply, block for it and return its value."""
        self.send(self.conn.send_call(message))
        if not message.SPEC.wants_reply:
            return None
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
            data, fds, _flags, _addr = socket.recv_fds(self.sock, max(self.conn.wanted, 65536), 4)
            self.fds.extend(fds)
            if not data:
                raise ChannelClosed("the other end closed the channel")
            self.conn.receive_data(data)

    def take_fd(self) -> int:
        if not self.fds:
            raise RpcError("expected a file descriptor with the reply, got none")
        return self.fds.pop(0)
