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
use them: one place for the order.  Memory is bounded by the stream: the set
is a sorted array of the announced pfns, not a bitmap of the address space.
"""

from __future__ import annotations

import numpy as np

from . import libxc
from .errors import RemoteProtocolError
from .pfnsets import sorted_distinct

PRECOPY, CONTEXT, PFNS, PAGES, ENDED = "precopy", "context", "pfns", "pages", "ended"


class ForwardRules:
    """The source's records, in order (pfns beyond the domain are refused by
    the decoder already, when it knows the domain's size)."""

    def __init__(self) -> None:
        self.state = PRECOPY
        self._listed: list[np.ndarray] = []
        self.pfns = np.empty(0, np.uint64)  # the set, sorted, once announced
        self.sent = np.empty(0, bool)  # parallel to pfns
        self.sent_count = 0
        self._context = False

    @classmethod
    def resumed(cls, lacking: np.ndarray) -> ForwardRules:
        """A resumed stream: only the pages still lacking may come, each once."""
        rules = cls()
        rules.state = PAGES
        rules.pfns, _ = sorted_distinct(lacking)
        rules.sent = np.zeros(len(rules.pfns), bool)
        return rules

    @property
    def postcopy(self) -> bool:
        return self.state != PRECOPY

    @property
    def remaining(self) -> int:
        return len(self.pfns) - self.sent_count

    def event(self, event, offset: int) -> None:
        """Check one event of the stream (raises RemoteProtocolError)."""
        match event:
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
            case libxc.PfnList(fault=False):
                self._expect(PFNS, "POSTCOPY_PFNS", offset)
                self._listed.append(event.pfns)
            case libxc.Marker(type=libxc.REC_POSTCOPY_TRANSITION):
                self._expect(PFNS, "POSTCOPY_TRANSITION", offset)
                self._close_set(offset)
                self.state = PAGES
            case libxc.PageData(postcopy=True):
                self._expect(PAGES, "POSTCOPY_PAGE_DATA", offset)
                self.page_data(event.pfns, offset)
            case libxc.Marker(type=libxc.REC_END) if self.postcopy:
                self._expect(PAGES, "END", offset)
                if self.remaining:
                    raise RemoteProtocolError(
                        f"END with {self.remaining} postcopy pages never sent", offset
                    )
                self.state = ENDED
            case (
                libxc.PfnList(fault=True)
                | libxc.PfnList(resume=True)
                | libxc.Marker(type=libxc.REC_POSTCOPY_COMPLETE)
                | libxc.Marker(type=libxc.REC_POSTCOPY_RESUME_END)
            ):
                raise RemoteProtocolError(
                    f"{record_name(event)} goes from the destination to the source", offset
                )

    def page_data(self, pfns: np.ndarray, offset: int) -> np.ndarray:
        """Mark `pfns` sent: each must be in the set and not sent before.
        Returns their indices in the set."""
        if len(pfns) == 1:  # a faulted page, alone: the common case, kept cheap
            return self._one_page(int(pfns[0]), offset)
        index = np.searchsorted(self.pfns, pfns)
        inside = index < len(self.pfns)
        announced = inside.copy()
        announced[inside] = self.pfns[index[inside]] == pfns[inside]
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
        i = int(np.searchsorted(self.pfns, pfn))
        if i >= len(self.pfns) or int(self.pfns[i]) != pfn:
            raise RemoteProtocolError(f"pfn {pfn:#x} was not announced for postcopy", offset)
        if self.sent[i]:
            raise RemoteProtocolError(f"postcopy pfn {pfn:#x} sent twice", offset)
        self.sent[i] = True
        self.sent_count += 1
        return np.array([i])

    def _close_set(self, offset: int) -> None:
        listed = np.concatenate(self._listed) if self._listed else np.empty(0, np.uint64)
        self._listed = []
        self.pfns, repeated = sorted_distinct(listed)
        if repeated:
            raise RemoteProtocolError("a pfn is listed twice in POSTCOPY_PFNS", offset)
        self.sent = np.zeros(len(self.pfns), bool)

    def _expect(self, state: str, what: str, offset: int) -> None:
        if self.state != state:
            where = (
                "before POSTCOPY_BEGIN" if self.state == PRECOPY else f"in the {self.state} phase"
            )
            raise RemoteProtocolError(f"{what} {where}", offset)


class ReturnRules:
    """The destination's records to the source: faults, then COMPLETE once.
    `resumed`: first the list of pfns it lacks (RESUME ..., RESUME_END)."""

    def __init__(self, resumed: bool = False) -> None:
        self.complete = False
        self.listing = resumed  # still reading the RESUME list
        self.lacking: list[np.ndarray] = []

    def event(self, event, offset: int) -> np.ndarray | None:
        """The faulted pfns of a POSTCOPY_FAULT (None for other records)."""
        if self.complete:
            raise RemoteProtocolError(f"{record_name(event)} after POSTCOPY_COMPLETE", offset)
        if self.listing:
            match event:
                case libxc.PfnList(resume=True):
                    self.lacking.append(event.pfns)
                    return None
                case libxc.Marker(type=libxc.REC_POSTCOPY_RESUME_END):
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
