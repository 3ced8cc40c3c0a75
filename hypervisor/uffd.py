"""userfaultfd: guest pages that arrive on demand (postcopy).

The runner, which owns guest RAM's mapping, creates a uffd, registers that
mapping for missing and minor faults and keeps the fd for as long as the
domain lives; the restore helper receives a copy (SCM_RIGHTS), reads the
faults and installs the pages.  Facts this relies on (../shared/POSTCOPY-NOTES.md,
and measured here with Linux 6.18):

- a MAP_SHARED memfd mapping needs the MISSING_SHMEM feature;
- with MINOR_SHMEM (Linux 5.14), a page the memfd holds but the mapping
  does not map yet faults too (a minor fault); UFFDIO_CONTINUE maps what
  the memfd holds, no copy (~0.3 us a page in large ranges).  So precopy's
  pages stay where they are at the switch: the ones of the postcopy set
  are rewritten in the memfd when their new version comes, then mapped;
  nothing is punched or copied while the guest waits;
- UFFDIO_COPY from another process installs a page at an address of the
  registering process's mapping and wakes the threads waiting on it;
  EEXIST means the page is there already (done, but wake the range);
  a multi-page copy may stop part-way (EAGAIN) with the count done;
- if only the helper held the uffd, its death would drop the registration
  and missing pages would read as zeros: the runner keeps its own fd;
- a fault read by a helper that then died is not delivered again: a new
  helper wakes the whole range before serving.

All calls go through ctypes, which releases the GIL while the kernel works.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

PAGE = 4096
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
UFFD_API = 0xAA
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_SHMEM = 1 << 10
FEATURES = FEATURE_MISSING_SHMEM | FEATURE_THREAD_ID | FEATURE_MINOR_SHMEM
REGISTER_MODE_MISSING, REGISTER_MODE_MINOR = 1, 4
EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WRITE = 1 << 0
MESSAGE = struct.Struct("<BBHIQQI4x")  # event, res, res, res, flags, address, ptid
assert MESSAGE.size == 32


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)  # {api, features, ioctls}
UFFDIO_REGISTER = _iowr(0x00, 32)  # {range{start, len}, mode, ioctls}
UFFDIO_UNREGISTER = _ior(0x01, 16)  # {start, len}
UFFDIO_WAKE = _ior(0x02, 16)  # {start, len}
UFFDIO_COPY = _iowr(0x03, 40)  # {dst, src, len, mode, copy}
UFFDIO_ZEROPAGE = _iowr(0x04, 32)  # {range{start, len}, mode, zeropage}
UFFDIO_CONTINUE = _iowr(0x07, 32)  # {range{start, len}, mode, mapped}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


class UffdError(OSError):
    pass


def _ioctl(fd: int, request: int, words) -> ctypes.Array:
    """One uffd ioctl on a buffer of u64 words; UffdError on failure, with the
    words as the kernel left them (a partial copy's count) in `.words`."""
    buf = (ctypes.c_int64 * len(words))(*words)
    if _libc.ioctl(fd, request, ctypes.addressof(buf)) < 0:
        err = ctypes.get_errno()
        exc = UffdError(err, os.strerror(err))
        exc.words = buf
        raise exc
    return buf


def create() -> int:
    """A new non-blocking uffd with the features postcopy of shared memory needs."""
    if SYS_USERFAULTFD is None:
        raise UffdError(0, f"userfaultfd is not known on {platform.machine()}")
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise UffdError(err, f"userfaultfd: {os.strerror(err)}")
    try:
        _ioctl(fd, UFFDIO_API, [UFFD_API, FEATURES, 0])
    except UffdError as exc:
        os.close(fd)
        raise UffdError(
            exc.errno,
            f"userfaultfd lacks what postcopy needs: faults on shared memory, minor "
            f"ones included (Linux 5.14 or later): {exc.strerror}",
        ) from None
    return fd


def register(fd: int, start: int, length: int) -> None:
    """Pages of [start, start+length) not mapped there fault into `fd` from
    now on: missing ones (holes in the memfd) and minor ones (held, unmapped)."""
    _ioctl(fd, UFFDIO_REGISTER, [start, length, REGISTER_MODE_MISSING | REGISTER_MODE_MINOR, 0])


def unregister(fd: int, start: int, length: int) -> None:
    """Missing pages of the range are the kernel's again (zero-filled on touch);
    threads waiting on the range are woken."""
    _ioctl(fd, UFFDIO_UNREGISTER, [start, length])
    wake(fd, start, length)


def usable() -> tuple[bool, str]:
    """Whether this machine can serve postcopy faults: (True, "") or (False, why)."""
    import mmap

    try:
        fd = create()
    except OSError as exc:
        return False, f"userfaultfd is not available ({exc.strerror or exc})"
    try:
        memfd = os.memfd_create("ferry-uffd-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, PAGE)
            ram = mmap.mmap(memfd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(ram)
            try:
                register(fd, ctypes.addressof(anchor), PAGE)
            finally:
                del anchor
                ram.close()
        finally:
            os.close(memfd)
    except OSError as exc:
        return False, f"userfaultfd cannot register shared memory ({exc.strerror or exc})"
    finally:
        os.close(fd)
    return True, ""


def read_faults(fd: int, max_faults: int = 256) -> list[tuple[int, int]]:
    """(address, thread id) of each fault waiting to be read; [] when none is."""
    try:
        data = os.read(fd, MESSAGE.size * max_faults)
    except BlockingIOError:
        return []
    faults = []
    for offset in range(0, len(data) - MESSAGE.size + 1, MESSAGE.size):
        event, _r1, _r2, _r3, _flags, address, ptid = MESSAGE.unpack_from(data, offset)
        if event == EVENT_PAGEFAULT:
            faults.append((address, ptid))
    return faults


def copy(fd: int, dst: int, src: int, length: int) -> list[int]:
    """Install [src, src+length) at dst (the registering process's address) and
    wake the threads waiting on it.  Pages that are there already are skipped:
    their addresses are returned (the caller expected none)."""
    return _until_done(
        fd, UFFDIO_COPY, dst, length, lambda at: [dst + at, src + at, length - at, 0, 0]
    )


def continue_(fd: int, start: int, length: int) -> list[int]:
    """Map the pages the memfd holds at [start, start+length) and wake their
    waiters (UFFDIO_CONTINUE).  Pages mapped already are skipped: their
    addresses are returned."""
    return _until_done(
        fd, UFFDIO_CONTINUE, start, length, lambda at: [start + at, length - at, 0, 0]
    )


def _until_done(fd: int, request: int, start: int, length: int, words) -> list[int]:
    """Repeat an install ioctl from where it stopped: `words(at)` are its
    arguments for the range from offset `at`, and its last word is what the
    kernel did.  EAGAIN stopped it part-way; EEXIST found the first page
    there already (skipped, its waiters woken; its address returned)."""
    at, skipped = 0, []
    while at < length:
        args = words(at)
        try:
            _ioctl(fd, request, args)
            return skipped
        except UffdError as exc:
            done = max(int(exc.words[len(args) - 1]), 0)
            if exc.errno == 17 and done == 0:  # EEXIST: the first page is there
                skipped.append(start + at)
                wake(fd, start + at, PAGE)
                done = PAGE
            elif exc.errno not in (11, 17):  # EAGAIN, or EEXIST after some pages
                raise
            at += done
    return skipped


def zeropage(fd: int, dst: int, length: int) -> None:
    """Install zero pages at dst (pages that are there already are skipped)."""
    try:
        _ioctl(fd, UFFDIO_ZEROPAGE, [dst, length, 0, 0])
    except UffdError as exc:
        if exc.errno != 17:
            raise
        wake(fd, dst, length)


def wake(fd: int, start: int, length: int) -> None:
    """Wake the threads waiting on [start, start+length) (their pages are there)."""
    _ioctl(fd, UFFDIO_WAKE, [start, length])


def touch(address: int) -> None:
    """Read one octet at `address` without holding the GIL: if the page is
    missing, this thread waits for it in the kernel while the others run."""
    scratch = ctypes.c_char()
    _libc.memmove(ctypes.addressof(scratch), address, 1)
