"""Every policy decision on synthetic stats."""

from __future__ import annotations

import time

import pytest

from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats
from toolstack.host.stats import JobStats
from toolstack.policies import ConvergePolicy, PolicyRegistry, XenPolicy, guard
from toolstack.policies.base import Decision, Policy
from toolstack.policies.estimate import DEFAULT_COMMIT_MS, Estimator, _distinct, _writes


def make_policy(name, **settings):
    return PolicyRegistry().make(name, settings)


MS = 1_000_000
CONTINUE, STOP, ABORT = (
    PrecopyDecision.CONTINUE_PRECOPY,
    PrecopyDecision.STOP_AND_COPY,
    PrecopyDecision.ABORT,
)


class Steered:
    """What the toolstack does per batch: update the job's estimator, then
    ask the policy."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.estimate = Estimator()

    def ask(self, batch):
        self.estimate.update(batch)
        return self.policy.decide(batch, self.estimate)


def stats(
    iteration=0, dirty=-1, written=1024, remaining=0, total_bytes=0, t_ms=0, total=None, wait_us=0
):
    return PrecopyStats(
        iteration=iteration,
        total_written=total if total is not None else written,
        dirty_count=dirty,
        iter_written=written,
        iter_remaining=remaining,
        iter_bytes=written * 4104,
        total_bytes=total_bytes,
        domain_pages=262144,
        time_ns=t_ms * MS,
        stream_start_ns=0,
        policy_wait_ns=wait_us * 1000,
    )


def test_xen_continues_through_iteration_0_with_unknown_dirty_count():
    p = Steered(XenPolicy())
    for batch in range(10):
        assert p.ask(stats(0, -1, written=1024 * batch, remaining=5000)) == CONTINUE


def test_xen_stops_below_50_dirty_pages_or_after_5_iterations():
    p = Steered(XenPolicy())
    assert p.ask(stats(1, dirty=50)) == CONTINUE
    assert p.ask(stats(1, dirty=49)) == STOP and "fewer than 50" in p.policy.reason
    assert p.ask(stats(4, dirty=10_000)) == CONTINUE
    assert p.ask(stats(5, dirty=10_000)) == STOP and "5 iterations" in p.policy.reason
    tuned = Steered(make_policy("xen", max_dirty=10, max_iterations=2))
    assert tuned.ask(stats(1, dirty=20)) == CONTINUE
    assert tuned.ask(stats(2, dirty=20)) == STOP


def feed_bandwidth(p, mb_per_s: float, iteration=1, dirty=1000, remaining=1000, ms=300):
    """Batches every 10 ms at the given bandwidth; returns the last answer."""
    answer = None
    for step in range(ms // 10 + 1):
        t = step * 10
        answer = p.ask(
            stats(
                iteration,
                dirty,
                remaining=remaining,
                total_bytes=int(mb_per_s * 1e6 * t / 1000),
                t_ms=t,
            ),
        )
    return answer


def test_converge_never_decides_on_iteration_0_nor_before_a_dirty_pass_was_timed():
    p = Steered(make_policy("converge", downtime_limit=300))
    assert p.ask(stats(0, -1, remaining=10, total_bytes=1_000, t_ms=0)) == CONTINUE
    assert p.ask(stats(0, -1, remaining=0, total_bytes=10**9, t_ms=500)) == CONTINUE
    assert p.estimate.expected_downtime_ms is None
    # iteration 1 begins with pages to send: what they cost is not known yet
    assert p.ask(stats(1, 10, remaining=10, total_bytes=10**9, t_ms=510)) == CONTINUE
    assert p.estimate.expected_downtime_ms is None and p.estimate.pass_bandwidth is None
    # one batch of it timed (the stream's 100 ms window is not needed)
    assert p.ask(stats(1, 10, remaining=5, total_bytes=10**9 + 10**6, t_ms=515)) == STOP
    assert p.estimate.pass_bandwidth == pytest.approx(200e6)


def test_converge_switches_when_expected_downtime_fits_the_limit():
    # 100 MB/s; 1000 pages left = 4.1 MB = ~41 ms, + 15 ms for the switchover
    p = Steered(make_policy("converge", downtime_limit=300))
    assert feed_bandwidth(p, 100, remaining=1000) == STOP
    assert p.estimate.bandwidth == pytest.approx(100e6, rel=0.05)
    assert "within 300 ms" in p.policy.reason
    # same bandwidth, 100,000 pages left = ~4 s: keep copying
    q = Steered(make_policy("converge", downtime_limit=300))
    assert feed_bandwidth(q, 100, remaining=100_000) == CONTINUE
    assert q.estimate.expected_downtime_ms == pytest.approx(4096, rel=0.05)


def test_converge_counts_pages_redirtied_since_the_iteration_began():
    p = Steered(make_policy("converge", downtime_limit=300))
    # iteration 1 lasted 1 s and its end found 50,000 of 262,144 pages dirty:
    # ~55,000 uniform random writes a second (some pages were written twice)
    p.ask(stats(1, 20_000, remaining=20_000, total_bytes=0, t_ms=0))
    p.ask(stats(1, 20_000, remaining=0, total_bytes=400_000_000, t_ms=1000))
    p.ask(stats(2, 50_000, remaining=50_000, total_bytes=400_000_000, t_ms=1000))
    assert p.estimate.dirty_rate == pytest.approx(_writes(50_000, 262_144))
    assert 55_000 < p.estimate.dirty_rate < 55_500
    # 0 pages left in the iteration, but 100 ms passed: ~5,500 re-dirtied pages
    p.ask(stats(2, 50_000, remaining=0, total_bytes=440_000_000, t_ms=1100))
    redirtied = _distinct(p.estimate.dirty_rate * 0.1, 262_144)
    assert p.estimate.final_pages == pytest.approx(redirtied) and 5_400 < redirtied < 5_600
    pages_ms = redirtied * 4104 / 400e6 * 1000
    drain_ms = (4 << 20) / 400e6 * 1000  # the last of them still in the sockets
    expected = DEFAULT_COMMIT_MS + pages_ms + drain_ms
    assert p.estimate.expected_downtime_ms == pytest.approx(expected, rel=0.01)


def test_converge_fallbacks_after_max_iterations_or_timeout():
    p = Steered(make_policy("converge", downtime_limit=1, max_iterations=3))
    assert feed_bandwidth(p, 10, iteration=2, remaining=100_000) == CONTINUE
    assert p.ask(stats(3, 100_000, remaining=100_000, total_bytes=4_000_000, t_ms=400)) == STOP
    assert "3 iterations" in p.policy.reason and "stop-and-copy" in p.policy.reason
    q = Steered(make_policy("converge", downtime_limit=1, precopy_timeout=0.2, fallback="abort"))
    assert q.ask(stats(1, 10**5, remaining=10**5, t_ms=0)) == CONTINUE
    assert q.ask(stats(1, 10**5, remaining=10**5, t_ms=250)) == ABORT
    assert "timeout" in q.policy.reason


def test_converge_downtime_limit_0_leaves_only_the_fallbacks():
    p = Steered(make_policy("converge", downtime_limit=0, max_iterations=1000))
    assert feed_bandwidth(p, 100, remaining=0, dirty=0) == CONTINUE
    # nothing to copy: stopping costs the switchover alone (none measured yet)
    assert p.estimate.expected_downtime_ms == DEFAULT_COMMIT_MS


def test_operator_requests_and_live_settings():
    p = Steered(ConvergePolicy())
    p.policy.request(ABORT)
    assert p.ask(stats(0)) == ABORT and "operator" in p.policy.reason
    q = Steered(make_policy("converge", downtime_limit=10))
    assert feed_bandwidth(q, 100, remaining=1000) == CONTINUE  # ~41 + 15 + 42 ms drain > 10 ms
    q.policy.set("downtime_limit", "130")  # aiming at 104 ms
    assert q.ask(stats(1, 1000, remaining=1000, total_bytes=30_000_000, t_ms=310)) == STOP
    with pytest.raises(ValueError, match="no setting 'speed'"):
        q.policy.set("speed", "1")
    with pytest.raises(ValueError, match="not a number"):
        q.policy.set("downtime_limit", "fast")
    with pytest.raises(ValueError, match="fallback is"):
        q.policy.set("fallback", "teleport")
    q.policy.set("fallback", "postcopy")  # what the job may do if it was allowed to
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("qemu")


def test_bandwidth_is_the_lower_of_the_window_and_the_whole_run():
    # 100 MB/s for 1 s of data, then 1 GB/s for 150 ms of never-touched pages
    p = Steered(make_policy("converge", downtime_limit=1))
    p.ask(stats(0, -1, total_bytes=0, t_ms=0))
    p.ask(stats(0, -1, total_bytes=100_000_000, t_ms=1000))
    p.ask(stats(0, -1, total_bytes=250_000_000, t_ms=1150))
    assert p.estimate.bandwidth == pytest.approx(250e6 / 1.15, rel=0.01)


def test_job_stats_turn_the_helpers_wait_total_into_waits_per_call_and_a_share():
    job = JobStats("save", "vm")
    for t_ms, wait_us in [(10, 0), (20, 50), (30, 130), (40, 100), (50, 160)]:
        job.record_batch(stats(t_ms=t_ms, wait_us=wait_us))
    # 50, 80; the total running backwards (130 -> 100) is no wait; then 30 on from 130
    assert job.policy_waits_us == [50.0, 80.0, 30.0]
    assert job.policy_calls == 5 and job.policy_wait_ns == 160_000
    assert job.policy_share_of_precopy == round(160_000 / (50 * MS), 4)


def test_the_budget_charges_a_sleep_but_not_time_the_policy_never_had():
    """A policy that sleeps past its budget fails; time taken from ferryd by
    the host (no voluntary switch: the call only waited for a CPU) is not
    charged, only the CPU it used."""

    class Sleeps(Policy):
        def rule(self, stats, estimate):
            time.sleep(0.005)
            return Decision.CONTINUE_PRECOPY

    class Quick(Policy):
        def rule(self, stats, estimate):
            return Decision.CONTINUE_PRECOPY

    estimate = Estimator()
    with pytest.raises(guard.PolicyFailed, match="took 5.* ms to answer, over its budget of 2 ms"):
        guard.decide(Sleeps(), stats(1, 10), estimate, budget_ms=2.0)
    before = guard.resource.getrusage(guard.resource.RUSAGE_THREAD)
    assert guard._charged_ms(before, wall_ms=50.0) < 2.0  # no switch, next to no CPU: not its
    assert guard.decide(Quick(), stats(1, 10), estimate) == CONTINUE
