"""The order of a postcopy stream (Otto's RFC, ferry's record numbers): sans-IO rules.

Source to destination, once precopy is over:

    POSTCOPY_BEGIN                       precopy is over: no PAGE_DATA after it
    X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS  the vCPU/device context, before the pfns
    POSTCOPY_PFNS_BEGIN
    POSTCOPY_PFNS ...                    the set: pfns still to come, each listed once
    POSTCOPY_TRANSITION                  the destination may run the guest (after "go")
    POSTCOPY_PAGE_DATA ...               pages of the set, each exactly once
    END                                  only once every page of the set was sent

Destination to source, after the transition:

    POSTCOPY_FAULT ...                   pfns the guest faulted on (inside the domain)
    POSTCOPY_COMPLETE                    once, when the destination holds every page;
                                         nothing after it

Recovery: when the link broke during postcopy, a new connection carries a
resumed stream of records only (no headers, no libxl layer):

    destination -> source   POSTCOPY_RESUME ...  the pfns it still lacks, then
                            POSTCOPY_RESUME_END; then FAULT and COMPLETE as above
    source -> destination   POSTCOPY_PAGE_DATA for those pfns, each once; END

`ForwardRules` and `ReturnRules` take the decoded libxc events of each
direction and raise RemoteProtocolError, with the offset, for the first rule
broken.  The restore helper, the save helper and `ferry verify-stream` all
use them: one place for the order.  Memory is bounded by the stream and the
domain: the set is a sorted array of the announced pfns, not a bitmap of the
address space, and a list (POSTCOPY_PFNS, POSTCOPY_RESUME) that repeats pfns
is refused while it is read, before it outgrows the domain (`PfnListing`).
"""

from __future__ import annotations

import numpy as np

from . import libxc
from .errors import RemoteProtocolError
from .limits import MAX_BATCH_PAGES
from .pfnsets import position, positions, sorted_distinct

PRECOPY, CONTEXT, PFNS, PAGES, ENDED = "precopy", "context", "pfns", "pages", "ended"

# Page types a POSTCOPY_PAGE_DATA record may not carry: a page of the set is
# one the guest has, so the source sends its data, or XALLOC for a zero page.
# XTAB (no such page) or BROKEN (its contents lost) cannot be put under a
# running guest: neither has a stand-in that is not a lie (indexed by type).
NOT_A_POSTCOPY_PAGE = np.zeros(16, bool)
NOT_A_POSTCOPY_PAGE[[libxc.PAGE_TYPE_XTAB, libxc.PAGE_TYPE_BROKEN]] = True
TYPE_NAMES = {libxc.PAGE_TYPE_XTAB: "XTAB", libxc.PAGE_TYPE_BROKEN: "BROKEN"}


class PfnListing:
    """The pfns of a list that spans records (POSTCOPY_PFNS, POSTCOPY_RESUME),
    each at most once, checked as they come so that memory stays within
    about twice the distinct pfns (which the decoder keeps below the
    domain's page count): a peer repeating pfns for ever is refused long
    before it grows anything.

    A repeat within a record is refused at once.  A record that starts
    above every pfn listed before it (ferry's senders list in ascending
    order) needs no other check.  Once another has come, the records not
    merged yet are merged, and checked, when they hold as many pfns as the
    merged part (at least a record's worth): linear work for ascending
    lists, O(n log n) for any order, a repeat found within that much more
    listing, and at the latest when the list ends (`close`)."""

    def __init__(self, record: str) -> None:
        self.record = record  # its name, for errors
        self.merged = np.empty(0, np.uint64)  # sorted, distinct
        self.pending: list[np.ndarray] = []  # each sorted and distinct
        self.pending_count = 0
        self.ascending = True  # each pending record starts above all before it
        self.top = -1  # the highest pfn listed so far

    @property
    def parts(self) -> list[np.ndarray]:
        """The pfns listed so far, in sorted arrays (the last ones not merged)."""
        return ([self.merged] if len(self.merged) else []) + self.pending

    def add(self, pfns: np.ndarray, offset: int) -> None:
        ordered, repeated = sorted_distinct(pfns)
        if not len(ordered):
            return
        if repeated:
            self._twice(offset)
        if int(ordered[0]) <= self.top:
            self.ascending = False
        self.top = max(self.top, int(ordered[-1]))
        self.pending.append(ordered)
        self.pending_count += len(ordered)
        if not self.ascending and self.pending_count >= max(len(self.merged), MAX_BATCH_PAGES):
            self._merge(offset)

    def close(self, offset: int) -> np.ndarray:
        """Every pfn listed, sorted (a repeat not found yet is refused now)."""
        self._merge(offset)
        return self.merged

    def _merge(self, offset: int) -> None:
        if not self.pending:
            return
        listed = np.concatenate(self.parts)
        if not self.ascending:  # sorted runs: timsort merges them
            listed = np.sort(listed, kind="stable")
            if (listed[1:] == listed[:-1]).any():
                self._twice(offset)
        self.merged, self.pending, self.pending_count = listed, [], 0
        self.ascending = True

    def _twice(self, offset: int) -> None:
        raise RemoteProtocolError(f"a pfn is listed twice in {self.record}", offset)


