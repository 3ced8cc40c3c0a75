"""Run one save or restore helper and answer its callbacks.

The helper is exec'd with the stream fd and one end of a socketpair; every
callback arrives as a generated message and is routed by the generated
dispatch table to `HelperCallbacks`.  Whatever the helper does (crash, hang,
send nonsense) ends this job with a one-line error and never more: the
process is always reaped before `run_helper` returns.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import sys
import time

import trio

from protocol import Call, ProtocolError
from protocol import _gen_helper_msgs as msgs
from protocol._gen_helper_msgs import PrecopyDecision

from ..policies import DEFAULT_BUDGET_MS, Policy, decide
from ..policies.guard import one_line
from ._gen_helper_dispatch import ToolstackHandlers
from .async_channel import AsyncChannel, ChannelError
from .deadlines import DEADLINES
from .domains import Domain, ToolstackError
from .stats import JobStats

log = logging.getLogger("ferry.helper")
CONTINUE = PrecopyDecision.CONTINUE_PRECOPY


class HelperFailed(ToolstackError):
    pass


def helper_command() -> list[str]:
    installed = os.path.join(os.path.dirname(sys.executable), "ferry-save-helper")
    if os.path.exists(installed):
        return [installed]
    found = shutil.which("ferry-save-helper")
    return [found] if found else [sys.executable, "-m", "helper.main"]


class HelperCallbacks(ToolstackHandlers):
    """The toolstack's side of the callback table, for one job."""

    def __init__(
        self,
        domain: Domain,
        stats: JobStats,
        policy: Policy | None = None,
        budget_ms: float = DEFAULT_BUDGET_MS,
    ):
        self.domain = domain
        self.stats = stats
        self.policy = policy
        self.budget_ms = budget_ms
        self.completed: tuple[int, int, str] | None = None
        self.abort_reason = ""  # why the policy answered ABORT, if it did
        self.before_suspend = None  # awaited before the guest is paused (a journal entry)
        # postcopy: the migration's side of the switch (see migration/sender.py, receiver.py)
        self.switch_to_postcopy = None  # source: have the destination run the guest
        self.run_guest_postcopy = None  # destination: run the guest
        self.postcopy_allowed = False  # a POSTCOPY answer may go to the helper
        self.postcopy_after_precopy = False  # answer POSTCOPY once the first pass is done
        self.suspended = False
        self.restored_pages = 0
        self.process = None  # the helper's trio Process while it runs

    async def on_log(self, level, errnoval, context, message) -> None:
        log.log(
            logging.ERROR if level <= 3 else logging.INFO,
            "%s %s: %s",
            self.domain.name,
            context,
            message,
        )

    async def on_progress(self, context, doing_what, done, total) -> None:
        self.stats.record_progress(done, total)

    async def on_restore_progress(self, pages, octets) -> None:
        self.stats.record_received(pages, octets)

    async def on_suspend(self) -> bool:
        if self.before_suspend is not None:
            await self.before_suspend()
        await self.domain.runner.pause()
        self.suspended = True
        self.stats.record_suspend()
        return True

    async def on_postcopy(self) -> bool:
        """The source's transition is written: the migration has the guest run
        at the destination (the hook), or says it did not."""
        if self.switch_to_postcopy is None:
            return False
        return await self.switch_to_postcopy()

    async def on_postcopy_transition(self) -> bool:
        """The destination's transition arrived: the migration runs the guest."""
        if self.run_guest_postcopy is None:
            return False
        return await self.run_guest_postcopy()

    async def on_postcopy_progress(self, pages, done, requested, octets, fault_us) -> None:
        self.stats.record_postcopy(pages, done, requested, octets, fault_us)

    async def on_start(self) -> bool:
        return True  # a helper started early is served once its job may begin

    async def on_checkpoint(self) -> int:
        return 0  # no checkpointed (Remus/COLO) streams: stop after the first

    async def on_wait_checkpoint(self) -> int:
        return 0

    async def on_switch_logdirty(self, enable) -> bool:
        return True  # ferry domains have no separate device model to switch

    async def on_static_data_done(self, missing) -> int:
        # A restore's stream starts here: the helper is up and reading pages.
        if self.stats.stream_start_ns is None:
            self.stats.stream_start_ns = time.monotonic_ns()
        return 0

    async def on_restore_results(self, pages, store_gfn, console_gfn) -> None:
        self.restored_pages = pages
        # the last restore_progress may be up to 0.2 s old: the count is this
        self.stats.pages_sent = max(self.stats.pages_sent, pages)

    async def on_complete(self, retval, errnoval, message, peak_rss, zero_pages) -> None:
        self.completed = (retval, errnoval, message)
        self.stats.stream_end_ns = time.monotonic_ns()
        self.stats.helper_peak_rss = peak_rss
        if retval == 0:  # a resumed postcopy's helper counts only its own
            self.stats.zero_pages = max(self.stats.zero_pages, zero_pages)

    async def on_precopy_policy(self, stats) -> PrecopyDecision:
        s = self.stats
        s.record_batch(stats)
        s.phase = "precopy"
        decision = PrecopyDecision.STOP_AND_COPY
        if self.policy:
            decision = decide(self.policy, stats, s.estimate, self.budget_ms)
        first_pass_done = stats.iteration >= 1
        stays = (PrecopyDecision.ABORT, PrecopyDecision.POSTCOPY)
        if self.postcopy_after_precopy and first_pass_done and decision not in stays:
            # libvirt's --postcopy-after-precopy: the switch comes after the first
            # pass whatever the policy would do (an abort still wins)
            decision = PrecopyDecision.POSTCOPY
            self.policy.reason = "the first pass over RAM is done (postcopy after precopy)"
        if decision == PrecopyDecision.POSTCOPY and not self.postcopy_allowed:
            decision = PrecopyDecision.ABORT
            self.policy.reason = (
                f"it answered POSTCOPY ({one_line(str(self.policy.reason))}), but this migration "
                "was not started with --postcopy"
            )
        if self.policy:
            if decision != PrecopyDecision.CONTINUE_PRECOPY:
                s.decision = f"{decision.name.lower()}: {one_line(str(self.policy.reason))}"
                if decision == PrecopyDecision.ABORT:
                    self.abort_reason = f"policy {self.policy.name} aborted the migration: " + (
                        one_line(str(self.policy.reason))
                    )
                log.info("%s: %s", self.domain.name, s.decision)
        return decision


