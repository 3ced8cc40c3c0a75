"""The postcopy stream's rules, sans-IO: protocol/postcopy.py's ForwardRules
(source -> destination) and ReturnRules (destination -> source) over
protocol/libxc.py's LibxcDecoder, as the helpers use them.

Each rule is broken once by hand (the error names it, at the offending
record's offset); random valid postcopy streams are accepted in any chunking
with every page delivered once; random corruptions of them, random record
sequences and mutated bytes raise nothing but RemoteProtocolError, within a
bounded number of steps and bounded memory.  `ferry verify-stream` checks a
postcopy stream built here too."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, RemoteProtocolError, libxc, libxl
from protocol.limits import MAX_BATCH_PAGES
from protocol.pfnsets import position
from protocol.postcopy import ENDED, ForwardRules, ReturnRules
from tests.streams import check_stream, page

PAGES = 64  # the domain's size in these streams
FUZZ = settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


# -- building streams ------------------------------------------------------------------
def raw(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def marker(rtype: int) -> bytes:
    return raw(libxc.encode_marker(rtype))


def pages(pfns, postcopy=False) -> bytes:
    pfns = np.asarray(pfns, np.uint64)
    return raw(libxc.encode_page_data(pfns, [page(int(p)) for p in pfns], postcopy=postcopy))


def pfn_list(pfns, fault=False, resume=False) -> bytes:
    return raw(libxc.encode_pfn_list(np.asarray(pfns, np.uint64), fault=fault, resume=resume))


HEADERS = libxc.encode_image_header() + libxc.encode_domain_header()
CONTEXT = [
    raw(libxc.encode_tsc_info(libxc.TscInfo(1, 2_000_000, 3, 0))),
    raw(libxc.encode_hvm_context(b"vcpu")),
    raw(libxc.encode_hvm_params([(1, 7)])),
]


def postcopy_records(precopy=(0, 1, 2, 3), pset=(4, 5, 9, 10, 11), lists=None, sends=None):
    """The records of a valid libxc postcopy stream (the headers first).
    `lists`: how the set is announced (POSTCOPY_PFNS records); `sends`: the
    POSTCOPY_PAGE_DATA records, in order (default: each pfn alone, in order)."""
    records = [HEADERS, marker(libxc.REC_STATIC_DATA_END)]
    if len(precopy):
        records.append(pages(precopy))
    records += [marker(libxc.REC_POSTCOPY_BEGIN), *CONTEXT, marker(libxc.REC_POSTCOPY_PFNS_BEGIN)]
    for listed in [list(pset)] if lists is None else lists:
        if len(listed):
            records.append(pfn_list(listed))
    records.append(marker(libxc.REC_POSTCOPY_TRANSITION))
    for batch in [[p] for p in pset] if sends is None else sends:
        records.append(pages(batch, postcopy=True))
    records.append(marker(libxc.REC_END))
    return records


def offset_of(records, index: int) -> int:
    return sum(len(r) for r in records[:index])


def index_of(records, rtype: int) -> int:
    for i, r in enumerate(records[1:], 1):
        if int.from_bytes(r[:4], "little") == rtype:
            return i
    raise ValueError(rtype)


# -- reading them as the helpers do -----------------------------------------------------
def forward(data: bytes, chunks=None, max_pfns=PAGES, exact=False):
    """Decode `data` and check it with ForwardRules, fed in `chunks` (sizes,
    cycled), or (`exact`) as the restore helper reads: exactly what the
    decoder wants, each time a fresh bytearray.  Returns (rules, events)."""
    decoder = libxc.LibxcDecoder(max_pfns=max_pfns)
    rules = ForwardRules()
    events: list = []
    bound = len(data) // 8 + 4  # every event takes octets: more events than this is a loop
    position, turn = 0, 0

    def drain():
        while not decoder.done:
            at = decoder.offset
            event = decoder.next_event()
            if event is NEED_DATA:
                return
            rules.event(event, at)
            events.append(event)
            assert len(events) <= bound, "the decoder keeps producing events"

    while position < len(data) and not decoder.done:
        if exact:
            size = decoder.wanted
        else:
            size = chunks[turn % len(chunks)] if chunks else len(data)
            turn += 1
        piece = data[position : position + size]
        position += len(piece)
        decoder.feed(bytearray(piece) if exact else piece)
        drain()
    if not decoder.done:
        decoder.feed_eof()
        drain()
    return rules, events


def returned(data: bytes, resumed=False, chunk=None, max_pfns=PAGES):
    """The destination's records checked as the source does: the faulted pfns."""
    decoder = libxc.LibxcDecoder(max_pfns=max_pfns, records_only=True)
    rules = ReturnRules(resumed)
    faults = []
    steps, bound = 0, len(data) // 8 + 2
    chunk = chunk or max(1, len(data))
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        while (event := decoder.next_event()) is not NEED_DATA:
            pfns = rules.event(event, decoder.offset)
            if pfns is not None:
                faults.append([int(p) for p in pfns])
            steps += 1
            assert steps <= bound, "the decoder keeps producing events"
            if decoder.done:
                return rules, faults
    return rules, faults


