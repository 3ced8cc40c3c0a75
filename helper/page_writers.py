"""Two threads write each record's pages into the incoming guest's RAM.

Most of a restore's first pass is not the copy: it is the kernel
allocating each fresh page as its data lands (and, where this host is
itself a VM whose host reclaims free memory, a fault on that host too).
One thread does that one page after another.  So a record's pages are
split in two: this thread writes one half into the memfd (`write`), a
second thread copies the other half through the mapping
(`write_beside_others`; a second `pwritev` would wait for the memfd's
inode lock).  Their allocations proceed side by side, and the second
thread's half overlaps with reading the next record.

Measured on the 2-core VM (2 GiB of fresh memory, settled, a bare loop
receiving 4 MiB records from loopback TCP): one writer 340-356 MB/s, split
in two like this 517-621 MB/s.

The next record waits for the previous one's second half (`wait`), so
records are written in order: a page sent twice keeps its later version,
and a page cleared after it was written stays clear.
"""

from __future__ import annotations

import os
import queue
import threading

from hypervisor import GuestMemory
from protocol.limits import PAGE_SIZE

SPLIT_MIN_PAGES = 64  # fewer: the hand-over costs more than the second thread saves
SPLIT_MIN_RUN = 16  # pages a run on average, or one thread writes the record

Run = tuple[int, memoryview]  # (first pfn, its pages' data)


class PageWriters:
    """`write(runs)` writes a record's runs of pages, half of them by the
    time it returns; `wait()` for the rest (before anything else touches
    guest RAM); `close()` ends the second thread."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = False  # the second thread has a half to write
        self._thread = threading.Thread(target=self._run, name="page-writer", daemon=True)
        self._thread.start()

    def write(self, runs: list[Run]) -> None:
        self.wait()
        pages = sum(data.nbytes for _pfn, data in runs) // PAGE_SIZE
        if not self.worth_splitting(len(runs), pages):
            for pfn, data in runs:
                self.memory.write(pfn, data)
            return
        mine, theirs = split_in_two(runs, pages // 2)
        self._work.put(theirs)
        self._pending = True
        for pfn, data in mine:
            self.memory.write(pfn, data)

    def worth_splitting(self, runs: int, pages: int) -> bool:
        """Long runs of fresh pages (a first pass) gain from two threads
        allocating; pages scattered one by one (a dirty pass: pages long
        allocated) lose: a run through the mapping costs more calls than a
        pwritev, and the threads take turns on the GIL.  At 30,000 dirty
        pages/s, splitting those too measured 114 ms of downtime where 80
        were expected."""
        return pages >= SPLIT_MIN_PAGES and pages >= SPLIT_MIN_RUN * runs and self.running

    def wait(self) -> None:
        """Until the second thread has written its half (its error raised)."""
        if self._pending:
            self._pending = False
            error = self._done.get()
            if error is not None:
                raise error

    def close(self, timeout: float) -> None:
        """End the second thread, its half written or not (a failed restore)."""
        self._work.put(None)
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        run_when_idle()
        while (runs := self._work.get()) is not None:
            try:
                for pfn, data in runs:
                    self.memory.write_beside_others(pfn, data)
            except BaseException as exc:
                self._done.put(exc)
            else:
                self._done.put(None)


def run_when_idle() -> None:
    """Have this thread run only on a CPU nobody else wants (SCHED_IDLE).
    The save helper waits for the policy's answer after every batch, and
    on two busy cores a third thread copying pages made it wait for a CPU
    as well: its policy wait was 3.2-3.6% of precopy with this thread at
    normal priority, 1.6-1.7% with it idle.  The writer loses nothing by it: when it lags, the reader waits for it
    and leaves a CPU free (2 GiB whole jobs, interleaved, 6 each: 446-541
    MB/s as SCHED_IDLE, 457-541 without)."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
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
