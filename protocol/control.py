"""Frames of the daemon's control API and of the migration handshake.

Each frame is a u32 big-endian length and a msgpack map.  Readers take the
header first and then exactly the body, so a migration connection can carry
frames, then raw stream bytes, then frames again.
"""

from __future__ import annotations

from typing import Any

import msgpack

from . import limits
from .errors import LocalProtocolError, RemoteProtocolError
from .rpc import FRAME_HEADER

HEADER_SIZE = FRAME_HEADER.size


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > limits.MAX_RPC_FRAME:
        raise LocalProtocolError(f"frame of {len(body)} octets is above {limits.MAX_RPC_FRAME}")
    return FRAME_HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """The length a frame header announces, checked against the limit."""
    (length,) = FRAME_HEADER.unpack(header)
    if length > limits.MAX_RPC_FRAME:
        raise RemoteProtocolError(
            f"frame length {length} is above the limit of {limits.MAX_RPC_FRAME}"
        )
    return length


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except msgpack.ExtraData:
        raise RemoteProtocolError("frame has trailing bytes after its message") from None
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise RemoteProtocolError("frame is not a map")
    return message
