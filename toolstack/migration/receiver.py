"""The receiving side of a live migration, like `xl migrate-receive`.

Serves one connection on the daemon's --listen port: authenticate the peer
(nothing is created before it proved it holds the key), then either build
an incoming domain for its `migrate` request, or answer `whereabouts` for a
sender that restarted in the middle of a migration.

An incoming domain belongs to its migrate-receive job: no operator command
touches it, and any failure before the guest runs (a dropped or stalled
connection included) removes it.  At `go` the journal records the commit
first, then the domain's state file is written, then the guest runs, then
the reply goes out: a crash anywhere in between leaves either no guest here
(the source resumes) or a guest the restarted daemon knows.
"""

from __future__ import annotations

import logging
import time

import trio

from protocol import NEED_DATA, RemoteProtocolError, auth, libxl
from protocol import _gen_migration_msgs as msgs
from protocol.handshake import RECEIVER, VERSION

from ..host import HelperCallbacks, Job, JobStats, ToolstackError, faults, run_helper, start_helper
from ..host.deadlines import DEADLINES
from ..host.domains import INCONSISTENT
from ..host.jobs import PostcopyAborted
from .joining import Joining
from .journal import DESTINATION, Record
from .link import LinkError, MigrationLink
from .ratelimit import RateLimitedLog
from .sender import mark_inconsistent
from .site import Site

log = logging.getLogger("ferry.migrate")
LIBXL_PREFIX = libxl.HEADER.size + 8  # the libxl header and LIBXC_CONTEXT
refusals = RateLimitedLog(log, per_minute=10)
MAX_UNAUTHENTICATED = 64  # connections authenticating at once; more are closed at once


class Refused(Exception):
    """The peer is not let in; the message is logged, not shown to the peer."""


async def serve_migration(site: Site, stream) -> None:
    """One incoming connection; never raises for a bad or vanishing peer."""
    peer = peer_name(stream)
    link = MigrationLink(stream, RECEIVER)
    handed_over = False
    try:
        await authenticate_within_cap(site, link)
        call = await link.next_call(DEADLINES.handshake, "a migrate request")
        if isinstance(call.message, msgs.Whereabouts):
            state = await site.resolver.whereabouts(call.message.name, call.message.migration_id)
            await link.answer(msgs.Location(state=state))
        elif isinstance(call.message, msgs.Resume):
            handed_over = await hand_to_paused_job(site, link, call.message)
        elif isinstance(call.message, msgs.Join):
            handed_over = await hand_to_incoming_job(site, link, call.message)
        else:
            await receive(site, link, call.message)
    except Refused as exc:
        refusals.warning("migration connection from %s refused: %s", peer, exc)
    except LinkError as exc:
        refusals.warning("migration connection from %s ended: %s", peer, exc)
    finally:
        if handed_over:
            # trio's listener closes the connection when this returns: wait
            # until the paused job that took the link over is done with it.
            await link.closed.wait()
        else:
            await link.aclose()


async def hand_to_paused_job(site: Site, link: MigrationLink, request) -> bool:
    """Recovery: a sender resumes a postcopy paused here; its paused job takes
    this link over (and closes it)."""
    job = site.jobs.get(request.name)
    if job is not None and job.migration_id == request.migration_id and job.error:
        # ended here for good (its guest lost, or aborted): no resume can help
        await link.refuse(
            f"migration {request.migration_id} of {request.name} ended here: {job.error}"
        )
        return False
    if job is None or job.migration_id != request.migration_id or job.pause_reason is None:
        await link.refuse(
            f"no paused postcopy migration {request.migration_id} of {request.name} here"
        )
        return False
    domain = site.host.domains.get(request.name)
    if domain is None or runner_exited(domain):
        await link.refuse(f"{request.name}'s runner died here during postcopy: {GUEST_LOST}")
        job.abort_paused("its runner died while postcopy was paused")  # continue_receiving ends it
        return False
    await link.answer()
    job.resume_with(link)
    return True


async def hand_to_incoming_job(site: Site, link: MigrationLink, request) -> bool:
    """An extra connection of a migration being received here: its job takes it."""
    joining = site.joining.get(request.migration_id)
    try:
        if joining is None:
            raise ToolstackError(f"no migration {request.migration_id} expects connections")
        joining.add(request.index, link)
    except ToolstackError as exc:
        await link.refuse(str(exc))
        return False
    await link.answer()
    return True


