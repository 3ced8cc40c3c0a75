"""Bandwidth, dirty rate and expected downtime, from the helper's batch stats.

Shared by the converge policy (which decides on them) and a job's stats
(which show them): one estimator, one definition of each number.

    bandwidth          stream octets over the last BANDWIDTH_WINDOW or more, or
                       over the whole run if that is lower: pages never
                       touched go out faster than data, so the tail of a
                       first pass over a sparse guest would promise a final
                       pass (all data) faster than it will be
    pass bandwidth     what the final pass will get: stream octets per second
                       of the batches of the dirty-page passes (iteration 1
                       on), each batch timed from the call before it in the
                       same pass, over the last PASS_WINDOW or more, or over
                       all of them if that is lower.  These are the pages a
                       final pass sends (written by the guest), where the
                       first pass mostly sends holes without data, and a
                       stream with little left to send idles: `bandwidth`
                       says nothing about them.  Only passes whose pages
                       lie about as scattered as the final pass's count: a
                       page costs mostly per run of consecutive pages (its
                       own buffer, no prefetch), and a pass over nearly all
                       of RAM (after a long first pass) went at twice the
                       speed a few scattered pages get (3.2-4.4 against 6-10
                       us a page here).  A pass holding a share d of RAM has
                       1 - d runs a page (uniform random pages); it counts
                       when that is at least SCATTERED_ALIKE of the final
                       pass's.  None counts: unknown (one batch of the next
                       pass will tell).  The final pass, the guest paused,
                       has been up to ~20% faster than a precopy pass: the
                       estimate does not count on it.
    dirty rate         pages dirtied by the guest during the previous
                       iteration (the dirty count at the start of this one)
                       over that iteration's duration, counting the pages
                       written twice meanwhile as uniform random writes over
                       RAM would (the count saturates: a guest that dirties
                       50,000 pages/s through a 26 s first pass over 1 GiB
                       leaves 260,573 dirty, 9,800 a second)
    bitmap             the helper reading (and clearing) the dirty bitmap:
                       the time from the last call of a pass to the first of
                       the next (measured in this job: the slowest of its
                       last reads), what stop-and-copy does first
    switchover         what stopping costs besides the pages: the dirty
                       bitmap, the drain (what of the final pass is still in
                       the sockets after the source's last write, at most
                       IN_FLIGHT, at the pass bandwidth), then the vCPU context,
                       END, the destination's last writes, Ready, go, its
                       commit (state file, unpause, journal) and its answer
                       (`commit_ms`: measured on this host's last
                       switchovers, see SwitchoverHistory; DEFAULT_COMMIT_MS
                       before the first)
    final pages        pages left in this iteration + pages re-dirtied
                       since the bitmap was read and until the guest is
                       paused (the decision's lead: the journal entry and
                       the pause, as this host's last switchovers measured
                       it), at the dirty rate
    expected downtime  switchover + final pages' octets / pass bandwidth
                       (unknown until a dirty-page pass has been timed,
                       unless no page is left to send)

The measured downtime it predicts is a job's `downtime_ms`: the guest
paused at the source to running at the destination (a save: to the stream
complete).  Each part is taken at its slower recent measure (the lower
bandwidth, the longer bitmap read, the longer recent commits), so that the
downtime rarely exceeds the estimate: converge stops once the estimate fits
its limit, and the downtime should then too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from protocol._gen_helper_msgs import PrecopyStats
from protocol.libxc import page_data_size

BANDWIDTH_WINDOW_NS = 100_000_000  # at least this much time per bandwidth sample
PASS_WINDOW_NS = 50_000_000  # at least this much batch time per pass-bandwidth sample
PASS_BATCHES = 64  # the newest dirty-pass batches kept for the window
SCATTERED_ALIKE = 0.75  # a pass's runs per page, as a share of the final pass's, to count
DENSITY_BINS = 20  # the job's whole dirty-pass sums, by the pass's share of RAM
DEFAULT_COMMIT_MS = 15.0  # a switchover's commit before this host has measured one
BITMAP_SAMPLES = 5  # the last bitmap reads of a job the estimate uses (the slowest)
SATURATED = 0.99  # a dirty count above this share of RAM says little more
IN_FLIGHT = 4 << 20  # octets still crossing the link after the source's last write


@dataclass(frozen=True)
class Switchover:
    """One measured stop-and-copy (JobStats.finish): what the next estimate
    of the same kind of job to the same peer starts from."""

    commit_ms: float  # the last page sent to the guest running (or the file complete)
    lead_ms: float  # the decision's answer to the guest paused
    bitmap_ms: float | None  # the job's dirty-bitmap read, when it measured one


@dataclass(frozen=True)
class Prior:
    """What this host's last switchovers measured: a high measure of each piece."""

    commit_ms: float
    lead_ms: float
    bitmap_ms: float | None
    samples: int


