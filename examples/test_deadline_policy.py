"""The deadline policy on synthetic batches (a real migration steered by it,
loaded with --policy-module, is in tests/test_user_policies.py)."""

from __future__ import annotations

import time

import pytest

from examples.deadline_policy import DeadlinePolicy
from protocol._gen_helper_msgs import PrecopyStats
from toolstack import Decision, Estimator, PolicyError

MS = 1_000_000


def batch(t_ms: int, iteration=1, dirty=100_000, remaining=50_000, mb_s=100.0) -> PrecopyStats:
    return PrecopyStats(
        iteration=iteration,
        total_written=0,
        dirty_count=dirty,
        iter_written=0,
        iter_remaining=remaining,
        iter_bytes=0,
        total_bytes=int(mb_s * 1e6 * t_ms / 1000),
        domain_pages=1 << 18,
        time_ns=t_ms * MS,
        stream_start_ns=0,
        policy_wait_ns=0,
    )


def run(policy, until_ms: int, **kw) -> tuple[Decision, int]:
    """Batches every 10 ms until the policy says something else than continue."""
    estimate = Estimator()
    for t in range(0, until_ms + 1, 10):
        stats = batch(t, **kw)
        estimate.update(stats)
        answer = policy.decide(stats, estimate)
        if answer != Decision.CONTINUE_PRECOPY:
            return answer, t
    return Decision.CONTINUE_PRECOPY, until_ms


def test_it_waits_for_the_downtime_to_fit_while_the_deadline_is_far():
    p = DeadlinePolicy()
    p.set("finish_in", "100")
    answer, _t = run(p, 2000)
    assert answer == Decision.CONTINUE_PRECOPY  # 50,000 pages at 100 MB/s: ~2 s of downtime


def test_it_stops_and_copies_once_the_downtime_fits():
    p = DeadlinePolicy()
    p.set("finish_in", "100")
    answer, _t = run(p, 2000, remaining=10, dirty=10)
    assert answer == Decision.STOP_AND_COPY and "fits" in p.reason


@pytest.mark.parametrize("fallback", ["stop-and-copy", "abort"])
def test_the_fallback_comes_when_the_deadline_nears(fallback):
    p = DeadlinePolicy()
    for key, value in {"finish_in": "5", "margin": "1", "fallback": fallback}.items():
        p.set(key, value)
    answer, t = run(p, 10_000)
    assert answer == (Decision.STOP_AND_COPY if fallback == "stop-and-copy" else Decision.ABORT)
    # expected downtime ~2 s (50,000 pages at 100 MB/s) + 1 s margin before the 5 s mark
    assert 1500 <= t <= 2500, t
    assert "deadline in" in p.reason and fallback in p.reason


def test_an_absolute_deadline_in_the_past_falls_back_at_once():
    p = DeadlinePolicy()
    p.set("deadline", str(time.time() - 1))
    answer, t = run(p, 1000)
    assert answer == Decision.STOP_AND_COPY and t <= 100


def test_settings_are_checked():
    p = DeadlinePolicy()
    with pytest.raises(PolicyError):
        p.set("finish_in", "soon")
    with pytest.raises(ValueError, match="fallback is"):
        p.set("fallback", "postcopy")
    with pytest.raises(PolicyError, match="no setting"):
        p.set("speed", "1")
