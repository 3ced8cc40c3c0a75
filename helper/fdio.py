"""Exact reads and vectored writes on the stream fd.

The fd may be a file, a pipe or a socket shared with the toolstack, and may
have been left non-blocking by it (O_NONBLOCK belongs to the open file, not
to this process), so both directions wait with poll() on EAGAIN.
"""

from __future__ import annotations

import os
import select
import socket
from collections import deque

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class StreamClosed(Exception):
    """The other end of the stream went away."""


def _wait(fd: int, event: int) -> None:
    poller = select.poll()
    poller.register(fd, event)
    poller.poll()


class FdWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    def writev(self, buffers: list) -> int:
        """Write every buffer, in order; returns the octets written."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        total = sum(v.nbytes for v in views)
        while views:
            try:
                n = os.writev(self.fd, views[:IOV_MAX])
            except BlockingIOError:
                _wait(self.fd, select.POLLOUT)
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise StreamClosed(f"stream closed by the receiver ({exc.strerror})") from None
            # drop what was written, keep the rest of a partly written buffer
            while n and views:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
        self.written += total
        return total


class Outbox:
    """Records for a socket this process must never block on: during postcopy
    pages flow one way and faults the other, and two sides each blocked
    writing to a full buffer the other does not read would wait forever.
    `put` queues a record (and, optionally, what to do once it is all out);
    `flush` writes what the socket takes now; the caller polls for POLLOUT
    while `pending`.  Octets are counted in the writer's `written`."""

    def __init__(self, sock: socket.socket, writer: FdWriter) -> None:
        self.sock, self.writer = sock, writer
        self.queue: deque = deque()  # memoryviews, and callables run once reached

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def put(self, buffers: list, then=None) -> None:
        self.queue.extend(v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes)
        if then is not None:
            self.queue.append(then)

    def flush(self) -> None:
        while self.queue:
            if callable(self.queue[0]):
                self.queue.popleft()()
                continue
            views = []
            for item in self.queue:
                if callable(item) or len(views) == IOV_MAX:
                    break
                views.append(item)
            try:
                n = self.sock.sendmsg(views, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise StreamClosed(f"stream closed by the other host ({exc.strerror})") from None
            self.writer.written += n
            while n:
                head = self.queue[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    self.queue.popleft()
                else:
                    self.queue[0] = head[n:]
                    n = 0

    def drain(self) -> None:
        """Flush everything, waiting for room (when nothing needs reading meanwhile)."""
        self.flush()
        while self.pending:
            _wait(self.sock.fileno(), select.POLLOUT)
            self.flush()


class FdReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.read = 0

    def read_exact(self, n: int) -> bytearray:
        """Exactly n octets (fewer only at end of stream), read straight into
        one new bytearray that the caller may keep."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                count = os.readv(self.fd, [view[got:]])
            except BlockingIOError:
                _wait(self.fd, select.POLLIN)
                continue
            except ConnectionResetError:
                count = 0
            if not count:
                break
            got += count
        view.release()
        self.read += got
        if got < n:
            del buf[got:]
        return buf
