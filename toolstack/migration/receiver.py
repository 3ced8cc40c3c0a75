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
from .journal import DESTINATION, Record
from .link import LinkError, MigrationLink
from .ratelimit import RateLimitedLog
from .site import Site

log = logging.getLogger("ferry.migrate")
LIBXL_PREFIX = libxl.HEADER.size + 8  # the libxl header and LIBXC_CONTEXT
refusals = RateLimitedLog(log, per_minute=10)


class Refused(Exception):
    """The peer is not let in; the message is logged, not shown to the peer."""


async def serve_migration(site: Site, stream) -> None:
    """One incoming connection; never raises for a bad or vanishing peer."""
    link = MigrationLink(stream, RECEIVER)
    try:
        await authenticate(link, site.key)
        call = await link.next_call(DEADLINES.handshake, "a migrate request")
        if isinstance(call.message, msgs.Whereabouts):
            state = await site.resolver.whereabouts(call.message.name, call.message.migration_id)
            await link.answer(msgs.Location(state=state))
            return
        await receive(site, link, call.message)
    except Refused as exc:
        refusals.warning("migration connection from %s refused: %s", peer_name(stream), exc)
    except LinkError as exc:
        log.warning("migration connection from %s ended: %s", peer_name(stream), exc)
    finally:
        await link.aclose()


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
    stats = JobStats("migrate-receive", config.name, config.memory_bytes)
    stats.peer = peer_name(link.stream)
    job = Job(stats)
    job.migration_id = request.migration_id

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
    await link.answer(msgs.Accepted(postcopy=False))

    await link.next_call(DEADLINES.handshake, "the stream")
    await read_libxl_prefix(link)
    stats.phase = "restoring"
    callbacks = HelperCallbacks(domain, stats)
    await run_helper("restore", link.fileno, domain, callbacks, stream_offset=LIBXL_PREFIX)
    await read_libxl_tail(link)  # the octets after the libxc stream
    ready = msgs.Ready()
    if request.verify:
        started = time.monotonic()
        digest = await domain.runner.digest()
        ready = msgs.Ready(digest=digest, verify_ms=(time.monotonic() - started) * 1000)
    await link.answer(ready)

    stats.phase = "waiting for go"
    await link.next_call(DEADLINES.go, "go")
    await journal.record(record, "committed")
    await host.save_state(domain)  # a guest that runs here is one this daemon knows
    await domain.runner.unpause()
    await host.commit(domain)
    job.commit()
    stats.resumed_ns = time.monotonic_ns()
    stats.finish("completed")
    try:
        await link.answer()
    except LinkError:
        pass  # the guest runs here; the sender will ask (whereabouts)
    log.info("incoming migration of %s complete: the guest runs here", domain.name)


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
