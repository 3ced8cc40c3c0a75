"""The sending side of a live migration, like `xl migrate`.

    connect, authenticate             hello / prove (protocol.auth)
    migrate(config, id)           ->  the receiver builds an incoming domain
    stream + the libxl stream     ->  the helper's libxc stream inside it
                                  <-  Ready (the receiver holds the guest)
    go                            ->  the receiver runs the guest
                                  <-  (reply)  the commit point
    destroy the source

Each phase goes into the journal before it is acted on (journal.py).  Until
"go" has left, every failure resumes the source exactly as it was (the
job's undo step).  After it the guest may run at the destination: an error
reply (the receiver could not start it) resumes the source, a lost reply
leaves the domain in doubt until the destination says where the guest is
(resolve.py), never resumed on a guess.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio

from protocol import _gen_migration_msgs as msgs
from protocol import auth, libxl
from protocol.handshake import SENDER, VERSION

from ..host import (
    Domain,
    HelperCallbacks,
    Job,
    ToolstackError,
    faults,
    run_helper,
    start_helper,
)
from ..host.deadlines import DEADLINES
from ..host.domains import INCONSISTENT, inconsistent_hold
from ..host.jobs import PostcopyAborted
from ..host.savefile import is_running, resume_source
from .journal import DESTINATION, SOURCE, Record
from .link import LinkError, MigrationLink, PeerRefused
from .site import Site

log = logging.getLogger("ferry.migrate")
REASON_GRACE = 2.0  # s to read the receiver's reason after our stream broke


class MigrationFailed(ToolstackError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ToolstackError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def connect(address: str) -> MigrationLink:
    host, port = parse_address(address)
    try:
        with trio.fail_after(DEADLINES.connect):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise MigrationFailed(
            f"cannot reach destination {address}: no answer within {DEADLINES.connect:g} s"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise MigrationFailed(f"cannot reach destination {address}: {reason}") from None
    return MigrationLink(stream, SENDER)


async def authenticate(link: MigrationLink, key: bytes) -> None:
    """Both sides prove they hold the key (protocol.auth); nothing happens before."""
    try:
        client_nonce = auth.new_nonce()
        hello = msgs.Hello(version=VERSION, nonce=client_nonce)
        challenge = await link.call(hello, DEADLINES.handshake, "authentication")
        if not auth.verify(key, b"server", client_nonce, challenge.nonce, challenge.proof):
            raise MigrationFailed("destination failed authentication (wrong --auth-key?)")
        proof = auth.proof(key, b"client", client_nonce, challenge.nonce)
        await link.call(msgs.Prove(proof=proof), DEADLINES.handshake, "authentication")
    except PeerRefused as exc:
        raise MigrationFailed(f"destination refused authentication: {exc}") from None


async def migrate_send(site: Site, job: Job, domain: Domain, address: str, verify: bool) -> None:
    """Migrate `domain` to the daemon at `address`, as `job`."""
    stats = job.stats
    stats.peer = address
    stats.phase = "connecting"
    link = await connect(address)
    extras: list[MigrationLink] = []  # more connections for the pages, once accepted
    try:
        await authenticate(link, site.key)
        await _send(site, job, domain, link, verify, extras)
    except LinkError as exc:
        raise MigrationFailed(f"destination {address}: {exc}") from None
    finally:
        for extra in extras:
            await extra.aclose()
        await link.aclose()


async def join_extra_links(site: Site, job: Job, extras: list[MigrationLink]) -> None:
    """The migration's extra connections (--parallel-connections), each
    authenticated and joined to it; appended to `extras` as they open."""
    for index in range(1, job.connections):
        extra = await connect(job.stats.peer)
        extras.append(extra)
        await authenticate(extra, site.key)
        request = msgs.Join(migration_id=job.migration_id, index=index)
        try:
            await extra.call(request, DEADLINES.handshake, "an answer to join")
        except PeerRefused as exc:
            raise MigrationFailed(f"destination refused connection {index}: {exc}") from None


async def open_resume(site: Site, job: Job, address: str) -> MigrationLink:
    """A new link for a paused postcopy: authenticated, and accepted by the
    destination's paused job (a refusal leaves ours paused as it was)."""
    link = await connect(address)
    try:
        await authenticate(link, site.key)
        request = msgs.Resume(name=job.stats.domain, migration_id=job.migration_id)
        await link.call(request, DEADLINES.handshake, "an answer to resume")
    except PeerRefused as exc:
        await link.aclose()
        raise MigrationFailed(f"destination {address} refused to resume: {exc}") from None
    except BaseException:
        await link.aclose()
        raise
    return link