# -- the forward rules, one at a time --------------------------------------------------------
def test_a_valid_postcopy_stream_is_accepted_and_every_page_arrives_once():
    records = postcopy_records(lists=[[11, 4], [10, 9, 5]], sends=[[9], [4, 5], [10, 11]])
    for chunks in (None, [1], [7, 3], [4096]):
        rules, events = forward(b"".join(records), chunks)
        assert rules.state == ENDED and rules.remaining == 0 and rules.sent_count == 5
        assert [int(p) for p in rules.pfns] == [4, 5, 9, 10, 11]
        got = [e for e in events if isinstance(e, libxc.PageData) and e.postcopy]
        assert [int(p) for e in got for p in e.pfns] == [9, 4, 5, 10, 11]
        for e in got:  # the data of each page is its own
            assert bytes(e.data) == b"".join(page(int(p)) for p in e.pfns)
    rules, _ = forward(b"".join(records), exact=True)
    assert rules.state == ENDED


@pytest.mark.parametrize("seen_as", [np.asarray, memoryview], ids=["array", "memoryview"])
def test_a_pfn_is_found_in_the_set_or_not_at_all(seen_as):
    pfns = seen_as(np.array([4, 5, 9, 2**40], np.uint64))
    found = [position(pfns, p) for p in (4, 9, 2**40, 0, 6, 2**41, 2**64 - 1)]
    assert found == [0, 2, 3, None, None, None, None]
    assert position(seen_as(np.empty(0, np.uint64)), 3) is None


def test_an_empty_postcopy_set_is_a_valid_stream():
    rules, _ = forward(b"".join(postcopy_records(pset=(), sends=[])))
    assert rules.state == ENDED and len(rules.pfns) == 0


def _insert(at_type, record, after=False):
    def change(records):
        i = index_of(records, at_type) + (1 if after else 0)
        return records[:i] + [record] + records[i:]

    return change


def _drop(rtype):
    def change(records):
        i = index_of(records, rtype)
        return records[:i] + records[i + 1 :]

    return change


def _send(batches):
    def change(records):
        return postcopy_records(sends=batches)

    return change