class ForwardRules:
    """The source's records, in order (pfns beyond the domain are refused by
    the decoder already, when it knows the domain's size)."""

    def __init__(self) -> None:
        self.state = PRECOPY
        self._listed = PfnListing("POSTCOPY_PFNS")
        self.sent_count = 0
        self._context = False
        self._announce(np.empty(0, np.uint64))

    @classmethod
    def resumed(cls, lacking: np.ndarray) -> ForwardRules:
        """A resumed stream: only the pages still lacking may come, each once."""
        rules = cls()
        rules.state = PAGES
        rules._announce(sorted_distinct(lacking)[0])
        return rules

    def _announce(self, pfns: np.ndarray) -> None:
        self.pfns = pfns  # the set, sorted, once announced
        self.sent = np.zeros(len(pfns), bool)  # parallel to pfns
        # The same arrays seen as Python sequences: one pfn looked up or
        # marked without numpy (see libxc.ONE_RECORD for why)
        self.pfn_at = memoryview(pfns)
        self.sent_at = memoryview(self.sent)

    @property
    def postcopy(self) -> bool:
        return self.state != PRECOPY

    @property
    def remaining(self) -> int:
        return len(self.pfns) - self.sent_count

    def event(self, event, offset: int) -> None:
        """Check one event of the stream (raises RemoteProtocolError)."""
        match event:
            # the other direction's records first: no case below may take them
            case (
                libxc.PfnList(fault=True)
                | libxc.PfnList(resume=True)
                | libxc.Marker(type=libxc.REC_POSTCOPY_COMPLETE)
                | libxc.Marker(type=libxc.REC_POSTCOPY_RESUME_END)
            ):
                raise RemoteProtocolError(
                    f"{record_name(event)} goes from the destination to the source", offset
                )
            case libxc.Marker(type=libxc.REC_POSTCOPY_BEGIN):
                self._expect(PRECOPY, "POSTCOPY_BEGIN", offset)
                self.state = CONTEXT
            case libxc.PageData(postcopy=False) if self.state != PRECOPY:
                raise RemoteProtocolError("PAGE_DATA after POSTCOPY_BEGIN", offset)
            case libxc.TscInfo() | libxc.HvmContext() | libxc.HvmParams() if self.postcopy:
                self._expect(CONTEXT, type(event).__name__, offset)
                self._context = self._context or isinstance(event, libxc.HvmContext)
            case libxc.Marker(type=libxc.REC_POSTCOPY_PFNS_BEGIN):
                self._expect(CONTEXT, "POSTCOPY_PFNS_BEGIN", offset)
                if not self._context:
                    raise RemoteProtocolError("POSTCOPY_PFNS_BEGIN before the vCPU context", offset)
                self.state = PFNS
            case libxc.PfnList(fault=False, resume=False):
                self._expect(PFNS, "POSTCOPY_PFNS", offset)
                self._listed.add(event.pfns, offset)
            case libxc.Marker(type=libxc.REC_POSTCOPY_TRANSITION):
                self._expect(PFNS, "POSTCOPY_TRANSITION", offset)
                self._close_set(offset)
                self.state = PAGES
            case libxc.PageData(postcopy=True):
                self._expect(PAGES, "POSTCOPY_PAGE_DATA", offset)
                if NOT_A_POSTCOPY_PAGE[event.types].any():
                    bad = int(np.flatnonzero(NOT_A_POSTCOPY_PAGE[event.types])[0])
                    kind = TYPE_NAMES[int(event.types[bad])]
                    raise RemoteProtocolError(
                        f"POSTCOPY_PAGE_DATA: pfn {int(event.pfns[bad]):#x} is typed {kind}: "
                        "a page of the postcopy set comes with its data or as XALLOC",
                        offset,
                    )
                self.page_data(event.pfns, offset)
            case libxc.Marker(type=libxc.REC_END) if self.postcopy:
                self._expect(PAGES, "END", offset)
                if self.remaining:
                    raise RemoteProtocolError(
                        f"END with {self.remaining} postcopy pages never sent", offset
                    )
                self.state = ENDED

    def page_data(self, pfns: np.ndarray, offset: int) -> np.ndarray:
        """Mark `pfns` sent: each must be in the set and not sent before.
        Returns their indices in the set."""
        if len(pfns) == 1:  # a faulted page, alone: the common case, kept cheap
            return self._one_page(int(pfns[0]), offset)
        index, announced = positions(self.pfns, pfns)
        if not announced.all():
            bad = int(pfns[~announced][0])
            raise RemoteProtocolError(f"pfn {bad:#x} was not announced for postcopy", offset)
        already = self.sent[index]
        unique, counts = np.unique(index, return_counts=True)
        if already.any() or (counts > 1).any():
            bad = int(pfns[already][0]) if already.any() else int(self.pfns[unique[counts > 1][0]])
            raise RemoteProtocolError(f"postcopy pfn {bad:#x} sent twice", offset)
        self.sent[index] = True
        self.sent_count += len(index)
        return index

    def _one_page(self, pfn: int, offset: int) -> np.ndarray:
        i = self.one_page(pfn)
        if i is None:  # the state was checked: not in the set, or there already
            if position(self.pfn_at, pfn) is None:
                raise RemoteProtocolError(f"pfn {pfn:#x} was not announced for postcopy", offset)
            raise RemoteProtocolError(f"postcopy pfn {pfn:#x} sent twice", offset)
        return np.array([i])

    def one_page(self, pfn: int) -> int | None:
        """A page that came alone (`LibxcDecoder.one_page`, the answer to a
        fault): its index in the set, now marked sent.  None where the page
        may not come now, without a change: `event` then refuses it with the
        rule it breaks."""
        if self.state != PAGES:
            return None
        i = position(self.pfn_at, pfn)
        if i is None or self.sent_at[i]:
            return None
        self.sent_at[i] = True
        self.sent_count += 1
        return i

    def _close_set(self, offset: int) -> None:
        self._announce(self._listed.close(offset))
        self._listed = PfnListing("POSTCOPY_PFNS")

    def _expect(self, state: str, what: str, offset: int) -> None:
        if self.state != state:
            where = (
                "before POSTCOPY_BEGIN" if self.state == PRECOPY else f"in the {self.state} phase"
            )
            raise RemoteProtocolError(f"{what} {where}", offset)


