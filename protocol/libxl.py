"""The libxl-layer migration stream (Xen's "LibXenLight Domain Image Format", v2).

    header   ident "LibxlFmt", version 2, options; big-endian
    records  END | LIBXC_CONTEXT | EMULATOR_XENSTORE_DATA | EMULATOR_CONTEXT |
             CHECKPOINT_END, framed like libxc records

LIBXC_CONTEXT has an empty body: the whole libxc stream follows it, and the
libxl records resume after the libxc END.  The toolstack writes this layer
around the helper's stream; `LibxlDecoder` reads it either handing the libxc
part to someone else (`inner=False`, the toolstack passes the fd to a restore
helper) or decoding it too (`inner=True`, `ferry verify-stream`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import libxc, limits
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import NEED_DATA, NeedData, RecordReader, record_buffers

IDENT = 0x4C6962786C466D74  # "LibxlFmt"
VERSION = 2
OPT_BIG_ENDIAN = 0x1
OPT_LEGACY = 0x2
HEADER = struct.Struct(">QII")  # ident, version, options

REC_END = 0x00000000
REC_LIBXC_CONTEXT = 0x00000001
REC_EMULATOR_XENSTORE_DATA = 0x00000002
REC_EMULATOR_CONTEXT = 0x00000003
REC_CHECKPOINT_END = 0x00000004
REC_CHECKPOINT_STATE = 0x00000005

RECORD_NAMES = {
    REC_END: "END",
    REC_LIBXC_CONTEXT: "LIBXC_CONTEXT",
    REC_EMULATOR_XENSTORE_DATA: "EMULATOR_XENSTORE_DATA",
    REC_EMULATOR_CONTEXT: "EMULATOR_CONTEXT",
    REC_CHECKPOINT_END: "CHECKPOINT_END",
    REC_CHECKPOINT_STATE: "CHECKPOINT_STATE",
}

EMULATOR_HEADER = struct.Struct("<II")  # emulator_id, index
EMULATOR_UNKNOWN, EMULATOR_QEMU_TRAD, EMULATOR_QEMU_UPSTREAM = 0, 1, 2
# ferry's device model state (the sim workload, the KVM vCPU) goes in
# HVM_CONTEXT; EMULATOR_CONTEXT is for emulator state a backend may add.


@dataclass(frozen=True)
class LibxlHeader:
    version: int = VERSION


@dataclass(frozen=True)
class LibxcContext:
    """The libxc stream follows this record."""


@dataclass(frozen=True)
class EmulatorContext:
    emulator_id: int
    index: int
    blob: bytes
    xenstore: bool = False  # EMULATOR_XENSTORE_DATA rather than EMULATOR_CONTEXT


@dataclass(frozen=True)
class CheckpointEnd:
    pass


@dataclass(frozen=True)
class LibxlEnd:
    pass


Event = LibxlHeader | LibxcContext | EmulatorContext | CheckpointEnd | LibxlEnd


def encode_header() -> bytes:
    return HEADER.pack(IDENT, VERSION, 0)


def encode_libxc_context() -> bytes:
    return b"".join(record_buffers(REC_LIBXC_CONTEXT, []))


def encode_emulator_context(ctx: EmulatorContext) -> bytes:
    rtype = REC_EMULATOR_XENSTORE_DATA if ctx.xenstore else REC_EMULATOR_CONTEXT
    body = [EMULATOR_HEADER.pack(ctx.emulator_id, ctx.index), ctx.blob]
    return b"".join(record_buffers(rtype, body))


def encode_end() -> bytes:
    return b"".join(record_buffers(REC_END, []))


def encode(event: Event) -> bytes:
    match event:
        case LibxlHeader():
            return encode_header()
        case LibxcContext():
            return encode_libxc_context()
        case EmulatorContext():
            return encode_emulator_context(event)
        case CheckpointEnd():
            return b"".join(record_buffers(REC_CHECKPOINT_END, []))
        case LibxlEnd():
            return encode_end()
    raise LocalProtocolError(f"cannot encode {event!r}")


class LibxlDecoder:
    """Feed bytes, read events.  With `inner=True` the libxc stream after
    LIBXC_CONTEXT is decoded too and its events come out in between; with
    `inner=False` the decoder stops after LIBXC_CONTEXT until `resume()`.

    `expect_header=False` starts directly at the records (the toolstack
    resuming after a helper consumed the libxc part); `start_offset` is the
    stream offset of the first octet fed, for error messages."""

    def __init__(
        self,
        inner: bool = True,
        expect_header: bool = True,
        max_pfns: int | None = None,
        max_record_length: int = limits.MAX_RECORD_LENGTH,
        start_offset: int = 0,
    ) -> None:
        self._reader = RecordReader(max_record_length, start_offset)
        self._inner = inner
        self._max_pfns = max_pfns
        self._max_record_length = max_record_length
        self._libxc: libxc.LibxcDecoder | None = None
        self._libxc_start = 0
        self._state = "header" if expect_header else "records"

    def feed(self, data) -> None:
        if self._libxc is not None:
            self._libxc.feed(data)
        else:
            self._reader.feed(data)

    def feed_eof(self) -> None:
        self._reader.feed_eof()
        if self._libxc is not None:
            self._libxc.feed_eof()

    @property
    def offset(self) -> int:
        if self._libxc is not None:
            return self._libxc_start + self._libxc.offset
        return self._reader.offset

    @property
    def wanted(self) -> int:
        if self._state == "header" and self._reader.buffered < HEADER.size:
            return HEADER.size - self._reader.buffered
        return self._reader.wanted or 8

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def buffered(self) -> int:
        """Octets fed but not yet consumed (past END: trailing garbage)."""
        return self._reader.buffered

    def resume(self) -> None:
        """After LIBXC_CONTEXT with `inner=False`: the libxc part was consumed
        elsewhere; continue with the libxl records."""
        if self._state != "handed-off":
            raise LocalProtocolError("resume() without a handed-off libxc stream")
        self._state = "records"

    def next_event(self) -> Event | libxc.Event | NeedData:
        if self._state == "header":
            return self._header()
        if self._state == "libxc":
            return self._libxc_event()
        if self._state == "handed-off":
            raise LocalProtocolError("the libxc stream was handed off; call resume()")
        if self._state == "done":
            return LibxlEnd()
        got = self._reader.take_record()
        if got is None:
            return NEED_DATA
        return self._record(*got)

    def _header(self):
        at = self.offset
        raw = self._reader.take(HEADER.size, "libxl header")
        if raw is None:
            return NEED_DATA
        ident, version, options = HEADER.unpack(raw)
        if ident != IDENT:
            raise RemoteProtocolError("libxl header: ident is not 'LibxlFmt'", at)
        if version != VERSION:
            raise RemoteProtocolError(f"libxl header: version {version} is not 2", at + 8)
        if options & OPT_BIG_ENDIAN:
            raise RemoteProtocolError("libxl header: big-endian streams are not supported", at + 12)
        if options & OPT_LEGACY:
            raise RemoteProtocolError("libxl header: legacy streams are not supported", at + 12)
        if options:
            raise RemoteProtocolError("libxl header: reserved option bits are not zero", at + 12)
        self._state = "records"
        return LibxlHeader(version)

    def _libxc_event(self):
        event = self._libxc.next_event()
        if self._libxc.done:
            end_offset = self._libxc_start + self._libxc.offset
            rest = self._libxc.trailing()
            eof = self._reader.eof
            self._libxc = None
            self._reader.restart(end_offset, rest)
            if eof:
                self._reader.feed_eof()
            self._state = "records"
        return event

    def _record(self, rtype: int, body: memoryview, at: int):
        name = RECORD_NAMES.get(rtype, f"{rtype:#010x}")
        if rtype in (REC_END, REC_LIBXC_CONTEXT, REC_CHECKPOINT_END) and len(body):
            raise RemoteProtocolError(f"libxl {name}: body_length {len(body)} is not 0", at + 4)
        if rtype == REC_END:
            self._state = "done"
            return LibxlEnd()
        if rtype == REC_LIBXC_CONTEXT:
            if self._inner:
                self._libxc_start = self._reader.offset
                self._libxc = libxc.LibxcDecoder(self._max_pfns, self._max_record_length)
                rest = self._reader.take_rest()
                eof = self._reader.eof
                self._libxc.feed(rest)
                if eof:
                    self._libxc.feed_eof()
                self._state = "libxc"
            else:
                self._state = "handed-off"
            return LibxcContext()
        if rtype in (REC_EMULATOR_CONTEXT, REC_EMULATOR_XENSTORE_DATA):
            if len(body) < EMULATOR_HEADER.size:
                raise RemoteProtocolError(f"libxl {name}: body too short", at + 4)
            emulator_id, index = EMULATOR_HEADER.unpack_from(body)
            if emulator_id > EMULATOR_QEMU_UPSTREAM:
                raise RemoteProtocolError(
                    f"libxl {name}: unknown emulator_id {emulator_id}", at + 8
                )
            return EmulatorContext(
                emulator_id, index, bytes(body[8:]), rtype == REC_EMULATOR_XENSTORE_DATA
            )
        if rtype == REC_CHECKPOINT_END:
            return CheckpointEnd()
        raise RemoteProtocolError(f"unsupported libxl record {name}", at)