BROKEN = {
    # (how the valid stream is changed, the rule named, the record it happens at)
    "precopy page after BEGIN": (
        _insert(libxc.REC_POSTCOPY_BEGIN, pages([7]), after=True),
        "PAGE_DATA after POSTCOPY_BEGIN",
    ),
    "postcopy page before BEGIN": (
        _insert(libxc.REC_POSTCOPY_BEGIN, pages([4], postcopy=True)),
        "POSTCOPY_PAGE_DATA before POSTCOPY_BEGIN",
    ),
    "no vCPU context": (
        _drop(libxc.REC_HVM_CONTEXT),
        "POSTCOPY_PFNS_BEGIN before the vCPU context",
    ),
    "context among the pfns": (
        _insert(libxc.REC_POSTCOPY_TRANSITION, CONTEXT[2]),
        "HvmParams in the pfns phase",
    ),
    "no POSTCOPY_BEGIN": (_drop(libxc.REC_POSTCOPY_BEGIN), "POSTCOPY_PFNS_BEGIN before"),
    "a pfn listed twice": (
        lambda r: postcopy_records(lists=[[4, 5, 9], [10, 11, 5]]),
        "a pfn is listed twice in POSTCOPY_PFNS",
    ),
    "pfns after the transition": (
        _insert(libxc.REC_END, pfn_list([20])),
        "POSTCOPY_PFNS in the pages phase",
    ),
    "a page before the transition": (
        _insert(libxc.REC_POSTCOPY_TRANSITION, pages([4], postcopy=True)),
        "POSTCOPY_PAGE_DATA in the pfns phase",
    ),
    "a page not announced": (_send([[4], [5], [6]]), "pfn 0x6 was not announced for postcopy"),
    "pages not announced, in a batch": (
        _send([[4, 5, 9, 10, 11, 12]]),
        "pfn 0xc was not announced for postcopy",
    ),
    "a page sent twice": (_send([[4], [5], [9], [5]]), "postcopy pfn 0x5 sent twice"),
    "a page twice in one batch": (_send([[4, 5, 5]]), "postcopy pfn 0x5 sent twice"),
    "a page twice across batches": (_send([[4, 5], [5, 9]]), "postcopy pfn 0x5 sent twice"),
    "END with pages missing": (_send([[4], [5], [9]]), "END with 2 postcopy pages never sent"),
    "a fault the wrong way": (
        _insert(libxc.REC_END, pfn_list([4], fault=True)),
        "POSTCOPY_FAULT goes from the destination to the source",
    ),
    "COMPLETE the wrong way": (
        _insert(libxc.REC_END, marker(libxc.REC_POSTCOPY_COMPLETE)),
        "POSTCOPY_COMPLETE goes from the destination to the source",
    ),
    "a second transition": (
        _insert(libxc.REC_END, marker(libxc.REC_POSTCOPY_TRANSITION)),
        "POSTCOPY_TRANSITION in the pages phase",
    ),
    "a listed pfn outside the domain": (
        lambda r: postcopy_records(lists=[[4, 5, 9, 10, 11, PAGES]]),
        f"pfn {PAGES:#x} is outside the domain",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_rule_is_named_at_its_record(name):
    change, rule = BROKEN[name]
    records = change(postcopy_records())
    with pytest.raises(RemoteProtocolError) as caught:
        forward(b"".join(records), [3, 1000])
    assert rule in caught.value.rule, caught.value
    # the offset is the start of a record of the stream (or inside a record,
    # for a field the decoder refuses), never beyond it
    starts = {offset_of(records, i) for i in range(len(records))}
    assert caught.value.offset is not None and caught.value.offset < len(b"".join(records))
    if "outside the domain" not in rule:
        assert caught.value.offset in starts, (caught.value.offset, sorted(starts))


@pytest.mark.parametrize("where", ["instead of the set", "among the pages"])
def test_a_resume_list_in_the_forward_stream_is_refused(where):
    records = postcopy_records()
    if where == "instead of the set":
        records[index_of(records, libxc.REC_POSTCOPY_PFNS)] = pfn_list(
            [4, 5, 9, 10, 11], resume=True
        )
    else:
        records.insert(len(records) - 1, pfn_list([4], resume=True))
    try:
        forward(b"".join(records))
    except RemoteProtocolError as exc:
        assert "POSTCOPY_RESUME goes from the destination" in exc.rule, exc
    else:
        raise AssertionError("a POSTCOPY_RESUME record in the forward stream was accepted")


def test_the_offending_record_is_the_one_named():
    records = postcopy_records(sends=[[4], [5], [9], [5], [10], [11]])
    with pytest.raises(RemoteProtocolError) as caught:
        forward(b"".join(records))
    assert caught.value.offset == offset_of(records, len(records) - 4)  # the second [5]


def test_a_resumed_stream_takes_only_the_pages_still_lacking():
    rules = ForwardRules.resumed(np.array([9, 4, 9, 11], np.uint64))
    assert [int(p) for p in rules.pfns] == [4, 9, 11] and rules.remaining == 3
    decoder = libxc.LibxcDecoder(max_pfns=PAGES, records_only=True)
    decoder.feed(pages([4, 11], postcopy=True) + pages([5], postcopy=True))
    rules.event(decoder.next_event(), 0)
    assert rules.remaining == 1
    with pytest.raises(RemoteProtocolError, match="pfn 0x5 was not announced"):
        rules.event(decoder.next_event(), 0)
    with pytest.raises(RemoteProtocolError, match="END with 1 postcopy pages never sent"):
        rules.event(libxc.END, 0)


# -- the return rules ---------------------------------------------------------------------
def test_faults_then_complete_once():
    data = pfn_list([5, 9], fault=True) + pfn_list([4], fault=True)
    data += marker(libxc.REC_POSTCOPY_COMPLETE)
    rules, faults = returned(data, chunk=5)
    assert faults == [[5, 9], [4]] and rules.complete
    for after in (pfn_list([4], fault=True), marker(libxc.REC_POSTCOPY_COMPLETE)):
        with pytest.raises(RemoteProtocolError, match="after POSTCOPY_COMPLETE"):
            returned(data + after)


@pytest.mark.parametrize(
    "record, rule",
    [
        (pages([4], postcopy=True), "POSTCOPY_PAGE_DATA may not come from the destination"),
        (marker(libxc.REC_END), "END may not come from the destination"),
        (pfn_list([4]), "POSTCOPY_PFNS may not come from the destination"),
        (pfn_list([4], resume=True), "POSTCOPY_RESUME may not come from the destination"),
        (marker(libxc.REC_POSTCOPY_TRANSITION), "POSTCOPY_TRANSITION may not come"),
        (pfn_list([PAGES], fault=True), f"POSTCOPY_FAULT: pfn {PAGES:#x} is outside the domain"),
        (pfn_list([1 << 51], fault=True), "is outside the domain"),
    ],
)
def test_the_destination_may_send_only_faults_and_complete(record, rule):
    with pytest.raises(RemoteProtocolError, match=rule):
        returned(pfn_list([4], fault=True) + record)


@pytest.mark.parametrize(
    "body, rule",
    [
        ((0).to_bytes(4, "little") + bytes(4), "count 0 is not within 1..1024"),
        ((1025).to_bytes(4, "little") + bytes(4) + bytes(8 * 1025), "count 1025"),
        ((2).to_bytes(4, "little") + bytes(4) + bytes(8), "count 2 does not fit"),
        ((1).to_bytes(4, "little") + bytes(4) + bytes(16), "does not match count 1"),
        ((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(8), "reserved"),
    ],
)
def test_a_malformed_fault_record_is_refused(body, rule):
    header = libxc.REC_POSTCOPY_FAULT.to_bytes(4, "little") + len(body).to_bytes(4, "little")
    with pytest.raises(RemoteProtocolError, match=rule):
        returned(header + body + bytes(-len(body) % 8))


def test_a_resumed_destination_lists_what_it_lacks_first():
    data = pfn_list([9, 4], resume=True) + pfn_list([11], resume=True)
    data += marker(libxc.REC_POSTCOPY_RESUME_END) + pfn_list([4], fault=True)
    rules, faults = returned(data, resumed=True, chunk=3)
    assert not rules.listing and faults == [[4]]
    assert sorted(int(p) for a in rules.lacking for p in a) == [4, 9, 11]
    with pytest.raises(RemoteProtocolError, match="POSTCOPY_FAULT before POSTCOPY_RESUME_END"):
        returned(pfn_list([4], fault=True), resumed=True)
    with pytest.raises(RemoteProtocolError, match="POSTCOPY_RESUME may not come"):
        returned(marker(libxc.REC_POSTCOPY_RESUME_END) + pfn_list([4], resume=True), True)


# -- bounded memory ---------------------------------------------------------------------------
def test_a_huge_length_field_allocates_nothing_large():
    evil = libxc.REC_POSTCOPY_FAULT.to_bytes(4, "little") + (0xFFFFFFF0).to_bytes(4, "little")
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="above the limit"):
            returned(evil + bytes(64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_flood_of_faults_costs_the_checker_nothing():
    """ReturnRules hands each fault on and keeps nothing: 16 MiB of requests
    through it in small memory."""
    flood = pfn_list(np.resize(np.arange(PAGES, dtype=np.uint64), MAX_BATCH_PAGES), fault=True)
    decoder = libxc.LibxcDecoder(max_pfns=PAGES, records_only=True)
    rules = ReturnRules()
    tracemalloc.start()
    try:
        for _ in range(2048):
            decoder.feed(flood)
            assert len(rules.event(decoder.next_event(), decoder.offset)) == MAX_BATCH_PAGES
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def assert_refused_at_once(check, record: bytes, copies=2048) -> None:
    """`copies` of `record` (1024 pfns of a 64-page domain: repeats, and more
    pfns than the domain has) fed to `check`: refused by the second at the
    latest, or the memory kept meanwhile is reported."""
    tracemalloc.start()
    try:
        for fed in range(1, copies + 1):
            try:
                check(record)
            except RemoteProtocolError:
                assert fed <= 2, f"refused only after {fed} lists"
                return
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    raise AssertionError(f"{copies} lists of repeated pfns accepted; {kept} octets kept")


def test_a_pfn_list_longer_than_the_domain_is_refused_before_it_grows():
    decoder = libxc.LibxcDecoder(max_pfns=PAGES)
    rules = ForwardRules()
    records = postcopy_records()
    decoder.feed(b"".join(records[: index_of(records, libxc.REC_POSTCOPY_PFNS)]))
    while (event := decoder.next_event()) is not NEED_DATA:
        rules.event(event, 0)

    def check(record):
        decoder.feed(record)
        rules.event(decoder.next_event(), decoder.offset)

    assert_refused_at_once(check, pfn_list(np.resize(np.arange(PAGES), MAX_BATCH_PAGES)))


def test_a_resume_list_longer_than_the_domain_is_refused_before_it_grows():
    decoder = libxc.LibxcDecoder(max_pfns=PAGES, records_only=True)
    rules = ReturnRules(resumed=True)

    def check(record):
        decoder.feed(record)
        rules.event(decoder.next_event(), decoder.offset)

    resume = pfn_list(np.resize(np.arange(PAGES), MAX_BATCH_PAGES), resume=True)
    assert_refused_at_once(check, resume)


# -- properties and fuzzing -----------------------------------------------------------------
@st.composite
def valid_streams(draw):
    """(records, the set) of a random valid postcopy stream of a PAGES-page domain."""
    pset = sorted(draw(st.sets(st.integers(0, PAGES - 1), max_size=24)))
    precopy = sorted(draw(st.sets(st.integers(0, PAGES - 1), max_size=8)))
    announced = draw(st.permutations(pset))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(pset))), max_size=3)))
    lists = [
        announced[i:j]
        for i, j in zip([0, *cuts], [*cuts, len(pset)], strict=True)
        if announced[i:j]
    ]
    order = draw(st.permutations(pset))
    sizes, sends, i = draw(st.lists(st.integers(1, 6), min_size=1, max_size=8)), [], 0
    while i < len(order):
        n = sizes[len(sends) % len(sizes)]
        sends.append(sorted(order[i : i + n]))
        i += n
    return postcopy_records(precopy, pset, lists, sends), pset