async def authenticate_within_cap(site: Site, link: MigrationLink) -> None:
    """At most MAX_UNAUTHENTICATED peers at a time may be proving themselves:
    anyone who can reach the port could otherwise hold a task and a socket
    each for the handshake deadline, as many as they like."""
    if site.unauthenticated >= MAX_UNAUTHENTICATED:
        raise Refused(f"{MAX_UNAUTHENTICATED} connections are already authenticating")
    site.unauthenticated += 1
    try:
        await authenticate(link, site.key)
    finally:
        site.unauthenticated -= 1


async def authenticate(link: MigrationLink, key: bytes) -> None:
    try:
        hello = (await link.next_call(DEADLINES.handshake, "hello")).message
    except LinkError as exc:
        raise Refused(str(exc)) from None
    if hello.version != VERSION:
        await link.refuse(f"handshake version {hello.version} is not {VERSION}")
        raise Refused(f"handshake version {hello.version}")
    server_nonce = auth.new_nonce()
    proof = auth.proof(key, b"server", hello.nonce, server_nonce)
    await link.answer(msgs.Challenge(nonce=server_nonce, proof=proof))
    try:
        claimed = (await link.next_call(DEADLINES.handshake, "the client's proof")).message
    except LinkError as exc:
        raise Refused(str(exc)) from None
    if not auth.verify(key, b"client", hello.nonce, server_nonce, claimed.proof):
        await link.refuse("authentication failed")
        raise Refused("authentication failed (wrong key?)")
    await link.answer()


async def receive(site: Site, link: MigrationLink, request) -> None:
    config = request.config
    if config.name in site.host.domains:
        await link.refuse(f"a domain named {config.name!r} exists here")
        return
    if request.postcopy and not site.postcopy[0]:
        await link.refuse(f"this host cannot serve postcopy: {site.postcopy[1]}")
        return
    try:
        site.host.check_socket_fits(config.name)
        if request.postcopy:  # an aborted postcopy renames it; that must not fail then
            site.host.check_socket_fits(config.name + INCONSISTENT)
    except ToolstackError as exc:
        await link.refuse(str(exc))
        return
    stats = JobStats("migrate-receive", config.name, config.memory_bytes)
    stats.peer = peer_name(link.stream)
    job = Job(stats)
    job.migration_id = request.migration_id
    job.postcopy_allowed = request.postcopy

    async def work(job: Job) -> None:
        try:
            await _build(site, job, link, request)
        except BaseException as exc:
            if not job.committed:  # past it, a refusal would resume a source whose guest ran here
                await link.refuse(str(exc) or "the destination failed")
            raise

    await site.run_job(job, work)


async def _build(site: Site, job: Job, link: MigrationLink, request) -> None:
    config, stats, journal = request.config, job.stats, site.journal
    record = Record(
        request.migration_id, DESTINATION, config.name, stats.peer, "receiving", config.to_wire()
    )
    await journal.record(record, "receiving")
    job.on_failure("forget the migration", lambda: journal.remove(record.migration_id))
    joining = site.joining[request.migration_id] = Joining(request.connections - 1)
    try:
        await _receive_stream(site, job, link, request, record, joining)
    finally:
        del site.joining[request.migration_id]
        await joining.aclose()


async def _receive_stream(site: Site, job: Job, link: MigrationLink, request, record, joining):
    config, stats, host = request.config, job.stats, site.host
    helper = None
    if request.connections == 1:  # the helper loads while the runner starts
        host.admit(config)  # a request refused anyway costs no exec
        helper = await start_restore_helper(site, job, link, config)
    domain = await host.create(config, incoming=True)
    job.own(domain)
    job.on_failure(f"destroy the half-built {config.name}", lambda: host.destroy(domain))
    await link.answer(msgs.Accepted(postcopy=request.postcopy))

    await link.next_call(DEADLINES.handshake, "the stream")
    extras = await joining.wait(DEADLINES.handshake)
    await read_libxl_prefix(link)
    stats.phase = "restoring"
    callbacks = HelperCallbacks(domain, stats)
    switch = callbacks.run_guest_postcopy = RunGuest(site, job, domain, link, record)
    try:
        helper = helper or await start_restore_helper(site, job, link, config, extras)
        await helper.serve(callbacks)
    except ToolstackError as exc:
        if not switch.done:
            raise
        await link.aclose()  # the source hears it at once (EOF), and pauses too
        await continue_receiving(site, job, domain, record, str(exc))
        return
    await read_libxl_tail(link)  # the octets after the libxc stream
    if switch.done:
        await finish_receiving(site, job, link, record)
        return
    ready = msgs.Ready()
    if request.verify:
        started = time.monotonic()
        digest = await domain.runner.digest()
        ready = msgs.Ready(digest=digest, verify_ms=(time.monotonic() - started) * 1000)
    await link.answer(ready)

    stats.phase = "waiting for go"
    await link.next_call(DEADLINES.go, "go")
    await run_guest(site, job, domain, link, record)
    stats.finish("completed")
    log.info("incoming migration of %s complete: the guest runs here", domain.name)


