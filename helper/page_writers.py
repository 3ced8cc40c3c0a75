"""Two threads write a record's pages into the incoming guest's RAM.

Most of a restore's first pass is not the copy: it is the kernel
allocating each fresh page as its data lands (and, where this host is
itself a VM whose host reclaims free memory, a fault on that host too).
One thread does that one page after another.  So a record's pages are
split in two: the reader writes one half into the memfd (`write`), a
second thread copies the other half through the mapping
(`write_beside_others`; a second `pwritev` would wait for the memfd's
inode lock).  Their allocations proceed side by side, and the second
thread's half overlaps with reading the next record.

Measured on the 2-core VM (2 GiB of fresh memory, settled, a bare loop
receiving 4 MiB records from loopback TCP): one writer 340-356 MB/s, split
in two like this 517-621 MB/s.

Only records that gain are split (`worth_splitting`): long runs of pages,
each pfn once and in ascending order.  A dirty pass's scattered pages are
long allocated, and one thread writes them faster than two.

With extra connections (shards.py) their readers call `write` at once, one
record each: every reader then writes its own through the mapping, so their
allocations proceed side by side already, and no second thread is started.

The next record waits for the previous one's second half (`wait`), and so
does anything else that touches guest RAM: pages land in the order they
were sent, and a page cleared after it was written stays clear.
"""

from __future__ import annotations

import os
import queue
import threading

from hypervisor import GuestMemory
from protocol.limits import PAGE_SIZE

SPLIT_MIN_PAGES = 64  # fewer: the hand-over costs more than the second thread saves
SPLIT_MIN_RUN = 16  # pages a run on average, or one thread writes the record
WRITER_NICE = 5  # the second thread's nice value above the reader's (why: yield_cpu)

Run = tuple[int, memoryview]  # (first pfn, its pages' data)


class PageWriters:
    """`write(runs)` writes a record's runs of pages, half of them by the
    time it returns; `wait()` for the rest (before anything else touches
    guest RAM); `close()` ends the second thread.  `readers`: how many
    threads call `write` (one per connection)."""

    def __init__(self, memory: GuestMemory, readers: int = 1) -> None:
        self.memory = memory
        self.readers = readers
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = False  # the second thread has a half to write
        self._thread = threading.Thread(target=self._run, name="page-writer", daemon=True)
        if readers == 1:
            self._thread.start()

    def write(self, runs: list[Run]) -> None:
        if self.readers > 1:
            for pfn, data in runs:
                self.memory.write_beside_others(pfn, data)
            return
        self.wait()
        pages = sum(data.nbytes for _pfn, data in runs) // PAGE_SIZE
        if not worth_splitting(runs, pages):
            for pfn, data in runs:
                self.memory.write(pfn, data)
            return
        mine, theirs = split_in_two(runs, pages // 2)
        self._work.put(theirs)
        self._pending = True
        for pfn, data in mine:
            self.memory.write(pfn, data)

    def wait(self) -> None:
        """Until the second thread has written its half (its error raised)."""
        if self._pending:
            self._pending = False
            error = self._done.get()
            if error is not None:
                raise error

    def close(self, timeout: float) -> None:
        """End the second thread once it has written any half it holds
        (at most `timeout` s: `running` says whether it still is)."""
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def native_id(self) -> int | None:
        """The second thread's id (the kernel's)."""
        return self._thread.native_id

    def _run(self) -> None:
        yield_cpu()
        while (runs := self._work.get()) is not None:
            try:
                for pfn, data in runs:
                    self.memory.write_beside_others(pfn, data)
            except BaseException as exc:
                self._done.put(exc)
            else:
                self._done.put(None)


def worth_splitting(runs: list[Run], pages: int) -> bool:
    """Long runs (a first pass: fresh pages) gain from two threads
    allocating.  Pages scattered one by one (a dirty pass: pages long
    allocated) lose: a run through the mapping costs more calls than a
    pwritev, and the threads take turns on the GIL; at 30,000 dirty
    pages/s, splitting those too measured 114 ms of downtime where 80 were
    expected.  And only runs in ascending order, none overlapping: of a
    pfn sent twice in one record, the later copy must win, and the halves
    are written at the same time."""
    if pages < SPLIT_MIN_PAGES or pages < SPLIT_MIN_RUN * len(runs):
        return False
    ends = [pfn + data.nbytes // PAGE_SIZE for pfn, data in runs]
    return all(pfn >= end for (pfn, _data), end in zip(runs[1:], ends, strict=False))


def yield_cpu() -> None:
    """Lower this thread's priority by WRITER_NICE.  The save helper waits
    for the policy's answer after every batch, and on two busy cores a
    third thread copying pages made it wait for a CPU as well.  Its policy
    wait, as a share of precopy (3 runs each; a raw ping-pong in the same
    gaps took 1.2-2.3%): this thread at the reader's priority 3.2-3.6%,
    at nice 5 2.3-2.6%, SCHED_IDLE 1.6-1.7%.  Not SCHED_IDLE: beside a
    busy guest on the same CPU it would get a few per mille of it, and the
    reader, which waits for each half, would crawl with it; at nice 5 it
    still gets about a quarter."""
    me = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, me, min(os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICE, 19)
        )
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: it competes like any thread


def split_in_two(runs: list[Run], pages: int) -> tuple[list[Run], list[Run]]:
    """The runs' first `pages` pages, and the rest (a run may be cut)."""
    first: list[Run] = []
    for at, (pfn, data) in enumerate(runs):
        count = data.nbytes // PAGE_SIZE
        if count >= pages:
            if pages:
                first.append((pfn, data[: pages * PAGE_SIZE]))
            rest = [(pfn + pages, data[pages * PAGE_SIZE :])] if count > pages else []
            return first, rest + runs[at + 1 :]
        first.append((pfn, data))
        pages -= count
    return first, []
