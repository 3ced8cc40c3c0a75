"""The libxc-layer migration stream (Xen's "LibXenCtrl Domain Image Format", v3).

    image header   marker 0xFFFFFFFFFFFFFFFF, id "XENF", version 3, options;
                   all big-endian
    domain header  type (x86 HVM = 2), page_shift (12), xen_major, xen_minor
    records        type | body_length | body | zero padding to 8 octets

The helper writes this stream; the restore helper and `ferry verify-stream`
read it with `LibxcDecoder`.  Encoders return lists of buffers so that page
data goes to `os.writev`/`socket.sendmsg` straight out of guest RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import limits
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import NEED_DATA, NeedData, RecordReader, record_buffers

# -- numbers from the spec ---------------------------------------------------
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_OPT_BIG_ENDIAN = 0x0001
IMAGE_HEADER = struct.Struct(">QIIHHI")  # marker, id, version, options, 2 reserved

DHDR_TYPE_X86_HVM = 0x0002
DOMAIN_HEADER = struct.Struct("<IHHII")  # type, page_shift, reserved, major, minor
XEN_MAJOR, XEN_MINOR = 4, 19

REC_END = 0x00000000
REC_PAGE_DATA = 0x00000001
REC_X86_TSC_INFO = 0x00000008
REC_HVM_CONTEXT = 0x00000009
REC_HVM_PARAMS = 0x0000000A
REC_VERIFY = 0x0000000D
REC_CHECKPOINT = 0x0000000E
REC_STATIC_DATA_END = 0x00000010

# Postcopy records.  Upstream Xen allocates mandatory record types
# sequentially from 0 (0x10-0x12 are STATIC_DATA_END and the x86 CPUID/MSR
# policies today), and the out-of-tree postcopy series used 0x10 onwards,
# which now collide.  ferry takes a block far above anything sequential:
# 0x00FE0000 + n.  They are mandatory: a reader that does not know postcopy
# must refuse the stream.
REC_POSTCOPY_BEGIN = 0x00FE0000  # empty: precopy is over, postcopy follows
REC_POSTCOPY_PFNS_BEGIN = 0x00FE0001  # empty: a list of pfns to fetch lazily follows
REC_POSTCOPY_PFNS = 0x00FE0002  # count u32, reserved u32, pfn u64[count]
REC_POSTCOPY_TRANSITION = 0x00FE0003  # empty: the destination may resume the guest
REC_POSTCOPY_PAGE_DATA = 0x00FE0004  # same layout as PAGE_DATA
REC_POSTCOPY_FAULT = 0x00FE0005  # destination -> source: count, reserved, pfn u64[count]
REC_POSTCOPY_COMPLETE = 0x00FE0006  # empty: every postcopy pfn has been sent
# Recovery (a postcopy whose link broke, resumed over a new one): the
# destination lists the pfns it still lacks, then ends the list.
REC_POSTCOPY_RESUME = 0x00FE0007  # destination -> source: count, reserved, pfn u64[count]
REC_POSTCOPY_RESUME_END = 0x00FE0008  # empty: the list is complete

REC_OPTIONAL = 0x80000000

RECORD_NAMES = {
    REC_END: "END",
    REC_PAGE_DATA: "PAGE_DATA",
    0x02: "X86_PV_INFO",
    0x03: "X86_PV_P2M_FRAMES",
    0x04: "X86_PV_VCPU_BASIC",
    0x05: "X86_PV_VCPU_EXTENDED",
    0x06: "X86_PV_VCPU_XSAVE",
    0x07: "SHARED_INFO",
    REC_X86_TSC_INFO: "X86_TSC_INFO",
    REC_HVM_CONTEXT: "HVM_CONTEXT",
    REC_HVM_PARAMS: "HVM_PARAMS",
    0x0B: "TOOLSTACK",
    0x0C: "X86_PV_VCPU_MSRS",
    REC_VERIFY: "VERIFY",
    REC_CHECKPOINT: "CHECKPOINT",
    0x0F: "CHECKPOINT_DIRTY_PFN_LIST",
    REC_STATIC_DATA_END: "STATIC_DATA_END",
    0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
    REC_POSTCOPY_BEGIN: "POSTCOPY_BEGIN",
    REC_POSTCOPY_PFNS_BEGIN: "POSTCOPY_PFNS_BEGIN",
    REC_POSTCOPY_PFNS: "POSTCOPY_PFNS",
    REC_POSTCOPY_TRANSITION: "POSTCOPY_TRANSITION",
    REC_POSTCOPY_PAGE_DATA: "POSTCOPY_PAGE_DATA",
    REC_POSTCOPY_FAULT: "POSTCOPY_FAULT",
    REC_POSTCOPY_COMPLETE: "POSTCOPY_COMPLETE",
    REC_POSTCOPY_RESUME: "POSTCOPY_RESUME",
    REC_POSTCOPY_RESUME_END: "POSTCOPY_RESUME_END",
}

# PAGE_DATA pfn entries: type in bits 63-60, reserved 59-52, pfn 51-0.
PFN_MASK = (1 << 52) - 1
PFN_RESERVED_MASK = 0xFF << 52
TYPE_SHIFT = 60
PAGE_TYPE_NOTAB = 0x0
PAGE_TYPE_BROKEN = 0xD
PAGE_TYPE_XALLOC = 0xE
PAGE_TYPE_XTAB = 0xF
_NO_DATA_TYPES = (PAGE_TYPE_BROKEN, PAGE_TYPE_XALLOC, PAGE_TYPE_XTAB)
_RESERVED_TYPES = (0x5, 0x6, 0x7, 0x8)
# Lookup tables by the 4-bit type (np.isin costs ~25 us even for one page,
# and a postcopy page's whole budget is a few hundred): HAS_NO_DATA[types].
HAS_NO_DATA = np.isin(np.arange(16), _NO_DATA_TYPES)
_IS_RESERVED = np.isin(np.arange(16), _RESERVED_TYPES)

PAGE_DATA_HEADER = struct.Struct("<II")  # count, reserved
ONE_ENTRY = struct.Struct("<IIQ")  # count (1), reserved, the one pfn entry
# A record of one entry, header included: a postcopy fault (24 octets) or
# its answer (24 + a page).  Its decoding below uses no numpy: on a helper
# the kernel has just woken, every module touched costs cache misses, and
# a fault's round trip is made of such wake-ups.
ONE_RECORD = struct.Struct("<IIIIQ")  # type, body_length, count (1), reserved, entry
ONE_FAULT_OCTETS = ONE_RECORD.size
ONE_PAGE_OCTETS = ONE_RECORD.size + limits.PAGE_SIZE
_DATA_TYPES = frozenset(t for t in range(16) if not HAS_NO_DATA[t] and not _IS_RESERVED[t])
TSC_INFO = struct.Struct("<IIQII")  # mode, khz, nsec, incarnation, reserved
HVM_PARAM = struct.Struct("<QQ")


def record_name(rtype: int) -> str:
    return RECORD_NAMES.get(rtype, f"{rtype:#010x}")


# -- events ------------------------------------------------------------------
@dataclass(frozen=True)
class ImageHeader:
    version: int = IHDR_VERSION


@dataclass(frozen=True)
class DomainHeader:
    type: int = DHDR_TYPE_X86_HVM
    page_shift: int = limits.PAGE_SHIFT
    xen_major: int = XEN_MAJOR
    xen_minor: int = XEN_MINOR


@dataclass(frozen=True, eq=False)
class PageData:
    """A batch of pages.  `pfns` and `types` are read-only arrays; `data`
    holds PAGE_SIZE octets for each pfn whose type carries data, in order."""

    pfns: np.ndarray
    types: np.ndarray
    data: memoryview
    postcopy: bool = False

    @property
    def data_pfns(self) -> np.ndarray:
        return self.pfns[~HAS_NO_DATA[self.types]]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PageData)
            and self.postcopy == other.postcopy
            and np.array_equal(self.pfns, other.pfns)
            and np.array_equal(self.types, other.types)
            and bytes(self.data) == bytes(other.data)
        )


@dataclass(frozen=True)
class TscInfo:
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0


@dataclass(frozen=True)
class HvmContext:
    blob: bytes


@dataclass(frozen=True)
class HvmParams:
    params: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class PfnList:
    """POSTCOPY_PFNS (source -> destination), POSTCOPY_FAULT or POSTCOPY_RESUME
    (destination -> source)."""

    pfns: np.ndarray
    fault: bool = False
    resume: bool = False

    @property
    def record_type(self) -> int:
        if self.resume:
            return REC_POSTCOPY_RESUME
        return REC_POSTCOPY_FAULT if self.fault else REC_POSTCOPY_PFNS

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PfnList)
            and self.record_type == other.record_type
            and np.array_equal(self.pfns, other.pfns)
        )


@dataclass(frozen=True)
class Marker:
    """A record with an empty body: END, VERIFY, CHECKPOINT, STATIC_DATA_END
    and the postcopy phase markers."""

    type: int

    @property
    def name(self) -> str:
        return record_name(self.type)


@dataclass(frozen=True)
class SkippedRecord:
    """An optional record (bit 31 set) this reader does not know."""

    type: int
    length: int


EMPTY_RECORDS = (
    REC_END,
    REC_VERIFY,
    REC_CHECKPOINT,
    REC_STATIC_DATA_END,
    REC_POSTCOPY_BEGIN,
    REC_POSTCOPY_PFNS_BEGIN,
    REC_POSTCOPY_TRANSITION,
    REC_POSTCOPY_COMPLETE,
    REC_POSTCOPY_RESUME_END,
)
END = Marker(REC_END)

Event = (
    ImageHeader
    | DomainHeader
    | PageData
    | TscInfo
    | HvmContext
    | HvmParams
    | PfnList
    | Marker
    | SkippedRecord
)


# -- encoding ----------------------------------------------------------------
def encode_image_header() -> bytes:
    return IMAGE_HEADER.pack(IHDR_MARKER, IHDR_ID, IHDR_VERSION, 0, 0, 0)


def encode_domain_header(hdr: DomainHeader | None = None) -> bytes:
    hdr = hdr or DomainHeader()
    return DOMAIN_HEADER.pack(hdr.type, hdr.page_shift, 0, hdr.xen_major, hdr.xen_minor)


def encode_page_data(pfns: np.ndarray, pages: list, types=None, postcopy=False) -> list:
    """PAGE_DATA for `pfns`, page contents given as buffers (any split: one
    buffer per page, per run of pages, or one for all).  No page is copied."""
    count = len(pfns)
    rtype = REC_POSTCOPY_PAGE_DATA if postcopy else REC_PAGE_DATA
    if (
        count == 1
        and types is None
        and sum(memoryview(p).nbytes for p in pages) == limits.PAGE_SIZE
    ):
        # one page with its data (a postcopy fault's answer): no numpy
        return [ONE_RECORD.pack(rtype, ONE_PAGE_OCTETS - 8, 1, 0, int(pfns[0])), *pages]
    if not 0 < count <= limits.MAX_BATCH_PAGES:
        raise LocalProtocolError(f"PAGE_DATA needs 1..{limits.MAX_BATCH_PAGES} pages, got {count}")
    entries = np.asarray(pfns, dtype=np.uint64)
    n_data = count
    if types is not None:
        types = np.asarray(types, dtype=np.uint64)
        entries = entries | (types << np.uint64(TYPE_SHIFT))
        n_data = len(types) - int(np.count_nonzero(HAS_NO_DATA[types]))
    data_len = sum(memoryview(p).nbytes for p in pages)
    if data_len != n_data * limits.PAGE_SIZE:
        raise LocalProtocolError(
            f"PAGE_DATA: {n_data} pages carry data but {data_len} octets given"
        )
    head = PAGE_DATA_HEADER.pack(count, 0)
    return record_buffers(rtype, [head, entries.astype("<u8").tobytes(), *pages])


def page_data_size(pages: int) -> int:
    """Stream octets of `pages` data pages sent in full PAGE_DATA batches."""
    records = -(-pages // limits.MAX_BATCH_PAGES)
    return records * 16 + pages * (8 + limits.PAGE_SIZE)


def encode_one_page(pfn: int, page) -> list:
    """POSTCOPY_PAGE_DATA of one page with its data: `encode_page_data`
    for a fault's answer, without numpy (see ONE_RECORD)."""
    return [ONE_RECORD.pack(REC_POSTCOPY_PAGE_DATA, ONE_PAGE_OCTETS - 8, 1, 0, pfn), page]


