"""Exact reads and frames over a trio stream (control API and migration)."""

from __future__ import annotations

import trio

from protocol import RemoteProtocolError
from protocol.control import HEADER_SIZE, body_length, decode_body, encode_frame


class ConnectionLost(Exception):
    """The peer closed the connection or it broke."""


async def read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Exactly n octets: never more, so raw stream bytes after them stay unread."""
    parts, got = [], 0
    while got < n:
        try:
            chunk = await stream.receive_some(n - got)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        if not chunk:
            raise ConnectionLost(f"connection closed ({got} of {n} octets received)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_frame(stream: trio.abc.ReceiveStream) -> dict:
    length = body_length(await read_exact(stream, HEADER_SIZE))
    return decode_body(await read_exact(stream, length))


async def send_frame(stream: trio.abc.SendStream, message: dict) -> None:
    try:
        await stream.send_all(encode_frame(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise ConnectionLost("connection closed while sending") from None


def field(message: dict, key: str, kind: type, default=...):
    """message[key] checked to be a `kind` (bad input from a peer: one clear error)."""
    if key not in message:
        if default is ...:
            raise RemoteProtocolError(f"message lacks {key!r}")
        return default
    value = message[key]
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise RemoteProtocolError(f"{key!r} is not a {kind.__name__}")
    return value
