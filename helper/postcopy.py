"""Postcopy: the guest runs at the destination while its last pages follow.

Source (`PostcopySender`), after the transition: pages the destination asks
for go first, the rest follow in small batches from just after the last
fault (Otto's RFC; Hines et al.: pages near the last fault are the likely
next ones), batches growing while no fault comes, shrinking at a fault.
Every pfn of the set goes exactly once.  When all are out the source waits
for POSTCOPY_COMPLETE, the destination's word that it holds them all.

Destination (`PostcopyReceiver`): one loop polls the stream and the
userfaultfd.  A fault on a page of the set is asked for (POSTCOPY_FAULT)
once; a page that arrives is installed with UFFDIO_COPY, which wakes its
waiters; a fault on a page outside the set is a page that holds nothing:
a zero page is put there at once.  Once every page is in place:
POSTCOPY_COMPLETE, then the source's END.

The stream socket carries both directions; this module reads only as many
octets as the next record needs, so nothing after the libxc END is taken.
Postcopy runs over sockets only (a save file has no return direction).
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import time
from collections import deque

import numpy as np

from hypervisor import uffd
from protocol import NEED_DATA, RemoteProtocolError, libxc
from protocol.limits import MAX_BATCH_PAGES, PAGE_SIZE
from protocol.postcopy import ForwardRules, ReturnRules

from .fdio import StreamClosed

# A requested page queues behind whatever push data is already on its way:
# the batch being written and the sockets' buffers.  While the guest faults,
# both stay small (measured on loopback here: 64 pages and 64 KiB give fault
# p50 ~0.9 ms, p99 ~2.2 ms; 4 MiB batches and autotuned buffers 7-17 ms);
# after a quiet spell they grow again, so the push does not crawl.
MIN_PUSH = 64  # pages in a batch while faults come (Otto's batch size)
MAX_PUSH = MAX_BATCH_PAGES  # pages in a batch after a quiet spell
QUIET_NS = 50_000_000  # no fault for this long: a quiet spell
SMALL_BUFFER, LARGE_BUFFER = 64 << 10, 1 << 20  # socket buffers, busy and quiet
NOTSENT_LOWAT = 64 << 10  # octets queued unsent at most before the sender may write more
PROGRESS_INTERVAL = 0.2  # s between postcopy_progress messages
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """(first pfn, count) of each stretch of consecutive pfns in sorted `pfns`."""
    if not len(pfns):
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pfns)]))
    return [(int(pfns[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class RecordStream:
    """Records from the stream socket without blocking and without reading past
    what the decoder needs.  `poll_fd` is the fd to poll for them."""

    def __init__(self, fd: int, decoder) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.decoder = decoder
        self.octets = 0

    def close(self) -> None:
        self.sock.close()

    def available(self) -> list:
        """Every whole record that has arrived (perhaps none)."""
        events = []
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                events.append(event)
                if self.decoder.done:
                    return events
                continue
            # Exactly what the record still needs: a whole body arrives in one
            # bytearray the decoder keeps without copying.
            buf = bytearray(self.decoder.wanted)
            try:
                got = self.sock.recv_into(buf, len(buf), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return events
            except ConnectionResetError:
                got = 0
            if not got:
                raise StreamClosed("the other host closed the stream during postcopy")
            del buf[got:]
            self.octets += got
            self.decoder.feed(buf)


def return_decoder(pages: int) -> libxc.LibxcDecoder:
    """The destination's records to the source: records only, pfns inside the domain."""
    return libxc.LibxcDecoder(max_pfns=pages, records_only=True)


def read_resume_list(incoming: RecordStream, rules: ReturnRules) -> np.ndarray:
    """Recovery, at the source: the pfns the destination lists as still lacking."""
    poller = select.poll()
    poller.register(incoming.sock.fileno(), select.POLLIN)
    while rules.listing:
        poller.poll()  # the helper's silence deadline in the toolstack bounds this
        for event in incoming.available():
            pfns = rules.event(event, incoming.decoder.offset)
            if pfns is not None:
                raise RemoteProtocolError("POSTCOPY_FAULT before POSTCOPY_RESUME_END")
    listed = np.concatenate(rules.lacking) if rules.lacking else np.empty(0, np.uint64)
    return np.unique(listed)


