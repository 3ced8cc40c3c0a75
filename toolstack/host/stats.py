"""What a job knows about itself: the numbers `ferry job` shows.

Modelled on `virsh domjobinfo`: phase, time elapsed, memory processed and
remaining, dirty rate, bandwidth, expected and measured downtime, plus the
per-iteration counts and how long the helper waited for policy answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol._gen_control_msgs import Iteration as IterationReport
from protocol._gen_control_msgs import JobReport, PostcopyReport
from protocol.libxc import page_data_size
from protocol.limits import PAGE_SIZE

from ..policies.estimate import SWITCHOVERS, Estimator, Switchover


@dataclass
class Iteration:
    pages: int = 0
    bytes: int = 0
    dirty_at_start: int = -1
    final: bool = False  # the stop-and-copy pass, sent with the guest suspended


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


HISTOGRAM_BUCKETS = 24  # power-of-two microseconds, as QEMU 10.1 reports postcopy faults


def histogram(latencies_us: list[int]) -> list[int]:
    """Counts by bucket: bucket i holds [2^i, 2^(i+1)) us, bucket 0 also 0-1 us,
    the last bucket everything above."""
    counts = [0] * HISTOGRAM_BUCKETS
    for us in latencies_us:
        counts[min(max(int(us), 1).bit_length() - 1, HISTOGRAM_BUCKETS - 1)] += 1
    return counts


@dataclass
class Postcopy:
    """A migration's postcopy phase, as one side sees it."""

    pages: int = 0
    done: int = 0  # sent (source) or in place (destination)
    requested: int = 0
    octets: int = 0
    fault_us: list[int] = field(default_factory=list)  # destination: one per fault served
    fault_histogram: list[int] | None = None  # source: the destination's, at the end
    fault_p50_us: float | None = None
    fault_p99_us: float | None = None
    started_ns: int = field(default_factory=time.monotonic_ns)  # the guest ran at the destination
    ended_ns: int | None = None  # every page was there

    def report(self) -> PostcopyReport:
        if self.fault_histogram is None:  # measured here
            hist = histogram(self.fault_us)
            p50 = percentile(self.fault_us, 0.5)
            p99 = percentile(self.fault_us, 0.99)
        else:  # the destination's account
            hist, p50, p99 = self.fault_histogram, self.fault_p50_us, self.fault_p99_us
        end = self.ended_ns or time.monotonic_ns()
        return PostcopyReport(
            pages=self.pages,
            pushed=max(self.done - self.requested, 0),
            requested=self.requested,
            fault_p50_us=_round(p50),
            fault_p99_us=_round(p99),
            fault_histogram=hist,
            ms=round((end - self.started_ns) / 1e6, 1),
            bytes=self.octets,
        )


