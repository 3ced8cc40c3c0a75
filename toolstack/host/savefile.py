"""Save files, like `xl save` / `xl restore`.

    xl header (magic, flags, the domain config as JSON)
    libxl stream: header, LIBXC_CONTEXT, <the helper's libxc stream>, END

Saving writes to a fresh temporary file beside FILE (created exclusively,
private to its owner) and renames it into place once complete and
fsynced, so a failed save leaves no file that looks complete and no name
can make ferryd write through a link someone placed.  Restoring reads the
headers itself, hands the fd to a restore helper for the libxc part (the
fd's offset is shared, so the helper reads on from where we stopped), then
reads the libxl records that follow.  Both run as jobs (host/jobs.py): a
failure leaves the source as it was and no half-restored domain behind.
File I/O leaves the trio thread, so one job's disk never delays another
job's policy answers.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time

import trio

from helper.fdio import FdReader
from protocol import NEED_DATA, RemoteProtocolError, libxl, xl
from protocol._gen_control_msgs import DomainConfig
from protocol._gen_runner_msgs import DomainState

from . import faults
from .domains import Domain, Host, RunnerGone, ToolstackError, config_from_json, config_to_json
from .helper_job import HelperCallbacks, HelperFailed, run_helper
from .jobs import Job
from .stats import JobStats

run_sync = trio.to_thread.run_sync


async def save_domain(
    job: Job,
    host: Host,
    domain: Domain,
    path: str,
    live: bool = False,
    keep: bool = False,
    verify: bool = False,
) -> None:
    """Save `domain` to `path`; it is destroyed afterwards unless `keep`.
    With `verify`, `job.stats.source_digest` is the RAM digest of the suspended guest."""
    stats = job.stats
    callbacks = HelperCallbacks(domain, stats, job.policy)
    was_running = await is_running(domain)
    job.on_failure("resume the source", lambda: resume_source(domain, was_running))
    fd, partial = await run_sync(_create_partial, path)
    job.on_failure(f"remove {partial}", lambda: run_sync(_unlink, partial))
    try:
        header = xl.encode_header(config_to_json(domain.config))
        await run_sync(
            _write_all, fd, header + libxl.encode_header() + libxl.encode_libxc_context()
        )
        await run_helper("save", fd, domain, callbacks, live=live)
        stats.resumed_ns = time.monotonic_ns()  # downtime: suspend to a complete stream
        await run_sync(_finish_file, fd, partial, path)
    finally:
        await run_sync(os.close, fd)
    job.commit()
    if verify:
        stats.source_digest = await domain.runner.digest()
    if keep:
        await resume_source(domain, was_running)
    else:
        await host.destroy(domain)


def _create_partial(path: str) -> tuple[int, str]:
    folder, base = os.path.split(path)
    try:
        return tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=folder or ".")
    except OSError as exc:
        raise ToolstackError(f"cannot write {path}: {exc.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _finish_file(fd: int, partial: str, path: str) -> None:
    """END, then the data on disk, then the name: a crash leaves the old file or the new one."""
    try:
        _write_all(fd, libxl.encode_end())
        faults.point("save:fsync")
        os.fsync(fd)
        os.rename(partial, path)
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise ToolstackError(f"cannot write {path}: {exc.strerror}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def is_running(domain: Domain) -> bool:
    return (await domain.runner.getinfo()).state == DomainState.RUNNING


async def resume_source(domain: Domain, was_running: bool) -> None:
    """After a failed save or migration: the guest is exactly as it was before
    it, log-dirty off and running only if it was running (unpause is a no-op
    for a guest that never stopped).  ToolstackError when its runner did not
    do it (busy, stopped): the caller says so, the guest is not resumed on a
    hope."""
    try:
        await domain.runner.logdirty_disable()
        if was_running:
            await domain.runner.unpause()
    except RunnerGone:
        pass  # the domain itself is gone; nothing left to resume
    except ToolstackError as exc:
        action = "unpause" if was_running else "check"
        raise ToolstackError(
            f"the source could not be resumed ({exc}): `ferry {action} {domain.name}` "
            "once its runner answers"
        ) from None


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
    config = config_from_json(header.config, "domain config in the save file")
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


def rename(config: DomainConfig, name: str) -> DomainConfig:
    """`config` under another name, checked like any name that enters."""
    return DomainConfig.from_wire({**config.to_wire(), "name": name}, "restore --name")


def open_save_file(path: str) -> tuple[int, DomainConfig]:
    """The file, positioned at its libxc stream, and the config it carries."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ToolstackError(f"cannot read {path!r}: {getattr(exc, 'strerror', exc)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolstackError(f"{path}: not a regular file")
        return fd, read_headers(fd)
    except RemoteProtocolError as exc:
        os.close(fd)
        raise ToolstackError(f"{path}: not a valid save file: {exc}") from None
    except OSError as exc:
        os.close(fd)
        raise ToolstackError(f"cannot read {path}: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise


async def restore_domain(
    job: Job, host: Host, fd: int, path: str, config: DomainConfig, paused: bool = False
) -> Domain:
    """Restore the save file open on `fd` (past its headers) as `config`."""
    stats = job.stats
    domain = await host.create(config, incoming=True)
    job.own(domain)
    job.on_failure(f"destroy the half-restored {config.name}", lambda: host.destroy(domain))
    stats.phase = "restoring"
    callbacks = HelperCallbacks(domain, stats)
    libxc_offset = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        await run_helper("restore", fd, domain, callbacks, stream_offset=libxc_offset)
        await run_sync(read_libxl_tail, fd)
    except (RemoteProtocolError, HelperFailed) as exc:
        raise ToolstackError(f"{path}: {exc}") from None
    await (domain.runner.pause() if paused else domain.runner.unpause())
    await host.commit(domain)
    job.commit()
    return domain


async def save_to_file(
    host: Host,
    domain: Domain,
    path: str,
    live: bool = False,
    keep: bool = False,
    policy=None,
    verify: bool = False,
):
    """`save_domain` as a job of its own, for library use: its stats, or
    ToolstackError with the job's one line."""
    job = Job(JobStats("save", domain.name, domain.config.memory_bytes), policy, domain)
    await job.run(lambda job: save_domain(job, host, domain, path, live, keep, verify))
    if job.error:
        raise ToolstackError(job.error)
    return job.stats


async def restore_from_file(host: Host, path: str, name: str = "", paused: bool = False):
    """`restore_domain` as a job of its own, for library use: the domain."""
    fd, config = await run_sync(open_save_file, path)
    try:
        if name:
            config = rename(config, name)
        job = Job(JobStats("restore", config.name, config.memory_bytes))
        restored = []

        async def work(job: Job) -> None:
            restored.append(await restore_domain(job, host, fd, path, config, paused))

        await job.run(work)
    finally:
        os.close(fd)
    if job.error:
        raise ToolstackError(job.error)
    return restored[0]