@FUZZ
@given(valid_streams(), st.lists(st.integers(1, 300), min_size=1, max_size=4), st.booleans())
def test_random_valid_streams_are_accepted_in_any_chunking(stream, chunks, exact):
    records, pset = stream
    rules, events = forward(b"".join(records), chunks, exact=exact)
    assert rules.state == ENDED and rules.remaining == 0
    sent = sorted(
        int(p) for e in events if isinstance(e, libxc.PageData) and e.postcopy for p in e.pfns
    )
    assert sent == pset


def _corrupt(draw, records, pset):
    """One change that breaks a rule (a pfn twice, a page missing or unknown,
    a record out of place)."""
    body = records[index_of(records, libxc.REC_POSTCOPY_TRANSITION) + 1 : -1]
    start = len(records) - 1 - len(body)
    choices = ["unknown page", "END early", "page in precopy"]
    if body:
        choices += ["page twice", "page missing"]
    if pset:
        choices += ["listed twice"]
    how = draw(st.sampled_from(choices))
    if how == "page twice":
        i = draw(st.integers(0, len(body) - 1))
        where = draw(st.integers(i + 1, len(body)))
        return records[: start + where] + [body[i]] + records[start + where :]
    if how == "page missing":
        i = draw(st.integers(0, len(body) - 1))
        return records[: start + i] + records[start + i + 1 :]
    if how == "unknown page":
        outside = [p for p in range(PAGES) if p not in pset]
        return (
            records[:-1] + [pages([draw(st.sampled_from(outside))], postcopy=True)] + records[-1:]
        )
    if how == "END early":  # anywhere after POSTCOPY_BEGIN, before the last page
        i = draw(st.integers(index_of(records, libxc.REC_POSTCOPY_BEGIN) + 1, len(records) - 2))
        if i >= start:  # among the pages: END is fine only once all are sent
            assert body
            return records[:start] + [marker(libxc.REC_END)]
        return records[:i] + [marker(libxc.REC_END)]
    if how == "page in precopy":
        i = index_of(records, libxc.REC_POSTCOPY_BEGIN)
        return records[: i + 1] + [pages([0])] + records[i + 1 :]
    pfn = draw(st.sampled_from(pset))  # listed twice
    i = index_of(records, libxc.REC_POSTCOPY_TRANSITION)
    return records[:i] + [pfn_list([pfn])] + records[i:]


