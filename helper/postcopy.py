"""Postcopy: the guest runs at the destination while its last pages follow.

Source (`PostcopySender`), after the transition: pages the destination asks
for go first, the rest follow in small batches from just after the last
fault (Otto's RFC; Hines et al.: pages near the last fault are the likely
next ones), batches growing while no fault comes, shrinking at a fault.
Every pfn of the set goes exactly once.  When all are out the source waits
for POSTCOPY_COMPLETE, the destination's word that it holds them all.

Destination (`PostcopyReceiver`): at the switch the runner unmapped guest
RAM and registered it for missing and minor faults, so every page faults
until it is put in place, while precopy's pages stay in the memfd: nothing
is punched or copied while the guest waits.  One loop polls the stream and
the userfaultfd.  A fault on a page of the set is asked for
(POSTCOPY_FAULT) once; a page that arrives is written to the memfd over
its stale version and mapped (UFFDIO_CONTINUE), or copied in where the
memfd has a hole (UFFDIO_COPY); either wakes its waiters.  Pages outside
the set are good where precopy left them (`PrecopyPages`): a fault on one
maps it at once, and between polls they are mapped in pfn order, a large
chunk at a time; one the memfd lacks never held data: a zero page.  Once
every page of the set is in place: POSTCOPY_COMPLETE, then the source's
END (the runner unregisters: what is left unmapped the kernel maps).

The stream socket carries both directions; this module never reads past a
direction's last record (END, POSTCOPY_COMPLETE): what follows belongs to
the layer above.  A fault and its answer, each a record alone, take the
short way: one look at the socket (MSG_PEEK) and one read, decoded without
the decoder's events or numpy (`lone_fault`, `lone_page`); on this VM a
helper the kernel has just woken runs cold, and every module touched then
costs cache misses (idle link, fault p50 286-345 -> 158-173 us).
Postcopy runs over sockets only (a save file has no return direction).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque

import numpy as np

from hypervisor import uffd
from protocol import NEED_DATA, RemoteProtocolError, framing, libxc
from protocol.limits import MAX_BATCH_PAGES, PAGE_SIZE
from protocol.pfnsets import position, positions, runs, sorted_distinct
from protocol.postcopy import ForwardRules, ReturnRules

from .fdio import Outbox, StreamClosed
from .toolstack_link import LOG_WARNING

# A requested page queues behind whatever push data is already on its way:
# the batch being written and the sockets' buffers.  While the guest faults,
# both stay small (measured on loopback here: 64 pages and 64 KiB give fault
# p50 ~0.9 ms, p99 ~2.2 ms; 4 MiB batches and autotuned buffers 7-17 ms);
# after a quiet spell they grow again, so the push does not crawl.  On a
# busy destination the queue is its receive buffer, which is kept small
# (1 GiB at 100,000 pages/s, 3 runs: fault p50 886-922 -> 711-716 us with
# RECEIVE_BUFFER and a TAKE_OCTETS of 256 KiB; the push ~10% slower).
MIN_PUSH = 16  # pages in a batch while faults come (Otto's batch size)
MAX_PUSH = MAX_BATCH_PAGES  # pages in a batch after a quiet spell
QUIET_NS = 50_000_000  # no fault for this long: a quiet spell
SMALL_BUFFER, LARGE_BUFFER = 64 << 10, 1 << 20  # socket buffers, busy and quiet
NOTSENT_LOWAT = 64 << 10  # octets queued unsent at most before the sender may write more
RECEIVE_BUFFER = 128 << 10  # the destination's SO_RCVBUF during postcopy (the kernel doubles it)
PROGRESS_INTERVAL = 0.2  # s between postcopy_progress messages
UNMAP_BATCH = 4096  # sent pages unmapped at once at the source (RSS bounded by 16 MiB)
MAP_CHUNK = 2048  # precopy's pages mapped between two polls (~0.6 ms)
# Records taken from the socket at once before they are acted on: the rest
# wait in the socket (the peer's flood fills its buffers, not this helper),
# and the other direction is served between two takes.
TAKE_RECORDS = 64  # a flood of POSTCOPY_FAULT: 64 x 8 KiB
TAKE_OCTETS = 256 << 10  # POSTCOPY_PAGE_DATA: a few records (or one of up to 4 MiB)
# A look at the socket for small records (faults, a faulted page) covers a
# few of them; a larger record is read as the decoder asks (its header, then
# its body in one read).
PEEK_OCTETS = 16 << 10
LAST_RECORDS = (libxc.REC_END, libxc.REC_POSTCOPY_COMPLETE)  # nothing after these is ours
ZERO_PAGES = 64
ZEROS = memoryview(bytes(ZERO_PAGES * PAGE_SIZE))  # written over stale pages that became zero
# While a guest waits for a page, both helpers stay hot (see HotPoller):
HOT_AFTER_ASK_NS = 200_000  # destination: from asking for a page
HOT_AFTER_INSTALL_NS = 100_000  # destination: after a faulted page is in place
HOT_AFTER_ANSWER_NS = 200_000  # source: after sending a faulted page


class HotPoller:
    """select.poll() that does not sleep for a while after `stay_hot`.

    A fault's round trip is a chain of wake-ups: the guest faults, the
    destination's helper asks, the source's answers, the destination puts
    the page in place, and the next fault follows within microseconds.  A
    helper the kernel must wake first (on this VM: an interrupt to another
    vCPU, cold caches) costs tens of microseconds at each link, so while a
    guest waits, each helper polls without sleeping and yields the CPU to
    anything else runnable between polls (measured on the idle link, both
    sides: fault p50 300-320 -> 135-145 us; without the yield 210-235)."""

    def __init__(self) -> None:
        self.poller = select.poll()
        self.hot_until = 0  # monotonic ns

    def register(self, fd: int, events: int) -> None:
        self.poller.register(fd, events)

    def unregister(self, fd: int) -> None:
        self.poller.unregister(fd)

    def stay_hot(self, ns: int) -> None:
        self.hot_until = max(self.hot_until, time.monotonic_ns() + ns)

    def cool(self) -> None:
        """Sleep in poll() again from now on (an empty answer is a timeout)."""
        self.hot_until = 0

    def poll(self, timeout_ms: float) -> dict[int, int]:
        """{fd: events} ready, waiting at most `timeout_ms` (none while hot)."""
        if timeout_ms and time.monotonic_ns() < self.hot_until:
            ready = dict(self.poller.poll(0))
            if not ready:
                os.sched_yield()
            return ready
        return dict(self.poller.poll(timeout_ms))


class DestinationBrokeRules(RemoteProtocolError):
    """The destination's records to the source broke the postcopy stream's
    rules (as opposed to an answer from this side's toolstack or domain)."""


def from_the_destination(exc: RemoteProtocolError) -> DestinationBrokeRules:
    if isinstance(exc, DestinationBrokeRules):
        return exc
    return DestinationBrokeRules(exc.rule, exc.offset)


class RecordStream:
    """Records from the stream socket, without blocking and never past the
    direction's last record.  `sock` is the socket to poll for them."""

    def __init__(self, fd: int, decoder) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.decoder = decoder
        self.octets = 0
        self.ended = False  # the direction's last record came: nothing more is ours
        self.peek_buffer = bytearray(PEEK_OCTETS)  # what a look finds is read into it
        self.peek_address = np.frombuffer(self.peek_buffer, np.uint8).ctypes.data

    def close(self) -> None:
        self.sock.close()

    def available(self, alone=None) -> list:
        """The whole records that have arrived (perhaps none).  Small ones
        are taken all at once, as many as a look at the socket finds whole
        (`take_whole_records`, at most PEEK_OCTETS), and all are decoded
        before this returns: none waits in the decoder, where poll() would
        not see it.  A larger record is read as the decoder asks
        (`take_wanted`); those reads stop after about TAKE_RECORDS records
        or TAKE_OCTETS, leaving the rest in the socket, so a peer that writes
        faster than this side acts fills its own buffers, not this process.
        Nothing past the direction's last record (END, POSTCOPY_COMPLETE) is
        ever taken: it belongs to the layer above.

        `alone(octets)`, when given, is offered what a look took, unless an
        event came before it in this call (the caller checks that one
        first): True when it acted on them itself (a lone fault or page)."""
        events: list = []
        started = self.octets
        looked = False
        while not self.ended:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                events.append(event)
                self.ended = self.decoder.done or is_last_record(event)
                full = len(events) >= TAKE_RECORDS or self.octets - started >= TAKE_OCTETS
                if full and not looked:
                    return events
                continue
            if looked:
                return events  # all the look took is decoded; poll() tells of more
            if self.decoder.between_records:
                took = self.take_whole_records(None if events else alone)
                if took is None:
                    return events
                if took:
                    looked = True
                    continue
            if not self.take_wanted():
                return events
        return events

    def take_whole_records(self, alone=None) -> int | None:
        """The small records waiting in the socket, in two calls: a look
        (MSG_PEEK) finds where the whole ones end, a read takes exactly
        those.  A fault and its page each cost one such pair instead of a
        read per header and per body and a last read that finds nothing
        (each tens of microseconds on a helper the kernel just woke).
        None when nothing waits; 0 when the first record is not whole yet."""
        look = socket.MSG_PEEK | socket.MSG_DONTWAIT
        try:
            seen = self.sock.recv_into(self.peek_buffer, PEEK_OCTETS, look)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            seen = 0
        if not seen:
            raise StreamClosed("the other host closed the stream during postcopy")
        whole = framing.whole_records(memoryview(self.peek_buffer)[:seen], LAST_RECORDS)
        if not whole:
            return 0
        # The same octets again, now taken from the socket, over what the look saw
        try:
            got = self.sock.recv_into(self.peek_buffer, whole, socket.MSG_DONTWAIT)  # seen: there
        except (BlockingIOError, ConnectionResetError):
            got = 0
        if got != whole:  # only this process reads the socket: a reset
            raise StreamClosed(f"the stream gave {got} of the {whole} octets it showed")
        self.octets += whole
        octets = memoryview(self.peek_buffer)[:whole]
        if alone is None or not alone(octets):
            self.decoder.feed(bytearray(octets))  # the decoder keeps what it is fed
        return whole

    def take_wanted(self) -> bool:
        """Exactly what the record being read still needs (a large one): a
        whole body arrives in one bytearray the decoder keeps without
        copying.  False when nothing waits."""
        buf = bytearray(self.decoder.wanted)
        try:
            got = self.sock.recv_into(buf, len(buf), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            got = 0
        if not got:
            raise StreamClosed("the other host closed the stream during postcopy")
        del buf[got:]
        self.octets += got
        self.decoder.feed(buf)
        return True


def is_last_record(event) -> bool:
    return isinstance(event, libxc.Marker) and event.type in LAST_RECORDS


def return_decoder(pages: int) -> libxc.LibxcDecoder:
    """The destination's records to the source: records only, pfns inside the domain."""
    return libxc.LibxcDecoder(max_pfns=pages, records_only=True)


def read_resume_list(incoming: RecordStream, rules: ReturnRules):
    """Recovery, at the source: the pfns the destination lists as still
    lacking, and the faults that came right behind the list (the rules let
    none come before its end)."""
    poller = select.poll()
    poller.register(incoming.sock.fileno(), select.POLLIN)
    faults = []
    while rules.listing:
        poller.poll()  # the helper's silence deadline in the toolstack bounds this
        try:
            for event in incoming.available():
                pfns = rules.event(event, incoming.decoder.offset)
                if pfns is not None:
                    faults.append(pfns)
        except RemoteProtocolError as exc:
            raise from_the_destination(exc) from None
    listed = np.concatenate(rules.lacking) if rules.lacking else np.empty(0, np.uint64)
    return sorted_distinct(listed)[0], faults


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
        # the same, one item at a time without numpy (see libxc.ONE_RECORD)
        self.pfn_at, self.sent_at, self.queued_at = map(memoryview, (pfns, self.sent, self.queued))
        self.requests: deque[int] = deque()  # indices into pfns, as the faults came
        self.cursor = 0  # where the background push goes on
        self.push = MIN_PUSH
        self.last_fault = time.monotonic_ns()
        self.pushed = self.requested = 0
        self.rules = rules or ReturnRules()
        self.incoming = incoming or RecordStream(saver.writer.fd, return_decoder(saver.pages))
        self.incoming.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.outbox = Outbox(self.incoming.sock, saver.writer)
        # sent pages still mapped here: how many, and the pfns they span
        self.to_unmap_pages = self.to_unmap_first = self.to_unmap_end = 0
        self.buffer = 0
        self.set_buffer(SMALL_BUFFER)
        self.started_octets = saver.writer.written
        self.last_progress = 0.0
        self.bandwidth = saver.postcopy_bandwidth  # octets/s for the push; 0: unlimited
        self.push_started = time.monotonic()
        self.pushed_octets = 0
        self.poller = HotPoller()

    def run(self) -> None:
        """Until every page is out and the destination said COMPLETE: read its
        faults whenever they come, write pages whenever the socket has room
        (never blocking on it: the destination may be writing faults to us)."""
        poller = self.poller
        sock = self.incoming.sock.fileno()
        try:
            while self.unsent or self.outbox.pending or not self.rules.complete:
                held = self.push_held()  # s the push must wait (its bandwidth)
                sending = self.outbox.pending or self.requests or (self.unsent and not held)
                reading = 0 if self.incoming.ended else select.POLLIN  # nothing after COMPLETE
                poller.register(sock, reading | (select.POLLOUT if sending else 0))
                wait = min(held, PROGRESS_INTERVAL) if held and not sending else PROGRESS_INTERVAL
                ready = poller.poll(wait * 1000).get(sock, 0)
                if ready & (select.POLLIN | select.POLLHUP | select.POLLERR) and reading:
                    self.read_requests()
                # Room (fewer than NOTSENT_LOWAT octets wait unsent), or pages
                # just asked for: those go at once, without another poll.
                if ready & select.POLLOUT or (self.requests and not self.outbox.pending):
                    if not self.outbox.pending:
                        self.send_next()  # requested pages first
                    self.outbox.flush()
                self.say_progress()
        finally:
            self.incoming.close()
        self.say_progress(force=True)

    @property
    def unsent(self) -> int:
        return len(self.pfns) - self.pushed - self.requested

    def read_requests(self) -> None:
        try:
            for event in self.incoming.available(self.lone_fault):
                pfns = self.rules.event(event, self.incoming.decoder.offset)
                if pfns is not None:
                    self.queue(pfns)
        except RemoteProtocolError as exc:
            raise from_the_destination(exc) from None

    def lone_fault(self, octets) -> bool:
        """One fault of one pfn of the set, postcopy's common case, queued
        without the decoder's events or numpy; False for anything else, which
        the general way takes (and refuses, naming the rule: see RecordStream)."""
        if not self.rules.takes_faults:
            return False
        pfn = self.incoming.decoder.one_fault(octets)
        i = None if pfn is None else position(self.pfn_at, pfn)
        if i is None:
            return False
        self.incoming.decoder.took(octets)
        self.request(i)
        return True

    def queue(self, pfns: np.ndarray) -> None:
        """Faulted pfns: each one of the set not yet sent nor queued goes to the
        front.  Duplicates cost nothing (a flood of them is bounded by the set)."""
        for i in self.set_indices(pfns):
            self.request(i)

    def request(self, i: int) -> None:
        if not self.sent_at[i] and not self.queued_at[i]:
            self.queued_at[i] = True
            self.requests.append(i)
        self.last_fault = time.monotonic_ns()
        self.push = MIN_PUSH
        self.set_buffer(SMALL_BUFFER)

    def set_indices(self, pfns: np.ndarray) -> list[int]:
        """Where each of `pfns` is in the set; a pfn outside it breaks the rules."""
        if len(pfns) == 1:  # one fault: the common case, without numpy's per-call cost
            i = position(self.pfns, int(pfns[0]))
            if i is not None:
                return [i]
        index, found = positions(self.pfns, pfns)
        if not found.all():
            bad = int(pfns[~found][0])
            raise DestinationBrokeRules(f"POSTCOPY_FAULT: pfn {bad:#x} is not in the postcopy set")
        return index.tolist()

    def set_buffer(self, size: int) -> None:
        if size != self.buffer:
            self.buffer = size
            self.incoming.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def send_next(self) -> None:
        if self.requests:
            take = []
            while self.requests and len(take) < MIN_PUSH:
                i = self.requests.popleft()
                if not self.sent_at[i]:
                    take.append(i)
            if take:
                self.cursor = (take[-1] + 1) % len(self.pfns)  # push on from the last fault
                if len(take) == 1:
                    self.requested += self.send_one(take[0])
                else:
                    self.requested += self.send(np.sort(np.array(take)))
                self.poller.stay_hot(HOT_AFTER_ANSWER_NS)  # the guest's next fault
                return
        if self.push_held():
            return
        index = self.next_unsent(self.push)
        self.pushed += self.send(index)
        self.pushed_octets += len(index) * PAGE_SIZE
        if time.monotonic_ns() - self.last_fault > QUIET_NS:  # quiet: bigger batches
            self.push = min(self.push * 2, MAX_PUSH)
            self.set_buffer(LARGE_BUFFER)

    def push_held(self) -> float:
        """Seconds the push waits before its next batch (--postcopy-bandwidth);
        0 when it may go now.  Requested pages never wait."""
        if not self.bandwidth or not self.unsent:
            return 0.0
        allowed = (time.monotonic() - self.push_started) * self.bandwidth
        return max(0.0, (self.pushed_octets - allowed) / self.bandwidth)

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
        """Queue one POSTCOPY_PAGE_DATA record; once it is out, our mapping of
        its pages goes (they would count in this helper's RSS)."""
        pfns = self.pfns[index]
        views = self.saver.page_views(pfns)

        self.outbox.put(libxc.encode_page_data(pfns, views, postcopy=True), then=self.unmap_later)
        self.sent[index] = True
        self.to_unmap(int(pfns[0]), int(pfns[-1]) + 1, len(pfns))
        return len(index)

    def send_one(self, i: int) -> int:
        """`send` for a page alone (a fault's answer), without numpy."""
        pfn = self.pfn_at[i]
        record = libxc.encode_one_page(pfn, self.saver.memory.page_view(pfn))
        self.outbox.put(record, then=self.unmap_later)
        self.sent_at[i] = True
        self.to_unmap(pfn, pfn + 1, 1)
        return 1

    def to_unmap(self, first: int, end: int, count: int) -> None:
        """Sent pages [first, end) join those still mapped here."""
        if not self.to_unmap_pages:
            self.to_unmap_first, self.to_unmap_end = first, end
        self.to_unmap_first = min(self.to_unmap_first, first)
        self.to_unmap_end = max(self.to_unmap_end, end)
        self.to_unmap_pages += count

    def unmap_later(self) -> None:
        """Our mapping of sent pages goes in bulk (it would count in this
        helper's RSS), off the path of a requested page."""
        if self.to_unmap_pages and (self.to_unmap_pages >= UNMAP_BATCH or not self.unsent):
            first, end = self.to_unmap_first, self.to_unmap_end
            self.saver.memory.unmap(first, end - first)  # one call: pages between are shared too
            self.to_unmap_pages = 0

    def say_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            octets = self.saver.writer.written - self.started_octets
            done = self.pushed + self.requested
            self.saver.link.postcopy_progress(len(self.pfns), done, self.requested, octets, [])


class PrecopyPages:
    """Destination: pages outside the postcopy set that the memfd holds from
    precopy, mapped under the guest (see the module doc).  `todo` marks those
    not mapped yet; mapping one twice is skipped by the kernel (EEXIST), so a
    fault racing the cursor is harmless."""

    def __init__(self, uffd_fd: int, base: int, todo: np.ndarray) -> None:
        self.uffd, self.base, self.todo = uffd_fd, base, todo
        self.cursor = 0  # pages below it are mapped (or never were to be)

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.todo)

    def fault(self, pfn: int) -> bool:
        """Map `pfn` now if precopy left it; False when it never held data."""
        if not self.todo[pfn]:
            return False
        self.map(pfn, 1)
        return True

    def map_next(self) -> None:
        """The next MAP_CHUNK pages, in pfn order."""
        end = min(self.cursor + MAP_CHUNK, len(self.todo))
        for first, count in runs(np.flatnonzero(self.todo[self.cursor : end]) + self.cursor):
            self.map(first, count)
        self.cursor = end

    def map(self, first: int, count: int) -> None:
        uffd.continue_(self.uffd, self.base + first * PAGE_SIZE, count * PAGE_SIZE)
        self.todo[first : first + count] = False


class PostcopyReceiver:
    """The destination side after the transition (see the module doc)."""

    def __init__(
        self, restorer, rules: ForwardRules, uffd_fd: int, base: int, precopy: PrecopyPages
    ) -> None:
        self.restorer = restorer
        self.rules = rules
        self.uffd = uffd_fd
        self.base = base
        self.precopy = precopy
        self.stale = restorer.stored  # pages the memfd holds: a set page there is stale
        self.stale_at = memoryview(self.stale)  # one at a time, without numpy
        self.pages = restorer.memory.pages
        self.asked = np.zeros(len(rules.pfns), bool)
        self.asked_at = memoryview(self.asked)
        self.waiting: dict[int, int] = {}  # pfn -> when its first fault was read (ns)
        self.latencies: list[int] = []  # us, since the last progress message
        self.requested = 0
        self.stream = RecordStream(restorer.reader.fd, restorer.decoder)
        self.outbox = Outbox(self.stream.sock, restorer.writer)  # faults: never block on them
        self.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.last_progress = 0.0
        self.poller = HotPoller()

    def serve(self) -> None:
        poller = self.poller
        sock = self.stream.sock.fileno()
        poller.register(self.uffd, select.POLLIN)
        try:
            while self.rules.remaining:
                poller.register(
                    sock, select.POLLIN | (select.POLLOUT if self.outbox.pending else 0)
                )
                wait = 0 if not self.precopy.done else PROGRESS_INTERVAL * 1000
                ready = poller.poll(wait)
                if self.uffd in ready:
                    self.on_faults()
                if ready.get(sock, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.on_records()
                self.outbox.flush()
                if not self.precopy.done:
                    self.precopy.map_next()
                self.say_progress()
            # First the runner lets the kernel serve what is left (pages never
            # written, outside the set), then the source hears it is over.
            self.restorer.domain.postcopy_done()
            self.outbox.put(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE))
            self.outbox.drain()  # the source reads all the time: it waits for this
            self.say_progress(force=True)
            poller.unregister(self.uffd)
            poller.register(sock, select.POLLIN)
            poller.cool()  # no guest waits now; read_to_end counts empty polls as silence
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
            i = position(self.rules.pfn_at, pfn)  # numpy-free: see libxc.ONE_RECORD
            if i is None:
                if not self.precopy.fault(pfn):
                    uffd.zeropage(self.uffd, page, PAGE_SIZE)  # never held data: zero it is
                continue
            if self.rules.sent_at[i]:
                uffd.wake(self.uffd, page, PAGE_SIZE)  # arrived meanwhile
                continue
            self.waiting.setdefault(pfn, now)
            if not self.asked_at[i]:
                self.asked_at[i] = True
                ask.append(pfn)
        for start in range(0, len(ask), MAX_BATCH_PAGES):
            chunk = ask[start : start + MAX_BATCH_PAGES]
            self.outbox.put(libxc.encode_pfn_list(chunk, fault=True))
            self.requested += len(chunk)
        self.outbox.flush()  # before anything else: the guest waits
        if ask:
            self.poller.stay_hot(HOT_AFTER_ASK_NS)  # the answer comes soon

    def on_records(self) -> None:
        for event in self.stream.available(self.lone_page):
            self.rules.event(event, self.stream.decoder.offset)
            if isinstance(event, libxc.PageData):
                self.install(event)

    def lone_page(self, octets) -> bool:
        """A page alone (a fault's answer, postcopy's common case), checked
        and put in place without the decoder's events or numpy; False for
        anything else, which then takes the general way (see RecordStream)."""
        pfn = self.stream.decoder.one_page(octets)
        if pfn is None or self.rules.one_page(pfn) is None:
            return False
        self.stream.decoder.took(octets)
        page_at = libxc.ONE_RECORD.size  # where the page is in `octets` and the look's buffer
        address = self.base + pfn * PAGE_SIZE
        if self.stale_at[pfn]:
            self.restorer.memory.write(pfn, octets[page_at:])
            there = uffd.continue_(self.uffd, address, PAGE_SIZE)
        else:
            there = uffd.copy(self.uffd, address, self.stream.peek_address + page_at, PAGE_SIZE)
        if there:
            self.found_in_place(there)
        self.installed((pfn,))
        return True

    def install(self, event: libxc.PageData) -> None:
        """Put a batch's pages in place (the rules have checked each is new).
        The data holds only the pages whose type carries data, in order; a
        page without (XALLOC: a zero page; the rules refuse XTAB and BROKEN)
        goes in as zeros, as the precopy restore makes it."""
        no_data = libxc.HAS_NO_DATA[event.types]
        if no_data.any():
            self.install_zeros(event.pfns[no_data])
            self.install_data(event.pfns[~no_data], event.data)
        else:
            self.install_data(event.pfns, event.data)
        self.installed(event.pfns.tolist())

    def installed(self, pfns) -> None:
        """`pfns` are in place: a guest that waited for one may fault again soon."""
        now = time.monotonic_ns()
        for pfn in pfns:
            started = self.waiting.pop(pfn, None)
            if started is not None:
                self.latencies.append(min((now - started) // 1000, 2**32 - 1))
                self.poller.stay_hot(HOT_AFTER_INSTALL_NS)  # the guest's next fault
        self.restorer.pages_written += len(pfns)

    def install_data(self, pfns: np.ndarray, octets) -> None:
        """`pfns` with a page of `octets` each, in order: over a stale version
        the memfd holds, write then map; into a hole, copy."""
        if not len(pfns):
            return
        octets = memoryview(octets)
        if octets.nbytes != len(pfns) * PAGE_SIZE:  # the decoder checked it: never
            raise RemoteProtocolError(f"{octets.nbytes} octets of data for {len(pfns)} pages")
        source = None  # the data's address, for UFFDIO_COPY: found when first needed
        run_at = 0  # where the current run's data starts in `octets`
        memory = self.restorer.memory
        pfn_runs = [(int(pfns[0]), 1)] if len(pfns) == 1 else runs(pfns)
        for first, count in pfn_runs:
            length = count * PAGE_SIZE
            for start, n, stale in split_by(self.stale, first, count):
                at = run_at + (start - first) * PAGE_SIZE
                address = self.base + start * PAGE_SIZE
                if stale:
                    memory.write(start, octets[at : at + n * PAGE_SIZE])
                    there = uffd.continue_(self.uffd, address, n * PAGE_SIZE)
                else:
                    if source is None:
                        source = np.frombuffer(octets, np.uint8).ctypes.data
                    there = uffd.copy(self.uffd, address, source + at, n * PAGE_SIZE)
                if there:
                    self.found_in_place(there)
            run_at += length

    def found_in_place(self, addresses: list[int]) -> None:
        """Pages of the set were in place before their data came: mapped
        under the guest already (UFFDIO_CONTINUE skipped them, after the data
        was written beneath a guest that may have written them too), or in
        the memfd where a hole was expected (UFFDIO_COPY left them as they
        were).  Neither should happen; say so, so that it can be traced."""
        pfns = ", ".join(f"{(a - self.base) // PAGE_SIZE:#x}" for a in addresses[:8])
        self.restorer.link.say(
            LOG_WARNING,
            "postcopy",
            f"{len(addresses)} page(s) of the set were in place before their data came "
            f"(pfn {pfns})",
        )

    def install_zeros(self, pfns: np.ndarray) -> None:
        """Zero pages: over a stale version the memfd holds, write zeros then
        map; into a hole, the kernel's zero page."""
        memory = self.restorer.memory
        for first, count in runs(np.sort(pfns)):
            for start, n, stale in split_by(self.stale, first, count):
                address = self.base + start * PAGE_SIZE
                if stale:
                    for at in range(start, start + n, ZERO_PAGES):
                        memory.write(at, ZEROS[: min(ZERO_PAGES, start + n - at) * PAGE_SIZE])
                    uffd.continue_(self.uffd, address, n * PAGE_SIZE)
                else:
                    uffd.zeropage(self.uffd, address, n * PAGE_SIZE)

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


def set_from_bitmap(bitmap: bytes, pages: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[:pages]
    return bits.astype(bool)


def present(memory) -> np.ndarray:
    """Which pages hold data in `memory`'s memfd (the rest are holes)."""
    held = np.zeros(memory.pages, bool)
    for first, end in memory.data_extents():
        held[first:end] = True
    return held


def split_by(mask: np.ndarray, first: int, count: int):
    """(start, count, value) of each stretch of first..first+count-1 where
    `mask` is constant."""
    if count == 1:
        yield first, 1, bool(mask[first])
        return
    values = mask[first : first + count]
    breaks = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [count]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield first + s, e - s, bool(values[s])


def set_bitmap(pfns: np.ndarray, pages: int) -> bytes:
    bits = np.zeros(pages, np.uint8)
    bits[pfns.astype(np.intp)] = 1
    return np.packbits(bits, bitorder="little").tobytes()
