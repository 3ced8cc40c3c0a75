"""Calling a policy under its time budget: the one way ferryd asks a policy.

A policy runs on ferryd's event loop, between the helper's batches, and
every other job waits while it does.  So each call is measured:

- a call that raises, or answers something that is not a `Decision`,
  fails its job with a line that names the policy and what it did (the
  traceback goes to ferryd's log, for the policy's author);
- a call that takes longer than the budget fails its job too.  "Takes"
  is wall time when the call slept or blocked (voluntary context
  switches, from getrusage); otherwise only the CPU time it used counts:
  a busy host, or a VM's host taking the vCPU away (which no counter
  here sees), is not the policy's fault;
- a call that has not answered after HARD_STOP_FACTOR budgets is stopped
  there (SIGALRM raises in it, and again every HARD_STOP_FACTOR budgets
  until it returns), so a policy that loops or sleeps by mistake cannot
  hang the daemon.  This needs the main thread, where ferryd runs trio.

A policy is code its operator chose to load into ferryd, like a kernel
module: these guards catch mistakes, not a policy written to defeat them
(one that catches BaseException in a loop, or blocks inside C code where
no signal handler runs).
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time

from .base import Decision, Policy, PolicyError

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
    decision = call(policy.name, "answer", policy.decide, stats, estimate, budget_ms=budget_ms)
    wall_ms = (time.perf_counter_ns() - started) / 1e6
    if type(decision) is not Decision:
        raise PolicyFailed(
            f"policy {policy.name!r} answered {one_line(repr(decision), 40)}, which is not a "
            "Decision (CONTINUE_PRECOPY, STOP_AND_COPY, POSTCOPY or ABORT)"
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


def call(name: str, what: str, fn, *args, budget_ms: float = DEFAULT_BUDGET_MS, loud=True):
    """Run a policy's own code (its rule, its constructor, a setting's check) on
    ferryd's loop: stopped at HARD_STOP_FACTOR budgets; anything it raises,
    SystemExit included, becomes PolicyFailed naming the policy.  The
    traceback goes to the log (at debug level when not `loud`: ferryd's start,
    whose one line says it all)."""
    limit_ms = budget_ms * HARD_STOP_FACTOR
    try:
        with _hard_stop(limit_ms / 1000):
            return fn(*args)
    except _HardStop:
        raise PolicyFailed(
            f"policy {name!r} did not {what} within {limit_ms:g} ms and was stopped "
            f"(its budget is {budget_ms:g} ms)"
        ) from None
    except PolicyError:
        raise  # a setting refused by the policy's own rule: the user's mistake, not its
    except BaseException as exc:  # noqa: B036 - a policy may not end the daemon
        log.log(logging.ERROR if loud else logging.DEBUG, "policy %r raised", name, exc_info=True)
        raise PolicyFailed(
            f"policy {name!r} raised {type(exc).__name__}: {one_line(str(exc))}"
        ) from None


def one_line(text: str, limit: int = 300) -> str:
    """Text a policy supplied, fit for a one-line error or a report."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _charged_ms(before, wall_ms: float) -> float:
    """The part of a call's `wall_ms` the policy answers for."""
    after = resource.getrusage(resource.RUSAGE_THREAD)
    gave_up = after.ru_nvcsw != before.ru_nvcsw
    if gave_up:
        return wall_ms  # it slept or blocked (preempted too or not): all of it is the policy's
    # Only preempted, or neither (the time went where this process cannot
    # see it: a virtual machine's host took the vCPU): only the CPU the call
    # used is the policy's.
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
            # again and again until the call returns: a policy that swallows
            # one stop meets the next
            signal.setitimer(signal.ITIMER_REAL, self.seconds, self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        global _armed
        if self.active:
            _armed = False  # first: an alarm that fires now is ignored
            signal.setitimer(signal.ITIMER_REAL, 0)