@FUZZ
@given(valid_streams(), st.data(), st.integers(1, 300))
def test_random_corruptions_of_valid_streams_are_refused(stream, data, chunk):
    records, pset = stream
    broken = _corrupt(data.draw, records, pset)
    with pytest.raises(RemoteProtocolError):
        forward(b"".join(broken), [chunk])


def _record_soup():
    pfns = st.lists(st.integers(0, PAGES + 2), min_size=1, max_size=6)
    markers = st.sampled_from(
        [
            libxc.REC_END,
            libxc.REC_STATIC_DATA_END,
            libxc.REC_VERIFY,
            libxc.REC_POSTCOPY_BEGIN,
            libxc.REC_POSTCOPY_PFNS_BEGIN,
            libxc.REC_POSTCOPY_TRANSITION,
            libxc.REC_POSTCOPY_COMPLETE,
            libxc.REC_POSTCOPY_RESUME_END,
        ]
    ).map(marker)
    lists = st.tuples(pfns, st.sampled_from([(0, 0), (1, 0), (0, 1)])).map(
        lambda t: pfn_list(np.minimum(t[0], (1 << 40)), fault=bool(t[1][0]), resume=bool(t[1][1]))
    )
    page_records = st.tuples(
        st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=4), st.booleans()
    )
    junk = st.tuples(st.integers(0, 0xFFFFFFFF), st.binary(max_size=40)).map(
        lambda t: (
            t[0].to_bytes(4, "little")
            + len(t[1]).to_bytes(4, "little")
            + t[1]
            + bytes(-len(t[1]) % 8)
        )
    )
    return st.lists(
        st.one_of(
            markers,
            lists,
            page_records.map(lambda t: pages(t[0], postcopy=t[1])),
            st.sampled_from(CONTEXT),
            junk,
        ),
        max_size=24,
    )


