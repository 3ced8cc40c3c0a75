"""ferry's own precopy policies.

xen       Xen's historical rule: stop and copy once fewer than
          `max_dirty` pages are dirty, or after `max_iterations`.
converge  QEMU's rule: stop and copy once the expected downtime
          (the switchover's measured cost + remaining dirty bytes / the
          bandwidth a dirty-page pass gets; estimate.py) is within
          HEADROOM of `downtime_limit` (ms; 0 switches this test off); after
          `max_iterations` or `precopy_timeout` (s; 0 = none) take the
          `fallback` (stop-and-copy or abort).
"""

from __future__ import annotations

from protocol._gen_helper_msgs import PrecopyStats

from .base import ABORT, CONTINUE, POSTCOPY, STOP, Decision, Policy, PolicyError
from .estimate import Estimator

FALLBACKS = {"stop-and-copy": STOP, "abort": ABORT, "postcopy": POSTCOPY}
# converge stops once the estimate fits this share of the limit: the measured
# downtime has come out up to ~1.25x the estimate on a busy 2-core host
# (`ferry bench`'s downtime_table), and the limit is a promise.
HEADROOM = 0.8


class XenPolicy(Policy):
    """Xen's rule: stop and copy below max_dirty dirty pages or after max_iterations."""

    SETTINGS = {"max_dirty": int, "max_iterations": int}

    def __init__(self) -> None:
        super().__init__()
        self.max_dirty = 50
        self.max_iterations = 5

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> Decision:
        if 0 <= stats.dirty_count < self.max_dirty:
            self.reason = f"{stats.dirty_count} dirty pages, fewer than {self.max_dirty}"
            return STOP
        if stats.iteration >= self.max_iterations:
            self.reason = f"{self.max_iterations} iterations done"
            return STOP
        return CONTINUE


class ConvergePolicy(Policy):
    """QEMU's rule: stop and copy once the expected downtime fits downtime_limit (ms)."""

    SETTINGS = {
        "downtime_limit": float,
        "max_iterations": int,
        "precopy_timeout": float,
        "fallback": str,
    }

    def __init__(self) -> None:
        super().__init__()
        self.downtime_limit = 300.0  # ms
        self.max_iterations = 30
        self.precopy_timeout = 0.0  # s, 0 = none
        self.fallback = "stop-and-copy"

    def check_setting(self, key: str, value) -> None:
        super().check_setting(key, value)
        if key == "fallback" and value not in FALLBACKS:
            raise PolicyError(f"fallback is {' or '.join(FALLBACKS)}, not {value!r}")

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> Decision:
        expected = estimate.expected_downtime_ms
        aim = self.downtime_limit * HEADROOM
        if self.downtime_limit and expected is not None and expected <= aim:
            self.reason = (
                f"expected downtime {expected:.0f} ms ({estimate.describe()}) "
                f"is within {self.downtime_limit:g} ms (aiming at {aim:.0f})"
            )
            return STOP
        if stats.iteration >= self.max_iterations:
            return self._give_up(f"{self.max_iterations} iterations without converging")
        if self.precopy_timeout and estimate.elapsed_s(stats) >= self.precopy_timeout:
            return self._give_up(f"precopy timeout of {self.precopy_timeout:g} s reached")
        return CONTINUE

    def _give_up(self, why: str) -> Decision:
        self.reason = f"{why}; fallback: {self.fallback}"
        return FALLBACKS[self.fallback]


BUILTIN = {"xen": XenPolicy, "converge": ConvergePolicy}