class SwitchoverHistory:
    """The switchovers this ferryd measured, the last KEEP per (kind, peer).

    One ferryd is one host, so this is the host's history (kept in memory:
    a restarted daemon starts again from DEFAULT_COMMIT_MS)."""

    KEEP = 5

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str | None], deque[Switchover]] = {}
        self._by_kind: dict[str, deque[Switchover]] = {}

    def add(self, kind: str, peer: str | None, switchover: Switchover) -> None:
        for table, key in ((self._by_key, (kind, peer)), (self._by_kind, kind)):
            table.setdefault(key, deque(maxlen=self.KEEP)).append(switchover)

    def prior(self, kind: str, peer: str | None = None) -> Prior | None:
        """The last switchovers to this peer, else of this kind to any peer
        (else None): of each piece the second longest (the longest of fewer
        than three), which one outlier does not move."""
        recent = self._by_key.get((kind, peer)) or self._by_kind.get(kind)
        if not recent:
            return None
        bitmaps = [s.bitmap_ms for s in recent if s.bitmap_ms is not None]
        return Prior(
            commit_ms=_high([s.commit_ms for s in recent]),
            lead_ms=_high([s.lead_ms for s in recent]),
            bitmap_ms=_high(bitmaps) if bitmaps else None,
            samples=len(recent),
        )

    def clear(self) -> None:
        self._by_key.clear()
        self._by_kind.clear()


SWITCHOVERS = SwitchoverHistory()  # this host's (one ferryd process)


