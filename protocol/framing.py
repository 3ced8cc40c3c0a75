"""The record framing shared by both migration stream layers.

libxc and libxl records look the same on the wire (little-endian here):

    type (u32) | body_length (u32) | body | zero padding to 8 octets

`RecordReader` owns the receive buffer and the byte offset; the layer
decoders (`libxc.LibxcDecoder`, `libxl.LibxlDecoder`) sit on top of it and
turn bodies into typed events.  Nothing here does I/O.
"""

from __future__ import annotations

import struct

from .errors import LocalProtocolError, RemoteProtocolError

RECORD_HEADER = struct.Struct("<II")
ALIGN = 8
_ZEROS = bytes(ALIGN)


def padding_for(length: int) -> int:
    """Octets of zero padding after a body of `length` octets."""
    return -length % ALIGN


def whole_records(data, last_types: tuple[int, ...]) -> int:
    """How many octets at the front of `data` are whole records, none after
    a record of one of `last_types` (what follows it belongs to someone
    else); 0 when not even the first record is whole.  The lengths are only
    summed here: the decoder checks each record when it is fed these octets."""
    end = 0
    while len(data) - end >= RECORD_HEADER.size:
        rtype, length = RECORD_HEADER.unpack_from(data, end)
        total = RECORD_HEADER.size + length + padding_for(length)
        if len(data) - end < total:
            break
        end += total
        if rtype in last_types:
            break
    return end


def record_buffers(rtype: int, body: list) -> list:
    """Header, body buffers and padding of one record, ready for writev."""
    length = sum(memoryview(b).nbytes for b in body)
    if length >= 1 << 32:
        raise LocalProtocolError(f"record body of {length} octets does not fit a u32 length")
    bufs = [RECORD_HEADER.pack(rtype, length), *body]
    pad = padding_for(length)
    if pad:
        bufs.append(_ZEROS[:pad])
    return bufs


class NeedData:
    """Returned by `next_event()` when more bytes are required (like h11.NEED_DATA)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class RecordReader:
    """A byte buffer fed in any chunking, with exact-size takes and an offset."""

    def __init__(self, max_record_length: int, start_offset: int = 0) -> None:
        self.max_record_length = max_record_length
        self._buf = bytearray()
        self._pos = 0
        self._base = start_offset  # stream offset of _buf[0]
        self._body: bytearray | None = None  # a handed-over body (see feed)
        # (record offset, octets after its header) while take_record waits for a body
        self._awaiting_body: tuple[int, int] | None = None
        self.eof = False
        self.wanted = 0  # octets still missing for the next step, 0 when unknown

    # -- feeding ------------------------------------------------------------
    def feed(self, data) -> None:
        if self.eof:
            raise LocalProtocolError("data fed after end of file")
        if type(data) is bytearray and self._completes_record(len(data)):
            # Exactly the body (and padding) of the record whose header is
            # buffered: keep the caller's bytearray instead of copying it.  A
            # reader that reads what `wanted` asks for hands every body over so.
            self._body = data
            return
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def _completes_record(self, size: int) -> bool:
        """take_record() is waiting for exactly `size` more octets after a
        buffered header (and nothing else is buffered)."""
        return (
            self._body is None
            and self._awaiting_body is not None
            and self._awaiting_body == (self._base + self._pos, size)
            and len(self._buf) - self._pos == RECORD_HEADER.size
        )

    def feed_eof(self) -> None:
        self.eof = True

    def skip(self, n: int) -> None:
        """`n` octets were read and decoded past this buffer (between records)."""
        if not self.between_records:
            raise LocalProtocolError("skip() inside a record")
        self._base += n

    @property
    def offset(self) -> int:
        """Stream offset of the next unread octet."""
        return self._base + self._pos

    @property
    def between_records(self) -> bool:
        """Nothing of a record is buffered: the next octet starts one."""
        return self._body is None and self._pos == len(self._buf)

    @property
    def buffered(self) -> int:
        body = 0 if self._body is None else len(self._body)
        return len(self._buf) - self._pos + body

    def take_rest(self) -> bytes:
        """Remove and return every buffered octet (for handing over to another layer)."""
        if self._body is not None:  # cannot happen between records; keep it exact anyway
            self._buf += self._body
            self._body = None
        rest = bytes(self._buf[self._pos :])
        self._base += len(self._buf)
        self._buf.clear()
        self._pos = 0
        return rest

    def restart(self, offset: int, data: bytes) -> None:
        """Continue at stream `offset` with `data` (bytes another layer read past its end)."""
        self._buf = bytearray(data)
        self._pos = 0
        self._base = offset

    # -- taking -------------------------------------------------------------
    def take(self, n: int, what: str) -> memoryview | None:
        """Return exactly n octets, or None when they have not all arrived."""
        if self.buffered < n:
            self.wanted = n - self.buffered
            if self.eof:
                raise RemoteProtocolError(
                    f"stream truncated: {what} needs {n} octets, {self.buffered} remain",
                    self.offset,
                )
            return None
        view = memoryview(self._buf)[self._pos : self._pos + n]
        # The view must not outlive a later resize of _buf; copy small parts,
        # hand big bodies over as bytes (one copy, no per-page work).
        out = memoryview(bytes(view))
        view.release()
        self._pos += n
        self.wanted = 0
        return out

    def take_record(self) -> tuple[int, memoryview, int] | None:
        """(type, body, offset of the record) for the next whole record, or None."""
        start = self.offset
        if self.buffered < RECORD_HEADER.size:
            return self._need(RECORD_HEADER.size, "record header")
        rtype, length = RECORD_HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_record_length:
            raise RemoteProtocolError(
                f"record type {rtype:#x} has body_length {length}, above the limit of "
                f"{self.max_record_length}",
                start,
            )
        total = RECORD_HEADER.size + length + padding_for(length)
        if self.buffered < total:
            self._awaiting_body = (start, total - RECORD_HEADER.size)
            return self._need(total, f"record type {rtype:#x}")
        self._awaiting_body = None
        if self._body is not None:
            whole, self._body = memoryview(self._body), None
            body, pad = whole[:length], whole[length:]
            self._pos += RECORD_HEADER.size
            self._base += len(whole)  # the handed-over octets were never in _buf
        else:
            self._pos += RECORD_HEADER.size
            body = self.take(length, "record body")
            pad = self.take(padding_for(length), "record padding")
        self.wanted = 0
        if any(pad):
            raise RemoteProtocolError(
                f"record type {rtype:#x}: padding is not zero", start + 8 + length
            )
        return rtype, body, start

    def _need(self, total: int, what: str) -> None:
        self.wanted = total - self.buffered
        if self.eof:
            raise RemoteProtocolError(
                f"stream truncated: {what} needs {total} octets, {self.buffered} remain",
                self.offset,
            )
        return None