def encode_pfn_list(pfns, fault: bool = False, resume: bool = False) -> list:
    rtype = PfnList(pfns, fault, resume).record_type
    if len(pfns) == 1:  # one fault (the common case): no numpy
        return [ONE_RECORD.pack(rtype, ONE_FAULT_OCTETS - 8, 1, 0, int(pfns[0]))]
    pfns = np.asarray(pfns, dtype="<u8")
    return record_buffers(rtype, [PAGE_DATA_HEADER.pack(len(pfns), 0), pfns.tobytes()])


def encode_tsc_info(tsc: TscInfo) -> list:
    return record_buffers(
        REC_X86_TSC_INFO, [TSC_INFO.pack(tsc.mode, tsc.khz, tsc.nsec, tsc.incarnation, 0)]
    )


def encode_hvm_context(blob: bytes) -> list:
    return record_buffers(REC_HVM_CONTEXT, [blob])


def encode_hvm_params(params) -> list:
    body = [PAGE_DATA_HEADER.pack(len(params), 0)]
    body += [HVM_PARAM.pack(index, value) for index, value in params]
    return record_buffers(REC_HVM_PARAMS, body)


def encode_marker(rtype: int) -> list:
    if rtype not in EMPTY_RECORDS:
        raise LocalProtocolError(f"{record_name(rtype)} is not an empty record")
    return record_buffers(rtype, [])


