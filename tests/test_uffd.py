"""hypervisor/uffd.py against the kernel: what an install does with a page
that is there already (postcopy relies on it being skipped, and told)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from hypervisor import uffd

PAGE = mmap.PAGESIZE
usable, why = uffd.usable()
pytestmark = pytest.mark.skipif(not usable, reason=f"userfaultfd: {why}")


@pytest.fixture
def registered():
    """Two pages of a memfd, mapped and registered; page 1 is in the memfd already."""
    memfd = os.memfd_create("ferry-uffd-test", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * PAGE)
    os.pwrite(memfd, b"\x5a" * PAGE, PAGE)
    ram = mmap.mmap(memfd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(ram)
    fd = uffd.create()
    base = ctypes.addressof(anchor)
    try:
        uffd.register(fd, base, 2 * PAGE)
        yield fd, base, memfd
    finally:
        uffd.unregister(fd, base, 2 * PAGE)
        os.close(fd)
        del anchor
        ram.close()
        os.close(memfd)


def test_a_copy_over_a_page_already_there_skips_it_and_says_which(registered):
    fd, base, memfd = registered
    data = ctypes.create_string_buffer(b"\xa5" * 2 * PAGE, 2 * PAGE)
    skipped = uffd.copy(fd, base, ctypes.addressof(data), 2 * PAGE)
    assert skipped == [base + PAGE]
    assert os.pread(memfd, PAGE, 0) == b"\xa5" * PAGE  # copied into the hole
    assert os.pread(memfd, PAGE, PAGE) == b"\x5a" * PAGE  # left as it was


def test_a_continue_over_mapped_pages_skips_them(registered):
    fd, base, memfd = registered
    os.pwrite(memfd, b"\x11" * PAGE, 0)
    assert uffd.continue_(fd, base, 2 * PAGE) == []
    assert uffd.continue_(fd, base, 2 * PAGE) == [base, base + PAGE]


def test_the_restore_helper_names_set_pages_it_found_in_place(registered):
    """A page of the postcopy set taken for a hole but there already is not
    overwritten in silence: the helper's warning names its pfn."""
    from types import SimpleNamespace

    import numpy as np

    from helper.postcopy import PostcopyReceiver

    fd, base, memfd = registered
    said = []
    receiver = PostcopyReceiver.__new__(PostcopyReceiver)  # only the install path is needed
    receiver.uffd, receiver.base = fd, base
    receiver.stale = np.zeros(2, bool)  # both taken for holes; page 1 is in the memfd
    receiver.restorer = SimpleNamespace(
        memory=SimpleNamespace(fd=memfd),
        link=SimpleNamespace(say=lambda level, what, text: said.append(text)),
    )
    receiver.install_data(np.array([0, 1], np.uint64), memoryview(b"\xa5" * 2 * PAGE))
    assert said == ["1 page(s) of the set were in place before their data came (pfn 0x1)"]
    assert os.pread(memfd, PAGE, 0) == b"\xa5" * PAGE
