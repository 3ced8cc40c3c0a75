"""Check a whole stream and summarise it (what `ferry verify-stream` prints).

`StreamChecker` is sans-IO: feed it the bytes of a save file (xl format),
a libxl stream or a bare libxc stream, then call `finish()`.  It detects the
format from the first octets unless told, and raises `RemoteProtocolError`
for the first broken rule, with its offset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from . import libxc, libxl, xl
from .errors import RemoteProtocolError
from .framing import NEED_DATA
from .postcopy import ForwardRules


@dataclass
class Summary:
    format: str = ""
    records: Counter = field(default_factory=Counter)
    pages: int = 0
    page_data_bytes: int = 0
    stream_bytes: int = 0
    context_bytes: dict = field(default_factory=dict)
    config: bytes = b""
    highest_pfn: int = -1


def detect_format(prefix: bytes) -> str | None:
    """The format these first octets start, or None if too few to tell."""
    candidates = {
        "xl": xl.MAGIC,
        "libxl": libxl.HEADER.pack(libxl.IDENT, 0, 0)[:8],
        "libxc": b"\xff" * 8,
    }
    for name, magic in candidates.items():
        n = min(len(prefix), len(magic))
        if prefix[:n] == magic[:n] and n == len(magic):
            return name
    if len(prefix) >= 32:
        raise RemoteProtocolError("not a ferry/Xen stream: no xl, libxl or libxc header", 0)
    return None


class StreamChecker:
    def __init__(self, fmt: str | None = None, max_pfns: int | None = None) -> None:
        self.summary = Summary(format=fmt or "")
        self._max_pfns = max_pfns
        self._pending = bytearray()  # bytes before the format (or xl header) is known
        self._xl_done = fmt != "xl"
        self._decoder = None
        self.postcopy = ForwardRules()  # a captured postcopy stream follows its order too
        if fmt and fmt != "xl":
            self._start(fmt)

    def _start(self, fmt: str, offset: int = 0) -> None:
        if fmt == "libxc":
            self._decoder = libxc.LibxcDecoder(self._max_pfns)
        else:
            self._decoder = libxl.LibxlDecoder(
                inner=True, max_pfns=self._max_pfns, start_offset=offset
            )

    def feed(self, data) -> None:
        self.summary.stream_bytes += len(data)
        if self._decoder is None:
            self._pending += data
            self._prelude()
            return
        self._decoder.feed(data)
        self._drain()

    def _prelude(self) -> None:
        if not self.summary.format:
            fmt = detect_format(bytes(self._pending[:32]))
            if fmt is None:
                return
            self.summary.format = fmt
            self._xl_done = fmt != "xl"
        if not self._xl_done:
            if len(self._pending) < xl.FIXED.size:
                return
            total = xl.header_length(bytes(self._pending[: xl.FIXED.size]))
            if len(self._pending) < total:
                return
            header = xl.decode_header(bytes(self._pending[:total]))
            self.summary.config = header.config
            del self._pending[:total]
            self._xl_done = True
            self._start("libxl", offset=total)
        else:
            self._start(self.summary.format)
        rest, self._pending = bytes(self._pending), bytearray()
        self._decoder.feed(rest)
        self._drain()

    def _drain(self) -> None:
        decoder = self._decoder
        while not decoder.done:
            at = decoder.offset
            event = decoder.next_event()
            if event is NEED_DATA:
                return
            self.postcopy.event(event, at)
            self._count(event)
            if decoder.done:
                if isinstance(decoder, libxc.LibxcDecoder):
                    extra = decoder.trailing()
                    if extra:
                        raise RemoteProtocolError("data after the libxc END record", decoder.offset)
                elif decoder.buffered:
                    raise RemoteProtocolError("data after the libxl END record", decoder.offset)

    def _count(self, event) -> None:
        s = self.summary
        match event:
            case libxc.PageData():
                s.records["PAGE_DATA" if not event.postcopy else "POSTCOPY_PAGE_DATA"] += 1
                s.pages += len(event.pfns)
                s.page_data_bytes += len(event.data)
                s.highest_pfn = max(s.highest_pfn, int(event.pfns.max()))
            case libxc.Marker():
                s.records["libxc " + event.name if event.type == libxc.REC_END else event.name] += 1
            case libxc.HvmContext():
                s.records["HVM_CONTEXT"] += 1
                s.context_bytes["HVM_CONTEXT"] = len(event.blob)
            case libxc.SkippedRecord():
                s.records[f"optional {event.type:#x} (skipped)"] += 1
            case libxl.EmulatorContext():
                s.records["EMULATOR_CONTEXT"] += 1
                s.context_bytes["EMULATOR_CONTEXT"] = len(event.blob)
            case libxc.TscInfo():
                s.records["X86_TSC_INFO"] += 1
            case libxc.HvmParams():
                s.records["HVM_PARAMS"] += 1
            case libxc.PfnList():
                s.records[libxc.record_name(event.record_type)] += 1
            case libxl.LibxlEnd():
                s.records["libxl END"] += 1
            case _:  # the headers and LIBXC_CONTEXT: once each, counted by their class
                s.records[type(event).__name__] += 1

    def finish(self) -> Summary:
        if self._decoder is None:
            self._prelude()
            if self._decoder is None:
                raise RemoteProtocolError(
                    f"stream truncated: {len(self._pending)} octets, no complete header", 0
                )
        self._decoder.feed_eof()
        self._drain()
        if not self._decoder.done:
            raise RemoteProtocolError("stream truncated: no END record", self._decoder.offset)
        return self.summary