def encode(event: Event) -> list:
    """Any libxc event back to its buffers (used by tests and tools)."""
    match event:
        case ImageHeader():
            return [encode_image_header()]
        case DomainHeader():
            return [encode_domain_header(event)]
        case PageData():
            return encode_page_data(event.pfns, [event.data], event.types, event.postcopy)
        case PfnList():
            return encode_pfn_list(event.pfns, event.fault, event.resume)
        case TscInfo():
            return encode_tsc_info(event)
        case HvmContext():
            return encode_hvm_context(event.blob)
        case HvmParams():
            return encode_hvm_params(event.params)
        case Marker():
            return encode_marker(event.type)
    raise LocalProtocolError(f"cannot encode {event!r}")


# -- decoding ----------------------------------------------------------------
class LibxcDecoder:
    """Feed bytes with `feed()` (any chunking), read events with `next_event()`.

    `max_pfns` is the domain's page count when known: pfns at or above it are
    refused.  `records_only` starts at the records, past the static section
    (no image or domain header: the destination's POSTCOPY_FAULT/COMPLETE
    records to the source, or an extra connection's PAGE_DATA).  After END, `next_event()` keeps returning END's marker and
    `trailing()` hands back whatever was fed past it (the libxl layer's next
    record).  `wanted` says how many more octets the next event needs, so a
    reader sharing its fd with another layer can read exactly that much.
    """

    def __init__(
        self,
        max_pfns: int | None = None,
        max_record_length: int = limits.MAX_RECORD_LENGTH,
        start_offset: int = 0,
        records_only: bool = False,
    ) -> None:
        self.max_pfns = limits.MAX_PFN + 1 if max_pfns is None else max_pfns
        self._reader = RecordReader(max_record_length, start_offset)
        # records_only: the postcopy return direction, records without headers
        self._state = "records" if records_only else "image-header"
        self._seen_static_end = records_only  # records only: past the static section
        self._seen_pages = False
        self.version = IHDR_VERSION

    def feed(self, data) -> None:
        self._reader.feed(data)

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    @property
    def offset(self) -> int:
        return self._reader.offset

    @property
    def wanted(self) -> int:
        if self._state == "image-header" and self._reader.buffered < IMAGE_HEADER.size:
            return IMAGE_HEADER.size - self._reader.buffered
        return self._reader.wanted or 8

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def between_records(self) -> bool:
        """Past the headers and nothing of a record buffered: octets that
        start with whole records (`framing.whole_records`) may be fed."""
        return self._state == "records" and self._reader.between_records

    # -- one-entry records, the postcopy fault path ---------------------------
    def one_fault(self, data) -> int | None:
        """The pfn when `data` is exactly one POSTCOPY_FAULT record of one pfn
        inside the domain, read between records; None for anything else,
        which `feed` then takes (and refuses with the rule it breaks): only a
        record that passes every check comes here.  Once the caller has
        acted on it, `took(data)` moves the stream past it."""
        pfn = self._one_entry_record(data, REC_POSTCOPY_FAULT, ONE_FAULT_OCTETS)
        return pfn if pfn is not None and pfn < self.max_pfns else None

    def one_page(self, data) -> int | None:
        """The pfn when `data` is exactly one POSTCOPY_PAGE_DATA record of one
        page with its data (data[ONE_RECORD.size:]), inside the domain, read
        between records; None for anything else (see `one_fault`)."""
        entry = self._one_entry_record(data, REC_POSTCOPY_PAGE_DATA, ONE_PAGE_OCTETS)
        if (
            entry is None
            or entry & PFN_RESERVED_MASK
            or (entry >> TYPE_SHIFT) not in _DATA_TYPES
            or (entry & PFN_MASK) >= self.max_pfns
        ):
            return None
        return entry & PFN_MASK

    def _one_entry_record(self, data, rtype: int, octets: int) -> int | None:
        """The entry of a whole `rtype` record of `octets` listing one entry,
        read between records (header, count and reserved field checked)."""
        if len(data) != octets or not self.between_records:
            return None
        found, length, count, reserved, entry = ONE_RECORD.unpack_from(data)
        if found != rtype or length != octets - 8 or count != 1 or reserved:
            return None
        return entry

    def took(self, data) -> None:
        """`data`, a record `one_fault` or `one_page` accepted, was acted on."""
        self._reader.skip(len(data))
        self._seen_pages = self._seen_pages or len(data) == ONE_PAGE_OCTETS

    def trailing(self) -> bytes:
        if not self.done:
            raise LocalProtocolError("trailing() before END")
        return self._reader.take_rest()

    def next_event(self) -> Event | NeedData:
        if self._state == "image-header":
            return self._image_header()
        if self._state == "domain-header":
            return self._domain_header()
        if self._state == "done":
            return END
        got = self._reader.take_record()
        if got is None:
            return NEED_DATA
        return self._record(*got)

    # -- headers -------------------------------------------------------------
    def _image_header(self):
        at = self.offset
        raw = self._reader.take(IMAGE_HEADER.size, "image header")
        if raw is None:
            return NEED_DATA
        marker, ident, version, options, res1, res2 = IMAGE_HEADER.unpack(raw)
        if marker != IHDR_MARKER:
            raise RemoteProtocolError("image header: marker is not 0xFFFFFFFFFFFFFFFF", at)
        if ident != IHDR_ID:
            raise RemoteProtocolError(f"image header: id {ident:#x} is not 'XENF'", at + 8)
        if version not in (2, 3):
            raise RemoteProtocolError(f"image header: version {version} is not 2 or 3", at + 12)
        if options & IHDR_OPT_BIG_ENDIAN:
            raise RemoteProtocolError("image header: big-endian streams are not supported", at + 16)
        if options & ~IHDR_OPT_BIG_ENDIAN or res1 or res2:
            raise RemoteProtocolError("image header: reserved bits are not zero", at + 16)
        self.version = version
        self._state = "domain-header"
        return ImageHeader(version)

    def _domain_header(self):
        at = self.offset
        raw = self._reader.take(DOMAIN_HEADER.size, "domain header")
        if raw is None:
            return NEED_DATA
        dtype, page_shift, reserved, major, minor = DOMAIN_HEADER.unpack(raw)
        if dtype != DHDR_TYPE_X86_HVM:
            raise RemoteProtocolError(f"domain header: type {dtype} is not x86 HVM (2)", at)
        if page_shift != limits.PAGE_SHIFT:
            raise RemoteProtocolError(f"domain header: page_shift {page_shift} is not 12", at + 4)
        if reserved:
            raise RemoteProtocolError("domain header: reserved field is not zero", at + 6)
        self._state = "records"
        return DomainHeader(dtype, page_shift, major, minor)

    # -- records -------------------------------------------------------------
    def _record(self, rtype: int, body: memoryview, at: int):
        name = record_name(rtype)
        if rtype in EMPTY_RECORDS:
            if len(body):
                raise RemoteProtocolError(f"{name}: body_length {len(body)} is not 0", at + 4)
            if rtype == REC_STATIC_DATA_END:
                if self._seen_static_end or self._seen_pages:
                    raise RemoteProtocolError(
                        "STATIC_DATA_END must come once, before any PAGE_DATA", at
                    )
                self._seen_static_end = True
            if rtype == REC_END:
                self._state = "done"
            return Marker(rtype)
        if rtype in (REC_PAGE_DATA, REC_POSTCOPY_PAGE_DATA):
            if self.version >= 3 and not self._seen_static_end and rtype == REC_PAGE_DATA:
                raise RemoteProtocolError("PAGE_DATA before STATIC_DATA_END", at)
            self._seen_pages = True
            return self._page_data(rtype, body, at)
        if rtype in (REC_POSTCOPY_PFNS, REC_POSTCOPY_FAULT, REC_POSTCOPY_RESUME):
            pfns = self._pfn_array(name, body, at)
            return PfnList(pfns, rtype == REC_POSTCOPY_FAULT, rtype == REC_POSTCOPY_RESUME)
        if rtype == REC_X86_TSC_INFO:
            if len(body) != TSC_INFO.size:
                raise RemoteProtocolError(
                    f"X86_TSC_INFO: body_length {len(body)} is not 24", at + 4
                )
            mode, khz, nsec, incarnation, reserved = TSC_INFO.unpack(body)
            if reserved:
                raise RemoteProtocolError("X86_TSC_INFO: reserved field is not zero", at + 28)
            return TscInfo(mode, khz, nsec, incarnation)
        if rtype == REC_HVM_CONTEXT:
            if not len(body):
                raise RemoteProtocolError("HVM_CONTEXT: empty context", at)
            return HvmContext(bytes(body))
        if rtype == REC_HVM_PARAMS:
            return self._hvm_params(body, at)
        if rtype & REC_OPTIONAL:
            return SkippedRecord(rtype, len(body))
        raise RemoteProtocolError(f"unsupported mandatory record {name}", at)

    def _counted_header(self, name: str, body: memoryview, at: int, item: int) -> int:
        if len(body) < PAGE_DATA_HEADER.size:
            raise RemoteProtocolError(f"{name}: body of {len(body)} octets has no count", at + 4)
        count, reserved = PAGE_DATA_HEADER.unpack_from(body)
        if reserved:
            raise RemoteProtocolError(f"{name}: reserved field is not zero", at + 12)
        if count == 0 or count > limits.MAX_BATCH_PAGES:
            raise RemoteProtocolError(
                f"{name}: count {count} is not within 1..{limits.MAX_BATCH_PAGES}", at + 8
            )
        if len(body) < PAGE_DATA_HEADER.size + count * item:
            raise RemoteProtocolError(
                f"{name}: count {count} does not fit body_length {len(body)}", at + 8
            )
        return count

    def _pfn_array(self, name: str, body: memoryview, at: int) -> np.ndarray:
        count = self._counted_header(name, body, at, 8)
        if len(body) != 8 + 8 * count:
            raise RemoteProtocolError(
                f"{name}: body_length {len(body)} does not match count {count}", at + 4
            )
        if count == 1:  # one fault (the common case): no numpy until the result
            pfn = ONE_ENTRY.unpack_from(body)[2]
            if pfn >= self.max_pfns:
                raise self._outside(name, pfn, at)
            pfns = np.array([pfn], np.uint64)
            pfns.flags.writeable = False  # as a view of a received body is
            return pfns
        pfns = np.frombuffer(body, dtype="<u8", count=count, offset=8)
        self._check_pfns(name, pfns, at)
        return pfns

    def _check_pfns(self, name: str, pfns: np.ndarray, at: int) -> None:
        too_big = pfns >= self.max_pfns
        if too_big.any():
            raise self._outside(name, int(pfns[too_big][0]), at)

    def _outside(self, name: str, pfn: int, at: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"{name}: pfn {pfn:#x} is outside the domain ({self.max_pfns} pages)", at + 16
        )

    def _page_data(self, rtype: int, body: memoryview, at: int) -> PageData:
        name = record_name(rtype)
        count = self._counted_header(name, body, at, 8)
        if count == 1:  # a postcopy fault's answer, the common case there: no numpy
            pfns, types, n_data = self._one_entry(name, body, at)
        else:
            pfns, types, n_data = self._entries(name, body, count, at)
        expected = 8 + 8 * count + n_data * limits.PAGE_SIZE
        if len(body) != expected:
            raise RemoteProtocolError(
                f"{name}: body_length {len(body)} does not match {count} pfns with "
                f"{n_data} data pages ({expected} octets)",
                at + 4,
            )
        pfns.flags.writeable = False
        types.flags.writeable = False
        return PageData(pfns, types, body[8 + 8 * count :], rtype == REC_POSTCOPY_PAGE_DATA)

    def _entries(self, name: str, body: memoryview, count: int, at: int):
        """The pfns, the types and how many pages carry data, each entry checked."""
        entries = np.frombuffer(body, dtype="<u8", count=count, offset=8)
        if (entries & np.uint64(PFN_RESERVED_MASK)).any():
            raise self._reserved_bits(name, at)
        types = (entries >> np.uint64(TYPE_SHIFT)).astype(np.uint8)
        if _IS_RESERVED[types].any():
            raise self._unknown_type(name, at)
        pfns = entries & np.uint64(PFN_MASK)
        self._check_pfns(name, pfns, at)
        return pfns, types, len(types) - int(np.count_nonzero(HAS_NO_DATA[types]))

    def _one_entry(self, name: str, body: memoryview, at: int):
        """_entries for a record of one page, the same checks in the same order."""
        entry = ONE_ENTRY.unpack_from(body)[2]
        if entry & PFN_RESERVED_MASK:
            raise self._reserved_bits(name, at)
        ptype = entry >> TYPE_SHIFT
        if _IS_RESERVED[ptype]:
            raise self._unknown_type(name, at)
        pfn = entry & PFN_MASK
        if pfn >= self.max_pfns:
            raise self._outside(name, pfn, at)
        pfns, types = np.array([pfn], np.uint64), np.array([ptype], np.uint8)
        return pfns, types, 0 if HAS_NO_DATA[ptype] else 1

    @staticmethod
    def _reserved_bits(name: str, at: int) -> RemoteProtocolError:
        return RemoteProtocolError(f"{name}: reserved pfn bits 52-59 are not zero", at + 16)

    @staticmethod
    def _unknown_type(name: str, at: int) -> RemoteProtocolError:
        return RemoteProtocolError(f"{name}: unrecognised page type", at + 16)

    def _hvm_params(self, body: memoryview, at: int) -> HvmParams:
        if len(body) < 8:
            raise RemoteProtocolError("HVM_PARAMS: body has no count", at + 4)
        count, reserved = PAGE_DATA_HEADER.unpack_from(body)
        if reserved:
            raise RemoteProtocolError("HVM_PARAMS: reserved field is not zero", at + 12)
        if len(body) != 8 + 16 * count:
            raise RemoteProtocolError(
                f"HVM_PARAMS: body_length {len(body)} does not match count {count}", at + 4
            )
        params = tuple(HVM_PARAM.iter_unpack(body[8:]))
        return HvmParams(params)
