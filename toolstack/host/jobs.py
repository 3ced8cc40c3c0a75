"""Jobs: one save, restore or migration each, inspectable and steerable.

Every job, whatever its kind, runs through `Job.run`, which

- registers it (`ferry job NAME` finds it on the host where it runs, the
  destination of a migration included) and marks its domain busy, so no
  other operation touches the domain until the job ends;
- runs it in a cancel scope of its own: `job-control abort` cancels it in
  any phase before the commit point, whatever the job waits for (a
  stopped helper, a silent destination);
- undoes what it did when it fails: the undo steps the work registered
  (resume the source, destroy a half-built domain) run last-first,
  shielded from cancellation.  `commit()` marks the point after which
  there is nothing to undo: the guest runs elsewhere, or here for good;
- turns every failure into one line for the user, and logs a traceback
  for anything that is not an expected error.

A job runs in the daemon's job nursery, not in the client connection that
asked for it: a CLI that goes away does not end a migration.
"""

from __future__ import annotations

import logging

import trio

from protocol import ProtocolError
from protocol._gen_control_msgs import JobReport
from protocol._gen_helper_msgs import PrecopyDecision

from ..policies import DEFAULT_BUDGET_MS, Policy, PolicyError, PolicyFailed
from ..policies.guard import one_line
from ..policies.registry import set_setting
from .domains import ToolstackError
from .stats import JobStats

log = logging.getLogger("ferry.job")

UNDO_TIMEOUT = 60.0  # s for all undo steps of one job: each is a few hypercalls

# Failures that are part of the contract: their message is the one line.
EXPECTED = (ToolstackError, PolicyFailed, PolicyError, ProtocolError, OSError)


class JobAborted(ToolstackError):
    pass


class PostcopyAborted(ToolstackError):
    """An operator ended a paused postcopy migration (not a rollback)."""


