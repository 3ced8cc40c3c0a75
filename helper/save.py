"""Save a domain: write the libxc stream, asking the toolstack after every batch.

The steps follow Xen's xg_sr_save.c:

    write_headers
    enable_logdirty                      (live only)
    send_memory_live                     iteration 0 sends every page, then
        send_dirty_pages                 each iteration sends what the last dirtied,
        (precopy_policy after each batch)  and the toolstack decides what's next
                                           (meanwhile prepare_batch maps the
                                           next batch's pages)
    suspend_and_send_dirty               STOP_AND_COPY: pause, send the rest
    end_shards                           END on every extra connection (shards.py)
    send_context                         TSC_INFO, HVM_CONTEXT, HVM_PARAMS
    END

ABORT stops where it is: log-dirty goes off again, the guest keeps running,
and the stream simply ends without END, which every reader reports.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import numpy as np

from hypervisor import GuestMemory, RunnerClient
from protocol import libxc, pfnsets
from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats
from protocol.limits import MAX_BATCH_PAGES, PAGE_SIZE
from protocol.postcopy import ReturnRules

from .fdio import FdWriter
from .postcopy import PostcopySender, RecordStream, read_resume_list, return_decoder
from .shards import ShardError, ShardWriter, shard_of
from .toolstack_link import LOG_INFO, LOG_WARNING, ToolstackLink

EMPTY_ITERATION_PAUSE = 0.005  # s: let a quiet guest dirty something before asking again
# Never-touched guest pages are holes in the memfd.  Reading one through the
# mapping would allocate it in the source (and fault, slowly): sweeps send
# them as XALLOC.  (The postcopy set holds only pages the guest wrote.)
POPULATE_MIN_PAGES = 16  # shorter runs: a syscall costs more than the faults it saves


@dataclass
class Batch:
    """One PAGE_DATA record to be: its pfns, their types (None: every page
    carries data; else XALLOC marks a zero page, sent without data), the
    buffers of the pages with data, in order, and how many are zero."""

    pfns: np.ndarray
    types: np.ndarray | None
    views: list[memoryview]
    zero: int
    shard: int = 0  # the connection it goes on (shards.py)


class SaveAborted(Exception):
    """The migration gave up; the message says why (it goes into the log and `complete`)."""


@dataclass
class Progress:
    """Counters the stats of every batch are made of."""

    iteration: int = 0
    total_written: int = 0
    dirty_count: int = -1
    iter_written: int = 0
    iter_total: int = 0
    iter_bytes: int = 0
    zero_pages: int = 0  # sent as XALLOC, without data


class Saver:
    def __init__(
        self,
        domain: RunnerClient,
        link: ToolstackLink,
        writer: FdWriter,
        live: bool,
        postcopy: bool = False,
        extra_fds: list[int] = (),
    ):
        self.domain = domain
        self.link = link
        self.writer = writer
        self.live = live
        self.postcopy = postcopy  # this migration may switch to postcopy
        self.postcopy_bandwidth = 0.0  # octets/s the postcopy push may use; 0: unlimited
        self.memory: GuestMemory = domain.map_guest_memory()
        self.pages = self.memory.pages
        self.progress = Progress()
        self.policy_wait_ns = 0  # reported in every PrecopyStats: RPC cost, visible
        self.stop_requested = False
        self._extents: DataExtents | None = None  # data extents of a sweep
        # the extra connections' writers (shards.py)
        self.shards = [ShardWriter(fd, i) for i, fd in enumerate(extra_fds, start=1)]
        self.extra_octets = 0  # what they wrote, once they ended
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_args) -> None:
        self.stop_requested = True  # acted on between batches: a safe point

    def close(self) -> None:
        self.memory.close()

    # -- the algorithm --------------------------------------------------------
    def save(self) -> None:
        self.write_headers()
        postcopy_set = None
        if self.live:
            self.enable_logdirty()
            try:
                postcopy_set = self.send_memory_live()
            except BaseException:
                self.disable_logdirty()
                raise
        else:
            self.suspend_domain()
            self.send_pages(np.arange(self.pages, dtype=np.uint64), sweep=True)
        self.end_shards()
        if postcopy_set is not None:
            self.send_postcopy(postcopy_set)
        else:
            self.send_context()
        self.writer.writev(libxc.encode_marker(libxc.REC_END))

    def write_headers(self) -> None:
        self.stream_start_ns = time.monotonic_ns()
        self.writer.writev([libxc.encode_image_header(), libxc.encode_domain_header()])
        self.writer.writev(libxc.encode_marker(libxc.REC_STATIC_DATA_END))

    def enable_logdirty(self) -> None:
        self.domain.logdirty_enable()

    def disable_logdirty(self) -> None:
        try:
            self.domain.logdirty_disable()
        except Exception as exc:  # the domain may be gone; say so, keep the first error
            self.link.say(LOG_WARNING, "save", f"could not switch log-dirty off: {exc}")

    def send_memory_live(self) -> np.ndarray | None:
        """Precopy iterations until the policy says stop (or gives up).
        Returns the postcopy set when it said POSTCOPY, else None."""
        to_send = np.arange(self.pages, dtype=np.uint64)
        while True:
            decision, unsent = self.send_dirty_pages(to_send)
            if decision == PrecopyDecision.STOP_AND_COPY:
                self.suspend_and_send_dirty(unsent)
                return None
            if decision == PrecopyDecision.ABORT:
                raise SaveAborted("the toolstack's policy aborted the migration")
            if decision == PrecopyDecision.POSTCOPY:
                if not self.postcopy:
                    raise SaveAborted(
                        "the policy answered POSTCOPY, but this migration may not switch to "
                        "postcopy (migrate --postcopy)"
                    )
                return self.suspend_for_postcopy(unsent)
            # the iteration is complete: the next one sends what it dirtied
            to_send, count = self.dirty_pfns()
            self.progress.iteration += 1
            self.progress.dirty_count = count
            if count == 0:
                time.sleep(EMPTY_ITERATION_PAUSE)

    def send_dirty_pages(self, pfns: np.ndarray) -> tuple[PrecopyDecision, np.ndarray]:
        """One iteration: batches of pfns, the policy asked after each.
        Returns the decision that ended it and the pfns not sent yet."""
        p = self.progress
        p.iter_written, p.iter_bytes, p.iter_total = 0, 0, len(pfns)
        if p.iteration > 0:
            # Like Xen, ask before each new iteration too: the fresh dirty
            # count may already be small enough to stop.
            decision = self.ask_policy()
            if decision != PrecopyDecision.CONTINUE_PRECOPY:
                return decision, pfns
        sweep = p.iteration == 0
        prepared = self.prepare(pfns[:MAX_BATCH_PAGES], sweep)
        for start in range(0, len(pfns), MAX_BATCH_PAGES):
            batch = pfns[start : start + MAX_BATCH_PAGES]
            with self.link.channel.together():  # progress and the call: the toolstack wakes once
                self.send(prepared)
                self.link.begin_precopy_policy(self.policy_stats())
            # The next batch needs its pages mapped whatever the answer (a
            # final pass sends them too): map them while the toolstack decides.
            following = pfns[start + MAX_BATCH_PAGES : start + 2 * MAX_BATCH_PAGES]
            prepared = self.prepare(following, sweep)
            decision = self.wait_for_policy()
            if decision != PrecopyDecision.CONTINUE_PRECOPY:
                return decision, pfns[start + len(batch) :]
        return PrecopyDecision.CONTINUE_PRECOPY, pfns[len(pfns) :]

    def suspend_and_send_dirty(self, unsent: np.ndarray) -> None:
        """Stop and copy: pause the guest, then send the pages it dirtied and
        those this iteration had not reached yet."""
        self.suspend_domain()
        dirty, _count = self.dirty_pfns()
        final = pfnsets.union(self.pages, dirty, unsent)
        self.link.say(
            LOG_INFO, "save", f"stop and copy: {len(final)} pages to send while suspended"
        )
        first_pass_unfinished = self.progress.iteration == 0
        self.progress.iteration += 1
        self.progress.dirty_count = len(final)
        # Stopped inside the first pass: the unsent part may hold holes, so
        # sweep with extents read now, while the guest is paused (holes go
        # out as XALLOC without being faulted in).  Otherwise every page to
        # send was written by the guest: no extents to read.
        self._extents = None
        self.send_pages(final, sweep=first_pass_unfinished)
        self.disable_logdirty()

    def suspend_for_postcopy(self, unsent: np.ndarray) -> np.ndarray:
        """Postcopy: pause the guest; the pages still to send are the ones it
        dirtied and the ones this iteration had not reached (in the first pass,
        only those that hold data: a hole stays a zero page at the destination)."""
        self.suspend_domain()
        dirty, _count = self.dirty_pfns()
        self.disable_logdirty()
        if self.progress.iteration == 0 and len(unsent):
            unsent = unsent[DataExtents(self.memory.data_extents()).holds(unsent)]
        pfns = pfnsets.union(self.pages, dirty, unsent)
        self.link.say(
            LOG_INFO, "save", f"postcopy: {len(pfns)} pages will follow the guest to its new host"
        )
        return pfns

    def send_postcopy(self, pfns: np.ndarray) -> None:
        """Otto's transition (context, then the set, then TRANSITION), the switch
        (the toolstack has the destination run the guest), then the pages."""
        self.writer.writev(libxc.encode_marker(libxc.REC_POSTCOPY_BEGIN))
        self.send_context()
        self.writer.writev(libxc.encode_marker(libxc.REC_POSTCOPY_PFNS_BEGIN))
        for start in range(0, len(pfns), MAX_BATCH_PAGES):
            self.writer.writev(libxc.encode_pfn_list(pfns[start : start + MAX_BATCH_PAGES]))
        self.writer.writev(libxc.encode_marker(libxc.REC_POSTCOPY_TRANSITION))
        if not self.link.postcopy():
            raise SaveAborted("the destination did not take the guest over: postcopy cancelled")
        PostcopySender(self, pfns).run()

    def resume_postcopy(self) -> None:
        """Recovery: a postcopy whose link broke goes on over this one.  The
        guest is long paused here; the destination says which pages it still
        lacks, and gets those, each once, requested ones first."""
        self.stream_start_ns = time.monotonic_ns()
        rules = ReturnRules(resumed=True)
        incoming = RecordStream(self.writer.fd, return_decoder(self.pages))
        lacking, faults = read_resume_list(incoming, rules)
        self.link.say(LOG_INFO, "save", f"postcopy resumed: {len(lacking)} pages still to send")
        sender = PostcopySender(self, lacking, incoming, rules)
        for pfns in faults:
            sender.queue(pfns)
        sender.run()
        self.writer.writev(libxc.encode_marker(libxc.REC_END))

    def suspend_domain(self) -> None:
        if not self.link.suspend():
            raise SaveAborted("the toolstack could not suspend the domain")

    def send_pages(self, pfns: np.ndarray, sweep: bool = False) -> None:
        """Send pfns with the guest suspended: no policy to ask."""
        p = self.progress
        p.iter_written, p.iter_bytes, p.iter_total = 0, 0, len(pfns)
        for start in range(0, len(pfns), MAX_BATCH_PAGES):
            batch = pfns[start : start + MAX_BATCH_PAGES]
            self.send(self.prepare(batch, sweep))

    def send_context(self) -> None:
        blob = self.domain.get_context()
        tsc = libxc.TscInfo(mode=0, khz=0, nsec=time.monotonic_ns(), incarnation=0)
        self.writer.writev(libxc.encode_tsc_info(tsc))
        self.writer.writev(libxc.encode_hvm_context(blob))
        self.writer.writev(libxc.encode_hvm_params([]))

    # -- one batch ------------------------------------------------------------
    def prepare_batch(self, pfns: np.ndarray, sweep: bool) -> Batch:
        """A batch straight from mapped guest RAM: one buffer per run of
        contiguous pages that carry data, no page copied in Python, each run
        mapped in one call (MADV_POPULATE_READ) rather than one fault per
        page inside the write.  All-zero pages go as XALLOC, without data
        (QEMU's zero-page detection); in a `sweep` over all of RAM, holes
        (never-touched pages) are known zero without being read."""
        if not len(pfns):
            return Batch(pfns, None, [], 0)
        zero = self.holes(pfns) if sweep else np.zeros(len(pfns), bool)
        self.map_runs(pfnsets.runs(pfns[~zero]))
        zero |= self.zero_pages(pfns, ~zero)
        views = [self.memory.page_view(f, c) for f, c in pfnsets.runs(pfns[~zero])]
        if not zero.any():
            return Batch(pfns, None, views, 0)
        types = np.where(zero, libxc.PAGE_TYPE_XALLOC, libxc.PAGE_TYPE_NOTAB).astype(np.uint64)
        return Batch(pfns, types, views, int(np.count_nonzero(zero)))

    def page_views(self, pfns: np.ndarray) -> list[memoryview]:
        """Every page's data from the mapping, zero pages and holes included (a
        postcopy page goes in as it comes): a buffer per run of consecutive
        pfns, long runs mapped in one call.  A page alone (a fault, postcopy's
        common case) skips the numpy work."""
        if len(pfns) == 1:
            return [self.memory.page_view(int(pfns[0]))]
        pfn_runs = pfnsets.runs(pfns)
        self.map_runs(pfn_runs)
        return [self.memory.page_view(first, count) for first, count in pfn_runs]

    def map_runs(self, pfn_runs: list[tuple[int, int]]) -> None:
        """Map each long run of pages in one call, before a write reads them."""
        for first, count in pfn_runs:
            if count >= POPULATE_MIN_PAGES:
                self.memory.populate(first * PAGE_SIZE, count * PAGE_SIZE)

    def holes(self, pfns: np.ndarray) -> np.ndarray:
        """Which `pfns` are holes in the memfd: never touched, zero.  The
        extents are read once per sweep: a hole the guest fills later is
        dirty, so a later pass resends it."""
        if self._extents is None:
            self._extents = DataExtents(self.memory.data_extents())
        return ~self._extents.holds(pfns)

    def zero_pages(self, pfns: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Which `pfns` (among `candidates`, mapped already) hold only zeros:
        a page whose first word is not zero is not (almost every page of
        data: one gather for the batch); the others are read whole."""
        zero = np.zeros(len(pfns), bool)
        maybe = np.flatnonzero(candidates)
        maybe = maybe[self.memory.words[pfns[maybe].astype(np.intp), 0] == 0]
        if len(maybe):
            zero[maybe] = ~self.memory.words[pfns[maybe].astype(np.intp)].any(axis=1)
        return zero

    def prepare(self, pfns: np.ndarray, sweep: bool) -> list[Batch]:
        """A batch as one record per connection its pages go on (shards.py)."""
        if not self.shards:
            return [self.prepare_batch(pfns, sweep)]
        shard = shard_of(pfns, len(self.shards) + 1)
        batches = []
        for index in np.unique(shard).tolist():
            batch = self.prepare_batch(pfns[shard == index], sweep)
            batch.shard = index
            batches.append(batch)
        return batches

    def send(self, batches: list[Batch]) -> None:
        """The PAGE_DATA records of a prepared batch, each on its connection."""
        if self.stop_requested:
            raise SaveAborted("the helper was asked to stop (SIGTERM)")
        p = self.progress
        for batch in batches:
            pfns = batch.pfns
            if not len(pfns):
                continue
            record = libxc.encode_page_data(pfns, batch.views, batch.types)
            first, end = int(pfns[0]), int(pfns[-1]) + 1
            if batch.shard:  # written by its connection's thread, unmapped after
                self.shards[batch.shard - 1].put(record, then=self.unmapper(first, end))
                written = sum(memoryview(b).nbytes for b in record)
            else:
                written = self.writer.writev(record)
                # The kernel has copied the pages: let go of their mapping too.
                self.memory.unmap(first, end - first)
            p.iter_written += len(pfns)
            p.total_written += len(pfns)
            p.zero_pages += batch.zero
            p.iter_bytes += written
        doing = f"iteration {p.iteration}"
        self.link.progress("save", doing, p.iter_written, p.iter_total)

    def unmapper(self, first: int, end: int):
        return lambda: self.memory.unmap(first, end - first)

    def end_shards(self) -> None:
        """Every extra connection's last pages out, then its END: before the
        main stream's context or POSTCOPY_BEGIN (shards.py)."""
        try:
            for shard in self.shards:
                shard.end()
        except ShardError as exc:
            raise SaveAborted(str(exc)) from None
        self.extra_octets = sum(shard.queued_octets for shard in self.shards)
        self.shards = []

    def stream_octets(self) -> int:
        return self.writer.written + self.extra_octets + sum(s.queued_octets for s in self.shards)

    def ask_policy(self) -> PrecopyDecision:
        self.link.begin_precopy_policy(self.policy_stats())
        return self.wait_for_policy()

    def wait_for_policy(self) -> PrecopyDecision:
        """The toolstack's answer.  The time blocked here (not the time spent
        preparing the next batch meanwhile) goes into policy_wait_ns."""
        started = time.monotonic_ns()
        decision = self.link.finish_precopy_policy()
        self.policy_wait_ns += time.monotonic_ns() - started
        return decision

    def policy_stats(self) -> PrecopyStats:
        p = self.progress
        return PrecopyStats(
            iteration=p.iteration,
            total_written=p.total_written,
            dirty_count=p.dirty_count,
            iter_written=p.iter_written,
            iter_remaining=p.iter_total - p.iter_written,
            iter_bytes=p.iter_bytes,
            total_bytes=self.stream_octets(),
            domain_pages=self.pages,
            time_ns=time.monotonic_ns(),
            stream_start_ns=self.stream_start_ns,
            policy_wait_ns=self.policy_wait_ns,
            zero_pages=p.zero_pages,
        )

    def dirty_pfns(self) -> tuple[np.ndarray, int]:
        log = self.domain.logdirty_clean()
        bitmap = np.unpackbits(np.frombuffer(log.bitmap, np.uint8), bitorder="little")
        pfns = np.flatnonzero(bitmap[: self.pages]).astype(np.uint64)
        return pfns, log.count


class DataExtents:
    """The memfd's data extents (`GuestMemory.data_extents`) as arrays, to
    ask of many pfns at once which hold data.  A guest that wrote pages at
    random leaves tens of thousands of extents: each pfn finds the last one
    starting at or before it by binary search (testing every extent for
    every pfn took 150 ms per 1,024-page batch)."""

    def __init__(self, extents: list[tuple[int, int]]) -> None:
        pairs = np.array(extents, np.uint64).reshape(-1, 2)
        self.firsts, self.ends = pairs[:, 0].copy(), pairs[:, 1].copy()

    def holds(self, pfns: np.ndarray) -> np.ndarray:
        """A mask of the `pfns` inside an extent (not holes)."""
        if not len(self.ends):
            return np.zeros(len(pfns), bool)
        last = np.searchsorted(self.firsts, pfns, side="right").astype(np.intp) - 1
        return (last >= 0) & (pfns < self.ends[np.maximum(last, 0)])
