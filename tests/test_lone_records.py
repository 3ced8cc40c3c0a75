"""The postcopy fault path's short cuts: a fault of one pfn and its answer of
one page are read in one look at the socket and decoded without the decoder's
events (`LibxcDecoder.one_fault`, `one_page`, `ForwardRules.one_page`,
`helper.postcopy.RecordStream`).  A short cut may only ever take what the
general path takes, with the same pfn and the same effect; anything else is
left to the general path, which names the rule it breaks."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, RemoteProtocolError, framing, libxc
from protocol.limits import PAGE_SIZE
from protocol.postcopy import PAGES, ForwardRules
from tests.streams import page

PAGES_IN_DOMAIN = 64


def joined(buffers: list) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in buffers)


def general(record: bytes, max_pfns: int = PAGES_IN_DOMAIN):
    """The general decoder's verdict on a record: its event, or its error."""
    decoder = libxc.LibxcDecoder(max_pfns=max_pfns, records_only=True)
    decoder.feed(bytearray(record))
    try:
        return decoder.next_event()
    except RemoteProtocolError as exc:
        return exc


FAULT = joined(libxc.encode_pfn_list([7], fault=True))
ANSWER = joined(libxc.encode_one_page(9, page(9)))


def test_the_one_record_encoders_write_the_specs_layout():
    # type, body_length, count, reserved, the entry (pfn, type 0): written out by hand
    assert FAULT == struct.pack("<IIIIQ", 0x00FE0005, 16, 1, 0, 7)
    assert ANSWER == struct.pack("<IIIIQ", 0x00FE0004, 16 + PAGE_SIZE, 1, 0, 9) + page(9)
    pfns = np.array([9], np.uint64)
    assert ANSWER == joined(libxc.encode_page_data(pfns, [page(9)], postcopy=True))
    assert general(FAULT).pfns.tolist() == [7]
    assert general(ANSWER).pfns.tolist() == [9]


def assert_taken_exactly_as_the_decoder_takes(record: bytes) -> None:
    """The short cut takes `record` if and only if the general path takes
    it as a lone fault, or a lone page with its data; with the same pfn."""
    decoder = libxc.LibxcDecoder(max_pfns=PAGES_IN_DOMAIN, records_only=True)
    is_fault = len(record) == libxc.ONE_FAULT_OCTETS
    pfn = decoder.one_fault(record) if is_fault else decoder.one_page(record)
    verdict = general(record)
    if is_fault:
        lone = isinstance(verdict, libxc.PfnList) and verdict.fault
    else:
        lone = isinstance(verdict, libxc.PageData) and verdict.postcopy
        lone = lone and not libxc.HAS_NO_DATA[verdict.types[0]]
    assert (pfn is not None) == lone
    if lone:
        assert verdict.pfns.tolist() == [pfn]