class HelperProcess:
    """A helper exec'd for one job; `serve` answers its calls until it completes.

    Started with `prestarted`, it loads its interpreter and modules (about
    0.2 s here) and then waits, touching neither the domain nor the stream,
    until `serve` answers its first call (`start`): a migration starts it
    while the other host creates the domain, off the critical path."""

    def __init__(self, mode: str, proc, ours: socket.socket) -> None:
        self.mode, self.proc, self.ours = mode, proc, ours
        self.served = False

    async def serve(self, callbacks: HelperCallbacks, silence_timeout: float | None = None) -> None:
        """Run the helper to completion; HelperFailed (one line) if it did not
        succeed.  One that says nothing for `silence_timeout` s
        (DEADLINES.helper) is hung."""
        if self.served:
            raise RuntimeError(f"{self.mode} helper served twice, or after discard")
        if silence_timeout is None:
            silence_timeout = DEADLINES.helper
        mode, proc = self.mode, self.proc
        self.served = True
        callbacks.process = proc
        channel = AsyncChannel(
            trio.SocketStream(trio.socket.from_stdlib_socket(self.ours)),
            msgs.TABLE,
            sends=None,
            receives=msgs.DIRECTION,
            sock=self.ours,
        )
        try:
            await _serve(channel, callbacks, silence_timeout, mode)
        except _HelperDied:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proc.wait()
            _kill(proc)
            status = describe_exit(proc.returncode)
            raise HelperFailed(f"{mode} helper died before completing ({status})") from None
        except BaseException:
            _kill(proc)
            raise
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(10):
                    await proc.wait()
                _kill(proc)
                await proc.wait()
                await channel.aclose()
        retval, errnoval, message = callbacks.completed
        if retval != 0:
            raise HelperFailed(
                callbacks.abort_reason or message or f"{mode} helper failed (errno {errnoval})"
            )

    async def discard(self) -> None:
        """A helper started early whose job ended before it was served: gone,
        and reaped.  (Served, it is reaped already: nothing to do.)"""
        if self.served:
            return
        self.served = True
        with trio.CancelScope(shield=True):
            self.ours.close()  # its watchdog sees the toolstack leave
            _kill(self.proc)
            await self.proc.wait()


