"""Sets of pfns as sorted numpy arrays, built without np.unique.

np.unique and np.union1d take 15-45 ms for 100,000 pfns with the numpy
this project runs on (measured here), several times a sort; during a
switchover every millisecond is downtime.  A stream's lists are usually
sorted already (ferry's sender sends them so), which a linear check sees.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np


def union(pages: int, *arrays: np.ndarray) -> np.ndarray:
    """The sorted union of pfn arrays, every pfn below `pages` (a bitmap)."""
    bits = np.zeros(pages, bool)
    for pfns in arrays:
        bits[np.asarray(pfns, np.intp)] = True
    return np.flatnonzero(bits).astype(np.uint64)


def sorted_distinct(pfns: np.ndarray) -> tuple[np.ndarray, bool]:
    """`pfns` sorted with each pfn once, and whether any came more than once."""
    pfns = np.asarray(pfns, np.uint64)
    if len(pfns) < 2 or bool((pfns[1:] > pfns[:-1]).all()):
        return pfns, False
    ordered = np.sort(pfns)
    first = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    return ordered[first], not bool(first.all())


def position(pfns, pfn: int) -> int | None:
    """Where `pfn` is in `pfns`, sorted, or None.  A binary search in Python:
    given a memoryview of the uint64 array (items are plain ints), one
    lookup calls no numpy at all, which on a postcopy fault's path matters
    (see libxc.ONE_RECORD); numpy's searchsorted with a Python int would
    convert the whole array first (O(n), 30 us for 65,536 pfns)."""
    i = bisect_left(pfns, pfn)
    return i if i < len(pfns) and pfns[i] == pfn else None


def positions(pfns: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `wanted` is in the sorted array `pfns`, and which of
    them are there at all (an index is meaningless where not found)."""
    index = np.searchsorted(pfns, wanted)
    found = index < len(pfns)
    found[found] = pfns[index[found]] == wanted[found]
    return index, found


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """(first pfn, count) of each stretch of consecutive pfns, in order."""
    if not len(pfns):
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pfns)]))
    return list(zip(pfns[starts].tolist(), (ends - starts).tolist(), strict=True))