def mutated(record: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(record)
    for at, value in changes:
        out[at] = value
    return bytes(out)


# Each octet of a lone record's first 24 set to each of a few values
@pytest.mark.parametrize("record", [FAULT, ANSWER], ids=["fault", "page"])
@pytest.mark.parametrize("at", range(libxc.ONE_RECORD.size))
@pytest.mark.parametrize("value", [0, 1, 0x40, 0xFF])
def test_a_lone_record_changed_in_one_octet_is_taken_as_the_decoder_takes_it(record, at, value):
    assert_taken_exactly_as_the_decoder_takes(mutated(record, [(at, value)]))


CHANGES = st.lists(st.tuples(st.integers(0, 23), st.integers(0, 255)), max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([FAULT, ANSWER]), CHANGES)
def test_mutated_lone_records_are_taken_exactly_when_the_decoder_takes_them(record, changes):
    assert_taken_exactly_as_the_decoder_takes(mutated(record, changes))


def test_a_pfn_outside_the_domain_is_left_to_the_decoder_which_names_it():
    record = joined(libxc.encode_pfn_list([PAGES_IN_DOMAIN], fault=True))
    decoder = libxc.LibxcDecoder(max_pfns=PAGES_IN_DOMAIN, records_only=True)
    assert decoder.one_fault(record) is None
    assert "outside the domain" in str(general(record))


def test_a_taken_record_moves_the_stream_on_and_the_next_error_names_its_offset():
    decoder = libxc.LibxcDecoder(max_pfns=PAGES_IN_DOMAIN, records_only=True)
    assert decoder.one_fault(FAULT) == 7
    assert decoder.offset == 0  # not until the caller has acted on it
    decoder.took(FAULT)
    assert decoder.offset == len(FAULT)
    bad = joined(libxc.encode_pfn_list([PAGES_IN_DOMAIN], fault=True))
    decoder.feed(bytearray(bad))
    with pytest.raises(RemoteProtocolError) as refused:
        decoder.next_event()
    assert refused.value.offset == len(FAULT) + 16


def test_a_record_is_not_taken_from_the_middle_of_another():
    decoder = libxc.LibxcDecoder(max_pfns=PAGES_IN_DOMAIN, records_only=True)
    decoder.feed(bytearray(FAULT[:8]))  # a header buffered
    assert decoder.next_event() is NEED_DATA
    assert decoder.one_fault(FAULT) is None


# -- where whole records end ---------------------------------------------------------
def test_whole_records_end_at_the_last_whole_one():
    two = FAULT + ANSWER
    last = (libxc.REC_END, libxc.REC_POSTCOPY_COMPLETE)
    assert framing.whole_records(two, last) == len(two)
    assert framing.whole_records(two[:-1], last) == len(FAULT)
    assert framing.whole_records(FAULT[:-1], last) == 0
    assert framing.whole_records(b"", last) == 0


def test_nothing_after_the_directions_last_record_is_counted():
    complete = joined(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE))
    end = joined(libxc.encode_marker(libxc.REC_END))
    last = (libxc.REC_END, libxc.REC_POSTCOPY_COMPLETE)
    assert framing.whole_records(FAULT + complete + FAULT, last) == len(FAULT + complete)
    assert framing.whole_records(ANSWER + end + b"libxl", last) == len(ANSWER + end)


def test_a_huge_length_is_only_summed():
    header = struct.pack("<II", libxc.REC_POSTCOPY_PAGE_DATA, 0xFFFFFFF8)
    assert framing.whole_records(header + bytes(64), (libxc.REC_END,)) == 0


# -- the rules -----------------------------------------------------------------------
def rules_with_set(pfns: list[int]) -> ForwardRules:
    rules = ForwardRules.resumed(np.array(pfns, np.uint64))
    assert rules.state == PAGES
    return rules


def test_a_lone_page_of_the_set_is_marked_sent_once():
    rules = rules_with_set([3, 9, 20])
    assert rules.one_page(9) == 1
    assert rules.sent.tolist() == [False, True, False] and rules.remaining == 2
    assert rules.one_page(9) is None  # twice: the general path names it
    with pytest.raises(RemoteProtocolError, match="sent twice"):
        rules.page_data(np.array([9], np.uint64), 0)


@pytest.mark.parametrize("pfn", [0, 4, 21, 2**52 - 1])
def test_a_lone_page_outside_the_set_changes_nothing(pfn):
    rules = rules_with_set([3, 9, 20])
    assert rules.one_page(pfn) is None
    assert rules.remaining == 3 and not rules.sent.any()


def test_a_lone_page_before_the_transition_is_left_to_the_general_path():
    rules = ForwardRules()
    assert rules.one_page(0) is None


