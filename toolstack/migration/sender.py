"""The sending side of a live migration, like `xl migrate`.

    connect, authenticate             hello / prove (protocol.auth)
    migrate(config, id)           ->  the receiver builds an incoming domain
    stream + the libxl stream     ->  the helper's libxc stream inside it
                                  <-  Ready (the receiver holds the guest)
    go                            ->  the receiver runs the guest
                                  <-  (reply)  the commit point
    destroy the source

Until the commit point every failure resumes the source exactly as it was
(the job's undo step); after "go" has left, a lost confirmation leaves the
source paused, since the guest may run at the destination.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio

from protocol import _gen_migration_msgs as msgs
from protocol import auth, libxl
from protocol.handshake import SENDER, VERSION

from ..host import Domain, HelperCallbacks, Host, Job, ToolstackError, run_helper
from ..host.savefile import undo_for
from . import deadlines
from .link import LinkError, MigrationLink, PeerRefused

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
        with trio.fail_after(deadlines.CONNECT):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise MigrationFailed(f"cannot reach destination {address}: {exc or 'timed out'}") from None
    return MigrationLink(stream, SENDER)


async def authenticate(link: MigrationLink, key: bytes) -> None:
    """Both sides prove they hold the key (protocol.auth); nothing happens before."""
    try:
        client_nonce = auth.new_nonce()
        hello = msgs.Hello(version=VERSION, nonce=client_nonce)
        challenge = await link.call(hello, deadlines.HANDSHAKE, "authentication")
        if not auth.verify(key, b"server", client_nonce, challenge.nonce, challenge.proof):
            raise MigrationFailed("destination failed authentication (wrong --auth-key?)")
        proof = auth.proof(key, b"client", client_nonce, challenge.nonce)
        await link.call(msgs.Prove(proof=proof), deadlines.HANDSHAKE, "authentication")
    except PeerRefused as exc:
        raise MigrationFailed(f"destination refused authentication: {exc}") from None


async def migrate_send(
    host: Host,
    job: Job,
    domain: Domain,
    address: str,
    key: bytes,
    verify: bool = False,
    budget_ms: float | None = None,
) -> None:
    """Migrate `domain` to the daemon at `address`, as `job`."""
    stats = job.stats
    stats.peer = address
    stats.phase = "connecting"
    link = await connect(address)
    try:
        await authenticate(link, key)
        await _send(host, job, domain, link, verify, budget_ms)
    except LinkError as exc:
        raise MigrationFailed(f"destination {address}: {exc}") from None
    finally:
        await link.aclose()


async def _send(host, job, domain, link, verify, budget_ms) -> None:
    stats = job.stats
    migration_id = secrets.token_hex(16)
    request = msgs.Migrate(config=domain.config, migration_id=migration_id, verify=verify)
    try:
        await link.call(request, deadlines.HANDSHAKE, "an answer to the migrate request")
    except PeerRefused as exc:
        raise MigrationFailed(f"destination refused: {exc}") from None

    callbacks = HelperCallbacks(domain, stats, job.policy, **_budget(budget_ms))
    job.on_failure("resume the source", await undo_for(domain, callbacks))
    await send_stream(link, domain, callbacks)
    stats.phase = "waiting for destination"
    source_digest: dict = {}
    ready = await wait_until_ready(link, domain, verify, source_digest)
    await link.send_call(msgs.Go())
    # "go" is out: the guest may run at the destination from now on, so no
    # failure resumes the source any more.
    job.commit()
    try:
        await link.reply(deadlines.RUNNING, "confirmation that the guest runs")
    except PeerRefused as exc:
        # the receiver says it could not start the guest: it runs nowhere
        raise MigrationFailed(
            f"{domain.name}: the destination could not start the guest ({exc}); the source "
            "is left paused: `ferry unpause` it once you have checked the destination"
        ) from None
    except LinkError as exc:
        raise MigrationFailed(
            f"{domain.name}: the destination did not confirm after 'go' ({exc}); the guest may "
            "run there, so the source is left paused: check the destination"
        ) from None
    stats.resumed_ns = time.monotonic_ns()
    _record_verify(stats, verify, ready, source_digest)
    await host.destroy(domain)
    stats.finish("completed")


def _budget(budget_ms):
    return {} if budget_ms is None else {"budget_ms": budget_ms}


async def send_stream(link: MigrationLink, domain: Domain, callbacks) -> None:
    """The libxl stream around the save helper's libxc stream."""
    await link.send_call(msgs.Stream())
    await link.send_raw(libxl.encode_header() + libxl.encode_libxc_context())
    try:
        await run_helper("save", link.fileno, domain, callbacks, live=True)
    except ToolstackError as exc:
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
            ready = await link.reply(deadlines.READY, "Ready")
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