async def start_restore_helper(site: Site, job: Job, link: MigrationLink, config, extras=()):
    """The restore helper, exec'd --prestarted: served once the stream comes,
    or discarded if the job fails first.  On one connection it starts while
    the domain's runner starts (both interpreters load at once); on more,
    once the `extras` joined (their fds go on its argv)."""
    helper = await start_helper(
        "restore",
        link.fileno,
        site.host.path(config.name, "sock"),
        stream_offset=LIBXL_PREFIX,
        extra_fds=tuple(extra.fileno for extra in extras),
        prestarted=True,
    )
    job.on_failure("stop the restore helper", helper.discard)
    return helper


async def run_guest(site: Site, job: Job, domain, link: MigrationLink, record=None) -> None:
    """The commit, in the order a crash cannot break: the state file exists,
    the job is committed (no failure undoes the guest from here), the guest
    runs, the journal says it ran here (`record`; a postcopy's caller wrote
    its own phase before), then the sender hears it.  A crash before the
    unpause leaves an incoming runner, which removes itself: the guest never
    ran here.  A crash after it leaves a running domain with its state file,
    which the restarted daemon adopts and journals as committed (resolve.py).
    Shielded: an abort that raced the commit cannot cut it short."""
    await site.host.save_state(domain)  # a guest that runs here is one this daemon knows
    job.commit()
    with trio.CancelScope(shield=True):
        await domain.runner.unpause()
        job.stats.resumed_ns = time.monotonic_ns()
        await site.host.release(domain)
        await faults.reached("destination:unpaused")
        if record is not None:
            await journal_ran_here(site, record)
        try:
            with trio.move_on_after(DEADLINES.handshake):
                await link.answer()
        except LinkError:
            pass  # the guest runs here; the sender will ask (whereabouts)


async def journal_ran_here(site: Site, record) -> None:
    """ "The guest ran here", for good: the answer to whereabouts from now on.
    Not writing it is survivable (the restart finds the running domain)."""
    try:
        await site.journal.record(record, "committed")
    except ToolstackError as exc:
        log.error("%s runs here, but %s", record.name, exc)


class RunGuest:
    """The destination's side of the switch to postcopy, called by its restore
    helper at POSTCOPY_TRANSITION: Ready, go, run the guest, confirm."""

    def __init__(self, site: Site, job: Job, domain, link: MigrationLink, record) -> None:
        self.site, self.job, self.domain, self.link, self.record = site, job, domain, link, record
        self.done = False

    async def __call__(self) -> bool:
        await self.link.answer(msgs.Ready(postcopy=True))
        self.job.stats.phase = "waiting for go"
        await self.link.next_call(DEADLINES.go, "go")
        await self.site.journal.record(self.record, "postcopy")
        self.done = True
        await run_guest(self.site, self.job, self.domain, self.link)
        self.job.stats.record_switch()
        return True


async def finish_receiving(site: Site, job: Job, link: MigrationLink, record) -> None:
    """Every page is here (COMPLETE went out): the sender's finish gets our
    account of the faults.  Without it the migration is complete all the same."""
    stats = job.stats
    try:
        await link.next_call(DEADLINES.handshake, "finish")
        report = stats.postcopy.report()
        await link.answer(
            msgs.Finished(
                requested=report.requested,
                fault_histogram=report.fault_histogram,
                fault_p50_us=report.fault_p50_us,
                fault_p99_us=report.fault_p99_us,
            )
        )
    except LinkError as exc:
        log.warning(
            "%s: the sender's finish did not come (%s); every page is here", record.name, exc
        )
    await site.journal.record(record, "committed")
    stats.finish("completed")
    log.info("postcopy migration of %s complete: every page is here", record.name)