async def start_helper(
    mode: str,
    io_fd: int,
    control_path: str,
    live: bool = False,
    command: list[str] | None = None,
    stream_offset: int = 0,
    postcopy: bool = False,
    resume: bool = False,
    postcopy_bandwidth: float = 0.0,
    extra_fds: tuple[int, ...] = (),
    prestarted: bool = False,
) -> HelperProcess:
    """Exec the helper for one job (see HelperProcess; `run_helper` also serves it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [*(command or helper_command()), f"--{mode}-domain", "--io-fd", str(io_fd)]
    cmd += ["--rpc-fd", str(theirs.fileno()), "--domain", control_path]
    if live:
        cmd.append("--live")
    if postcopy:
        cmd.append("--postcopy")  # save: the helper may obey a POSTCOPY answer
    if resume:
        cmd.append("--postcopy-resume")  # a broken postcopy goes on over a new link
    if postcopy_bandwidth:
        cmd += ["--postcopy-bandwidth", repr(postcopy_bandwidth)]
    for fd in extra_fds:
        cmd += ["--extra-fd", str(fd)]  # the migration's extra connections
    if stream_offset:
        cmd += ["--stream-offset", str(stream_offset)]
    if prestarted:
        cmd.append("--prestarted")  # it asks `start` before it begins
    try:
        proc = await trio.lowlevel.open_process(cmd, pass_fds=(io_fd, theirs.fileno(), *extra_fds))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return HelperProcess(mode, proc, ours)


async def run_helper(
    mode: str,
    io_fd: int,
    domain: Domain,
    callbacks: HelperCallbacks,
    silence_timeout: float | None = None,
    **options,
) -> None:
    """Exec the helper and run it to completion (`start_helper`'s options);
    HelperFailed (one line) if it did not succeed."""
    helper = await start_helper(mode, io_fd, domain.control_path, **options)
    await helper.serve(callbacks, silence_timeout)


async def _serve(channel: AsyncChannel, callbacks: HelperCallbacks, timeout: float, mode: str):
    # One cancel scope for the whole job: waiting for the helper arms its
    # deadline, answering disarms it.  (A fail_after per message cost more
    # than the policy decision itself.)  During postcopy the helper reports
    # every 0.2 s whatever happens; a report that nothing moved is silence
    # too: a stalled link must fail (and pause) like a broken one.
    still = StandingStill()
    with trio.CancelScope() as silence:
        while callbacks.completed is None:
            silence.deadline = still.since + timeout
            try:
                event = await channel.next_event()
            except ChannelError:
                raise _HelperDied from None
            except ProtocolError as exc:
                raise HelperFailed(f"{mode} helper sent nonsense: {exc}") from None
            silence.deadline = math.inf
            if not isinstance(event, Call):
                raise HelperFailed(f"{mode} helper sent an unexpected {type(event).__name__}")
            still.heard(event.message)
            reply = await callbacks.dispatch(event.message)
            if event.message.SPEC.wants_reply:
                try:
                    await channel.send(channel.conn.send_reply(reply))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _HelperDied from None
                if isinstance(event.message, msgs.PrecopyPolicy):
                    callbacks.stats.record_answer(event.message.stats.time_ns)
    if silence.cancelled_caught and still.stalled:
        raise HelperFailed(f"postcopy moved nothing for {timeout:g} s (a stalled link?)")
    if silence.cancelled_caught:
        raise HelperFailed(f"{mode} helper sent nothing for {timeout:g} s; killed it")


class StandingStill:
    """When the helper last said something that shows it is getting on."""

    def __init__(self) -> None:
        self.since = trio.current_time()
        self.stalled = False  # it still talks, but postcopy moves nothing
        self.last_postcopy = None

    def heard(self, message) -> None:
        if isinstance(message, msgs.PostcopyProgress):
            counters = (message.done, message.requested, message.octets)
            self.stalled = counters == self.last_postcopy
            self.last_postcopy = counters
            if self.stalled:
                return
        self.stalled = False
        self.since = trio.current_time()


class _HelperDied(Exception):
    pass


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _kill(proc) -> None:
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