async def _send(site: Site, job: Job, domain: Domain, link: MigrationLink, verify: bool, extras):
    stats, journal = job.stats, site.journal
    if job.postcopy_allowed:  # an aborted postcopy renames it; that must not fail then
        site.host.check_socket_fits(domain.name + INCONSISTENT)
    was_running = await is_running(domain)
    record = Record(
        secrets.token_hex(16),
        SOURCE,
        domain.name,
        stats.peer,
        "precopy",
        domain.config.to_wire(),
        was_running,
    )
    job.migration_id = record.migration_id
    await journal.record(record, "precopy")
    job.on_failure("forget the migration", lambda: journal.remove(record.migration_id))
    job.on_failure("resume the source", lambda: resume_source(domain, was_running))
    request = msgs.Migrate(
        config=domain.config,
        migration_id=record.migration_id,
        verify=verify,
        postcopy=job.postcopy_allowed,
        connections=job.connections,
    )
    # one connection: the helper loads while the destination builds its domain
    helper = await start_save_helper(job, domain, link) if job.connections == 1 else None
    try:
        await link.call(request, DEADLINES.handshake, "an answer to the migrate request")
    except PeerRefused as exc:
        raise MigrationFailed(f"destination refused: {exc}") from None
    await join_extra_links(site, job, extras)

    callbacks = HelperCallbacks(domain, stats, job.policy, site.budget_ms)
    callbacks.before_suspend = lambda: journal.record(record, "suspended")
    callbacks.postcopy_allowed = job.postcopy_allowed
    callbacks.postcopy_after_precopy = job.postcopy_after_precopy
    switch = callbacks.switch_to_postcopy = Switch(site, job, domain, link, record)
    try:
        await send_stream(link, domain, callbacks, job, switch, extras, helper)
    except ToolstackError as exc:
        if not switch.done:
            raise
        await link.aclose()  # postcopy lost its link: the job pauses, then goes on
        await continue_postcopy(site, job, domain, record, str(exc))
        return
    if switch.done:
        await finish_postcopy(site, job, domain, link, record)
        return
    stats.phase = "waiting for destination"
    source_digest: dict = {}
    ready = await wait_until_ready(link, domain, verify, source_digest)

    await journal.record(record, "go-sent")
    await link.send_call(msgs.Go())
    commit_after_go(site, job, domain, record)
    await faults.reached("source:go-out")
    await wait_until_running(site, job, domain, link, record)
    stats.resumed_ns = time.monotonic_ns()  # the guest runs there; our journal is our business
    await journal_committed(journal, record)
    _record_verify(stats, verify, ready, source_digest)
    await site.host.destroy(domain)
    await journal.remove(record.migration_id)
    job.outcome_known()
    stats.finish("completed")


async def journal_committed(journal, record) -> None:
    """The destination confirmed: our copy goes.  The record spares a crash
    before the destroy a question to the destination; without it (a full
    disk) the destroy is as safe, and a restart finds the copy gone."""
    try:
        await journal.record(record, "committed")
    except ToolstackError as exc:
        log.error("%s: %s; destroying our copy all the same", record.name, exc)


def commit_after_go(site: Site, job: Job, domain: Domain, record) -> None:
    """ "go" is out: the guest may run at the destination from now on.  No
    failure resumes the source on a guess any more; any failure until the
    outcome is known leaves it in doubt (resolve.py asks the destination)."""
    job.commit()

    async def keep_in_doubt() -> None:
        site.resolver.in_doubt(domain, record, f"{job.error or 'no outcome'} after 'go'")

    job.if_failed_after_commit("keep the source in doubt", keep_in_doubt)


