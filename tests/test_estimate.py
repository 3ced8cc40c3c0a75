"""The expected downtime counts what the switchover itself costs, as measured
(this job's dirty-bitmap reads and dirty-page passes, this host's last
switchovers), on synthetic batch stats."""

from __future__ import annotations

import pytest

from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats
from protocol.libxc import page_data_size
from toolstack.host import stats as job_stats
from toolstack.host.stats import JobStats
from toolstack.policies import PolicyRegistry
from toolstack.policies.builtin import HEADROOM
from toolstack.policies.estimate import (
    DEFAULT_COMMIT_MS,
    Estimator,
    Prior,
    Switchover,
    SwitchoverHistory,
)

MS = 1_000_000
PAGES = 262_144  # a 1 GiB guest
CONTINUE, STOP = PrecopyDecision.CONTINUE_PRECOPY, PrecopyDecision.STOP_AND_COPY


def batch(iteration, dirty, remaining, total_bytes, t_ms, written=0) -> PrecopyStats:
    return PrecopyStats(
        iteration=iteration,
        total_written=written,
        dirty_count=dirty,
        iter_written=written,
        iter_remaining=remaining,
        iter_bytes=0,
        total_bytes=int(total_bytes),
        domain_pages=PAGES,
        time_ns=int(t_ms * MS),
        stream_start_ns=0,
        policy_wait_ns=0,
    )


class Job:
    """A converge policy and the job's estimator, fed batch by batch."""

    def __init__(self, limit_ms: float, prior: Prior | None = None) -> None:
        self.policy = PolicyRegistry().make("converge", {"downtime_limit": limit_ms})
        self.estimate = Estimator(prior)
        self.t_ms = 0.0
        self.octets = 0

    def ask(self, iteration, dirty, remaining, sent_pages=0, ms=0.0, mb_s=400.0):
        """A call `ms` after the last, having sent `sent_pages` at `mb_s`."""
        self.t_ms += ms
        self.octets += sent_pages * 4104
        if sent_pages and not ms:
            self.t_ms += sent_pages * 4104 / (mb_s * 1e6) * 1000
        stats = batch(iteration, dirty, remaining, self.octets, self.t_ms)
        self.estimate.update(stats)
        return self.policy.decide(stats, self.estimate)

    def dirty_pass(self, pages: int, mb_s: float = 400.0, iteration: int = 1) -> PrecopyDecision:
        """An iteration of `pages` dirty pages, sent in batches of 1024 at `mb_s`
        by a guest that dirties nothing meanwhile; the last answer."""
        answer = self.ask(iteration, pages, pages, ms=2.0)
        left = pages
        while left and answer == CONTINUE:
            sent = min(left, 1024)
            left -= sent
            answer = self.ask(iteration, pages, left, sent_pages=sent, mb_s=mb_s)
        return answer