# -- the stream socket -----------------------------------------------------------------
@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_lone_fault_is_taken_in_one_look_and_what_follows_complete_is_left(pair):
    from helper.postcopy import RecordStream, return_decoder

    a, b = pair
    stream = RecordStream(b.fileno(), return_decoder(PAGES_IN_DOMAIN))
    try:
        taken = []

        def alone(octets) -> bool:
            pfn = stream.decoder.one_fault(octets)
            if pfn is None:
                return False
            stream.decoder.took(octets)
            taken.append(pfn)
            return True

        a.sendall(FAULT)
        assert stream.available(alone) == [] and taken == [7]
        complete = joined(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE))
        a.sendall(FAULT + complete + b"the next layer's")
        events = stream.available(alone)
        assert [type(e) for e in events] == [libxc.PfnList, libxc.Marker]
        assert taken == [7] and stream.octets == 2 * len(FAULT) + len(complete)
        assert b.recv(64) == b"the next layer's"  # never read by the helper
    finally:
        stream.close()


# -- what the reviewer found: nothing stranded, nothing acted on out of order -------------
def test_every_record_a_look_took_is_decoded_before_available_returns(pair):
    from helper.postcopy import RecordStream, return_decoder

    a, b = pair
    stream = RecordStream(b.fileno(), return_decoder(PAGES_IN_DOMAIN))
    try:
        a.sendall(b"".join(joined(libxc.encode_pfn_list([p % 64], fault=True)) for p in range(100)))
        events = stream.available(lambda octets: False)
        assert len(events) == 100  # none left in the decoder, where poll() cannot see it
        assert stream.decoder.between_records
    finally:
        stream.close()


def test_a_resume_list_of_many_small_records_is_read_to_its_end(pair):
    import threading

    from helper.postcopy import RecordStream, read_resume_list, return_decoder
    from protocol.postcopy import ReturnRules

    a, b = pair
    listing = [joined(libxc.encode_pfn_list([p], resume=True)) for p in range(70)]
    a.sendall(b"".join(listing) + joined(libxc.encode_marker(libxc.REC_POSTCOPY_RESUME_END)))
    stream = RecordStream(b.fileno(), return_decoder(PAGES_IN_DOMAIN * 2))
    got = {}
    reader = threading.Thread(
        target=lambda: got.update(lacking=read_resume_list(stream, ReturnRules(resumed=True))[0]),
        daemon=True,
    )
    try:
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "read_resume_list waits for records it already holds"
        assert got["lacking"].tolist() == list(range(70))
    finally:
        if reader.is_alive():
            a.shutdown(socket.SHUT_RDWR)  # ends it: the stream closes under it
            reader.join(10)
        stream.close()


def test_a_lone_record_behind_an_earlier_event_takes_the_general_way(pair):
    from helper.postcopy import RecordStream

    a, b = pair
    decoder = libxc.LibxcDecoder(max_pfns=PAGES_IN_DOMAIN, records_only=True)
    stream = RecordStream(b.fileno(), decoder)
    try:
        batch = joined(
            libxc.encode_page_data(
                np.arange(16, dtype=np.uint64), [page(p) for p in range(16)], postcopy=True
            )
        )
        a.sendall(batch + joined(libxc.encode_one_page(3, page(3))))
        offered = []
        events = stream.available(lambda octets: offered.append(octets) or True)
        assert offered == []  # the batch came first: its check comes first too
        assert [e.pfns.tolist() for e in events] == [list(range(16)), [3]]
    finally:
        stream.close()


@pytest.mark.parametrize("split", [2, 6])
def test_nothing_after_complete_is_taken_however_it_arrives(pair, split):
    from helper.postcopy import RecordStream, return_decoder

    a, b = pair
    stream = RecordStream(b.fileno(), return_decoder(PAGES_IN_DOMAIN))
    complete = joined(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE))
    try:
        a.sendall(complete[:split])
        assert stream.available(lambda octets: True) == []
        a.sendall(complete[split:] + FAULT + b"the next layer's")
        events = stream.available(lambda octets: pytest.fail("a record after COMPLETE was offered"))
        assert [type(e) for e in events] == [libxc.Marker] and stream.ended
        assert stream.available() == []
        assert b.recv(64) == FAULT + b"the next layer's"
    finally:
        stream.close()
