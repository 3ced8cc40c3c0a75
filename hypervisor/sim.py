"""The simulated guest: a thread that dirties guest RAM at a chosen rate.

Write number j of the guest goes to a page drawn from block j // BLOCK of a
sequence seeded by (seed, block), so the pages written depend only on the
write index: a guest restored from (RAM, writes done) continues exactly the
sequence the source would have.  Page p at version v holds the 64-bit word
(p << 32) | v in all 512 of its words; version 0 is an untouched zero page.
The version lives only in the page: a write reads it from there.
Hence any page can be checked on its own, and the sum of all versions equals
the number of writes made: a lost page update shows up as a short sum.
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np

from protocol._gen_runner_msgs import Workload

from .backend import BackendError, unpack_context
from .memory import GuestMemory

BLOCK = 1024  # writes per seeded block of the sequence
TICK = 0.002  # seconds between bursts of writes
IDLE_TICK = 1.0  # an idle guest (rate 0) only wakes to be stopped
MAX_BURST = 512  # writes per burst at most: bounds how long a clean or pause waits
CHECK_CHUNK = 16384  # pages verified at a time by guest_check


def sequence_block(workload: Workload, pages: int, block: int) -> np.ndarray:
    """The BLOCK pages written by writes block*BLOCK .. block*BLOCK+BLOCK-1."""
    rng = np.random.default_rng([workload.seed, block])
    working = max(1, min(pages, int(pages * workload.working_set)))
    hot = max(1, working // 10)
    is_hot = rng.random(BLOCK) < workload.skew
    return np.where(is_hot, rng.integers(0, hot, BLOCK), rng.integers(0, working, BLOCK))


def sequence(workload: Workload, pages: int, start: int, end: int) -> np.ndarray:
    """Pages written by writes start .. end-1 (for tests and checks)."""
    first, last = start // BLOCK, (end - 1) // BLOCK if end > start else start // BLOCK
    blocks = [sequence_block(workload, pages, b) for b in range(first, last + 1)]
    seq = np.concatenate(blocks) if blocks else np.empty(0, np.int64)
    return seq[start - first * BLOCK : end - first * BLOCK]


def check_pages(words: np.ndarray, first: int) -> tuple[str, int]:
    """('', sum of versions) for pages first.. that hold what the guest
    wrote, or what is wrong with the first that does not."""
    head = words[:, 0]
    uniform = (words == head[:, None]).all(axis=1)
    if not uniform.all():
        return f"page {first + int(np.flatnonzero(~uniform)[0])} is torn (mixed contents)", 0
    tags = head >> np.uint64(32)
    pfns = np.arange(first, first + len(head), dtype=np.uint64)
    wrong = (head != 0) & (tags != pfns)
    if wrong.any():
        p = int(np.flatnonzero(wrong)[0])
        return f"page {first + p} holds page {int(tags[p])}'s contents", 0
    return "", int((head & np.uint64(0xFFFFFFFF)).sum())


class SimGuest:
    name = "sim"

    def __init__(self, memory: GuestMemory, workload: Workload, lock: threading.Lock):
        self.memory = memory
        self.workload = workload
        self.lock = lock
        self.pages = memory.pages
        self._writes = 0
        self._dirty = np.zeros(self.pages, dtype=bool)
        self._logdirty = False
        self._thread: threading.Thread | None = None
        self._running = threading.Event()  # set while the guest may write
        self._stopping = threading.Event()  # wakes the pacing loop at once
        self._block_index = -1
        self._block = None

    # -- running ----------------------------------------------------------
    def start(self, incoming: bool) -> None:
        # Nothing to load for a restored guest: a page's version is read from
        # the page itself when the guest next writes it.
        self._stopping.clear()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="sim-guest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        start_time, start_writes = time.monotonic(), self._writes
        idle = self.workload.dirty_rate <= 0
        while not self._stopping.wait(IDLE_TICK if idle else TICK):
            due = int(self.workload.dirty_rate * (time.monotonic() - start_time))
            burst = min(due - (self._writes - start_writes), MAX_BURST)
            if burst > 0:
                self._write(burst)

    def _write(self, count: int) -> None:
        pages = sequence(self.workload, self.pages, self._writes, self._writes + count)
        unique, counts = np.unique(pages, return_counts=True)
        # Postcopy: wait for missing pages here, without the GIL and outside the
        # lock, so that a page still on its way freezes only this thread.
        self.memory.ensure_present(unique)
        with self.lock:
            if not self._running.is_set():
                return
            versions = (self.memory.words[unique, 0] & np.uint64(0xFFFFFFFF)) + counts.astype(
                np.uint64
            )
            words = (unique.astype(np.uint64) << np.uint64(32)) | versions
            self.memory.words[unique] = words[:, None]
            if self._logdirty:
                self._dirty[unique] = True
            self._writes += count

    # -- log-dirty --------------------------------------------------------
    def logdirty(self, enable: bool) -> None:
        with self.lock:
            self._logdirty = enable
            self._dirty[:] = False

    def dirty_bitmap(self, clear: bool) -> tuple[int, bytes]:
        with self.lock:
            count = int(np.count_nonzero(self._dirty))
            bitmap = np.packbits(self._dirty, bitorder="little").tobytes()
            if clear:
                self._dirty[:] = False
        return count, bitmap

    # -- context ----------------------------------------------------------
    def get_context(self) -> bytes:
        """The guest's own state: how far along its write sequence it is.  Its
        workload (rate, working set, seed) is the domain's config, which the
        destination has already checked; a context never overrides it."""
        return msgpack.packb({"writes": self._writes})

    def set_context(self, blob: bytes) -> None:
        ctx = unpack_context(blob, "sim guest")
        writes = ctx.get("writes") if isinstance(ctx, dict) else None
        if type(writes) is not int or not 0 <= writes < 1 << 63:
            raise BackendError("not a sim guest context: 'writes' is not a count")
        self._writes = writes

    def writes(self) -> int:
        return self._writes

    def guest_check(self) -> str:
        """Every page uniform and tagged with its own pfn, versions summing to
        the writes made.  Holes are untouched zero pages: nothing to read."""
        with self.lock:
            total = 0
            for first_extent, end_extent in self.memory.data_extents():
                for first in range(first_extent, end_extent, CHECK_CHUNK):
                    end = min(end_extent, first + CHECK_CHUNK)
                    problem, versions = check_pages(self.memory.words[first:end], first)
                    if problem:
                        return problem
                    total += versions
            if total != self._writes:
                return f"page versions sum to {total}, but the guest made {self._writes} writes"
        return "ok"

    def close(self) -> None:
        self.stop()
