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

from ..host import HelperCallbacks, Job, JobStats, ToolstackError, run_helper
from ..host.deadlines import DEADLINES
from ..host.jobs import PostcopyAborted
from .journal import DESTINATION, Record
from .link import LinkError, MigrationLink
from .ratelimit import RateLimitedLog
from .sender import mark_inconsistent
from .site import Site

log = logging.getLogger("ferry.migrate")
LIBXL_PREFIX = libxl.HEADER.size + 8  # the libxl header and LIBXC_CONTEXT
refusals = RateLimitedLog(log, per_minute=10)


class Refused(Exception):
    """The peer is not let in; the message is logged, not shown to the peer."""


async def serve_migration(site: Site, stream) -> None:
    """One incoming connection; never raises for a bad or vanishing peer."""
    link = MigrationLink(stream, RECEIVER)
    handed_over = False
    try:
        await authenticate(link, site.key)
        call = await link.next_call(DEADLINES.handshake, "a migrate request")
        if isinstance(call.message, msgs.Whereabouts):
            state = await site.resolver.whereabouts(call.message.name, call.message.migration_id)
            await link.answer(msgs.Location(state=state))
        elif isinstance(call.message, msgs.Resume):
            handed_over = await hand_to_paused_job(site, link, call.message)
        else:
            await receive(site, link, call.message)
    except Refused as exc:
        refusals.warning("migration connection from %s refused: %s", peer_name(stream), exc)
    except LinkError as exc:
        log.warning("migration connection from %s ended: %s", peer_name(stream), exc)
    finally:
        if not handed_over:
            await link.aclose()


async def hand_to_paused_job(site: Site, link: MigrationLink, request) -> bool:
    """Recovery: a sender resumes a postcopy paused here; its paused job takes
    this link over (and closes it)."""
    job = site.jobs.get(request.name)
    if job is None or job.migration_id != request.migration_id or job.pause_reason is None:
        await link.refuse(
            f"no paused postcopy migration {request.migration_id} of {request.name} here"
        )
        return False
    await link.answer()
    job.resume_with(link)
    return True


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
    stats = JobStats("migrate-receive", config.name, config.memory_bytes)
    stats.peer = peer_name(link.stream)
    job = Job(stats)
    job.migration_id = request.migration_id
    job.postcopy_allowed = request.postcopy

    async def work(job: Job) -> None:
        try:
            await _build(site, job, link, request)
        except BaseException as exc:
            await link.refuse(str(exc) or "the destination failed")
            raise

    await site.run_job(job, work)


async def _build(site: Site, job: Job, link: MigrationLink, request) -> None:
    config, stats, host, journal = request.config, job.stats, site.host, site.journal
    record = Record(
        request.migration_id, DESTINATION, config.name, stats.peer, "receiving", config.to_wire()
    )
    await journal.record(record, "receiving")
    job.on_failure("forget the migration", lambda: journal.remove(record.migration_id))
    domain = await host.create(config, incoming=True)
    job.own(domain)
    job.on_failure(f"destroy the half-built {config.name}", lambda: host.destroy(domain))
    await link.answer(msgs.Accepted(postcopy=request.postcopy))

    await link.next_call(DEADLINES.handshake, "the stream")
    await read_libxl_prefix(link)
    stats.phase = "restoring"
    callbacks = HelperCallbacks(domain, stats)
    switch = callbacks.run_guest_postcopy = RunGuest(site, job, domain, link, record)
    try:
        await run_helper("restore", link.fileno, domain, callbacks, stream_offset=LIBXL_PREFIX)
    except ToolstackError as exc:
        if not switch.done:
            raise
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
    await journal.record(record, "committed")
    await run_guest(site, job, domain)
    stats.finish("completed")
    try:
        await link.answer()
    except LinkError:
        pass  # the guest runs here; the sender will ask (whereabouts)
    log.info("incoming migration of %s complete: the guest runs here", domain.name)


async def run_guest(site: Site, job: Job, domain) -> None:
    """The commit, in the order a crash cannot break: the journal says so
    (written by the caller), the state file exists, then the guest runs."""
    await site.host.save_state(domain)  # a guest that runs here is one this daemon knows
    await domain.runner.unpause()
    await site.host.commit(domain)
    job.commit()
    job.stats.resumed_ns = time.monotonic_ns()


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
        await run_guest(self.site, self.job, self.domain)
        self.job.stats.record_switch()
        self.done = True
        try:
            await self.link.answer()
        except LinkError:
            pass  # the guest runs; a lost link pauses postcopy, the sender resumes it
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
        why = f"{why}; the source resumes it with `ferry migrate {domain.name} HOST:PORT --resume`"
        try:
            link = await job.pause(why)
        except PostcopyAborted:
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


async def read_libxl_prefix(link: MigrationLink) -> None:
    decoder = libxl.LibxlDecoder(inner=False)
    decoder.feed(await link.receive_exact(LIBXL_PREFIX))
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
