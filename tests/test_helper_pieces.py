"""Pieces of the helpers, alone: which pages of guest RAM hold data, the
buffers a batch is sent from, where a faulted pfn is in the postcopy set,
and the poller that stays hot while a guest waits."""

from __future__ import annotations

import os
import select
import socket
import time

import numpy as np
import pytest

from helper.postcopy import DestinationBrokeRules, HotPoller, PostcopySender
from helper.save import DataExtents, Saver
from helper.shards import ShardReader
from hypervisor import GuestMemory
from protocol.limits import PAGE_SIZE


def memory_written_at(pages: int, written: np.ndarray) -> GuestMemory:
    memory = GuestMemory(pages)
    for pfn in np.flatnonzero(written).tolist():
        os.pwrite(memory.fd, pfn.to_bytes(8, "little") * (PAGE_SIZE // 8), pfn * PAGE_SIZE)
    return memory


def test_pages_written_at_random_are_told_from_holes():
    rng = np.random.default_rng(7)
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        written = rng.random(4096) < density
        memory = memory_written_at(4096, written)
        try:
            extents = DataExtents(memory.data_extents())
            pfns = rng.integers(0, 4096, 3000).astype(np.uint64)
            assert (extents.holds(pfns) == written[pfns.astype(np.intp)]).all()
            assert not extents.holds(np.empty(0, np.uint64)).any()
        finally:
            memory.close()


def test_a_batch_of_postcopy_pages_is_every_page_in_order():
    written = np.zeros(64, bool)
    written[[3, 4, 5, 9, 40]] = True
    memory = memory_written_at(64, written)
    saver = Saver.__new__(Saver)  # only the memory is needed to read pages
    saver.memory = memory
    try:
        for pfns in ([9], [3, 4, 5, 9], [2, 3, 40, 41]):
            views = saver.page_views(np.array(pfns, np.uint64))
            data = b"".join(bytes(v) for v in views)
            expected = b"".join(
                (p.to_bytes(8, "little") if written[p] else bytes(8)) * (PAGE_SIZE // 8)
                for p in pfns
            )
            assert data == expected
    finally:
        memory.close()


@pytest.mark.parametrize("size", [0, 2])
def test_a_fault_outside_the_set_breaks_the_rules(size):
    sender = PostcopySender.__new__(PostcopySender)  # only the set is needed
    sender.pfns = np.array([5, 9][:size], np.uint64)
    for fault, indices in (([5], [0]), ([9], [1]), ([5, 9], [0, 1]), ([9, 5], [1, 0])):
        if size:
            assert sender.set_indices(np.array(fault, np.uint64)) == indices
    for fault in ([4], [10], [5, 6], [3, 9]):
        with pytest.raises(DestinationBrokeRules) as refused:
            sender.set_indices(np.array(fault, np.uint64))
        bad = next(p for p in fault if p not in sender.pfns.tolist())
        assert f"pfn {bad:#x} is not in the postcopy set" in str(refused.value)


def test_a_hot_poller_answers_at_once_until_it_cools():
    read_end, write_end = os.pipe()
    try:
        poller = HotPoller()
        poller.register(read_end, select.POLLIN)
        poller.stay_hot(60 * 10**9)
        started = time.monotonic()
        assert poller.poll(5000) == {}  # hot: nothing ready, no waiting
        assert time.monotonic() - started < 2.5
        poller.cool()
        started = time.monotonic()
        assert poller.poll(50) == {}  # cool: the timeout is waited for
        assert time.monotonic() - started >= 0.04
        os.write(write_end, b"x")
        assert poller.poll(5000) == {read_end: select.POLLIN}
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_stopped_shard_reader_ends_before_guest_ram_is_unmapped():
    """A restore that fails while an extra connection is mid-record stops
    its reader first: a reader left copying would write into unmapped RAM."""
    ours, theirs = socket.socketpair()
    written = []
    try:
        reader = ShardReader(ours.fileno(), 1, 1024, written.append)
        theirs.sendall(b"\x01\x00\x00\x00")  # the start of a record, no more
        time.sleep(0.05)
        assert reader.running  # blocked on the rest of the record
        reader.stop(2.0)
        assert not reader.running and written == []
        with pytest.raises(Exception, match="connection 1"):
            reader.done(0)  # it ended on a cut-short record: an error, not END
    finally:
        ours.close()
        theirs.close()
