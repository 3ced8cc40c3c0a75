"""Sans-IO RPC: length-prefixed msgpack frames and a connection state machine.

A frame is a u32 big-endian length, then one msgpack array:

    [CALL,  msg_id, [args...]]    a message from the schema
    [REPLY, msg_id, value]        the answer to the last CALL that wants one
    [ERROR, msg_id, "text"]       the receiver could not carry the CALL out

The message table (ids, directions, argument and reply types) is generated
by `codegen` from a TOML schema; this module only knows the rules every
table shares.  `RpcConnection` is to the RPC what h11's Connection is to
HTTP: bytes in, events out, and it refuses anything that breaks a rule.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from . import limits
from .checks import check_str
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import NEED_DATA, NeedData

FRAME_HEADER = struct.Struct(">I")
CALL, REPLY, ERROR = 0, 1, 2


# -- the table a generated module provides ------------------------------------
@dataclass(frozen=True)
class MessageSpec:
    id: int
    name: str
    direction: str  # e.g. "helper->toolstack"
    applies: str  # "save", "restore", "both" (or "any" for tables without modes)
    wants_reply: bool
    passes_fd: bool
    model: type  # the generated dataclass; .from_args(list) / .to_args()
    decode_reply: Any  # callable(value, where) -> python value
    encode_reply: Any  # callable(python value) -> wire value


@dataclass(frozen=True)
class Call:
    message: Any  # an instance of a generated message model

    @property
    def spec(self) -> MessageSpec:
        return self.message.SPEC


@dataclass(frozen=True)
class Reply:
    msg_id: int
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    msg_id: int
    text: str


class RpcConnection:
    """One end of an RPC channel.

    `sends` is the direction this end may send CALLs in (for example
    "helper->toolstack" on the helper), `receives` the direction it accepts
    CALLs in.  Replies go against the direction of the call they answer.
    The protocol is synchronous: at most one call awaits a reply per
    direction at a time.
    """

    def __init__(
        self,
        table: dict[int, MessageSpec],
        sends: str | None,
        receives: str | None,
        max_frame: int = limits.MAX_RPC_FRAME,
    ) -> None:
        self.table = table
        self.sends = sends
        self.receives = receives
        self.max_frame = max_frame
        self._buf = bytearray()
        self.broken = False  # framing lost: nothing more can be read from this peer
        self._awaiting: MessageSpec | None = None  # our call that wants a reply
        self._owing: MessageSpec | None = None  # their call we must answer

    # -- sending ----------------------------------------------------------
    def send_call(self, message) -> bytes:
        spec = message.SPEC
        if spec.direction != self.sends:
            raise LocalProtocolError(
                f"{spec.name} goes {spec.direction}; this end sends {self.sends}"
            )
        if self._awaiting is not None:
            raise LocalProtocolError(
                f"{spec.name} sent while {self._awaiting.name} awaits its reply"
            )
        if spec.wants_reply:
            self._awaiting = spec
        return self._frame([CALL, spec.id, message.to_args()])

    def send_reply(self, value=None) -> bytes:
        spec = self._owe("reply")
        return self._frame([REPLY, spec.id, spec.encode_reply(value)])

    def send_error(self, text: str) -> bytes:
        spec = self._owe("error")
        return self._frame([ERROR, spec.id, text])

    def send_protocol_error(self, error: RemoteProtocolError) -> bytes:
        """An ERROR frame (message id 0) answering a frame that broke a rule,
        so a peer that sent nonsense learns why instead of just losing the line."""
        self._owing = None
        return self._frame([ERROR, 0, f"protocol error: {error}"])

    def _owe(self, what: str) -> MessageSpec:
        if self._owing is None:
            raise LocalProtocolError(f"{what} sent with no call awaiting one")
        spec, self._owing = self._owing, None
        return spec

    def _frame(self, body) -> bytes:
        packed = msgpack.packb(body, use_bin_type=True)
        if len(packed) > self.max_frame:
            raise LocalProtocolError(f"frame of {len(packed)} octets is above {self.max_frame}")
        return FRAME_HEADER.pack(len(packed)) + packed

    # -- receiving --------------------------------------------------------
    def receive_data(self, data) -> None:
        self._buf += data

    @property
    def wanted(self) -> int:
        """Octets still needed for the next frame (at least 1)."""
        if len(self._buf) < FRAME_HEADER.size:
            return FRAME_HEADER.size - len(self._buf)
        (length,) = FRAME_HEADER.unpack_from(self._buf)
        return max(1, FRAME_HEADER.size + length - len(self._buf))

    def next_event(self) -> Call | Reply | ErrorReply | NeedData:
        if len(self._buf) < FRAME_HEADER.size:
            return NEED_DATA
        (length,) = FRAME_HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            self.broken = True
            raise RemoteProtocolError(
                f"frame length {length} is above the limit of {self.max_frame}"
            )
        if len(self._buf) < FRAME_HEADER.size + length:
            return NEED_DATA
        body = bytes(self._buf[FRAME_HEADER.size : FRAME_HEADER.size + length])
        del self._buf[: FRAME_HEADER.size + length]
        return self._decode(body)

    def _decode(self, body: bytes):
        try:
            # Limits keep a hostile frame from asking msgpack for huge
            # containers; ExtraData means trailing bytes after the object.
            frame = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=True,
                max_bin_len=self.max_frame,
                max_str_len=self.max_frame,
                max_array_len=1 << 20,
                max_map_len=1 << 16,
                max_ext_len=0,
            )
        except msgpack.ExtraData:
            raise RemoteProtocolError("frame has trailing bytes after its message") from None
        except (ValueError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"frame is not valid msgpack: {exc}") from None
        if type(frame) is not list or len(frame) != 3:
            raise RemoteProtocolError("frame is not a [kind, id, payload] triple")
        kind, msg_id, payload = frame
        if type(msg_id) is not int:
            raise RemoteProtocolError("frame: message id is not an integer")
        if kind == ERROR and msg_id == 0:
            self._awaiting = None  # the peer refused our last frame, and says why
            return ErrorReply(0, check_str(payload, "protocol error"))
        spec = self.table.get(msg_id)
        if spec is None:
            raise RemoteProtocolError(f"unknown message id {msg_id}")
        if kind == CALL:
            if spec.direction != self.receives:
                raise RemoteProtocolError(
                    f"{spec.name} goes {spec.direction}; it may not be sent to this end"
                )
            if self._owing is not None:
                raise RemoteProtocolError(
                    f"{spec.name} arrived before {self._owing.name} was answered"
                )
            message = spec.model.from_args(payload)  # checks the payload's shape
            if spec.wants_reply:
                self._owing = spec
            return Call(message)
        if kind in (REPLY, ERROR):
            if self._awaiting is None or self._awaiting.id != msg_id:
                raise RemoteProtocolError(f"reply to {spec.name}, which was not called")
            self._awaiting = None
            if kind == ERROR:
                return ErrorReply(msg_id, check_str(payload, f"{spec.name} error"))
            return Reply(msg_id, spec.decode_reply(payload, f"{spec.name} reply"))
        raise RemoteProtocolError(f"frame kind {kind!r} is not CALL, REPLY or ERROR")
