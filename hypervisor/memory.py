"""Guest RAM: a memfd of whole pages, mapped, with numpy views of it.

The memfd is sparse until touched, so a large domain starts at once.  The
runner owns it; the helper gets the same fd through `map_memory` and maps it
too (Xen's foreign mapping), so no page goes through a socket twice.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os

import numpy as np

from protocol.limits import PAGE_SIZE

from . import uffd

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
PAGEMAP_PRESENT_OR_SWAPPED = (1 << 63) | (1 << 62)
KEEP_SIZE, PUNCH_HOLE = 0x01, 0x02  # fallocate modes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class GuestMemory:
    def __init__(self, pages: int, fd: int | None = None, name: str = "guest", writable=True):
        if pages <= 0:
            raise ValueError("a domain needs at least one page")
        self.pages = pages
        self.size = pages * PAGE_SIZE
        if fd is None:
            fd = os.memfd_create(f"ferry-{name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
        elif os.fstat(fd).st_size < self.size:
            raise ValueError(f"memfd holds {os.fstat(fd).st_size} octets, {self.size} needed")
        self.fd = fd
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, prot)
        self.view = memoryview(self.map)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8).reshape(pages, PAGE_SIZE)
        self.words = np.frombuffer(self.map, dtype="<u8").reshape(pages, PAGE_SIZE // 8)
        self.address = self.bytes.ctypes.data  # where the mapping is (numpy's view pins it)
        # Postcopy: pages may be missing (a userfaultfd serves them).  Code that
        # reads or writes guest RAM through numpy holds the GIL and would freeze
        # this whole process on a missing page, so it calls ensure_present first.
        self.pages_pending = False

    def punch(self, first: int, count: int) -> None:
        """Give pages first..first+count-1 back (FALLOC_FL_PUNCH_HOLE): they
        read as zero again and hold no memory."""
        if _libc.fallocate(self.fd, PUNCH_HOLE | KEEP_SIZE, first * PAGE_SIZE, count * PAGE_SIZE):
            err = ctypes.get_errno()
            raise OSError(err, f"punching guest pages: {os.strerror(err)}")

    def write(self, first: int, data) -> None:
        """Write `data` (whole pages) into pages first.. through the memfd:
        the kernel allocates each fresh page without a page fault.  One
        writer's way: the write holds the memfd's inode lock."""
        view = memoryview(data).cast("B")
        offset = self._check_fits(first, view.nbytes)
        while view:
            written = os.pwritev(self.fd, [view], offset)
            view, offset = view[written:], offset + written

    def write_beside_others(self, first: int, data) -> None:
        """As `write`, for several threads writing at once: copied through
        the mapping, without the GIL, so their page faults proceed side by
        side (a write to the memfd would take them one at a time), then this
        process's page-table entries for the pages are dropped (the memfd
        keeps them; the helper's RSS stays small)."""
        source = np.frombuffer(data, np.uint8)
        self._check_fits(first, source.nbytes)
        if self.map.closed:
            raise ValueError("guest RAM is no longer mapped here")
        target = self.address + first * PAGE_SIZE
        ctypes.memmove(target, source.ctypes.data, source.nbytes)
        self.unmap(first, source.nbytes // PAGE_SIZE)

    def _check_fits(self, first: int, octets: int) -> int:
        """The offset of page `first`, once `octets` are whole pages inside RAM."""
        if octets % PAGE_SIZE or first < 0 or first * PAGE_SIZE + octets > self.size:
            raise ValueError(f"{octets} octets at page {first} do not fit guest RAM")
        return first * PAGE_SIZE

    def mapped(self) -> np.ndarray:
        """Which pages this process's mapping maps now (/proc/self/pagemap:
        present, or swapped out).  Postcopy's truth for a helper that takes
        over: a page is mapped under the guest only once it is in place."""
        entries = np.empty(self.pages, "<u8")
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            offset = self.address // PAGE_SIZE * 8
            view = memoryview(entries).cast("B")
            while view:
                n = os.pread(f.fileno(), len(view), offset)
                if not n:
                    raise OSError(f"short read of /proc/self/pagemap at {offset}")
                view[: len(n)] = n
                view, offset = view[len(n) :], offset + len(n)
        return (entries & PAGEMAP_PRESENT_OR_SWAPPED) != 0

    def drop_mappings(self) -> None:
        """Unmap every page from this process's mapping (MADV_DONTNEED; the
        memfd keeps them): under a userfaultfd, each faults until mapped again."""
        self.map.madvise(mmap.MADV_DONTNEED, 0, self.size)

    def ensure_present(self, pfns) -> None:
        """Wait, without the GIL, for pages that may not have arrived yet."""
        if self.pages_pending:
            for pfn in pfns:
                uffd.touch(self.address + int(pfn) * PAGE_SIZE)

    def populate(self, offset: int, length: int) -> None:
        """Map a range of allocated pages in one call (MADV_POPULATE_READ)
        rather than one page fault per page, which is slow under nested
        virtualisation.  Only for ranges that hold data: on a hole it would
        allocate.  A kernel without it (before 5.14) just takes the faults."""
        try:
            self.map.madvise(MADV_POPULATE_READ, offset, length)
        except OSError:
            pass

    def unmap(self, first: int, count: int) -> None:
        """Drop this process's page-table entries for pages first..first+count-1
        (MADV_DONTNEED).  The memfd keeps the data: the pages are shared, so
        this only stops them counting in this process's RSS, which would
        otherwise grow to the guest's size as a save helper reads it all."""
        self.map.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE, count * PAGE_SIZE)

    def data_extents(self) -> list[tuple[int, int]]:
        """(first page, end page) of every stretch of allocated RAM.  The rest
        are holes: pages never written, zero, and not worth faulting in."""
        extents, pos = [], 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            extents.append((start // PAGE_SIZE, -(-end // PAGE_SIZE)))
            pos = end
        return extents

    def page_view(self, first: int, count: int = 1) -> memoryview:
        return self.view[first * PAGE_SIZE : (first + count) * PAGE_SIZE]

    def digest(self) -> str:
        """SHA-256 of all RAM, hex.  Read through the fd, not the mapping: a
        read() of a never-touched page returns zeros without allocating it."""
        h = hashlib.sha256()
        buf = memoryview(bytearray(1 << 20))
        offset = 0
        while offset < self.size:
            n = os.preadv(self.fd, [buf[: min(len(buf), self.size - offset)]], offset)
            if n <= 0:
                raise OSError(f"short read of guest memory at {offset}")
            h.update(buf[:n])
            offset += n
        return h.hexdigest()

    def close(self) -> None:
        # numpy views keep the mmap exported; drop them before closing.
        self.bytes = self.words = None
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process
        os.close(self.fd)