class Switch:
    """The source's side of the switch to postcopy, called by its save helper
    once the transition is written: the destination says Ready, gets "go" and
    confirms the guest runs there (the commit point), then the helper pushes."""

    def __init__(self, site: Site, job: Job, domain: Domain, link: MigrationLink, record) -> None:
        self.site, self.job, self.domain, self.link, self.record = site, job, domain, link, record
        self.done = False  # the guest runs at the destination: from here, pause, never resume

    async def __call__(self) -> bool:
        job, journal = self.job, self.site.journal
        job.stats.phase = "switching to postcopy"
        try:
            await self.link.reply(DEADLINES.ready, "Ready")
        except PeerRefused as exc:
            raise MigrationFailed(f"destination failed: {exc}") from None
        await journal.record(self.record, "go-sent")
        await self.link.send_call(msgs.Go())
        commit_after_go(self.site, job, self.domain, self.record)
        await faults.reached("source:go-out")
        await wait_until_running(self.site, job, self.domain, self.link, self.record)
        await journal.record(self.record, "postcopy")
        job.stats.record_switch()
        self.done = True
        return True


async def finish_postcopy(site: Site, job: Job, domain: Domain, link, record) -> None:
    """The destination said COMPLETE (our helper ended after it): every page is
    there.  Its account of the faults, then our copy goes."""
    stats = job.stats
    try:
        finished = await link.call(msgs.Finish(), DEADLINES.handshake, "the destination's account")
        pc = stats.postcopy
        pc.fault_histogram, pc.fault_p50_us, pc.fault_p99_us = (
            finished.fault_histogram,
            finished.fault_p50_us,
            finished.fault_p99_us,
        )
        pc.requested = max(pc.requested, finished.requested)
    except (LinkError, PeerRefused) as exc:
        # COMPLETE came already: the destination holds every page; only its numbers are lost
        log.warning("%s: no account from the destination (%s)", domain.name, exc)
    if stats.postcopy.ended_ns is None:
        stats.postcopy.ended_ns = time.monotonic_ns()
    await journal_committed(site.journal, record)
    await site.host.destroy(domain)
    await site.journal.remove(record.migration_id)
    job.outcome_known()
    stats.finish("completed")


async def continue_postcopy(site: Site, job: Job, domain: Domain, record, why: str) -> None:
    """A postcopy that lost its link (or its helper): the source keeps its
    paused copy and every page it has not sent; the job waits for an
    operator's `ferry migrate NAME HOST:PORT --resume` and goes on over the
    new link, as often as the link breaks; an abort instead ends it without
    a rollback (the copy is renamed NAME--postcopy-inconsistent and kept)."""
    while True:
        why = (
            f"{why}; the guest runs at {record.peer}; "
            f"resume with `ferry migrate {domain.name} {record.peer} --resume`"
        )
        try:
            link = await job.pause(why)
        except PostcopyAborted:
            await mark_inconsistent(site, domain, record)
            job.outcome_known()
            raise PostcopyAborted(
                f"postcopy aborted: the guest runs at {record.peer} without all of its pages; "
                f"the rest stay here in {domain.name}, paused and kept for inspection"
            ) from None
        try:
            callbacks = HelperCallbacks(domain, job.stats, None, site.budget_ms)
            await run_helper(
                "save",
                link.fileno,
                domain,
                callbacks,
                resume=True,
                postcopy_bandwidth=job.postcopy_bandwidth,
            )
            await finish_postcopy(site, job, domain, link, record)
            return
        except ToolstackError as exc:
            why = str(exc)
        finally:
            await link.aclose()


async def mark_inconsistent(site: Site, domain: Domain, record) -> None:
    """xl's rename for a copy that must never run again as it is."""
    name = domain.name if domain.name.endswith(INCONSISTENT) else domain.name + INCONSISTENT
    if name != domain.name:
        try:
            await site.host.rename(domain, name)
        except (ToolstackError, OSError) as exc:  # the held name says the same
            log.error("%s: not renamed (%s); held under its own name", domain.name, exc)
            name = domain.name
    domain.hold = inconsistent_hold(name)
    if record.role == DESTINATION:  # kept: a sender asking must not resume its copy
        await site.journal.record(record, "split")
    else:
        await site.journal.remove(record.migration_id)
    log.warning(
        "%s: postcopy ended without all pages on either host; kept as %s", record.name, name
    )