class PostcopySender:
    """The source side after the transition (see the module doc)."""

    def __init__(
        self,
        saver,
        pfns: np.ndarray,
        incoming: RecordStream | None = None,
        rules: ReturnRules | None = None,
    ) -> None:
        self.saver = saver
        self.pfns = pfns  # the set, sorted
        self.sent = np.zeros(len(pfns), bool)
        self.queued = np.zeros(len(pfns), bool)
        self.requests: deque[int] = deque()  # indices into pfns, as the faults came
        self.cursor = 0  # where the background push goes on
        self.push = MIN_PUSH
        self.last_fault = time.monotonic_ns()
        self.pushed = self.requested = 0
        self.rules = rules or ReturnRules()
        self.incoming = incoming or RecordStream(saver.writer.fd, return_decoder(saver.pages))
        self.incoming.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.buffer = 0
        self.set_buffer(SMALL_BUFFER)
        self.started_octets = saver.writer.written
        self.last_progress = 0.0

    def run(self) -> None:
        try:
            while not (self.unsent == 0 and self.rules.complete):
                self.read_requests(timeout=0 if self.unsent else PROGRESS_INTERVAL)
                if self.unsent:
                    self.send_next()
                self.say_progress()
        finally:
            self.incoming.close()
        self.say_progress(force=True)

    @property
    def unsent(self) -> int:
        return len(self.pfns) - self.pushed - self.requested

    def read_requests(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.incoming.sock.fileno(), select.POLLIN)
        if not poller.poll(timeout * 1000):
            return
        for event in self.incoming.available():
            pfns = self.rules.event(event, self.incoming.decoder.offset)
            if pfns is not None:
                self.queue(pfns)

    def queue(self, pfns: np.ndarray) -> None:
        """Faulted pfns: each one of the set not yet sent nor queued goes to the
        front.  Duplicates cost nothing (a flood of them is bounded by the set)."""
        index = np.minimum(np.searchsorted(self.pfns, pfns), len(self.pfns) - 1)
        outside = self.pfns[index] != pfns
        if outside.any():
            bad = int(pfns[outside][0])
            raise RemoteProtocolError(f"POSTCOPY_FAULT: pfn {bad:#x} is not in the postcopy set")
        for i in index.tolist():
            if not self.sent[i] and not self.queued[i]:
                self.queued[i] = True
                self.requests.append(i)
        self.last_fault = time.monotonic_ns()
        self.push = MIN_PUSH
        self.set_buffer(SMALL_BUFFER)

    def set_buffer(self, size: int) -> None:
        if size != self.buffer:
            self.buffer = size
            self.incoming.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def send_next(self) -> None:
        if self.requests:
            take = []
            while self.requests and len(take) < MIN_PUSH:
                i = self.requests.popleft()
                if not self.sent[i]:
                    take.append(i)
            if take:
                self.cursor = (take[-1] + 1) % len(self.pfns)  # push on from the last fault
                self.requested += self.send(np.sort(np.array(take)))
                return
        index = self.next_unsent(self.push)
        self.pushed += self.send(index)
        if time.monotonic_ns() - self.last_fault > QUIET_NS:  # quiet: bigger batches
            self.push = min(self.push * 2, MAX_PUSH)
            self.set_buffer(LARGE_BUFFER)

    def next_unsent(self, count: int) -> np.ndarray:
        """Up to `count` unsent indices from the cursor on, wrapping once."""
        found = np.flatnonzero(~self.sent[self.cursor :])[:count] + self.cursor
        if len(found) < count and self.cursor:
            more = np.flatnonzero(~self.sent[: self.cursor])[: count - len(found)]
            found = np.concatenate((found, more))
        if len(found):
            self.cursor = (int(found[-1]) + 1) % len(self.pfns)
        return np.sort(found)

    def send(self, index: np.ndarray) -> int:
        pfns = self.pfns[index]
        views = self.saver.prepare_batch(pfns, sweep=False)
        self.saver.writer.writev(libxc.encode_page_data(pfns, views, postcopy=True))
        for first, count in runs(pfns):
            self.saver.memory.unmap(first, count)
        self.sent[index] = True
        return len(index)

    def say_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            octets = self.saver.writer.written - self.started_octets
            done = self.pushed + self.requested
            self.saver.link.postcopy_progress(len(self.pfns), done, self.requested, octets, [])


