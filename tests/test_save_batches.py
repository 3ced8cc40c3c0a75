"""The save helper's view of guest RAM: which pages hold data, and the
buffers a batch is sent from."""

from __future__ import annotations

import os

import numpy as np

from helper.save import DataExtents, Saver
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
