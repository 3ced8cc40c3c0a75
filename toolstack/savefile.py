"""Save files, like `xl save` / `xl restore`.

    xl header (magic, flags, the domain config as JSON)
    libxl stream: header, LIBXC_CONTEXT, <the helper's libxc stream>, END

Saving writes to NAME.partial and renames on success, so a failed save
leaves no file that looks complete.  Restoring reads the headers itself,
hands the fd to a restore helper for the libxc part (the fd's offset is
shared, so the helper reads on from where we stopped), then reads the libxl
records that follow.  Any failure leaves no domain behind.
"""

from __future__ import annotations

import os
import time

from helper.fdio import FdReader
from protocol import NEED_DATA, RemoteProtocolError, libxl, xl

from .domains import Domain, DomainConfig, Host, ToolstackError
from .helper_job import HelperCallbacks, HelperFailed, run_helper
from .policies import Policy
from .stats import JobStats


async def save_to_file(
    host: Host,
    domain: Domain,
    path: str,
    live: bool = False,
    keep: bool = False,
    policy: Policy | None = None,
    stats: JobStats | None = None,
    verify: bool = False,
) -> JobStats:
    """Save `domain` to `path`; it is destroyed afterwards unless `keep`.
    With `verify`, `stats.source_digest` is the RAM digest of the suspended guest."""
    stats = stats or JobStats("save", domain.name, domain.config.memory_bytes)
    callbacks = HelperCallbacks(domain, stats, policy)
    partial = path + ".partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ToolstackError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.write(fd, xl.encode_header(domain.config.to_json()))
        os.write(fd, libxl.encode_header() + libxl.encode_libxc_context())
        await run_helper("save", fd, domain, callbacks, live=live)
        stats.resumed_ns = time.monotonic_ns()  # downtime: suspend to a complete stream
        os.write(fd, libxl.encode_end())
        os.fsync(fd)
        os.rename(partial, path)
        if verify:
            stats.source_digest = await domain.call("digest")
    except BaseException as exc:
        os.unlink(partial)
        await resume_source(domain, callbacks)
        stats.finish("failed", str(exc))
        raise
    finally:
        os.close(fd)
    if keep:
        await domain.call("unpause")
    else:
        await host.destroy(domain)
    stats.finish("completed")
    return stats


async def resume_source(domain: Domain, callbacks: HelperCallbacks) -> None:
    """After a failed save or migration: the guest runs on exactly as before."""
    try:
        await domain.call("logdirty_disable")
        if callbacks.suspended:
            await domain.call("unpause")
    except ToolstackError:
        pass  # the domain itself is gone; nothing left to resume


def read_exact(fd: int, n: int, what: str) -> bytes:
    data = FdReader(fd).read_exact(n)
    if len(data) < n:
        raise RemoteProtocolError(f"file truncated in the {what}")
    return bytes(data)


def read_headers(fd: int) -> DomainConfig:
    """The xl header's config, then the libxl header and LIBXC_CONTEXT."""
    fixed = read_exact(fd, xl.FIXED.size, "xl header")
    total = xl.header_length(fixed)
    header = xl.decode_header(fixed + read_exact(fd, total - xl.FIXED.size, "xl header"))
    if not header.config:
        raise RemoteProtocolError("the save file carries no domain config")
    config = DomainConfig.from_json(header.config)
    decoder = libxl.LibxlDecoder(inner=False, start_offset=total)
    decoder.feed(read_exact(fd, libxl.HEADER.size + 8, "libxl header"))
    if decoder.next_event() != libxl.LibxlHeader():
        raise RemoteProtocolError("no libxl header", total)
    if decoder.next_event() != libxl.LibxcContext():
        raise RemoteProtocolError("the libxl stream does not start with LIBXC_CONTEXT", total + 16)
    return config


def read_libxl_tail(fd: int) -> None:
    """The libxl records after the libxc stream, up to END."""
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    decoder = libxl.LibxlDecoder(inner=False, expect_header=False, start_offset=offset)
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            chunk = os.read(fd, 65536)
            if not chunk:
                decoder.feed_eof()
            else:
                decoder.feed(chunk)
            continue
        if isinstance(event, libxl.LibxlEnd):
            return
        # EMULATOR_CONTEXT records: ferry's backends keep no emulator state.


async def restore_from_file(
    host: Host,
    path: str,
    name: str | None = None,
    paused: bool = False,
    stats: JobStats | None = None,
) -> Domain:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ToolstackError(f"cannot read {path}: {exc.strerror}") from None
    try:
        try:
            config = read_headers(fd)
        except RemoteProtocolError as exc:
            raise ToolstackError(f"{path}: not a valid save file: {exc}") from None
        if name:
            config = config.model_copy(update={"name": name})
        stats = stats or JobStats("restore", config.name, config.memory_bytes)
        domain = await host.create(config, incoming=True)
        try:
            stats.phase = "restoring"
            callbacks = HelperCallbacks(domain, stats)
            libxc_offset = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                await run_helper("restore", fd, domain, callbacks, stream_offset=libxc_offset)
                read_libxl_tail(fd)
            except (RemoteProtocolError, HelperFailed) as exc:
                raise ToolstackError(f"{path}: {exc}") from None
            await domain.call("pause" if paused else "unpause")
            await host.commit(domain)
        except BaseException:
            await host.destroy(domain)
            raise
    finally:
        os.close(fd)
    stats.finish("completed")
    return domain