@FUZZ
@given(_record_soup(), st.integers(1, 64), st.booleans())
def test_random_record_sequences_raise_only_protocol_errors(soup, chunk, with_headers):
    data = (HEADERS + marker(libxc.REC_STATIC_DATA_END) if with_headers else b"") + b"".join(soup)
    try:
        forward(data, [chunk])
    except RemoteProtocolError:
        pass
    for resumed in (False, True):
        try:
            returned(b"".join(soup), resumed, chunk)
        except RemoteProtocolError:
            pass


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "set32", "cut", "insert"])) if data else "insert"
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set32":
            value = draw(st.sampled_from([0, 1, 5, 0xFE0004, 0xFE0005, 1024, 1025, 0xFFFFFFFF]))
            data[pos : pos + 4] = value.to_bytes(4, "little")
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


VALID = b"".join(postcopy_records(lists=[[11, 4], [10, 9, 5]], sends=[[9], [4, 5], [10, 11]]))
LIBXL = libxl.encode_header() + libxl.encode_libxc_context() + VALID + libxl.encode_end()


@FUZZ
@given(
    st.sampled_from([("libxc", VALID), ("libxl", LIBXL)]).flatmap(
        lambda b: st.tuples(st.just(b[0]), mutated(b[1]))
    ),
    st.integers(1, 5000),
    st.booleans(),
)
def test_mutated_postcopy_streams_raise_only_protocol_errors(stream, chunk, exact):
    fmt, data = stream
    if fmt == "libxc":  # the restore helper's way, and verify-stream's
        try:
            forward(data, [chunk], exact=exact)
        except RemoteProtocolError:
            pass
    check_stream(data, None, chunk, max_pfns=PAGES)


