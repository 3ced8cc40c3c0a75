"""Jobs: one save, restore or migration each, inspectable and steerable.

A job runs in the daemon's job nursery, not in the client connection that
asked for it: a CLI that goes away does not end a migration.  `ferry job`
reads `stats`; `ferry job-control` reaches `policy`.
"""

from __future__ import annotations

import trio

from protocol._gen_helper_msgs import PrecopyDecision

from .policies import Policy
from .stats import JobStats

ACTIONS = {"abort": PrecopyDecision.ABORT, "stop-and-copy": PrecopyDecision.STOP_AND_COPY}


class Job:
    def __init__(self, stats: JobStats, policy: Policy | None = None) -> None:
        self.stats = stats
        self.policy = policy
        self.done = trio.Event()
        self.result: dict | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def control(self, action: str, key: str | None = None, value: str | None = None) -> str:
        """Deliver an operator's order; the helper sees it in its next answer."""
        if not self.running:
            raise ValueError(f"the {self.stats.kind} job of {self.stats.domain} is over")
        if self.policy is None:
            raise ValueError(f"a {self.stats.kind} job has no policy to steer")
        if action in ACTIONS:
            self.policy.request(ACTIONS[action])
            return f"{action} requested"
        if action == "set":
            self.policy.set(key, value)
            return f"{key} = {getattr(self.policy, key)}"
        raise ValueError(f"unknown action {action!r}: abort, stop-and-copy or set KEY=VALUE")

    async def run(self, work) -> None:
        """Run `work()` (returns the report); record the outcome either way."""
        try:
            self.result = await work()
            if self.stats.phase != "completed":
                self.stats.finish("completed")
        except Exception as exc:
            self.error = str(exc)
            if self.stats.ended_ns is None or not self.stats.error:
                self.stats.finish("failed", self.error)
        finally:
            if self.stats.ended_ns is None:
                self.stats.finish("cancelled", "the daemon stopped")
            self.done.set()
