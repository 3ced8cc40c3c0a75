"""Restore a domain: read the libxc stream into an incoming domain's RAM.

Every record is checked before it touches the domain (the decoder bounds
lengths, counts and pfns by the domain's size); page data is written into
the domain's memfd, a first pass's long runs by two threads at once
(page_writers.py).  The stream is read exactly up to its END record and no
further: the toolstack reads the libxl records that follow from the same fd.
"""

from __future__ import annotations

import time

import numpy as np

from hypervisor import RunnerClient, uffd
from protocol import NEED_DATA, RemoteProtocolError, libxc
from protocol.limits import MAX_BATCH_PAGES, PAGE_SIZE
from protocol.postcopy import ForwardRules

from .fdio import FdReader, FdWriter
from .page_writers import PageWriters
from .postcopy import PostcopyReceiver, PrecopyPages, present, set_bitmap, set_from_bitmap
from .shards import ShardError, ShardReader
from .toolstack_link import ToolstackLink

PROGRESS_INTERVAL = 0.2  # s between restore_progress messages while pages arrive
SHARD_STOP_TIMEOUT = 2.0  # s for a failed restore's extra readers to end
WRITER_STOP_TIMEOUT = 2.0  # s for the second page writer to end


class Restorer:
    def __init__(
        self,
        domain: RunnerClient,
        link: ToolstackLink,
        reader: FdReader,
        stream_offset: int = 0,
        extra_fds: list[int] = (),
    ):
        self.domain = domain
        self.link = link
        self.reader = reader
        self.memory = domain.map_guest_memory(writable=True)
        self.decoder = libxc.LibxcDecoder(max_pfns=self.memory.pages, start_offset=stream_offset)
        self.written = np.zeros(self.memory.pages, dtype=bool)  # pfns this restore wrote
        self.stored = np.zeros(self.memory.pages, dtype=bool)  # ...into the memfd (not skipped)
        self.pages_written = 0
        self.context: bytes | None = None
        self.params: dict[int, int] = {}
        self.last_progress = 0.0  # monotonic s of the last restore_progress
        self.rules = ForwardRules()  # the stream's order, postcopy's included
        self.writer = FdWriter(reader.fd)  # postcopy: faults and COMPLETE go back
        self.uffd: int | None = None
        self.base = 0
        # the extra connections' readers (shards.py), until their END
        self.shard_octets = 0
        self.page_writers = PageWriters(self.memory, readers=1 + len(extra_fds))
        self.shards = [
            ShardReader(fd, i, self.memory.pages, self.write_pages)
            for i, fd in enumerate(extra_fds, start=1)
        ]

    def close(self) -> None:
        for shard in self.shards:  # still reading: the restore failed before their END
            shard.stop(SHARD_STOP_TIMEOUT)
        self.page_writers.close(WRITER_STOP_TIMEOUT)
        if any(shard.running for shard in self.shards) or self.page_writers.running:
            return  # a thread still copies into guest RAM: it goes with the process
        self.memory.close()

    def restore(self) -> None:
        while True:
            at = self.decoder.offset
            event = self.next_event()
            self.rules.event(event, at)
            if ends_the_pages(event):
                self.finish_pages()  # every page in before anything else
            match event:
                case libxc.PageData():
                    self.write_pages(event)
                    self.pages_written += len(event.pfns)  # the extra readers count theirs
                    self.say_progress()
                case libxc.Marker(type=libxc.REC_STATIC_DATA_END):
                    self.link.static_data_done(0)
                case libxc.Marker(type=libxc.REC_END):
                    break
                case (
                    libxc.Marker(type=libxc.REC_POSTCOPY_BEGIN)
                    | libxc.Marker(type=libxc.REC_POSTCOPY_PFNS_BEGIN)
                    | libxc.PfnList()
                ):
                    pass  # the rules keep the set
                case libxc.Marker(type=libxc.REC_POSTCOPY_TRANSITION):
                    self.run_postcopy()
                    break
                case libxc.HvmContext():
                    if self.context is not None:
                        raise RemoteProtocolError(
                            "a second HVM_CONTEXT record", self.decoder.offset
                        )
                    self.context = event.blob
                case libxc.HvmParams():
                    self.params.update(event.params)
                case libxc.Marker() if event.type != libxc.REC_VERIFY:
                    raise RemoteProtocolError(
                        f"{event.name} is not supported by this restore", self.decoder.offset
                    )
        if not self.rules.postcopy:
            self.load_context()
        self.link.restore_results(self.pages_written, self.params.get(1, 0), self.params.get(2, 0))

    def load_context(self) -> None:
        if self.context is None:
            raise RemoteProtocolError("the stream ended without an HVM_CONTEXT record")
        self.domain.set_context(self.context)

    def run_postcopy(self) -> None:
        """The transition: the runner keeps the set (for a helper that may
        replace this one), the vCPU context goes in, the runner unmaps guest
        RAM and registers it (every page faults until put in place), the
        toolstack runs the guest, then pages are served until every one of
        the set is in place."""
        in_set = np.zeros(self.memory.pages, bool)
        in_set[self.rules.pfns.astype(np.intp)] = True
        self.domain.postcopy_set(set_bitmap(self.rules.pfns, self.memory.pages))
        self.load_context()
        self.uffd, self.base = self.domain.register_postcopy()
        precopy = PrecopyPages(self.uffd, self.base, self.stored & ~in_set)
        if not self.link.postcopy_transition():
            raise RemoteProtocolError("the toolstack did not run the guest: postcopy cancelled")
        PostcopyReceiver(self, self.rules, self.uffd, self.base, precopy).serve()

    def resume_postcopy(self) -> None:
        """Recovery: this helper replaces one that died or lost its link.  It
        wakes every waiting vCPU first (a fault the old helper had read is not
        delivered again: woken, the vCPU faults anew), tells the source which
        pages of the set are not in place here (not mapped under the guest:
        the memfd may hold a stale version), and serves them until done."""
        self.uffd, self.base = self.domain.register_postcopy()
        in_set = set_from_bitmap(self.domain.postcopy_pending(), self.memory.pages)
        mapped = set_from_bitmap(self.domain.postcopy_mapped(), self.memory.pages)
        self.stored = present(self.memory)
        lacking = np.flatnonzero(in_set & ~mapped).astype(np.uint64)
        precopy = PrecopyPages(self.uffd, self.base, self.stored & ~in_set & ~mapped)
        uffd.wake(self.uffd, self.base, self.memory.size)
        for start in range(0, len(lacking), MAX_BATCH_PAGES):
            self.writer.writev(
                libxc.encode_pfn_list(lacking[start : start + MAX_BATCH_PAGES], resume=True)
            )
        self.writer.writev(libxc.encode_marker(libxc.REC_POSTCOPY_RESUME_END))
        self.decoder = libxc.LibxcDecoder(max_pfns=self.memory.pages, records_only=True)
        self.rules = ForwardRules.resumed(lacking)
        PostcopyReceiver(self, self.rules, self.uffd, self.base, precopy).serve()
        self.link.restore_results(self.pages_written, 0, 0)

    def finish_pages(self) -> None:
        """Every page written, from every connection and writer."""
        if self.shards:
            self.join_shards()
        self.page_writers.wait()

    def join_shards(self) -> None:
        """Wait for every extra connection's END, saying progress meanwhile."""
        try:
            while not all([shard.done(PROGRESS_INTERVAL) for shard in self.shards]):
                self.say_progress()
        except ShardError as exc:
            raise RemoteProtocolError(str(exc)) from None
        self.shard_octets = sum(shard.reader.read for shard in self.shards)
        self.pages_written += sum(shard.pages for shard in self.shards)
        self.shards = []

    def say_progress(self) -> None:
        """Tell the toolstack pages are arriving, at most every PROGRESS_INTERVAL:
        its deadline measures silence, and a restore that moves pages is not silent."""
        now = time.monotonic()
        if now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            octets = self.reader.read + self.shard_octets
            octets += sum(shard.reader.read for shard in self.shards)
            pages = self.pages_written + sum(shard.pages for shard in self.shards)
            self.link.restore_progress(pages, octets)

    def next_event(self):
        """The next record, reading exactly as many octets as it needs."""
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            want = self.decoder.wanted
            data = self.reader.read_exact(want)
            self.decoder.feed(data)
            if len(data) < want:
                self.decoder.feed_eof()

    def write_pages(self, event: libxc.PageData) -> None:
        """One write per run of contiguous pfns (page_writers.py: how, and
        by which threads).  An XALLOC page carries no data: the incoming
        domain's RAM starts zeroed, so it is left alone, unless this restore
        wrote it before: then its memory is given back (it reads zero
        again)."""
        self.page_writers.wait()  # the last record's pages before any clear
        pfns = event.pfns.astype(np.intp)
        has_data = ~libxc.HAS_NO_DATA[event.types]
        self.written[pfns] = True
        if not has_data.all():
            self.clear(pfns[~has_data])
        data_pfns = pfns[has_data]
        self.stored[data_pfns] = True
        data = memoryview(event.data)
        stretches = [
            (int(data_pfns[first]), data[first * PAGE_SIZE : (last + 1) * PAGE_SIZE])
            for first, last in runs(np.arange(len(data_pfns)), data_pfns)
        ]
        self.page_writers.write(stretches)

    def clear(self, pfns: np.ndarray) -> None:
        """Zero pages: those the memfd holds (written earlier) are punched out."""
        held = pfns[self.stored[pfns]]
        self.stored[held] = False
        for first, last in runs(np.arange(len(held)), held):
            self.memory.punch(int(held[first]), last - first + 1)


def ends_the_pages(event) -> bool:
    """The first record after precopy's pages: the context, END or POSTCOPY_BEGIN."""
    if isinstance(event, libxc.TscInfo | libxc.HvmContext | libxc.HvmParams):
        return True
    return isinstance(event, libxc.Marker) and event.type in (
        libxc.REC_END,
        libxc.REC_POSTCOPY_BEGIN,
    )


def runs(positions: np.ndarray, pfns: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) positions of each stretch that is contiguous both in
    the record and in guest memory."""
    if not len(positions):
        return []
    step = (np.diff(positions) != 1) | (np.diff(pfns[positions]) != 1)
    breaks = np.flatnonzero(step)
    firsts = positions[np.concatenate(([0], breaks + 1))]
    lasts = positions[np.concatenate((breaks, [len(positions) - 1]))]
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))