class Estimator:
    def __init__(self, prior: Prior | None = None) -> None:
        self.prior = prior  # this host's last switchovers; None: none measured yet
        self.bandwidth: float | None = None  # bytes/s
        self.pass_bandwidth: float | None = None  # bytes/s of dirty-page passes
        self.dirty_rate: float | None = None  # pages/s
        self.bitmap_ms: float | None = None  # this job's dirty-bitmap read
        self.switchover_ms: float | None = None  # the fixed part of the expected downtime
        self.final_pages: float | None = None  # what a final pass would send now
        self.expected_downtime_ms: float | None = None
        self.started_ns: int | None = None
        self._samples: deque[tuple[int, int]] = deque()  # (time_ns, total_bytes)
        self._first: tuple[int, int] | None = None
        self._iteration = -1
        self._iteration_start = 0
        self._last: PrecopyStats | None = None  # the previous call's stats
        # dirty-pass batches: the newest (ns, octets, the pass's share of RAM),
        # and all of the job's summed by that share
        self._batches: deque[tuple[int, int, float]] = deque(maxlen=PASS_BATCHES)
        self._bin_ns = [0] * DENSITY_BINS
        self._bin_octets = [0] * DENSITY_BINS
        self._bitmaps: deque[float] = deque(maxlen=BITMAP_SAMPLES)

    def update(self, stats: PrecopyStats) -> None:
        now = stats.time_ns
        if self.started_ns is None:
            self.started_ns = now
        self._track_pass(stats)
        self._track_iteration(stats, now)
        self._track_bandwidth(stats, now)
        self._last = stats
        self.expected_downtime_ms = self._expected_downtime_ms(stats, now)

    def elapsed_s(self, stats: PrecopyStats) -> float:
        started = stats.time_ns if self.started_ns is None else self.started_ns
        return (stats.time_ns - started) / 1e9

    @property
    def commit_ms(self) -> float:
        """After the last page: context, END, the destination's commit, its answer."""
        return self.prior.commit_ms if self.prior else DEFAULT_COMMIT_MS

    @property
    def lead_ms(self) -> float:
        """The decision to the guest paused: it still dirties pages meanwhile."""
        return self.prior.lead_ms if self.prior else 0.0

    def describe(self) -> str:
        """The expected downtime's parts, for a decision's reason."""
        if self.expected_downtime_ms is None or self.switchover_ms is None:
            return "unknown"
        text = f"{self.switchover_ms:.0f} ms switchover"
        if self.final_pages:
            mb_s = (self.pass_bandwidth or 0) / 1e6
            text += f" + {self.final_pages:,.0f} pages at {mb_s:.0f} MB/s"
        return text

    def _track_pass(self, stats: PrecopyStats) -> None:
        """Time each batch of a dirty-page pass from the call before it, and
        the dirty bitmap between two passes."""
        last = self._last
        if last is None or stats.time_ns <= last.time_ns:
            return
        elapsed = stats.time_ns - last.time_ns
        if stats.iteration != last.iteration:
            # the last call of a pass to the first of the next: the helper read
            # the bitmap (and, when it found nothing, slept: not a sample)
            if last.iteration >= 0 and stats.dirty_count > 0:
                self._bitmaps.append(elapsed / 1e6)
                self.bitmap_ms = max(self._bitmaps)
            return
        octets = stats.total_bytes - last.total_bytes
        if stats.iteration < 1 or octets <= 0:
            return
        density = _share(stats.dirty_count, stats.domain_pages)
        self._batches.append((elapsed, octets, density))
        index = _bin(density)
        self._bin_ns[index] += elapsed
        self._bin_octets[index] += octets

    def _pass_bandwidth(self, final_density: float) -> float | None:
        """Octets/s of the dirty-pass batches scattered like a final pass of
        `final_density`: the newest PASS_WINDOW of them, or all, if lower."""
        densest = 1.0 - SCATTERED_ALIKE * (1.0 - final_density)
        ns = octets = 0
        for elapsed, sent, density in reversed(self._batches):
            if density <= densest:
                ns, octets = ns + elapsed, octets + sent
                if ns >= PASS_WINDOW_NS:
                    break
        if not ns:
            return None
        bins = range(_bin(densest) + 1)
        all_ns = sum(self._bin_ns[b] for b in bins)
        all_octets = sum(self._bin_octets[b] for b in bins)
        window = octets / (ns / 1e9)
        return min(window, all_octets / (all_ns / 1e9)) if all_ns else window

    def _track_iteration(self, stats: PrecopyStats, now: int) -> None:
        if stats.iteration == self._iteration:
            return
        if self._iteration >= 0 and stats.dirty_count >= 0:
            seconds = max((now - self._iteration_start) / 1e9, 1e-6)
            self.dirty_rate = _writes(stats.dirty_count, stats.domain_pages) / seconds
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
        self.switchover_ms = self.final_pages = None
        if stats.dirty_count < 0:
            return None  # iteration 0: what the guest dirties is not known yet
        bitmap = self.bitmap_ms
        if bitmap is None:
            bitmap = self.prior.bitmap_ms if self.prior and self.prior.bitmap_ms else 0.0
        self.switchover_ms = bitmap + self.commit_ms
        redirtying_s = (now - self._iteration_start) / 1e9 + (bitmap + self.lead_ms) / 1e3
        writes = (self.dirty_rate or 0.0) * redirtying_s
        self.final_pages = stats.iter_remaining + _distinct(writes, stats.domain_pages)
        if stats.domain_pages > 0:  # never more than the guest has
            self.final_pages = min(self.final_pages, stats.domain_pages)
        self.pass_bandwidth = self._pass_bandwidth(_share(self.final_pages, stats.domain_pages))
        if self.final_pages < 0.5:
            return self.switchover_ms  # nothing to copy: stopping costs the switchover alone
        if not self.pass_bandwidth:
            return None  # no dirty-page pass like the final one timed yet: unknown
        octets = page_data_size(round(self.final_pages))
        self.switchover_ms += self.drain_ms(octets)
        return self.switchover_ms + octets / self.pass_bandwidth * 1000

    def drain_ms(self, octets: int) -> float:
        """After the source's last write of a final pass of `octets`, what is
        still in the sockets (at most IN_FLIGHT) reaches the destination's
        memory at the pass bandwidth: an idle guest's switchover has none."""
        if not self.pass_bandwidth:
            return 0.0
        return min(octets, IN_FLIGHT) / self.pass_bandwidth * 1000


def _share(pages: float, of: int) -> float:
    return min(max(pages / of, 0.0), 1.0) if of > 0 else 0.0


def _bin(density: float) -> int:
    """The DENSITY_BINS bin of a share of RAM; a share on a bin's edge goes below."""
    return max(0, min(math.ceil(density * DENSITY_BINS) - 1, DENSITY_BINS - 1))


def _high(values: list[float]) -> float:
    """The second largest of three or more values, else the largest."""
    ordered = sorted(values)
    return ordered[-2] if len(ordered) >= 3 else ordered[-1]


def _writes(dirty: int, pages: int) -> float:
    """How many uniform random page writes leave `dirty` of `pages` dirty."""
    if pages <= 0 or dirty <= 0:
        return float(max(dirty, 0))
    share = min(dirty / pages, SATURATED)
    return max(-pages * math.log1p(-share), dirty)


def _distinct(writes: float, pages: int) -> float:
    """The pages `writes` uniform random page writes dirty (the inverse)."""
    if pages <= 0:
        return writes
    return min(pages * -math.expm1(-writes / pages), writes)


def _rate(since: tuple[int, int], now: int, total_bytes: int) -> float | None:
    """Octets per second from the sample `since` to now, when the span is a window or more."""
    then, sent = since
    if now - then < BANDWIDTH_WINDOW_NS or total_bytes <= sent:
        return None
    return (total_bytes - sent) / ((now - then) / 1e9)
