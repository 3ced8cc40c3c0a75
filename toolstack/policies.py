"""Precopy policies: what the toolstack answers after every batch.

A policy sees the helper's `PrecopyStats` and answers a `PrecopyDecision`
in microseconds, without I/O.  It may read state outside the migration: an
operator's request (`request()`), changed limits (`set()`), the clock.

    xen       Xen's historical rule: stop and copy once fewer than
              `max_dirty` pages are dirty, or after `max_iterations`.
    converge  QEMU's rule: stop and copy once the expected downtime
              (remaining dirty bytes / measured bandwidth) is within
              `downtime_limit` (ms; 0 switches this test off); after
              `max_iterations` or `precopy_timeout` (s; 0 = none) take the
              `fallback` (stop-and-copy or abort).
"""

from __future__ import annotations

from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats

from .estimate import Estimator

CONTINUE = PrecopyDecision.CONTINUE_PRECOPY
STOP = PrecopyDecision.STOP_AND_COPY
ABORT = PrecopyDecision.ABORT

FALLBACKS = {"stop-and-copy": STOP, "abort": ABORT}


class Policy:
    """The interface: `decide(stats)` after every batch.  Subclasses write
    `rule()` and list their tunables in `SETTINGS` (name -> type)."""

    name = "policy"
    SETTINGS: dict[str, type] = {}

    def __init__(self) -> None:
        self.requested: PrecopyDecision | None = None
        self.reason = ""  # why the last non-CONTINUE answer was given

    def decide(self, stats: PrecopyStats, estimate: Estimator) -> PrecopyDecision:
        """The answer to one batch; `estimate` has already seen `stats`."""
        if self.requested is not None:
            self.reason = f"operator requested {self.requested.name.lower().replace('_', '-')}"
            return self.requested
        return self.rule(stats, estimate)

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> PrecopyDecision:
        raise NotImplementedError

    def request(self, decision: PrecopyDecision) -> None:
        """An operator's order, carried by the next answer (abort, stop-and-copy)."""
        self.requested = decision

    def set(self, key: str, value: str) -> None:
        """Change a limit while the job runs; ValueError names what is wrong."""
        if key not in self.SETTINGS:
            known = ", ".join(sorted(self.SETTINGS)) or "none"
            raise ValueError(f"policy {self.name} has no setting {key!r} (settings: {known})")
        kind = self.SETTINGS[key]
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a {kind.__name__}") from None
        if key == "fallback":
            if parsed not in FALLBACKS:
                raise ValueError("fallback is stop-and-copy or abort")
        elif parsed < 0:
            raise ValueError(f"{key} must not be negative")
        setattr(self, key, parsed)

    def settings(self) -> dict:
        return {key: getattr(self, key) for key in self.SETTINGS}


class XenPolicy(Policy):
    name = "xen"
    SETTINGS = {"max_dirty": int, "max_iterations": int}

    def __init__(self, max_dirty: int = 50, max_iterations: int = 5) -> None:
        super().__init__()
        self.max_dirty = max_dirty
        self.max_iterations = max_iterations

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> PrecopyDecision:
        if 0 <= stats.dirty_count < self.max_dirty:
            self.reason = f"{stats.dirty_count} dirty pages, fewer than {self.max_dirty}"
            return STOP
        if stats.iteration >= self.max_iterations:
            self.reason = f"{self.max_iterations} iterations done"
            return STOP
        return CONTINUE


class ConvergePolicy(Policy):
    name = "converge"
    SETTINGS = {
        "downtime_limit": float,
        "max_iterations": int,
        "precopy_timeout": float,
        "fallback": str,
    }

    def __init__(
        self,
        downtime_limit: float = 300.0,  # ms
        max_iterations: int = 30,
        precopy_timeout: float = 0.0,  # s, 0 = none
        fallback: str = "stop-and-copy",
    ) -> None:
        super().__init__()
        self.downtime_limit = downtime_limit
        self.max_iterations = max_iterations
        self.precopy_timeout = precopy_timeout
        if fallback not in FALLBACKS:
            raise ValueError("fallback is stop-and-copy or abort")
        self.fallback = fallback

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> PrecopyDecision:
        expected = estimate.expected_downtime_ms
        if self.downtime_limit and expected is not None and expected <= self.downtime_limit:
            self.reason = (
                f"expected downtime {expected:.0f} ms is within {self.downtime_limit:g} ms"
            )
            return STOP
        if stats.iteration >= self.max_iterations:
            return self._give_up(f"{self.max_iterations} iterations without converging")
        if self.precopy_timeout and estimate.elapsed_s(stats) >= self.precopy_timeout:
            return self._give_up(f"precopy timeout of {self.precopy_timeout:g} s reached")
        return CONTINUE

    def _give_up(self, why: str) -> PrecopyDecision:
        self.reason = f"{why}; fallback: {self.fallback}"
        return FALLBACKS[self.fallback]


POLICIES = {"xen": XenPolicy, "converge": ConvergePolicy}


def make_policy(name: str, **settings) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (policies: {', '.join(POLICIES)})") from None
    policy = cls()
    for key, value in settings.items():
        if value is not None:
            policy.set(key, str(value))
    return policy