class PostcopyReceiver:
    """The destination side after the transition (see the module doc)."""

    def __init__(self, restorer, rules: ForwardRules, uffd_fd: int, base: int) -> None:
        self.restorer = restorer
        self.rules = rules
        self.uffd = uffd_fd
        self.base = base
        self.pages = restorer.memory.pages
        self.asked = np.zeros(len(rules.pfns), bool)
        self.waiting: dict[int, int] = {}  # pfn -> when its first fault was read (ns)
        self.latencies: list[int] = []  # us, since the last progress message
        self.requested = 0
        self.stream = RecordStream(restorer.reader.fd, restorer.decoder)
        self.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        self.last_progress = 0.0

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.stream.sock.fileno(), select.POLLIN)
        poller.register(self.uffd, select.POLLIN)
        try:
            while self.rules.remaining:
                ready = {fd for fd, _ in poller.poll(PROGRESS_INTERVAL * 1000)}
                if self.uffd in ready:
                    self.on_faults()
                if self.stream.sock.fileno() in ready:
                    self.on_records()
                self.say_progress()
            # First the runner lets the kernel serve what is left (pages never
            # written, outside the set), then the source hears it is over.
            self.restorer.domain.postcopy_done()
            self.restorer.writer.writev(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE))
            self.say_progress(force=True)
            self.read_to_end(poller)
        finally:
            self.stream.close()

    def on_faults(self) -> None:
        ask = []
        now = time.monotonic_ns()
        for address, _thread in uffd.read_faults(self.uffd):
            pfn = (address - self.base) // PAGE_SIZE
            if not 0 <= pfn < self.pages:
                continue  # not guest RAM: cannot happen with one registered range
            page = self.base + pfn * PAGE_SIZE
            i = int(np.searchsorted(self.rules.pfns, pfn))
            if i >= len(self.rules.pfns) or int(self.rules.pfns[i]) != pfn:
                uffd.zeropage(self.uffd, page, PAGE_SIZE)  # never held data: zero it is
                continue
            if self.rules.sent[i]:
                uffd.wake(self.uffd, page, PAGE_SIZE)  # arrived meanwhile
                continue
            self.waiting.setdefault(pfn, now)
            if not self.asked[i]:
                self.asked[i] = True
                ask.append(pfn)
        for start in range(0, len(ask), MAX_BATCH_PAGES):
            chunk = ask[start : start + MAX_BATCH_PAGES]
            self.restorer.writer.writev(libxc.encode_pfn_list(chunk, fault=True))
            self.requested += len(chunk)

    def on_records(self) -> None:
        for event in self.stream.available():
            self.rules.event(event, self.stream.decoder.offset)
            if isinstance(event, libxc.PageData):
                self.install(event)

    def install(self, event: libxc.PageData) -> None:
        """Put a batch's pages in place (the rules have checked each is new)."""
        data = np.frombuffer(event.data, np.uint8)
        source = data.ctypes.data
        position = 0
        for first, count in runs(event.pfns):
            length = count * PAGE_SIZE
            uffd.copy(self.uffd, self.base + first * PAGE_SIZE, source + position, length)
            position += length
        now = time.monotonic_ns()
        for pfn in event.pfns.tolist():
            started = self.waiting.pop(pfn, None)
            if started is not None:
                self.latencies.append(min((now - started) // 1000, 2**32 - 1))
        self.restorer.pages_written += len(event.pfns)

    def read_to_end(self, poller) -> None:
        """After COMPLETE the source ends its stream: END, nothing else."""
        while not self.stream.decoder.done:
            if not poller.poll(PROGRESS_INTERVAL * 1000):
                self.say_progress(force=True)  # still here, waiting for the source's END
                continue
            for event in self.stream.available():
                self.rules.event(event, self.stream.decoder.offset)

    def say_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            latencies, self.latencies = self.latencies, []
            self.restorer.link.postcopy_progress(
                len(self.rules.pfns),
                self.rules.sent_count,
                self.requested,
                self.stream.octets,
                latencies,
            )


def lacking_pages(memory, bitmap: bytes) -> np.ndarray:
    """Recovery, at the destination: pages of the set (a bitmap) not in place yet.
    A page in place holds data in the memfd; one still to come is a hole."""
    expected = np.flatnonzero(np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little"))
    expected = expected[expected < memory.pages].astype(np.uint64)
    present = np.zeros(len(expected), bool)
    for first, end in memory.data_extents():
        present |= (expected >= first) & (expected < end)
    return expected[~present]


def set_bitmap(pfns: np.ndarray, pages: int) -> bytes:
    bits = np.zeros(pages, np.uint8)
    bits[pfns.astype(np.intp)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def punch_holes(memfd: int, pfns: np.ndarray) -> None:
    """Make pages missing again: a page of the set that precopy had sent holds
    stale data, and a present page never faults.  Punched, it faults until
    its newest version is installed."""
    for first, count in runs(np.sort(pfns)):
        if _libc.fallocate(
            memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, first * PAGE_SIZE, count * PAGE_SIZE
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"punching stale pages: {os.strerror(err)}")