@dataclass
class JobStats:
    kind: str
    domain: str
    memory_bytes: int = 0
    phase: str = "starting"
    started_ns: int = field(default_factory=time.monotonic_ns)
    ended_ns: int | None = None
    iterations: list[Iteration] = field(default_factory=list)
    pages_sent: int = 0
    zero_pages: int = 0  # of pages_sent, sent without data (precopy batches)
    bytes_sent: int = 0
    remaining_pages: int | None = None
    estimate: Estimator = field(default_factory=Estimator)
    suspended_ns: int | None = None
    resumed_ns: int | None = None  # destination unpaused (or the save finished)
    policy_calls: int = 0
    # Each policy round trip: the helper's call sent (its stats' time_ns) to
    # ferryd's answer leaving (both on CLOCK_MONOTONIC of this host).
    policy_rtts_us: list[float] = field(default_factory=list)
    # How long the helper was blocked for each answer, as it timed it: the
    # round trip less whatever it prepared meanwhile (the next batch).
    policy_waits_us: list[float] = field(default_factory=list)
    policy_wait_ns: int = 0  # the helper's time waiting for answers, as of its last call
    precopy_ns: int = 0  # the helper's stream start to its last policy call
    connections: int | None = None  # a migration's, for precopy pages
    helper_peak_rss: int | None = None  # VmHWM of the helper when it completed
    decision: str = ""  # the last non-continue decision and why
    source_digest: str = ""  # RAM digest of the suspended source, when asked for
    peer: str | None = None  # a migration's other daemon
    verify: dict = field(default_factory=dict)  # integrity, digests, verify_ms (migrate --verify)
    stream_start_ns: int | None = None  # the helper's first write
    stream_end_ns: int | None = None  # the helper's `complete`
    error: str = ""
    postcopy: Postcopy | None = None  # from the switch on
    # the switchover's pieces, as this job measures them for the next (SWITCHOVERS)
    answered_ns: int | None = None  # the last policy answer left (the decision, at the end)
    paused_ns: int | None = None  # the guest paused (suspended_ns, before any correction)
    final_sent_ns: int | None = None  # the last page of the final pass left the helper

    # -- updates ----------------------------------------------------------
    def record_batch(self, stats) -> None:
        """From a precopy_policy call: the helper's counters after a batch."""
        if not self.policy_calls and self.estimate.prior is None:
            self.estimate.prior = SWITCHOVERS.prior(self.switchover_kind, self.peer)
        self.estimate.update(stats)
        self.stream_start_ns = stats.stream_start_ns
        waited = stats.policy_wait_ns - self.policy_wait_ns
        if self.policy_calls and waited >= 0:  # the previous call's wait, as the helper timed it
            self.policy_waits_us.append(waited / 1e3)
        # A helper whose running total goes backwards is wrong about it: keep
        # what it reported before rather than a negative wait.
        self.policy_calls += 1
        self.policy_wait_ns = max(self.policy_wait_ns, stats.policy_wait_ns)
        self.precopy_ns = stats.time_ns - stats.stream_start_ns
        while len(self.iterations) <= stats.iteration:
            self.iterations.append(Iteration())
        it = self.iterations[stats.iteration]
        it.pages, it.bytes, it.dirty_at_start = (
            stats.iter_written,
            stats.iter_bytes,
            stats.dirty_count,
        )
        self.pages_sent = stats.total_written
        self.zero_pages = stats.zero_pages
        self.bytes_sent = stats.total_bytes
        self.remaining_pages = stats.iter_remaining

    def record_answer(self, sent_ns: int) -> None:
        """The policy's answer to the call the helper sent at `sent_ns` has left."""
        self.answered_ns = time.monotonic_ns()
        self.policy_rtts_us.append((self.answered_ns - sent_ns) / 1e3)

    def record_suspend(self) -> None:
        """Stop and copy begins: the next pages go into the final pass (the
        iteration that was stopped before it sent anything, or a new one)."""
        self.phase = "stop-and-copy"
        self.suspended_ns = self.paused_ns = time.monotonic_ns()
        if not self.iterations or self.iterations[-1].pages:
            self.iterations.append(Iteration())
        self.iterations[-1].final = True
        self._final_base = (self.pages_sent, self.bytes_sent)

    def record_progress(self, done: int, total: int) -> None:
        self.remaining_pages = total - done
        if self.phase == "stop-and-copy":
            self.final_sent_ns = time.monotonic_ns()
            final = self.iterations[-1]
            final.pages, final.bytes = done, page_data_size(done)
            self.pages_sent = self._final_base[0] + done
            self.bytes_sent = self._final_base[1] + final.bytes

    def record_switch(self) -> None:
        """The guest runs at the destination now; its last pages follow (postcopy)."""
        if self.iterations and self.iterations[-1].final and not self.iterations[-1].pages:
            self.iterations.pop()  # the suspend opened a final pass that postcopy replaced
        self.phase = "postcopy"
        self.resumed_ns = time.monotonic_ns()  # the switchover's downtime ends here
        if self.postcopy is None:
            self.postcopy = Postcopy()

    def record_postcopy(self, pages, done, requested, octets, fault_us) -> None:
        if self.postcopy is None:
            self.postcopy = Postcopy()
        pc = self.postcopy
        pc.pages, pc.done, pc.requested, pc.octets = pages, done, requested, octets
        pc.fault_us.extend(fault_us)
        if pages and done >= pages and pc.ended_ns is None:
            pc.ended_ns = time.monotonic_ns()

    def record_received(self, pages: int, octets: int) -> None:
        """A restore's progress: for receiving jobs, "sent" counts what arrived."""
        self.pages_sent, self.bytes_sent = pages, octets

    def finish(self, phase: str, error: str = "") -> None:
        if phase == "completed":
            self.remaining_pages = 0  # whatever the last progress said
            switchover = self.measured_switchover()
            if switchover is not None:
                SWITCHOVERS.add(self.switchover_kind, self.peer, switchover)
        self.phase = phase
        self.error = error
        self.ended_ns = time.monotonic_ns()

    # -- derived ----------------------------------------------------------
    @property
    def switchover_kind(self) -> str:
        """Switchovers compare within a kind of job and a guest size (to a
        power of two): the helpers' teardown of the guest's mapping, in the
        commit, grows with it (a 2 GiB migration's commit priced a 1 GiB
        idle guest's switchover at 56 ms, against 11 measured)."""
        return f"{self.kind} of 2^{max(self.memory_bytes, 1).bit_length()} octets"

    def measured_switchover(self) -> Switchover | None:
        """A stop-and-copy's pieces, as the estimate counts them: the commit
        (the last page sent to the guest running: downtime less the final
        pass at the source, which begins with the dirty bitmap) and the lead
        (the decision's answer to the guest paused).  None for jobs without
        one (restores, postcopy, failures)."""
        if self.kind not in ("migrate", "save") or self.postcopy is not None:
            return None
        downtime = self.downtime_ms
        if downtime is None or self.paused_ns is None:
            return None
        if self.final_sent_ns is not None:  # pages went: the bitmap is in the pass
            final_pass_ms = (self.final_sent_ns - self.paused_ns) / 1e6
            final_pass_ms += self.estimate.drain_ms(self.iterations[-1].bytes)
        else:
            final_pass_ms = self.estimate.bitmap_ms or 0.0
        lead_ms = 0.0
        if self.answered_ns is not None and self.answered_ns <= self.paused_ns:
            lead_ms = (self.paused_ns - self.answered_ns) / 1e6
        return Switchover(
            commit_ms=max(downtime - final_pass_ms, 0.0),
            lead_ms=lead_ms,
            bitmap_ms=self.estimate.bitmap_ms,
        )

    @property
    def elapsed_ms(self) -> float:
        end = self.ended_ns or time.monotonic_ns()
        return (end - self.started_ns) / 1e6

    @property
    def running_after_ms(self) -> float | None:
        """A migration's whole job as QEMU times one: the request to the
        guest running at the destination."""
        if self.kind != "migrate" or self.resumed_ns is None:
            return None
        return (self.resumed_ns - self.started_ns) / 1e6

    @property
    def stream_ms(self) -> float | None:
        """How long the helper took to write the whole stream."""
        if self.stream_start_ns is None or self.stream_end_ns is None:
            return None
        return (self.stream_end_ns - self.stream_start_ns) / 1e6

    @property
    def downtime_ms(self) -> float | None:
        if self.suspended_ns is None or self.resumed_ns is None:
            return None
        return (self.resumed_ns - self.suspended_ns) / 1e6

    @property
    def policy_share_of_precopy(self) -> float | None:
        """The fraction of precopy the helper spent waiting for answers."""
        if not self.precopy_ns:
            return None
        return round(self.policy_wait_ns / self.precopy_ns, 4)

    def report(self, running: bool, policy=None) -> JobReport:
        """What `ferry job` shows (the JSON keys are JobReport's fields)."""
        e = self.estimate
        remaining = None if self.remaining_pages is None else self.remaining_pages * PAGE_SIZE
        return JobReport(
            kind=self.kind,
            domain=self.domain,
            phase=self.phase,
            running=running,
            iteration=max(0, len(self.iterations) - 1),
            elapsed_ms=round(self.elapsed_ms, 1),
            running_after_ms=_round(self.running_after_ms),
            connections=self.connections,  # set for migrations only
            memory_total_bytes=self.memory_bytes,
            memory_processed_bytes=self.pages_sent * PAGE_SIZE,
            memory_remaining_bytes=remaining,
            pages_sent=self.pages_sent,
            bytes_sent=self.bytes_sent,
            zero_pages=self.zero_pages,
            dirty_rate_pages_s=_round(e.dirty_rate),
            bandwidth_mb_s=_round(e.bandwidth and e.bandwidth / 1e6),
            expected_downtime_ms=_round(e.expected_downtime_ms),
            downtime_ms=_round(self.downtime_ms),
            stream_ms=_round(self.stream_ms),
            iterations=[
                IterationReport(
                    pages=it.pages, bytes=it.bytes, dirty_at_start=it.dirty_at_start, final=it.final
                )
                for it in self.iterations
            ],
            policy=policy.name if policy else None,
            settings=policy.settings() if policy else {},
            policy_rpcs=self.policy_calls,
            policy_rpc_p50_us=_round(percentile(self.policy_rtts_us, 0.5)),
            policy_rpc_p99_us=_round(percentile(self.policy_rtts_us, 0.99)),
            policy_wait_p50_us=_round(percentile(self.policy_waits_us, 0.5)),
            policy_wait_p99_us=_round(percentile(self.policy_waits_us, 0.99)),
            policy_share_of_precopy=self.policy_share_of_precopy,
            helper_peak_rss_bytes=self.helper_peak_rss,
            decision=self.decision,
            error=self.error,
            peer=self.peer,
            postcopy=self.postcopy.report() if self.postcopy else None,
            **self.verify,
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