async def continue_receiving(site: Site, job: Job, domain, record, why: str) -> None:
    """Postcopy lost its link or its helper: the guest waits here for its
    missing pages (the runner keeps the userfaultfd: they read as nothing,
    never as zeros) until the sender resumes, as often as it breaks."""
    while True:
        if await runner_died(domain):
            await lose_guest(site, domain, record)
        why = f"{why}; the source resumes it with `ferry migrate {domain.name} HOST:PORT --resume`"
        try:
            link = await pause_watching_runner(job, domain, why)
        except PostcopyAborted:
            if await runner_died(domain):
                await lose_guest(site, domain, record)
            await mark_inconsistent(site, domain, record)
            raise PostcopyAborted(
                f"postcopy aborted: the guest here lacks pages still at the source; kept for "
                f"inspection as {domain.name}"
            ) from None
        try:
            callbacks = HelperCallbacks(domain, job.stats)
            await run_helper("restore", link.fileno, domain, callbacks, resume=True)
            await finish_receiving(site, job, link, record)
            return
        except ToolstackError as exc:
            why = str(exc)
        finally:
            await link.aclose()


RUNNER_WATCH_INTERVAL = 0.5  # s between looks at a paused postcopy's runner
GUEST_LOST = "the guest is lost (the source's copy lacks what it wrote here); nothing to resume"


def runner_exited(domain) -> bool:
    """The guest's runner is gone: a postcopy guest's memory and vCPUs with it."""
    return domain.process is not None and domain.process.poll() is not None


async def pause_watching_runner(job: Job, domain, why: str):
    """`job.pause(why)`, ended (PostcopyAborted) if the runner dies meanwhile:
    a guest that died while paused is lost now, not when a resume comes."""
    aborted = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while not runner_exited(domain):
                await trio.sleep(RUNNER_WATCH_INTERVAL)
            job.abort_paused("its runner died while postcopy was paused")

        nursery.start_soon(watch)
        try:
            link = await job.pause(why)
        except PostcopyAborted as exc:
            link, aborted = None, exc
        finally:
            nursery.cancel_scope.cancel()
    if aborted is not None:
        raise aborted
    return link


async def runner_died(domain) -> bool:
    """The runner is gone, or going: a helper that failed on it may have
    failed first (ESRCH) while the process was still exiting, so one that no
    longer answers gets a moment to be seen dead."""
    if runner_exited(domain):
        return True
    try:
        with trio.fail_after(DEADLINES.handshake):
            await domain.runner.getinfo()
        return False
    except (ToolstackError, trio.TooSlowError):
        with trio.move_on_after(2):
            while not runner_exited(domain):
                await trio.sleep(0.02)
        return runner_exited(domain)


async def lose_guest(site: Site, domain, record) -> None:
    """Postcopy's guest died here: neither host has it whole any more, and
    the source must not be told to resume.  Nothing is left to keep."""
    log.error("%s: its runner died during postcopy; the guest is lost here", record.name)
    await site.journal.record(record, "split")  # kept: a sender asking must not resume
    await site.host.destroy(domain)
    raise ToolstackError(f"{domain.name}'s runner died here during postcopy: {GUEST_LOST}")


async def read_libxl_prefix(link: MigrationLink) -> None:
    decoder = libxl.LibxlDecoder(inner=False)
    with trio.move_on_after(DEADLINES.handshake) as scope:
        decoder.feed(await link.receive_exact(LIBXL_PREFIX))
    if scope.cancelled_caught:
        raise ToolstackError(f"the sender's stream did not start within {DEADLINES.handshake:g} s")
    if decoder.next_event() != libxl.LibxlHeader() or decoder.next_event() != libxl.LibxcContext():
        raise RemoteProtocolError("the stream does not start with a libxl header and LIBXC_CONTEXT")


async def read_libxl_tail(link: MigrationLink) -> None:
    """The libxl records after the libxc stream, up to END (read exactly)."""
    decoder = libxl.LibxlDecoder(inner=False, expect_header=False)
    with trio.move_on_after(DEADLINES.handshake) as scope:
        while not isinstance(event := decoder.next_event(), libxl.LibxlEnd):
            if event is NEED_DATA:
                decoder.feed(await link.receive_exact(decoder.wanted))
    if scope.cancelled_caught:
        raise ToolstackError(
            f"the sender's stream stalled after the libxc END ({DEADLINES.handshake:g} s)"
        )


def peer_name(stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "a peer"