class Job:
    def __init__(self, stats: JobStats, policy: Policy | None = None, domain=None) -> None:
        self.stats = stats
        self.policy = policy
        self.domain = None  # the Domain this job owns while it runs, if any yet
        self.migration_id: str | None = None  # a migration's id, the same on both hosts
        self.postcopy_allowed = False  # a migration started with --postcopy
        self.postcopy_after_precopy = False  # ... that switches once the first pass is done
        self.postcopy_bandwidth = 0.0  # MB/s its background push may use; 0: unlimited
        self.done = trio.Event()
        self.error: str | None = None
        self.committed = False
        self._undo: list = []  # (description, async callable), run last-first on failure
        self._after_commit: list = []  # (description, async callable) for a failure past it
        self._scope = trio.CancelScope()
        self._abort_reason: str | None = None
        # postcopy: a job that lost its link waits for a new one (resume) or an abort
        self.pause_reason: str | None = None  # set while paused
        self.paused = trio.Event()  # set at each pause, for a client that watches
        self._resumed = trio.Event()
        self._resume_link = None
        self._pause_scope: trio.CancelScope | None = None
        if domain is not None:
            self.own(domain)

    @property
    def connections(self) -> int:
        """A migration's TCP connections for precopy pages (the report shows them)."""
        return self.stats.connections or 1

    @connections.setter
    def connections(self, count: int) -> None:
        self.stats.connections = count

    @property
    def kind(self) -> str:
        return self.stats.kind

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def report(self) -> JobReport:
        return self.stats.report(self.running, self.policy)

    # -- what the work says as it goes ------------------------------------------------
    def own(self, domain) -> None:
        """From now on the job owns `domain`: no other job or command may touch
        it.  Synchronous, so that a check that the domain is free and its claim
        cannot be separated by another request (ToolstackError if it is taken)."""
        if domain.owner is not None and domain.owner is not self:
            raise ToolstackError(
                f"domain {domain.name} belongs to a {domain.owner.kind} job until it ends "
                f"(see `ferry job {domain.name}`)"
            )
        self.domain = domain
        domain.owner = self

    def on_failure(self, what: str, undo) -> None:
        """If the job fails from here on, `await undo()` (shielded) puts it right."""
        self._undo.append((what, undo))

    def commit(self) -> None:
        """The commit point: the job's effect stands, nothing is undone after it."""
        self.committed = True
        self._undo.clear()

    def if_failed_after_commit(self, what: str, step) -> None:
        """A failure past the commit point runs `await step()` (shielded): not an
        undo, a verdict (a source whose guest may run elsewhere goes in doubt)."""
        self._after_commit.append((what, step))

    def outcome_known(self) -> None:
        """The job's outcome is settled: no failure-after-commit step is due."""
        self._after_commit.clear()

    # -- operators ---------------------------------------------------------------------
    # -- postcopy's pause ------------------------------------------------------------
    async def pause(self, why: str):
        """Postcopy lost its link: wait, as long as it takes, for a new one
        (`resume_with`), which this returns; PostcopyAborted when an operator
        aborts instead."""
        self.pause_reason = why
        self.stats.phase = "postcopy-paused"
        self._resumed = trio.Event()
        self.paused.set()
        log.warning("%s of %s paused: %s", self.kind, self.stats.domain, why)
        with trio.CancelScope() as self._pause_scope:
            await self._resumed.wait()
        self._pause_scope = None
        self.pause_reason = None
        self.paused = trio.Event()
        if self._resume_link is None:
            raise PostcopyAborted(self._abort_reason or "aborted while paused")
        link, self._resume_link = self._resume_link, None
        self.stats.phase = "postcopy"
        return link

    def resume_with(self, link) -> None:
        """Hand a paused job the link it goes on with."""
        if self.pause_reason is None:
            raise ToolstackError(f"the {self.kind} job of {self.stats.domain} is not paused")
        self._resume_link = link
        self.pause_reason = None  # resumed from now on, for anyone who looks
        self._resumed.set()

    def abort_paused(self, reason: str) -> None:
        """End a paused postcopy's wait: `pause` raises PostcopyAborted(reason)."""
        if self._pause_scope is not None:
            self._abort_reason = reason
            self._pause_scope.cancel()

    def control(self, action: str, key: str = "", value: str = "", budget_ms=None) -> str:
        """An operator's order: abort ends the job now (before its commit point,
        or while postcopy is paused); stop-and-copy, postcopy and set reach the
        policy's next answer."""
        if not self.running:
            raise ToolstackError(f"the {self.kind} job of {self.stats.domain} is over")
        if action == "abort" and self._pause_scope is not None:
            self.abort_paused("aborted by the operator while postcopy was paused")
            self.stats.decision = "abort: operator requested abort (postcopy paused)"
            return "abort requested: the guest's pages stay split; both copies are kept"
        if action == "abort":
            if self.committed:
                raise ToolstackError(
                    f"the {self.kind} job of {self.stats.domain} is past its commit point: "
                    "the guest runs at the destination, there is nothing to abort"
                    + (
                        " (a postcopy migration can be aborted once paused)"
                        if self.stats.postcopy
                        else ""
                    )
                )
            self._abort_reason = "aborted by the operator (job-control abort)"
            self.stats.decision = "abort: operator requested abort"
            self._scope.cancel()
            return "abort requested"
        if self.policy is None:
            raise ToolstackError(f"a {self.kind} job has no policy to steer")
        if action == "stop-and-copy":
            self.policy.request(PrecopyDecision.STOP_AND_COPY)
            return f"{action} requested"
        if action == "postcopy":
            if not self.postcopy_allowed:
                raise ToolstackError(
                    f"the {self.kind} job of {self.stats.domain} may not switch to postcopy "
                    "(it was not started with --postcopy)"
                )
            self.policy.request(PrecopyDecision.POSTCOPY)
            return "postcopy requested"
        if action == "set":
            set_setting(self.policy, key, value, budget_ms or DEFAULT_BUDGET_MS)
            return f"{key} = {getattr(self.policy, key)}"
        raise ToolstackError(f"unknown action {action!r}: abort, stop-and-copy or set KEY=VALUE")

    # -- running -------------------------------------------------------------------------
    async def run(self, work, registry: dict | None = None) -> None:
        """Run `await work(self)`; record the outcome, undo on failure, never raise
        (the outcome is in `error` and the stats)."""
        if registry is not None:
            current = registry.get(self.stats.domain)
            if current is None or not current.running:  # never hide a job that runs
                registry[self.stats.domain] = self
        try:
            with self._scope:
                await work(self)
            if self._scope.cancelled_caught:
                raise JobAborted(self._abort_reason or "cancelled")
            if self.stats.phase != "completed":
                self.stats.finish("completed")
        except trio.Cancelled:
            self._fail("cancelled: the daemon is stopping")
            await self._run_undo()
            raise
        except BaseException as exc:  # noqa: B036 - every failure is recorded, then undone
            self._fail(describe(exc))  # a job's failure, whatever it was, is not the daemon's
            await self._run_undo()
        finally:
            if self.domain is not None and self.domain.owner is self:
                self.domain.owner = None
            self.done.set()

    def _fail(self, message: str) -> None:
        message = one_line(message, 1000)
        self.error = message
        if self.stats.ended_ns is None or not self.stats.error:
            self.stats.finish("failed", message)
        log.warning("%s of %s failed: %s", self.kind, self.stats.domain, message)

    async def _run_undo(self) -> None:
        """The undo steps (or, past the commit point, the verdict steps); a step
        that fails is logged and said in the job's error: never silent."""
        steps = self._after_commit if self.committed else self._undo
        with trio.CancelScope(shield=True), trio.move_on_after(UNDO_TIMEOUT):
            while steps:
                what, step = steps.pop()
                try:
                    await step()
                except Exception as exc:
                    log.exception("%s of %s: could not %s", self.kind, self.stats.domain, what)
                    said = str(exc) if isinstance(exc, ToolstackError) else f"could not {what}"
                    self.error = one_line(f"{self.error}; and {said}", 1000)
                    self.stats.error = self.error


def describe(exc: BaseException) -> str:
    """One line for the user; a traceback in the log for a failure nobody expected."""
    if isinstance(exc, EXPECTED):
        return str(exc) or type(exc).__name__
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions
        if len(inner) == 1:
            return describe(inner[0])
        return "; ".join(describe(e) for e in inner)
    log.error("unexpected failure", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc} (details in ferryd's log)"
