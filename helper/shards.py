"""Precopy pages over several connections (`migrate --parallel-connections N`).

Pages are sharded by 2 MiB block: block b travels on connection b % N, so
every version of one pfn goes on the same connection and arrives in the
order it was sent; no record waits for another connection.  Connection 0
is the migration's own and carries the whole libxc stream as with one
connection (its share of the pages included); each extra connection
carries PAGE_DATA records of its shard, then END (docs/streams.md).

The save helper writes each extra connection from its own thread, fed
through a short queue (the main thread maps and encodes, the writers block
in writev without the GIL).  It ends every extra stream before the main
stream's context or POSTCOPY_BEGIN; the restore helper, whose readers run
one thread per extra connection, waits for all of them there: every page
is in before the guest can run.
"""

from __future__ import annotations

import os
import queue
import socket
import threading

import numpy as np

from protocol import NEED_DATA, RemoteProtocolError, libxc

from .fdio import FdReader, FdWriter

SHARD_SHIFT = 9  # 512 pages: 2 MiB blocks
QUEUE_DEPTH = 2  # records queued per extra connection: enough to keep it busy


def shard_of(pfns: np.ndarray, connections: int) -> np.ndarray:
    """The connection each pfn travels on."""
    return (pfns >> np.uint64(SHARD_SHIFT)) % np.uint64(connections)


class ShardWriter:
    """An extra connection's writer thread.  `put` queues one record (with
    what to do once it is written); `end` sends END and waits for the thread."""

    def __init__(self, fd: int, index: int) -> None:
        self.writer = FdWriter(fd)
        self.index = index
        self.queued_octets = 0  # counted when queued: the stats' stream octets
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name=f"shard-{index}", daemon=True)
        self._thread.start()

    def put(self, buffers: list, then=None) -> None:
        self.check()
        self.queued_octets += sum(memoryview(b).nbytes for b in buffers)
        self._queue.put((buffers, then))

    def end(self) -> None:
        """END on this connection, then wait until everything queued is written."""
        self.put(libxc.encode_marker(libxc.REC_END))
        self._queue.put(None)
        self._thread.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise ShardError(f"connection {self.index}: {self.error}")

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # failed: drain, the main thread reports it
            buffers, then = item
            try:
                self.writer.writev(buffers)
                if then is not None:
                    then()
            except BaseException as exc:
                self.error = exc


class ShardReader:
    """An extra connection's reader thread at the destination: PAGE_DATA
    records, written into guest RAM with `write_pages`, until END."""

    def __init__(self, fd: int, index: int, pages: int, write_pages) -> None:
        self.reader = FdReader(fd)
        self.index = index
        self.decoder = libxc.LibxcDecoder(max_pfns=pages, records_only=True)
        self.write_pages = write_pages
        self.pages = 0  # written so far (progress)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"shard-{index}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """End the reader early (the restore failed): shut its socket for
        reading, so the next read ends, and wait for the thread, which must
        not write into guest RAM once the caller unmaps it."""
        try:
            with socket.socket(fileno=os.dup(self.reader.fd)) as sock:
                sock.shutdown(socket.SHUT_RD)  # the socket, not this duplicate fd
        except OSError:
            pass  # not a socket, or already shut: the thread ends at its END or EOF
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def done(self, timeout: float) -> bool:
        """Wait up to `timeout` s for END; True once it came (errors raise)."""
        self._thread.join(timeout)
        if self.error is not None:
            raise ShardError(f"connection {self.index}: {self.error}")
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while (event := self._next_event()) != libxc.Marker(libxc.REC_END):
                if not isinstance(event, libxc.PageData) or event.postcopy:
                    raise RemoteProtocolError(
                        f"only PAGE_DATA and END travel on an extra connection, not "
                        f"{type(event).__name__}",
                        self.decoder.offset,
                    )
                self.write_pages(event)
                self.pages += len(event.pfns)
        except BaseException as exc:
            self.error = exc

    def _next_event(self):
        while (event := self.decoder.next_event()) is NEED_DATA:
            want = self.decoder.wanted
            data = self.reader.read_exact(want)
            self.decoder.feed(data)
            if len(data) < want:
                self.decoder.feed_eof()
        return event


class ShardError(Exception):
    """An extra connection failed; the message says which and why."""
