"""Bandwidth, dirty rate and expected downtime, from the helper's batch stats.

Shared by the converge policy (which decides on them) and a job's stats
(which show them): one estimator, one definition of each number.

    bandwidth          stream octets over the last BANDWIDTH_WINDOW or more, or
                       over the whole run if that is lower: pages never
                       touched go out faster than data, so the tail of a
                       first pass over a sparse guest would promise a final
                       pass (all data) faster than it will be
    dirty rate         pages dirtied by the guest during the previous
                       iteration (the dirty count at the start of this one)
                       over that iteration's duration
    expected downtime  (pages left in this iteration + pages re-dirtied since
                       its start at the dirty rate) * PAGE_SIZE / bandwidth
"""

from __future__ import annotations

from collections import deque

from protocol._gen_helper_msgs import PrecopyStats
from protocol.limits import PAGE_SIZE

BANDWIDTH_WINDOW_NS = 100_000_000  # at least this much time per bandwidth sample


class Estimator:
    def __init__(self) -> None:
        self.bandwidth: float | None = None  # bytes/s
        self.dirty_rate: float | None = None  # pages/s
        self.expected_downtime_ms: float | None = None
        self.started_ns: int | None = None
        self._samples: deque[tuple[int, int]] = deque()  # (time_ns, total_bytes)
        self._first: tuple[int, int] | None = None
        self._iteration = -1
        self._iteration_start = 0

    def update(self, stats: PrecopyStats) -> None:
        now = stats.time_ns
        if self.started_ns is None:
            self.started_ns = now
        self._track_iteration(stats, now)
        self._track_bandwidth(stats, now)
        self.expected_downtime_ms = self._expected_downtime_ms(stats, now)

    def elapsed_s(self, stats: PrecopyStats) -> float:
        started = stats.time_ns if self.started_ns is None else self.started_ns
        return (stats.time_ns - started) / 1e9

    def _track_iteration(self, stats: PrecopyStats, now: int) -> None:
        if stats.iteration == self._iteration:
            return
        if self._iteration >= 0 and stats.dirty_count >= 0:
            seconds = max((now - self._iteration_start) / 1e9, 1e-6)
            self.dirty_rate = stats.dirty_count / seconds
        self._iteration = stats.iteration
        self._iteration_start = now

    def _track_bandwidth(self, stats: PrecopyStats, now: int) -> None:
        self._samples.append((now, stats.total_bytes))
        if self._first is None:
            self._first = (now, stats.total_bytes)
        # keep the newest sample that is at least a window old, drop older ones
        while len(self._samples) >= 2 and self._samples[1][0] <= now - BANDWIDTH_WINDOW_NS:
            self._samples.popleft()
        window = _rate(self._samples[0], now, stats.total_bytes)
        if window is not None:
            whole = _rate(self._first, now, stats.total_bytes)
            self.bandwidth = min(window, whole) if whole else window

    def _expected_downtime_ms(self, stats: PrecopyStats, now: int) -> float | None:
        if stats.dirty_count == 0 and stats.iter_remaining == 0:
            return 0.0  # a pass found nothing dirty: stopping now copies nothing
        if stats.dirty_count < 0 or not self.bandwidth:
            return None  # iteration 0, or no bandwidth measured yet: unknown
        since_clean = (now - self._iteration_start) / 1e9
        remaining_pages = stats.iter_remaining + (self.dirty_rate or 0.0) * since_clean
        return remaining_pages * PAGE_SIZE / self.bandwidth * 1000


def _rate(since: tuple[int, int], now: int, total_bytes: int) -> float | None:
    """Octets per second from the sample `since` to now, when the span is a window or more."""
    then, sent = since
    if now - then < BANDWIDTH_WINDOW_NS or total_bytes <= sent:
        return None
    return (total_bytes - sent) / ((now - then) / 1e9)
