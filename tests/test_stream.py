"""The libxc/libxl/xl stream layers: round trips, chunking, rules."""

from __future__ import annotations

import numpy as np
import pytest

from protocol import (
    NEED_DATA,
    LocalProtocolError,
    RemoteProtocolError,
    StreamChecker,
    libxc,
    libxl,
    xl,
)
from protocol.limits import MAX_RECORD_LENGTH, PAGE_SIZE
from tests.streams import libxc_stream, libxl_stream, page, save_file


def decode_all(decoder, data: bytes, chunk: int | None = None) -> list:
    events = []
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        while (ev := decoder.next_event()) is not NEED_DATA:
            events.append(ev)
            if decoder.done:
                break
    return events


ALL_LIBXC_EVENTS = [
    libxc.ImageHeader(),
    libxc.DomainHeader(),
    libxc.Marker(libxc.REC_STATIC_DATA_END),
    libxc.PageData(
        np.array([3, 4, 9], dtype=np.uint64),
        np.array([0, 0xF, 0], dtype=np.uint8),
        memoryview(page(3) + page(9)),
    ),
    libxc.TscInfo(1, 2, 3, 4),
    libxc.HvmContext(b"x" * 13),
    libxc.HvmParams(((1, 2), (3, 4))),
    libxc.Marker(libxc.REC_VERIFY),
    libxc.Marker(libxc.REC_CHECKPOINT),
    libxc.Marker(libxc.REC_POSTCOPY_BEGIN),
    libxc.Marker(libxc.REC_POSTCOPY_PFNS_BEGIN),
    libxc.PfnList(np.array([7, 8], dtype=np.uint64)),
    libxc.Marker(libxc.REC_POSTCOPY_TRANSITION),
    libxc.PageData(
        np.array([7], dtype=np.uint64), np.array([0], dtype=np.uint8), memoryview(page(7)), True
    ),
    libxc.PfnList(np.array([8], dtype=np.uint64), fault=True),
    libxc.Marker(libxc.REC_POSTCOPY_COMPLETE),
    libxc.END,
]


def encode_all(events) -> bytes:
    return b"".join(bytes(b) for ev in events for b in libxc.encode(ev))


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_every_libxc_record_round_trips_in_any_chunking(chunk):
    data = encode_all(ALL_LIBXC_EVENTS)
    assert decode_all(libxc.LibxcDecoder(max_pfns=16), data, chunk) == ALL_LIBXC_EVENTS


def test_records_are_8_byte_aligned_with_zero_padding():
    bufs = libxc.encode_hvm_context(b"abc")
    raw = b"".join(bufs)
    assert len(raw) == 16 and raw[8:11] == b"abc" and raw[11:] == bytes(5)


def test_image_header_is_big_endian_xenf_v3():
    raw = libxc.encode_image_header()
    assert raw[:8] == b"\xff" * 8 and raw[8:12] == b"XENF" and raw[12:16] == b"\0\0\0\x03"
    assert raw[16:] == bytes(8)
    assert libxc.encode_domain_header()[:8] == b"\x02\0\0\0\x0c\0\0\0"


def test_page_data_layout_matches_the_spec():
    raw = b"".join(libxc.encode_page_data(np.array([5, 6]), [page(5)], types=np.array([0, 0xF])))
    assert raw[:8] == (1).to_bytes(4, "little") + (8 + 8 * 2 + PAGE_SIZE).to_bytes(4, "little")
    assert raw[8:12] == (2).to_bytes(4, "little")
    assert int.from_bytes(raw[24:32], "little") == (0xF << 60) | 6


def test_page_data_encoder_sends_caller_buffers_without_copying():
    ram = bytearray(4 * PAGE_SIZE)
    view = memoryview(ram)[PAGE_SIZE:]
    bufs = libxc.encode_page_data(np.array([1, 2, 3]), [view])
    assert any(b is view for b in bufs)


def test_encoder_refuses_inconsistent_page_data():
    with pytest.raises(LocalProtocolError):
        libxc.encode_page_data(np.array([1, 2]), [page(1)])
    with pytest.raises(LocalProtocolError):
        libxc.encode_page_data(np.arange(1025), [bytes(1025 * PAGE_SIZE)])


def test_unknown_optional_record_is_skipped_unknown_mandatory_rejected():
    optional = libxc.encode_hvm_context(b"z")
    optional[0] = (0x80000042).to_bytes(4, "little") + optional[0][4:]
    events = decode_all(libxc.LibxcDecoder(), libxc_stream(extra=[optional]))
    assert libxc.SkippedRecord(0x80000042, 1) in events
    mandatory = [(0x42).to_bytes(4, "little") + bytes(4)]
    with pytest.raises(RemoteProtocolError, match="unsupported mandatory record 0x00000042"):
        decode_all(libxc.LibxcDecoder(), libxc_stream(extra=[mandatory]))


