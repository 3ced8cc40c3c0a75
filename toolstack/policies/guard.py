"""Calling a policy under its time budget: the one way ferryd asks a policy.

A policy runs on ferryd's event loop, between the helper's batches, and
every other job waits while it does.  So each call is measured:

- a call that raises, or answers something that is not a `Decision`,
  fails its job with a line that names the policy and what it did (the
  traceback goes to ferryd's log, for the policy's author);
- a call that takes longer than the budget fails its job too.  "Takes"
  is wall time, except while the kernel had taken the CPU away from
  ferryd (involuntary context switches, from getrusage): a busy host is
  not the policy's fault, so then only the CPU time the call used counts;
- a call that has not answered after HARD_STOP_FACTOR budgets is stopped
  there (SIGALRM raises in it), so a policy that loops or blocks cannot
  hang the daemon.  This needs the main thread, where ferryd runs trio.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time

from .base import Decision, Policy

log = logging.getLogger("ferry.policy")

DEFAULT_BUDGET_MS = 2.0
HARD_STOP_FACTOR = 25


class PolicyFailed(Exception):
    """The policy broke its contract; the message names it and says how."""


class _HardStop(BaseException):
    """Raised inside an overrunning policy call.  Not an Exception, so a
    policy's own `except Exception` cannot swallow it."""


_armed = False
_handler_installed = False


def _on_alarm(_signum, _frame) -> None:
    if _armed:
        raise _HardStop


def decide(policy: Policy, stats, estimate, budget_ms: float = DEFAULT_BUDGET_MS) -> Decision:
    """The policy's answer to one batch, or PolicyFailed."""
    usage_before = resource.getrusage(resource.RUSAGE_THREAD)
    started = time.perf_counter_ns()
    try:
        with _hard_stop(budget_ms * HARD_STOP_FACTOR / 1000):
            decision = policy.decide(stats, estimate)
    except _HardStop:
        raise PolicyFailed(
            f"policy {policy.name!r} did not answer within {budget_ms * HARD_STOP_FACTOR:g} ms "
            f"and was stopped (its budget is {budget_ms:g} ms)"
        ) from None
    except Exception as exc:
        log.error("policy %r raised", policy.name, exc_info=True)
        raise PolicyFailed(f"policy {policy.name!r} raised {type(exc).__name__}: {exc}") from None
    wall_ms = (time.perf_counter_ns() - started) / 1e6
    if type(decision) is not Decision:
        shown = repr(decision)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise PolicyFailed(
            f"policy {policy.name!r} answered {shown}, which is not a Decision "
            "(CONTINUE_PRECOPY, STOP_AND_COPY, POSTCOPY or ABORT)"
        )
    if wall_ms > budget_ms:
        charged = _charged_ms(usage_before, wall_ms)
        if charged > budget_ms:
            raise PolicyFailed(
                f"policy {policy.name!r} took {charged:.1f} ms to answer, over its budget "
                f"of {budget_ms:g} ms"
            )
        log.debug("policy %r: %.1f ms while preempted; not counted", policy.name, wall_ms)
    return decision


def _charged_ms(before, wall_ms: float) -> float:
    """The part of a call's `wall_ms` the policy answers for."""
    after = resource.getrusage(resource.RUSAGE_THREAD)
    if after.ru_nivcsw == before.ru_nivcsw:
        return wall_ms  # it had the CPU all along, or gave it up itself (slept, blocked)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu * 1000


class _hard_stop:
    """Raise _HardStop in the block after `seconds` (main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        global _armed, _handler_installed
        if self.active:
            if not _handler_installed:
                signal.signal(signal.SIGALRM, _on_alarm)
                _handler_installed = True
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        global _armed
        if self.active:
            _armed = False  # first: an alarm that fires now is ignored
            signal.setitimer(signal.ITIMER_REAL, 0)
