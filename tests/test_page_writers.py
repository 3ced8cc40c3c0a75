"""The restore's two page writers (helper/page_writers.py): every page lands
once, records stay in order although the second half of one is still being
written while the next arrives, and the second thread's failure reaches
the restore."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from helper.page_writers import SPLIT_MIN_PAGES, PageWriters, split_in_two
from hypervisor import GuestMemory
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


def test_the_second_writer_yields_every_cpu_to_other_work():
    memory = GuestMemory(SPLIT_MIN_PAGES)
    writers = PageWriters(memory)
    try:
        writers.write([(0, pages_of(range(SPLIT_MIN_PAGES), 1))])
        writers.wait()  # its thread has started, and set its policy first
        assert os.sched_getscheduler(writers._thread.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the reader's is its own
    finally:
        writers.close(2.0)
        memory.close()