def corrupt(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


STREAM = libxc_stream()
PAGE_REC = 24 + 16 + 8  # image header, domain header, STATIC_DATA_END


@pytest.mark.parametrize(
    "data, rule",
    [
        (corrupt(STREAM, 0, b"\0"), "marker"),
        (corrupt(STREAM, 8, b"XENG"), "id"),
        (corrupt(STREAM, 12, b"\0\0\0\x09"), "version 9"),
        (corrupt(STREAM, 16, b"\0\x01"), "big-endian"),
        (corrupt(STREAM, 20, b"\x01"), "reserved"),
        (corrupt(STREAM, 24, b"\x01"), "not x86 HVM"),
        (corrupt(STREAM, 28, b"\x0d"), "page_shift"),
        (corrupt(STREAM, PAGE_REC + 4, (1 << 30).to_bytes(4, "little")), "above the limit"),
        (corrupt(STREAM, PAGE_REC + 8, bytes(4)), "count 0"),
        (corrupt(STREAM, PAGE_REC + 8, (5).to_bytes(4, "little")), "does not match"),
        (corrupt(STREAM, PAGE_REC + 12, b"\x01"), "reserved field"),
        (corrupt(STREAM, PAGE_REC + 16, (1 << 40).to_bytes(8, "little")), "outside the domain"),
        (corrupt(STREAM, PAGE_REC + 16 + 7, b"\x01"), "reserved pfn bits"),
        (corrupt(STREAM, PAGE_REC + 16 + 7, b"\x50"), "unrecognised page type"),
        (corrupt(STREAM, PAGE_REC + 16, (1 << 60 | 0xF << 60).to_bytes(8, "little")), None),
        (STREAM[:-8], "truncated"),
        (STREAM[:50], "truncated"),
        (STREAM + b"\0", "after the libxc END"),
    ],
)
def test_broken_rules_are_named_with_their_offset(data, rule):
    checker = StreamChecker("libxc", max_pfns=64)
    with pytest.raises(RemoteProtocolError) as info:
        checker.feed(data)
        checker.finish()
    if rule:
        assert rule in str(info.value)
    assert info.value.offset is not None


ONE_PAGE = libxc_stream(pfns=(5,))  # a record of one page: the decoder's own path for it
ENTRY = PAGE_REC + 16  # the record's one pfn entry


@pytest.mark.parametrize(
    "data, rule, offset",
    [
        (corrupt(ONE_PAGE, PAGE_REC + 12, b"\x01"), "reserved field", PAGE_REC + 12),
        (corrupt(ONE_PAGE, ENTRY, (64).to_bytes(8, "little")), "pfn 0x40 is outside", ENTRY),
        (corrupt(ONE_PAGE, ENTRY + 7, b"\x01"), "reserved pfn bits", ENTRY),
        (corrupt(ONE_PAGE, ENTRY + 7, b"\x50"), "unrecognised page type", ENTRY),
        # typed XTAB, which carries no data, with its 4096 octets still there
        (corrupt(ONE_PAGE, ENTRY + 7, b"\xf0"), "1 pfns with 0 data pages", PAGE_REC + 4),
    ],
)
def test_a_broken_one_page_record_is_named_like_any_other(data, rule, offset):
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(libxc.LibxcDecoder(max_pfns=64), data)
    assert rule in str(info.value)
    assert info.value.offset == offset


def test_a_one_page_record_decodes_as_read_only_arrays():
    pages = [e for e in decode_all(libxc.LibxcDecoder(), ONE_PAGE) if isinstance(e, libxc.PageData)]
    assert [int(p) for p in pages[0].pfns] == [5] and bytes(pages[0].data) == page(5)
    assert not pages[0].pfns.flags.writeable and not pages[0].types.flags.writeable


def test_pfn_limit_is_the_domain_size_when_known():
    with pytest.raises(RemoteProtocolError, match="pfn 0x5 is outside the domain"):
        decode_all(libxc.LibxcDecoder(max_pfns=5), STREAM)
    assert decode_all(libxc.LibxcDecoder(max_pfns=6), STREAM)[-1] == libxc.END


def test_record_length_above_limit_is_refused_before_buffering():
    decoder = libxc.LibxcDecoder()
    decoder.feed(
        STREAM[:PAGE_REC]
        + (1).to_bytes(4, "little")
        + (MAX_RECORD_LENGTH + 8).to_bytes(4, "little")
    )
    decoder.next_event(), decoder.next_event(), decoder.next_event()
    with pytest.raises(RemoteProtocolError, match="above the limit"):
        decoder.next_event()


def test_page_data_before_static_data_end_is_refused():
    data = STREAM.replace(b"".join(libxc.encode_marker(libxc.REC_STATIC_DATA_END)), b"", 1)
    with pytest.raises(RemoteProtocolError, match="before STATIC_DATA_END"):
        decode_all(libxc.LibxcDecoder(), data)


def test_wanted_says_how_much_the_next_event_needs():
    decoder = libxc.LibxcDecoder()
    assert decoder.wanted == 24
    decoder.feed(STREAM[:40])
    decoder.next_event(), decoder.next_event()
    assert decoder.next_event() is NEED_DATA and decoder.wanted == 8


@pytest.mark.parametrize("chunk", [None, 1, 1000])
def test_libxl_stream_with_inner_libxc_decodes_both_layers(chunk):
    events = decode_all(libxl.LibxlDecoder(), libxl_stream(), chunk)
    kinds = [type(e).__name__ for e in events]
    assert kinds[:3] == ["LibxlHeader", "LibxcContext", "ImageHeader"]
    assert libxc.END in events
    assert events[-2] == libxl.EmulatorContext(2, 0, b"qemu-state")
    assert events[-1] == libxl.LibxlEnd()


def test_libxl_decoder_can_hand_the_libxc_part_to_someone_else():
    data = libxl_stream()
    decoder = libxl.LibxlDecoder(inner=False)
    decoder.feed(data[:24])
    assert decoder.next_event() == libxl.LibxlHeader()
    assert decoder.next_event() == libxl.LibxcContext()
    # the restore helper reads exactly the libxc stream from the same fd...
    inner = libxc.LibxcDecoder()
    pos = 24
    while not inner.done:
        want = inner.wanted
        inner.feed(data[pos : pos + want])
        pos += want
        while inner.next_event() is not NEED_DATA and not inner.done:
            pass
    assert inner.trailing() == b""
    # ...and the toolstack continues after it
    decoder.resume()
    decoder.feed(data[pos:])
    assert isinstance(decoder.next_event(), libxl.EmulatorContext)
    assert decoder.next_event() == libxl.LibxlEnd()


def test_libxl_header_rules():
    good = libxl_stream()
    for offset, new, rule in [
        (0, b"X", "ident"),
        (8, b"\0\0\0\x03", "version 3"),
        (12, b"\0\0\0\x02", "legacy"),
        (12, b"\0\0\0\x01", "big-endian"),
    ]:
        with pytest.raises(RemoteProtocolError, match=rule):
            decode_all(libxl.LibxlDecoder(), corrupt(good, offset, new))


def test_every_libxl_record_round_trips():
    events = [
        libxl.LibxlHeader(),
        libxl.EmulatorContext(1, 3, b"abc", xenstore=True),
        libxl.CheckpointEnd(),
        libxl.LibxlEnd(),
    ]
    data = b"".join(libxl.encode(e) for e in events)
    assert decode_all(libxl.LibxlDecoder(), data, 3) == events


def test_xl_save_file_header_carries_the_config():
    raw = xl.encode_header(b'{"name": "vm"}')
    assert raw[:32] == b"Xen saved domain, xl format\n \0 \r"
    n = xl.header_length(raw[: xl.FIXED.size])
    assert n == len(raw)
    header = xl.decode_header(raw)
    assert header.config == b'{"name": "vm"}'
    assert header.mandatory_flags == xl.FLAG_STREAMV2 | xl.FLAG_JSON


@pytest.mark.parametrize(
    "offset, new, rule",
    [
        (0, b"Y", "bad magic"),
        (32, b"\x01\x02\x03\x04", "byte order"),
        (36, b"\x07", "mandatory flags 0x4"),
        (36, b"\x01", "legacy"),
        (44, b"\xff\xff\xff\x7f", "optional_data_len"),
    ],
)
def test_xl_header_rules(offset, new, rule):
    with pytest.raises(RemoteProtocolError, match=rule):
        checker = StreamChecker("xl")
        checker.feed(corrupt(save_file(), offset, new))
        checker.finish()


def test_checker_summarises_a_save_file():
    checker = StreamChecker()
    for i in range(0, len(data := save_file()), 333):
        checker.feed(data[i : i + 333])
    s = checker.finish()
    assert s.format == "xl" and s.pages == 4 and s.page_data_bytes == 4 * PAGE_SIZE
    assert s.records["PAGE_DATA"] == 1 and s.records["libxl END"] == 1
    assert s.context_bytes == {"HVM_CONTEXT": 8, "EMULATOR_CONTEXT": 10}
    assert b'"vm1"' in s.config


def test_checker_refuses_unknown_formats():
    with pytest.raises(RemoteProtocolError, match="not a ferry/Xen stream"):
        StreamChecker().feed(b"hello world, this is not a stream at all")


def test_a_body_read_after_its_header_is_handed_over_not_copied():
    data = STREAM
    decoder = libxc.LibxcDecoder()
    pos, bodies = 0, []
    while not decoder.done:
        chunk = bytearray(data[pos : pos + decoder.wanted])  # exact reads, like the restore helper
        pos += len(chunk)
        decoder.feed(chunk)
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, libxc.PageData):
                bodies.append((event, chunk))
            if decoder.done:
                break
    ((page_data, body_chunk),) = bodies
    assert page_data.data.obj is body_chunk  # the very bytearray the reader filled
    assert decoder.offset == len(data) and decoder.trailing() == b""
    assert bytes(page_data.data) == b"".join(page(p) for p in (0, 1, 2, 5))
