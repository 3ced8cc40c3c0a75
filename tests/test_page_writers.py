"""The restore's two page writers (helper/page_writers.py): every page lands
once, records stay in order although the second half of one is still being
written while the next arrives, and the second thread's failure reaches
the restore."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from helper.fdio import FdReader
from helper.page_writers import (
    SPLIT_MIN_PAGES,
    WRITER_NICE,
    PageWriters,
    split_in_two,
    worth_splitting,
)
from helper.restore import Restorer
from hypervisor import GuestMemory
from protocol import RemoteProtocolError, libxc
from protocol.limits import PAGE_SIZE


def pages_of(pfns, tag: int) -> memoryview:
    """One page per pfn, each page's words holding pfn * 1000 + tag."""
    words = np.repeat(np.asarray(pfns, "<u8") * 1000 + tag, PAGE_SIZE // 8)
    return memoryview(words.tobytes())


def contents(memory: GuestMemory) -> np.ndarray:
    """The first word of every page, read through the memfd."""
    return np.array(
        [
            int.from_bytes(memory.view[p * PAGE_SIZE : p * PAGE_SIZE + 8], "little")
            for p in range(memory.pages)
        ]
    )


@pytest.mark.parametrize("cut", [0, 1, 5, 6, 7, 13, 20])
def test_splitting_runs_in_two_keeps_every_page_once_in_order(cut):
    runs = [
        (10, pages_of(range(10, 15), 0)),
        (40, pages_of(range(40, 41), 0)),
        (50, pages_of(range(50, 64), 0)),
    ]
    first, rest = split_in_two(runs, cut)
    assert sum(d.nbytes for _p, d in first) == min(cut, 20) * PAGE_SIZE
    flat = [
        (pfn + i, bytes(d[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]))
        for pfn, d in first + rest
        for i in range(d.nbytes // PAGE_SIZE)
    ]
    whole = [
        (pfn + i, bytes(d[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]))
        for pfn, d in runs
        for i in range(d.nbytes // PAGE_SIZE)
    ]
    assert flat == whole
    assert all(d.nbytes for _p, d in first + rest)  # no empty run handed on


def test_records_split_between_two_writers_land_whole():
    memory = GuestMemory(4096)
    writers = PageWriters(memory)
    try:
        rng = np.random.default_rng(3)
        expected = np.zeros(memory.pages, dtype=np.int64)
        for tag in range(1, 9):  # each record rewrites pages the last one wrote
            first = int(rng.integers(0, 2048))
            pfns = np.concatenate([np.arange(first, first + 700), np.arange(3000, 3300)])
            writers.write([(first, pages_of(pfns[:700], tag)), (3000, pages_of(pfns[700:], tag))])
            expected[pfns] = pfns * 1000 + tag
        writers.wait()
        assert (contents(memory) == expected).all()
    finally:
        writers.close(2.0)
        memory.close()
    assert not writers.running


class SlowSecondHalf(GuestMemory):
    """Guest RAM whose second writer blocks until released, logging writes."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages)
        self.release = threading.Event()
        self.log: list[tuple[str, int]] = []

    def write(self, first, data):
        self.log.append(("first half", first))
        super().write(first, data)

    def write_beside_others(self, first, data):
        assert self.release.wait(10)
        self.log.append(("second half", first))
        super().write_beside_others(first, data)


def test_a_record_waits_for_the_second_half_of_the_one_before():
    memory = SlowSecondHalf(4 * SPLIT_MIN_PAGES)
    writers = PageWriters(memory)
    try:
        pfns = list(range(2 * SPLIT_MIN_PAGES))
        writers.write([(0, pages_of(pfns, 1))])  # returns with its second half pending
        later = threading.Thread(target=writers.write, args=([(0, pages_of(pfns, 2))],))
        later.start()
        later.join(0.3)
        assert later.is_alive(), "the next record did not wait for the last one's pages"
        memory.release.set()
        later.join(10)
        writers.wait()
        assert [who for who, _ in memory.log] == ["first half", "second half"] * 2
        assert (contents(memory)[: len(pfns)] == np.array(pfns) * 1000 + 2).all()
    finally:
        memory.release.set()
        writers.close(2.0)
        memory.close()


class FailingSecondHalf(GuestMemory):
    def write_beside_others(self, first, data):
        raise OSError(28, "No space left on device")


def test_the_second_writers_failure_reaches_the_restore():
    memory = FailingSecondHalf(4 * SPLIT_MIN_PAGES)
    writers = PageWriters(memory)
    try:
        writers.write([(0, pages_of(range(2 * SPLIT_MIN_PAGES), 1))])
        with pytest.raises(OSError, match="No space"):
            writers.wait()
        writers.wait()  # said once
    finally:
        writers.close(2.0)
        memory.close()


@pytest.mark.parametrize(
    "runs",
    [
        [(0, pages_of(range(SPLIT_MIN_PAGES - 1), 1))],  # short
        [(2 * p, pages_of([2 * p], 1)) for p in range(4 * SPLIT_MIN_PAGES)],  # scattered
    ],
    ids=["short", "scattered"],
)
def test_short_or_scattered_records_are_written_by_one_thread(runs):
    memory = SlowSecondHalf(16 * SPLIT_MIN_PAGES)  # its second half would block
    writers = PageWriters(memory)
    try:
        writers.write(runs)
        writers.wait()
        assert {who for who, _ in memory.log} == {"first half"}
        assert len(memory.log) == len(runs)
    finally:
        writers.close(2.0)
        memory.close()


def test_the_second_writer_yields_to_the_reader_but_is_not_idle():
    memory = GuestMemory(SPLIT_MIN_PAGES)
    writers = PageWriters(memory)
    try:
        writers.write([(0, pages_of(range(SPLIT_MIN_PAGES), 1))])
        writers.wait()  # its thread has started, and set its priority first
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, writers.native_id) == min(mine + WRITER_NICE, 19)
        assert os.sched_getscheduler(writers.native_id) != os.SCHED_IDLE
    finally:
        writers.close(2.0)
        memory.close()


@pytest.mark.parametrize(
    "runs, split",
    [
        ([(0, 64), (100, 64)], True),
        ([(0, 64), (64, 64)], True),  # touching, not overlapping
        ([(0, 64), (63, 64)], False),  # pfn 63 twice
        ([(100, 64), (0, 64)], False),  # descending
        ([(0, SPLIT_MIN_PAGES - 1)], False),  # short
        ([(2 * p, 1) for p in range(4 * SPLIT_MIN_PAGES)], False),  # scattered
    ],
)
def test_only_long_ascending_runs_are_split(runs, split):
    runs = [(pfn, pages_of(range(pfn, pfn + count), 1)) for pfn, count in runs]
    assert worth_splitting(runs, sum(d.nbytes for _p, d in runs) // PAGE_SIZE) is split


# -- the Restorer's use of them: the real restore, a stream from a file ----------------


class SlowWrites(GuestMemory):
    """Guest RAM whose writes by one thread or the other take a while."""

    reader_delay = 0.0  # s before each pwritev (the reader's half)
    writer_delay = 0.0  # s before each copy through the mapping (the second half)
    copied = 0  # runs copied through the mapping

    def write(self, first, data):
        time.sleep(self.reader_delay)
        super().write(first, data)

    def write_beside_others(self, first, data):
        time.sleep(self.writer_delay)
        super().write_beside_others(first, data)
        self.copied += 1


class Domain:
    """Hands the restore its RAM; notes every page as the context goes in
    (what the guest would run with)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.at_context: np.ndarray | None = None

    def map_guest_memory(self, writable=False):
        return self.memory

    def set_context(self, blob):
        self.at_context = contents(self.memory)


class QuietLink:
    def __getattr__(self, name):
        return lambda *args: None


def restore_stream(tmp_path, records, memory: GuestMemory) -> Domain:
    buffers = [libxc.encode_image_header(), libxc.encode_domain_header()]
    buffers += libxc.encode_marker(libxc.REC_STATIC_DATA_END)
    for record in records:
        buffers += record
    buffers += libxc.encode_hvm_context(b"context")
    buffers += libxc.encode_marker(libxc.REC_END)
    path = tmp_path / "stream"
    path.write_bytes(b"".join(bytes(b) for b in buffers))
    fd = os.open(path, os.O_RDONLY)
    domain = Domain(memory)
    restorer = Restorer(domain, QuietLink(), FdReader(fd))
    try:
        restorer.restore()
    finally:
        restorer.page_writers.close(2.0)  # not Restorer.close: the test reads RAM after
        os.close(fd)
    return domain


def page_data(pfns, tag: int, types=None):
    pfns = np.asarray(pfns, np.uint64)
    with_data = pfns if types is None else pfns[~libxc.HAS_NO_DATA[np.asarray(types)]]
    views = [pages_of([p], tag) for p in with_data.tolist()]
    return libxc.encode_page_data(pfns, views, types)


def test_a_page_cleared_in_the_next_record_stays_clear(tmp_path):
    memory = SlowWrites(1024)
    memory.writer_delay = 0.3  # pfns 64..127 still being written as record 2 comes
    types = [libxc.PAGE_TYPE_XALLOC] + [0] * 64
    second = page_data([100, *range(200, 264)], 2, types)
    domain = restore_stream(tmp_path, [page_data(range(128), 1), second], memory)
    assert domain.at_context[100] == 0
    assert domain.at_context[99] == 99 * 1000 + 1


def test_every_page_is_in_before_the_context(tmp_path):
    memory = SlowWrites(1024)
    memory.writer_delay = 0.3
    domain = restore_stream(tmp_path, [page_data(range(128), 1)], memory)
    assert (domain.at_context[:128] == np.arange(128) * 1000 + 1).all()


def test_a_pfn_twice_in_one_record_keeps_its_later_copy(tmp_path):
    memory = SlowWrites(1024)
    memory.reader_delay = 0.3  # were it split, the reader's (earlier) copy would land last
    pfns = np.array([*range(64), *range(64)], np.uint64)
    views = [pages_of([p], 1 if i < 64 else 2) for i, p in enumerate(pfns.tolist())]
    domain = restore_stream(tmp_path, [libxc.encode_page_data(pfns, views)], memory)
    assert (domain.at_context[:64] == np.arange(64) * 1000 + 2).all()


def test_several_readers_write_their_own_without_a_second_thread():
    memory = SlowWrites(256)
    memory.reader_delay = 10.0  # a pwritev would hang the test: none is made
    writers = PageWriters(memory, readers=2)
    try:
        readers = [
            threading.Thread(
                target=writers.write, args=([(first, pages_of(range(first, first + 128), 1))],)
            )
            for first in (0, 128)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(5)
        assert not writers.running and writers.native_id is None
        assert (contents(memory) == np.arange(256) * 1000 + 1).all()
    finally:
        writers.close(2.0)
        memory.close()


def test_a_failed_restore_unmaps_guest_ram_only_once_the_second_half_is_in(tmp_path, monkeypatch):
    """A record split, the second half still being copied, then a record
    the decoder refuses: close() waits for the half before unmapping, and
    when the half outlasts its wait, leaves the mapping to the process."""
    for delay, timeout, unmapped in ((0.3, 2.0, True), (1.0, 0.1, False)):
        memory = SlowWrites(1024)
        memory.writer_delay = delay
        buffers = [libxc.encode_image_header(), libxc.encode_domain_header()]
        buffers += libxc.encode_marker(libxc.REC_STATIC_DATA_END)
        buffers += page_data(range(128), 1)
        buffers.append(b"\xff" * 64)  # no record type this restore knows
        path = tmp_path / f"stream-{delay}"
        path.write_bytes(b"".join(bytes(b) for b in buffers))
        fd = os.open(path, os.O_RDONLY)
        restorer = Restorer(Domain(memory), QuietLink(), FdReader(fd))
        monkeypatch.setattr("helper.restore.WRITER_STOP_TIMEOUT", timeout)
        try:
            with pytest.raises(RemoteProtocolError):
                restorer.restore()
            restorer.close()
            assert memory.copied == unmapped  # the half went in first, or is still going
            assert memory.map.closed is unmapped
            assert restorer.page_writers.running is not unmapped
        finally:
            restorer.page_writers.close(5.0)
            os.close(fd)
            if not unmapped:
                assert contents(memory)[127] == 127 * 1000 + 1  # the half went in
                memory.close()