@FUZZ
@given(st.sampled_from([VALID]).flatmap(mutated), st.integers(1, 300))
def test_the_first_broken_rule_does_not_depend_on_the_chunking(data, chunk):
    """Whole, in chunks, or read exactly as the helper does: the same events,
    or the same rule at the same offset."""
    outcomes = []
    for how in ({"chunks": None}, {"chunks": [chunk]}, {"exact": True}):
        try:
            _, events = forward(data, **how)
            outcomes.append(("ok", len(events)))
        except RemoteProtocolError as exc:
            outcomes.append((exc.rule, exc.offset))
    assert outcomes[0] == outcomes[1] == outcomes[2], outcomes


# -- ferry verify-stream on a postcopy stream -------------------------------------------------
def verify(path, *args):
    return subprocess.run(
        [sys.executable, "-m", "toolstack", "verify-stream", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_verify_stream_checks_a_postcopy_stream(tmp_path):
    path = tmp_path / "postcopy.libxl"
    path.write_bytes(LIBXL)
    r = verify(path, "-v")
    assert r.returncode == 0, r.stderr
    assert "valid libxl stream" in r.stdout and "pages: 9" in r.stdout
    assert "POSTCOPY_PAGE_DATA: 3 record(s)" in r.stdout
    broken = postcopy_records(sends=[[4], [5], [9], [5], [10], [11]])
    path.write_bytes(b"".join(broken))
    r = verify(path, "--format", "libxc")
    at = offset_of(broken, len(broken) - 4)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"postcopy pfn 0x5 sent twice at offset {at}" in r.stderr, r.stderr
    os.remove(path)