async def wait_until_running(site, job, domain, link, record) -> None:
    """The receiver's answer to go: it runs the guest, it could not (the
    source resumes), or no answer (in doubt until the destination says).
    Shielded: an abort that raced the commit point cannot cut it short."""
    try:
        with trio.CancelScope(shield=True):
            await link.reply(DEADLINES.running, "confirmation that the guest runs")
    except PeerRefused as exc:
        # The receiver refuses go only before it commits: its guest never ran.
        await resume_source(domain, record.was_running)
        await site.journal.remove(record.migration_id)
        job.outcome_known()
        raise MigrationFailed(
            f"{domain.name}: the destination could not start the guest ({exc}); "
            "the source runs on as it was"
        ) from None
    except LinkError as exc:
        site.resolver.in_doubt(domain, record, str(exc))
        raise MigrationFailed(
            f"{domain.name}: no confirmation after 'go' ({exc}); the guest may run at "
            f"{record.peer}, so the source is kept paused, in doubt, until the destination "
            f"answers (retried in the background; `ferry migrate-resolve {domain.name}`)"
        ) from None


async def start_save_helper(job: Job, domain: Domain, link: MigrationLink, extras=()):
    """The save helper, exec'd --prestarted: it waits for `send_stream` to
    serve it, or is discarded if the job fails first.  A migration on one
    connection starts it before the destination has built its domain (its
    interpreter, ~0.2 s to load here, loads meanwhile); one on more, once
    the `extras` joined (their fds go on its argv)."""
    helper = await start_helper(
        "save",
        link.fileno,
        domain.control_path,
        live=True,
        postcopy=job.postcopy_allowed,
        postcopy_bandwidth=job.postcopy_bandwidth,
        extra_fds=tuple(extra.fileno for extra in extras),
        prestarted=True,
    )
    job.on_failure("stop the save helper", helper.discard)
    return helper


async def send_stream(
    link: MigrationLink, domain: Domain, callbacks, job: Job, switch, extras, helper=None
) -> None:
    """The libxl stream around the save helper's libxc stream (`helper`:
    one started early, else one is started now)."""
    await link.send_call(msgs.Stream())
    await link.send_raw(libxl.encode_header() + libxl.encode_libxc_context())
    try:
        helper = helper or await start_save_helper(job, domain, link, extras)
        await helper.serve(callbacks)
    except ToolstackError as exc:
        if callbacks.abort_reason or switch.done:
            raise  # our own policy ended it, or postcopy lost its link: nothing to ask
        reason = await _receivers_reason(link)
        raise MigrationFailed(f"destination failed: {reason}" if reason else str(exc)) from None
    await link.send_raw(libxl.encode_end())


async def _receivers_reason(link: MigrationLink) -> str:
    """After our stream broke: the receiver's error reply, if it sent one."""
    try:
        await link.reply(REASON_GRACE, "the receiver's reason")
    except PeerRefused as exc:
        return str(exc)
    except LinkError:
        pass
    return ""


async def wait_until_ready(link, domain, verify: bool, digest: dict):
    """The receiver's Ready; with `verify`, the source's digest goes into
    `digest` meanwhile."""
    async with trio.open_nursery() as nursery:
        if verify:

            async def digest_source():
                started = time.monotonic()
                digest["value"] = await domain.runner.digest()
                digest["ms"] = (time.monotonic() - started) * 1000

            nursery.start_soon(digest_source)
        try:
            ready = await link.reply(DEADLINES.ready, "Ready")
        except PeerRefused as exc:
            raise MigrationFailed(f"destination failed: {exc}") from None
    return ready


def _record_verify(stats, verify: bool, ready, digest: dict) -> None:
    if not verify:
        return
    # The integrity check is not guest downtime: both digests ran at once,
    # so the longer of the two is what it added.
    verify_ms = max(ready.verify_ms, digest.get("ms", 0.0))
    if stats.suspended_ns is not None:
        stats.suspended_ns += int(verify_ms * 1e6)
    source = digest.get("value", "")
    stats.verify = {
        "source_digest": source,
        "destination_digest": ready.digest,
        "integrity": "ok" if source and source == ready.digest else "mismatch",
        "verify_ms": round(verify_ms, 1),
    }