def first_pass(job: Job, ms: float = 500.0, mb_s: float = 2000.0) -> None:
    """Iteration 0 over a sparse guest: mostly holes, fast."""
    for step in range(11):
        job.ask(0, -1, PAGES - step * PAGES // 10, ms=0 if step == 0 else ms / 10, mb_s=mb_s)
        job.octets += int(mb_s * 1e6 * ms / 10 / 1000)


def test_a_measured_switchover_of_40ms_leaves_no_room_for_20ms_of_pages_in_70():
    """The switchover measured 40 ms on this host: 20 ms of pages left would
    have fitted a 70 ms limit (converge aims at 56) by pages alone, not with it."""
    pages_20ms = int(20e-3 * 400e6 / 4104)  # ~1950 pages at 400 MB/s
    prior = Prior(commit_ms=40.0, lead_ms=0.0, bitmap_ms=None, samples=3)
    job = Job(limit_ms=70, prior=prior)
    first_pass(job)
    assert job.dirty_pass(8192) == CONTINUE  # iteration 1 times what a dirty page costs
    assert job.ask(2, pages_20ms, pages_20ms, ms=2.0) == CONTINUE
    e = job.estimate
    drain = e.drain_ms(page_data_size(pages_20ms))  # the last 4 MiB still in the sockets
    assert drain == pytest.approx((4 << 20) / 400e6 * 1000, rel=0.01)
    assert e.switchover_ms == pytest.approx(40 + e.bitmap_ms + drain)
    assert e.bitmap_ms == pytest.approx(2)
    assert e.expected_downtime_ms == pytest.approx(62 + drain, abs=1.5)
    assert e.pass_bandwidth == pytest.approx(400e6, rel=0.01)
    # ... and stops once the pages fit beside it (about 8 ms of them)
    answer, left = CONTINUE, pages_20ms
    while answer == CONTINUE and left:
        left -= 256
        answer = job.ask(2, pages_20ms, left, sent_pages=256)
    assert answer == STOP and 40 < e.expected_downtime_ms <= 70 * HEADROOM
    assert "ms switchover + " in job.policy.reason and "at 400 MB/s" in job.policy.reason
    # the same pages with no switchover measured: the default's 15 ms
    fresh = Job(limit_ms=70)
    first_pass(fresh)
    fresh.dirty_pass(8192)
    assert fresh.ask(2, pages_20ms, pages_20ms, ms=2.0) == STOP
    expected = DEFAULT_COMMIT_MS + 2 + 20 + drain
    assert fresh.estimate.expected_downtime_ms == pytest.approx(expected, abs=1)


def test_the_final_pass_is_costed_at_what_dirty_pages_got_not_the_sweep_over_holes():
    """Iteration 0 streamed holes at 2 GB/s; dirty pages go at 300 MB/s.
    12,000 pages left look like 25 ms by the first, cost 164 ms by the second."""
    job = Job(limit_ms=100)
    first_pass(job, mb_s=2000)
    assert job.estimate.bandwidth > 1.5e9
    # the new iteration's first call: no dirty page timed yet, so no estimate
    assert job.ask(1, 12_000, 12_000, ms=2.0) == CONTINUE
    assert job.estimate.expected_downtime_ms is None
    assert job.ask(1, 12_000, 12_000 - 1024, sent_pages=1024, mb_s=300) == CONTINUE
    e = job.estimate
    assert e.pass_bandwidth == pytest.approx(300e6, rel=0.01)
    # 10,976 pages left and ~400 dirtied since the bitmap read (~24,000 a second)
    assert 12_000 - 1024 < e.final_pages < 12_000 - 1024 + 450
    octets = page_data_size(round(e.final_pages))
    drain = (4 << 20) / 300e6 * 1000  # what is still in the sockets after the last write
    expected = octets / 300e6 * 1000 + 15 + 2 + drain
    assert e.expected_downtime_ms == pytest.approx(expected, rel=0.001)
    assert e.expected_downtime_ms > 150


def test_a_slow_batch_lowers_the_pass_bandwidth_until_it_leaves_the_window_and_the_mean():
    job = Job(limit_ms=1)
    first_pass(job)
    job.ask(1, 100_000, 100_000, ms=2.0)
    left = 100_000
    for mb_s in [400] * 10 + [100] + [400] * 40:
        left -= 1024
        job.ask(1, 100_000, left, sent_pages=1024, mb_s=mb_s)
        if mb_s == 100:
            assert job.estimate.pass_bandwidth < 300e6  # the window holds the slow batch
    # the slow batch left the 50 ms window; the job's whole mean still counts it
    whole = 51 * 1024 * 4104 / ((50 * 1024 * 4104 / 400e6) + 1024 * 4104 / 100e6)
    assert job.estimate.pass_bandwidth == pytest.approx(whole, rel=0.001)
    assert whole < 400e6


def test_nothing_dirty_costs_the_switchover_alone_and_an_empty_pass_is_no_bitmap_sample():
    job = Job(limit_ms=100)
    first_pass(job)
    # the helper found nothing dirty and slept 5 ms before asking: not a bitmap read
    assert job.ask(1, 0, 0, ms=5.5) == STOP
    e = job.estimate
    assert e.bitmap_ms is None and e.final_pages == 0
    assert e.expected_downtime_ms == e.switchover_ms == DEFAULT_COMMIT_MS
    assert job.policy.reason.startswith("expected downtime 15 ms (15 ms switchover)")
    limited = Job(limit_ms=10)  # less than a switchover costs: only a fallback stops it
    first_pass(limited)
    assert limited.ask(1, 0, 0, ms=5.5) == CONTINUE


def test_pages_dirtied_since_the_bitmap_and_during_the_lead_count():
    prior = Prior(commit_ms=10.0, lead_ms=4.0, bitmap_ms=None, samples=3)
    job = Job(limit_ms=1, prior=prior)
    first_pass(job, ms=1000)
    job.ask(1, 50_000, 50_000, ms=3.0)  # a 3 ms bitmap read after a 1 s pass
    e = job.estimate
    assert e.bitmap_ms == pytest.approx(3.0)
    rate = e.dirty_rate  # 50,000 of 262,144 in ~1 s: ~55,000 writes/s
    assert 54_000 < rate < 56_000
    # redirtied meanwhile: 3 ms bitmap + 4 ms lead, at that rate
    assert e.final_pages == pytest.approx(50_000 + rate * 0.007, abs=2)


def test_a_saturated_dirty_count_is_not_read_as_a_slow_guest():
    """50,000 writes/s through a 26.6 s first pass leave 260,573 of 262,144
    pages dirty: 9,800/s by the count, ~45,000 by what it takes to get there."""
    job = Job(limit_ms=100)
    first_pass(job, ms=26_600)
    job.ask(1, 260_573, 260_573, ms=0.0)
    assert 40_000 < job.estimate.dirty_rate < 50_000


def test_history_takes_the_second_longest_of_recent_switchovers_per_peer():
    h = SwitchoverHistory()
    assert h.prior("migrate", "b:1") is None
    h.add("migrate", "b:1", Switchover(commit_ms=12, lead_ms=2, bitmap_ms=None))
    assert h.prior("migrate", "b:1").commit_ms == 12  # one: that one
    for commit in (10, 60, 11):  # one outlier among them
        h.add("migrate", "b:1", Switchover(commit_ms=commit, lead_ms=1, bitmap_ms=3))
    p = h.prior("migrate", "b:1")
    assert (p.commit_ms, p.lead_ms, p.bitmap_ms, p.samples) == (12, 1, 3, 4)
    for commit in (20, 21, 22, 23, 24):  # only the last KEEP count
        h.add("migrate", "b:1", Switchover(commit_ms=commit, lead_ms=1, bitmap_ms=None))
    assert h.prior("migrate", "b:1").commit_ms == 23
    assert h.prior("migrate", "c:1").commit_ms == 23  # a new peer: this host's migrations
    h.add("migrate", "c:1", Switchover(commit_ms=50, lead_ms=1, bitmap_ms=None))
    assert h.prior("migrate", "c:1").commit_ms == 50
    assert h.prior("save") is None  # a save file costs something else


def test_a_completed_switchover_is_measured_into_the_next_jobs_estimate(monkeypatch):
    history = SwitchoverHistory()
    monkeypatch.setattr(job_stats, "SWITCHOVERS", history)
    job = JobStats("migrate", "vm")
    job.peer = "b:8002"
    job.record_batch(batch(1, 500, 500, 0, 0))
    job.record_batch(batch(2, 300, 300, 10**6, 10))
    assert job.estimate.prior is None and job.estimate.bitmap_ms == 10
    job.answered_ns = 100 * MS  # the decision's answer
    job.record_suspend()
    # the guest paused 3 ms after the answer; its 300 pages left in 20 ms;
    # the guest ran at the destination 12 ms later
    job.suspended_ns = job.paused_ns = 103 * MS
    job.record_progress(300, 300)
    job.final_sent_ns = 123 * MS
    job.resumed_ns = 135 * MS
    job.finish("completed")
    measured = history.prior(job.switchover_kind, "b:8002")
    assert (measured.commit_ms, measured.lead_ms, measured.bitmap_ms) == (12, 3, 10)
    nothing = JobStats("migrate", "idle")  # nothing dirty: the final pass is the bitmap
    nothing.peer = "b:8002"
    nothing.record_batch(batch(1, 0, 0, 0, 0))
    nothing.record_suspend()
    nothing.suspended_ns, nothing.resumed_ns = nothing.paused_ns, nothing.paused_ns + 9 * MS
    nothing.finish("completed")
    assert history.prior(job.switchover_kind, "b:8002").commit_ms == 12  # the longer of 12 and 9
    # the next migration to that peer starts from them
    following = JobStats("migrate", "vm2")
    following.peer = "b:8002"
    following.record_batch(batch(1, 0, 0, 0, 0))
    assert following.estimate.prior.commit_ms == 12
    assert following.estimate.expected_downtime_ms == pytest.approx(12 + 10)
    # a failed job, a restore and a postcopy measure nothing
    for kind, phase in (("migrate", "failed"), ("restore", "completed")):
        other = JobStats(kind, "x")
        other.record_suspend()
        other.resumed_ns = other.paused_ns + 500 * MS
        other.finish(phase)
    assert history.prior(job.switchover_kind, "b:8002").samples == 2
    # a guest of another size starts from the default
    bigger = JobStats("migrate", "big", 2 << 30)
    bigger.peer = "b:8002"
    bigger.record_batch(batch(1, 0, 0, 0, 0))
    assert bigger.estimate.prior is None


def test_a_pass_over_nearly_all_of_ram_does_not_price_a_few_scattered_pages():
    """After a long first pass nearly every page is dirty: that pass goes at
    800 MB/s (long runs of pages); the pages dirtied meanwhile lie scattered,
    and go at 400.  The dense pass's batches do not price them."""
    job = Job(limit_ms=300)
    first_pass(job, ms=60_000)
    dense = 250_000  # 95% of RAM: ~13,000 writes a second over the 60 s
    assert job.ask(1, dense, dense, ms=2.0) == CONTINUE
    left, e = dense, job.estimate
    while left:
        sent = min(left, 1024)
        left -= sent
        assert job.ask(1, dense, left, sent_pages=sent, mb_s=800) == CONTINUE
        if left == dense - 1024:  # stopped now, the final pass would be as dense: its speed
            assert e.pass_bandwidth == pytest.approx(800e6, rel=0.01)
    # the pass took 1.3 s: ~16,000 pages dirtied meanwhile, 6% of RAM, scattered
    assert 15_000 < e.final_pages < 18_000
    assert e.expected_downtime_ms is None and e.pass_bandwidth is None
    assert job.ask(2, 16_500, 16_500, ms=2.0) == CONTINUE and e.expected_downtime_ms is None
    # one batch of the scattered pass at 400 MB/s prices them
    assert job.ask(2, 16_500, 16_500 - 1024, sent_pages=1024, mb_s=400) == STOP
    assert e.pass_bandwidth == pytest.approx(400e6, rel=0.01)
    pages_ms = page_data_size(round(e.final_pages)) / 400e6 * 1000
    assert e.expected_downtime_ms == pytest.approx(e.switchover_ms + pages_ms)
    assert 150 < pages_ms < 170  # the dense pass's speed would have promised half that