class ReturnRules:
    """The destination's records to the source: faults, then COMPLETE once.
    `resumed`: first the list of pfns it lacks (RESUME ..., RESUME_END), each
    pfn once (a repeat is refused as it comes: see PfnListing)."""

    def __init__(self, resumed: bool = False) -> None:
        self.complete = False
        self.listing = resumed  # still reading the RESUME list
        self._lacking = PfnListing("POSTCOPY_RESUME")

    @property
    def takes_faults(self) -> bool:
        """A POSTCOPY_FAULT may come now (`LibxcDecoder.one_fault`'s pfns
        need no other check)."""
        return not self.complete and not self.listing

    @property
    def lacking(self) -> list[np.ndarray]:
        """The pfns listed as lacking so far, in sorted arrays (one once listed)."""
        return self._lacking.parts

    def event(self, event, offset: int) -> np.ndarray | None:
        """The faulted pfns of a POSTCOPY_FAULT (None for other records)."""
        if self.complete:
            raise RemoteProtocolError(f"{record_name(event)} after POSTCOPY_COMPLETE", offset)
        if self.listing:
            match event:
                case libxc.PfnList(resume=True):
                    self._lacking.add(event.pfns, offset)
                    return None
                case libxc.Marker(type=libxc.REC_POSTCOPY_RESUME_END):
                    self._lacking.close(offset)
                    self.listing = False
                    return None
            raise RemoteProtocolError(f"{record_name(event)} before POSTCOPY_RESUME_END", offset)
        match event:
            case libxc.PfnList(fault=True):
                return event.pfns
            case libxc.Marker(type=libxc.REC_POSTCOPY_COMPLETE):
                self.complete = True
                return None
        raise RemoteProtocolError(
            f"{record_name(event)} may not come from the destination during postcopy", offset
        )


def record_name(event) -> str:
    if isinstance(event, libxc.Marker):
        return event.name
    if isinstance(event, libxc.PfnList):
        return libxc.record_name(event.record_type)
    if isinstance(event, libxc.PageData):
        return "POSTCOPY_PAGE_DATA" if event.postcopy else "PAGE_DATA"
    return type(event).__name__
