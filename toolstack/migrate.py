"""Live migration between two daemons, like `xl migrate` / `xl migrate-receive`.

    sender                                   destination
    connect, authenticate (protocol.auth) -> refuse without the key
    {"op": "migrate", config, verify}     -> create an incoming domain
                                          <- {"ok": true}
    libxl stream (the helper's libxc       -> a restore helper reads it
      stream inside)                          into the incoming domain
                                          <- {"ok": true, "ready": ...}
    {"op": "go"}                          -> unpause, remember the domain
                                          <- {"ok": true, "running": true}
    destroy the source

Until "running" arrives every failure resumes the source exactly as it was,
and the destination removes its half-built domain when anything goes wrong
before "go" (a dropped connection included).
"""

from __future__ import annotations

import logging
import time

import trio

from protocol import NEED_DATA, ProtocolError, RemoteProtocolError, auth, libxl

from .domains import Domain, DomainConfig, Host, ToolstackError
from .helper_job import HelperCallbacks, run_helper
from .policies import Policy
from .savefile import resume_source
from .stats import JobStats
from .wire import ConnectionLost, field, read_exact, read_frame, send_frame

log = logging.getLogger("ferry.migrate")
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
CONFIRM_TIMEOUT = 30.0  # destination: from "go" to "running"
GO_TIMEOUT = 120.0  # destination: from "ready" to the sender's "go"


class MigrationFailed(ToolstackError):
    pass


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ToolstackError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# -- authentication -------------------------------------------------------------
async def client_handshake(stream, key: bytes) -> None:
    with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
        client_nonce = auth.new_nonce()
        await stream.send_all(auth.HELLO + client_nonce)
        answer = await read_exact(stream, auth.NONCE_SIZE + auth.PROOF_SIZE)
        server_nonce, server_proof = answer[: auth.NONCE_SIZE], answer[auth.NONCE_SIZE :]
        if not auth.verify(key, b"server", client_nonce, server_nonce, server_proof):
            raise MigrationFailed("destination failed authentication (wrong --auth-key?)")
        await stream.send_all(auth.proof(key, b"client", client_nonce, server_nonce))
        if await read_exact(stream, len(auth.ACCEPT)) != auth.ACCEPT:
            raise MigrationFailed("destination refused authentication")
    if scope.cancelled_caught:
        raise MigrationFailed("destination did not complete authentication in time")


