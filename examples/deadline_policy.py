"""A precopy policy that finishes by a deadline: an example of a policy
written outside ferry and loaded by ferryd.

    ferryd --state-dir ... --policy-module examples/deadline_policy.py
    ferry migrate vm1 host-b:8002 --policy deadline \\
        --set finish_in=60 --set downtime_limit=100 --set fallback=stop-and-copy

It stops and copies as soon as the expected downtime fits `downtime_limit`
(like converge).  When the deadline is near (closer than `margin` seconds,
plus the expected downtime itself), it stops waiting for convergence and
takes its `fallback`: stop-and-copy (finish now, with a longer downtime) or
abort (the guest stays where it is).  The deadline is either absolute,
`deadline` (seconds since the epoch, like `date +%s`), or relative,
`finish_in` (seconds after precopy started); whichever comes first counts.
"""

from __future__ import annotations

import time

from toolstack import Decision, Policy

FALLBACKS = {"stop-and-copy": Decision.STOP_AND_COPY, "abort": Decision.ABORT}


class DeadlinePolicy(Policy):
    """Stop and copy once the downtime fits; when the deadline nears, take the fallback."""

    SETTINGS = {
        "deadline": float,
        "finish_in": float,
        "downtime_limit": float,
        "margin": float,
        "fallback": str,
    }

    def __init__(self) -> None:
        super().__init__()
        self.deadline = 0.0  # seconds since the epoch; 0: none
        self.finish_in = 0.0  # seconds after precopy started; 0: none
        self.downtime_limit = 300.0  # ms
        self.margin = 2.0  # s kept in hand before the deadline
        self.fallback = "stop-and-copy"

    def check_setting(self, key: str, value) -> None:
        super().check_setting(key, value)
        if key == "fallback" and value not in FALLBACKS:
            raise ValueError(f"fallback is {' or '.join(FALLBACKS)}, not {value!r}")

    def rule(self, stats, estimate) -> Decision:
        expected = estimate.expected_downtime_ms
        if expected is not None and expected <= self.downtime_limit:
            self.reason = f"expected downtime {expected:.0f} ms fits {self.downtime_limit:g} ms"
            return Decision.STOP_AND_COPY
        left = self.seconds_left(estimate.elapsed_s(stats))
        if left is not None and left <= self.margin + (expected or 0.0) / 1000:
            self.reason = f"deadline in {max(left, 0):.1f} s; fallback: {self.fallback}"
            return FALLBACKS[self.fallback]
        return Decision.CONTINUE_PRECOPY

    def seconds_left(self, elapsed_s: float) -> float | None:
        """Seconds to the nearer deadline, or None when there is none."""
        left = []
        if self.deadline:
            left.append(self.deadline - time.time())
        if self.finish_in:
            left.append(self.finish_in - elapsed_s)
        return min(left) if left else None


POLICIES = {"deadline": DeadlinePolicy}
