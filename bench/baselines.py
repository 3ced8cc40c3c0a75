"""What this machine does without ferry: the baselines ferry is divided by.

Each is the least a program must do for the same job, written plainly in
Python like ferry itself, measured in the same run:

    raw_stream      as many bytes from a filled mmap over loopback TCP, one
                    sendmsg of 4 KiB-page iovecs per 4 MiB, received by
                    another process into a fresh mmap
    raw_read        a file read into a fresh mmap
    raw_ping_pong   64-octet messages bounced over a socketpair between
                    two processes; optionally with the pinging side busy
                    for a while before each (as a helper writing a batch),
                    so the other side has gone to sleep when it is pinged
    memory_fill     as many bytes written into fresh memory of the kind a
                    destination fills: a memfd (ferry's guest RAM, shmem)
                    or anonymous memory advised MADV_HUGEPAGE (QEMU's
                    memory-backend-ram): no network, no stream

The far ends run in their own processes (`python -m bench.baselines ...`),
as ferry's helpers do.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import time

from toolstack.host.stats import percentile

PAGE = 4096
CHUNK = 1024 * PAGE  # one sendmsg: as many pages as one ferry batch


def filled_mmap(size: int, huge: bool = False) -> mmap.mmap:
    """A private anonymous mapping with every page written, like a guest's
    used RAM in QEMU (memory-backend-ram; `huge`: advised MADV_HUGEPAGE
    first, as QEMU advises it).  Not mmap's default MAP_SHARED: that is
    shmem, a memfd's kind of memory, and takes no transparent huge page."""
    region = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        region.madvise(mmap.MADV_HUGEPAGE)
    pattern = b"\x5a" * CHUNK
    for offset in range(0, size, CHUNK):
        region[offset : offset + min(CHUNK, size - offset)] = pattern[: size - offset]
    return region


def _peer(*args: object, pass_fds=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.baselines", *map(str, args)]
    return subprocess.Popen(cmd, pass_fds=pass_fds, stdout=subprocess.PIPE)


def raw_stream(total: int) -> float:
    """MB/s of the minimal sender into a receiver in another process."""
    source = filled_mmap(total)
    view = memoryview(source)
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = _peer("receive", listener.getsockname()[1], total)
    try:
        sock, _ = listener.accept()
        started = time.perf_counter()
        for offset in range(0, total, CHUNK):
            end = min(offset + CHUNK, total)
            pages = [view[p : min(p + PAGE, end)] for p in range(offset, end, PAGE)]
            while pages:
                sent = sock.sendmsg(pages)
                while sent and pages:  # a partial send: drop what went, keep the rest
                    if sent >= len(pages[0]):
                        sent -= len(pages.pop(0))
                    else:
                        pages[0], sent = pages[0][sent:], 0
        sock.recv(1)  # the receiver has every byte
        elapsed = time.perf_counter() - started
        sock.close()
    finally:
        receiver.communicate()
        listener.close()
        view.release()
        source.close()
    return total / 1e6 / elapsed


def receive(port: int, total: int) -> None:
    into = mmap.mmap(-1, total)
    view = memoryview(into)
    sock = socket.create_connection(("127.0.0.1", port))
    got = 0
    while got < total:
        count = sock.recv_into(view[got:])
        if not count:
            raise SystemExit("raw_stream: the sender closed early")
        got += count
    sock.send(b"k")
    sock.close()


def raw_read(path: str) -> float:
    """MB/s of reading the file into a fresh mmap, CHUNK octets a call."""
    size = os.path.getsize(path)
    into = mmap.mmap(-1, size)
    view = memoryview(into)
    fd = os.open(path, os.O_RDONLY)
    started = time.perf_counter()
    got = 0
    while got < size:
        count = os.readv(fd, [view[got : got + CHUNK]])
        if not count:
            raise OSError(f"{path} shrank while it was read")
        got += count
    elapsed = time.perf_counter() - started
    os.close(fd)
    view.release()
    into.close()
    return size / 1e6 / elapsed


def memory_fill(total: int, kind: str) -> float:
    """MB/s of writing `total` octets, CHUNK at a time, into fresh memory of
    `kind` ("memfd" by pwrite, as a restore writes; "anonymous", advised
    MADV_HUGEPAGE, by copying into the mapping, as QEMU's destination
    receives into its RAM)."""
    if kind == "memfd":
        pattern = memoryview(b"\x5a" * CHUNK)
        fd = os.memfd_create("ferry-bench-fill", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, total)
            started = time.perf_counter()
            for offset in range(0, total, CHUNK):
                os.pwrite(fd, pattern[: total - offset], offset)
            elapsed = time.perf_counter() - started
        finally:
            os.close(fd)
    else:
        started = time.perf_counter()
        region = filled_mmap(total, huge=True)
        elapsed = time.perf_counter() - started
        region.close()
    return total / 1e6 / elapsed


def huge_pages(setting: str) -> str:
    """The host's transparent huge page `setting` ("enabled": anonymous
    memory; "shmem_enabled": memfds), e.g. "madvise" or "never"."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{setting}") as f:
            chosen = [word for word in f.read().split() if word.startswith("[")]
    except OSError:
        return "unknown"
    return chosen[0].strip("[]") if chosen else "unknown"


def raw_ping_pong(count: int, size: int = 64, busy_us: float = 0.0) -> dict:
    """Round trips of `size` octets over a socketpair: p50 and p99 in µs.
    With `busy_us`, this side computes that long before each ping."""
    ours, theirs = socket.socketpair()
    peer = _peer("pong", theirs.fileno(), count, size, pass_fds=[theirs.fileno()])
    theirs.close()
    message = bytes(size)
    samples = []
    for _ in range(count):
        busy_until = time.perf_counter_ns() + busy_us * 1000
        while time.perf_counter_ns() < busy_until:
            pass
        started = time.perf_counter_ns()
        ours.sendall(message)
        ours.recv(size, socket.MSG_WAITALL)
        samples.append((time.perf_counter_ns() - started) / 1e3)
    peer.communicate()
    ours.close()
    # the same percentile as ferry's own round trips (toolstack.stats)
    return {
        "p50_us": round(percentile(samples, 0.5), 1),
        "p99_us": round(percentile(samples, 0.99), 1),
    }


def pong(fd: int, count: int, size: int) -> None:
    sock = socket.socket(fileno=fd)
    for _ in range(count):
        sock.sendall(sock.recv(size, socket.MSG_WAITALL))
    sock.close()


if __name__ == "__main__":
    role, numbers = sys.argv[1], [int(a) for a in sys.argv[2:]]
    {"receive": receive, "pong": pong}[role](*numbers)