async def server_handshake(stream, key: bytes) -> bool:
    """True when the peer proved it holds the key; nothing is created before."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        hello = await read_exact(stream, len(auth.HELLO) + auth.NONCE_SIZE)
        if not hello.startswith(auth.HELLO):
            return False
        client_nonce = hello[len(auth.HELLO) :]
        server_nonce = auth.new_nonce()
        await stream.send_all(server_nonce + auth.proof(key, b"server", client_nonce, server_nonce))
        claimed = await read_exact(stream, auth.PROOF_SIZE)
        if not auth.verify(key, b"client", client_nonce, server_nonce, claimed):
            return False
        await stream.send_all(auth.ACCEPT)
        return True
    return False


# -- the sender -------------------------------------------------------------------
async def migrate_send(
    host: Host,
    domain: Domain,
    address: str,
    key: bytes,
    policy: Policy,
    stats: JobStats,
    verify: bool = False,
) -> dict:
    """Migrate `domain` to the daemon at `address`; returns the report."""
    dest, port = parse_address(address)
    stats.phase = "connecting"
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(dest, port)
    except (OSError, trio.TooSlowError) as exc:
        raise MigrationFailed(f"cannot reach destination {address}: {exc}") from None
    async with stream:
        try:
            return await _send(host, domain, stream, key, policy, stats, verify)
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise MigrationFailed(f"connection to the destination lost: {exc}") from None
        except ProtocolError as exc:
            raise MigrationFailed(f"destination sent nonsense: {exc}") from None


async def _send(host, domain, stream, key, policy, stats, verify) -> dict:
    await client_handshake(stream, key)
    await send_frame(stream, {"op": "migrate", "config": domain.config.to_json(), "verify": verify})
    reply = await read_frame(stream)
    if not field(reply, "ok", bool):
        raise MigrationFailed(f"destination refused: {field(reply, 'error', str, 'no reason')}")
    callbacks = HelperCallbacks(domain, stats, policy)
    source_digest, source_digest_ms = "", 0.0
    try:
        await stream.send_all(libxl.encode_header() + libxl.encode_libxc_context())
        await run_helper("save", stream.socket.fileno(), domain, callbacks, live=True)
        await stream.send_all(libxl.encode_end())
        stats.phase = "waiting for destination"
        async with trio.open_nursery() as nursery:
            if verify:

                async def digest_source():
                    nonlocal source_digest, source_digest_ms
                    started = time.monotonic()
                    source_digest = await domain.call("digest")
                    source_digest_ms = (time.monotonic() - started) * 1000

                nursery.start_soon(digest_source)
            ready = await read_frame(stream)
        if not field(ready, "ok", bool):
            raise MigrationFailed(f"destination failed: {field(ready, 'error', str, 'no reason')}")
        await send_frame(stream, {"op": "go"})
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await resume_source(domain, callbacks)
        log.warning("%s: migration failed, source resumed: %s", domain.name, exc)
        raise
    # "go" is out: from here the guest may run at the destination, so the
    # source must not be resumed on a lost confirmation.
    try:
        with trio.fail_after(CONFIRM_TIMEOUT):
            confirm = await read_frame(stream)
        running = field(confirm, "ok", bool) and field(confirm, "running", bool, False)
    except (ConnectionLost, ProtocolError, trio.TooSlowError):
        running = None
    if running is None:
        raise MigrationFailed(
            f"{domain.name}: the destination did not confirm after 'go'; the guest may run "
            "there, so the source is left paused: check the destination"
        )
    if not running:
        with trio.CancelScope(shield=True):
            await resume_source(domain, callbacks)
        raise MigrationFailed(f"destination could not start the guest: {confirm.get('error')}")
    stats.resumed_ns = time.monotonic_ns()
    # The integrity check is not guest downtime: both digests run at once,
    # so the longer of the two is what it added.
    verify_ms = max(field(ready, "verify_ms", float, 0.0), source_digest_ms)
    if verify_ms and stats.suspended_ns is not None:
        stats.suspended_ns += int(verify_ms * 1e6)
    await host.destroy(domain)
    stats.finish("completed")
    report = stats.to_dict()
    if verify:
        report["source_digest"] = source_digest
        report["destination_digest"] = field(ready, "digest", str, "")
        report["integrity"] = "ok" if source_digest == report["destination_digest"] else "mismatch"
        report["verify_ms"] = verify_ms
    return report


# -- the destination ----------------------------------------------------------------
async def migrate_receive(host: Host, stream, key: bytes, on_job=None) -> None:
    """Serve one incoming migration connection; never raises for a bad peer."""
    peer = _peer_name(stream)
    try:
        if not await server_handshake(stream, key):
            log.warning("migration from %s refused: authentication failed", peer)
            return
        request = await read_frame(stream)
        if field(request, "op", str) != "migrate":
            raise RemoteProtocolError("first request is not 'migrate'")
        config = DomainConfig.from_json(field(request, "config", bytes))
        verify = field(request, "verify", bool, False)
    except (ConnectionLost, ProtocolError, ToolstackError) as exc:
        log.warning("migration from %s refused: %s", peer, exc)
        await _try_send(stream, {"ok": False, "error": str(exc)})
        return
    if config.name in host.domains:
        await _try_send(
            stream, {"ok": False, "error": f"a domain named {config.name!r} exists here"}
        )
        return
    stats = JobStats("migrate-receive", config.name, config.memory_bytes)
    if on_job:
        on_job(stats)
    try:
        domain = await host.create(config, incoming=True)
    except ToolstackError as exc:
        stats.finish("failed", str(exc))
        await _try_send(stream, {"ok": False, "error": str(exc)})
        return
    committed = False
    try:
        await send_frame(stream, {"ok": True})
        committed = await _receive(host, domain, stream, stats, verify)
    except (
        ConnectionLost,
        ProtocolError,
        ToolstackError,
        trio.BrokenResourceError,
        trio.TooSlowError,
    ) as exc:
        stats.finish("failed", str(exc) or "timed out waiting for the sender")
        log.warning("incoming migration of %s failed: %s", config.name, exc)
        await _try_send(stream, {"ok": False, "error": str(exc)})
    finally:
        if not committed:
            await host.destroy(domain)  # shielded inside: no half-built domain stays


async def _receive(host: Host, domain: Domain, stream, stats: JobStats, verify: bool) -> bool:
    decoder = libxl.LibxlDecoder(inner=False)
    decoder.feed(await read_exact(stream, libxl.HEADER.size + 8))
    if decoder.next_event() != libxl.LibxlHeader() or decoder.next_event() != libxl.LibxcContext():
        raise RemoteProtocolError("the stream does not start with a libxl header and LIBXC_CONTEXT")
    stats.phase = "restoring"
    # offsets in errors count from the start of the libxl stream
    libxc_offset = libxl.HEADER.size + 8
    callbacks = HelperCallbacks(domain, stats)
    await run_helper(
        "restore", stream.socket.fileno(), domain, callbacks, stream_offset=libxc_offset
    )
    decoder.resume()
    while not isinstance(event := decoder.next_event(), libxl.LibxlEnd):
        if event is NEED_DATA:
            decoder.feed(await read_exact(stream, decoder.wanted))
    ready = {"ok": True, "ready": True}
    if verify:
        started = time.monotonic()
        ready["digest"] = await domain.call("digest")
        ready["verify_ms"] = (time.monotonic() - started) * 1000
    await send_frame(stream, ready)
    stats.phase = "waiting for go"
    with trio.fail_after(GO_TIMEOUT):
        go = await read_frame(stream)
    if field(go, "op", str) != "go":
        raise RemoteProtocolError("expected 'go'")
    await domain.call("unpause")
    await host.commit(domain)
    stats.resumed_ns = time.monotonic_ns()
    stats.finish("completed")
    await _try_send(stream, {"ok": True, "running": True})
    log.info("incoming migration of %s complete: the guest runs here", domain.name)
    return True


async def _try_send(stream, message: dict) -> None:
    try:
        await send_frame(stream, message)
    except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _peer_name(stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "a peer"
