"""Resolving migrations whose outcome this daemon does not know.

A daemon that restarts in the middle of a migration, or a sender that lost
the destination's answer to "go", must not guess: resuming a guest that
runs at the destination would run it twice; destroying one that does not
would lose it.  The journal says what can be true:

    source phase          what can be true                 what we do
    precopy, suspended    "go" never left: it runs here     resume the source as it was
    go-sent               it may run at the destination     ask the destination
    postcopy              it runs there, lacking pages      keep ours: postcopy is paused
    committed             it runs at the destination        destroy our copy

    destination phase     what can be true                 what we do
    receiving             it never ran here                 remove the incoming domain
    postcopy              it runs here, lacking pages       postcopy is paused: wait for resume
    committed             it runs here if its runner does   keep it (or forget the record)

A paused postcopy is a job again after a restart: `ferry migrate NAME
HOST:PORT --resume` goes on with it, `ferry job-control NAME abort` ends it.

Asking means an authenticated `whereabouts(name, migration_id)`: "running"
there, our copy is destroyed; "absent", ours resumes; no answer (or
"incoming", the destination still deciding), the domain is `in-doubt`:
shown so by `ferry list`, untouchable by other commands, and asked again
in the background (every RETRY_FIRST s, backing off to RETRY_MAX s) until
the destination answers.  `ferry migrate-resolve NAME` asks at once;
`--force-resume` / `--force-destroy` let an operator who knows the answer
decide.
"""

from __future__ import annotations

import logging

import trio

from protocol import _gen_migration_msgs as msgs

from ..host import Domain, Job, JobStats, ToolstackError
from ..host.deadlines import DEADLINES
from ..host.domains import Hold
from ..host.savefile import resume_source
from ..host.stats import Postcopy
from .journal import DESTINATION, SOURCE, Record
from .link import LinkError, PeerRefused
from .receiver import continue_receiving
from .sender import authenticate, connect, continue_postcopy
from .site import Site

log = logging.getLogger("ferry.resolve")
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # s between asking an unreachable destination again
SETTLE = 2.0  # s a whereabouts answer waits for a migration that is about to settle


class Resolver:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.doubts: dict[str, Record] = {}  # domain name -> the record in doubt
        self._wake = trio.Event()

    # -- after a restart ----------------------------------------------------------------
    async def resolve_journal(self) -> None:
        """Every record the journal holds: destination records at once (they
        need nobody), source records by asking their peers in the background."""
        records, problems = self.site.journal.load()
        for line in problems:
            log.error("%s (left in place)", line)
        for record in records:
            if record.role == DESTINATION:
                await self._settle_destination(record)
            else:
                await self._settle_source_locally(record)

    async def _settle_destination(self, record: Record) -> None:
        domain = self.site.host.domains.get(record.name)
        if record.phase == "committed" and domain is not None:
            log.info("%s arrived by migration %s: it runs here", record.name, record.migration_id)
            return  # kept: the sender may still ask about it
        if record.phase == "postcopy" and domain is not None:
            self.adopt_paused(domain, record, "ferryd restarted during postcopy")
            return
        if record.phase == "postcopy":
            log.error("%s: its runner died during postcopy; the guest is lost here", record.name)
        # receiving: the guest never ran here (reattach removed the incoming runner)
        await self.site.journal.remove(record.migration_id)
        log.info(
            "%s: incoming migration %s did not finish; removed", record.name, record.migration_id
        )

    async def _settle_source_locally(self, record: Record) -> None:
        domain = self.site.host.domains.get(record.name)
        if domain is None:
            log.warning(
                "%s: gone while migration %s was journalled", record.name, record.migration_id
            )
            await self.site.journal.remove(record.migration_id)
        elif record.phase in ("precopy", "suspended"):
            await self._resume(domain, record, "'go' never left, so the guest is here")
        elif record.phase == "committed":
            await self._destroy(domain, record, "the destination had confirmed it runs there")
        elif record.phase == "postcopy":
            self.adopt_paused(domain, record, "ferryd restarted during postcopy")
        else:
            self.in_doubt(domain, record, "ferryd restarted after 'go' was sent")

    def adopt_paused(self, domain: Domain, record: Record, why: str) -> None:
        """A postcopy known only from the journal becomes a paused job again."""
        source = record.role == SOURCE
        stats = JobStats(
            "migrate" if source else "migrate-receive", domain.name, domain.config.memory_bytes
        )
        stats.peer, stats.postcopy = record.peer, Postcopy()
        job = Job(stats, domain=domain)
        job.migration_id, job.postcopy_allowed = record.migration_id, True
        job.commit()  # past the commit point: nothing to undo
        go_on = continue_postcopy if source else continue_receiving

        async def work(job: Job) -> None:
            await go_on(self.site, job, domain, record, why)

        self.site.start_job(job, work)

    # -- in doubt -------------------------------------------------------------------------
    def in_doubt(self, domain: Domain, record: Record, why: str) -> None:
        """Keep `domain` paused and untouchable until the destination says where the guest is."""
        domain.hold = Hold(
            "in-doubt",
            f"migration to {record.peer}: {why}",
            f"`ferry migrate-resolve {domain.name}` settles it",
        )
        self.doubts[domain.name] = record
        log.warning("%s is in doubt (%s); asking %s", domain.name, why, record.peer)
        self._wake.set()

    async def retry_forever(self) -> None:
        """Ask about every domain in doubt, backing off while nobody answers."""
        delay = RETRY_FIRST
        while True:
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self.doubts:
                delay = RETRY_FIRST
                continue
            for name in list(self.doubts):
                try:
                    await self.resolve(name)
                except ToolstackError as exc:
                    log.info("%s still in doubt: %s", name, exc)
            delay = RETRY_FIRST if not self.doubts else min(delay * 2, RETRY_MAX)

    async def resolve(self, name: str, force: str = "") -> str:
        """Settle the migration `name` is in doubt about; the outcome in a line.
        `force` ("resume" or "destroy") is an operator's decision, taken without asking."""
        record = self.doubts.get(name)
        domain = self.site.host.domains.get(name)
        if record is None or domain is None:
            raise ToolstackError(f"{name} is not in doubt: nothing to resolve")
        if force == "resume":
            return await self._resume(domain, record, "forced by the operator")
        if force == "destroy":
            return await self._destroy(domain, record, "forced by the operator")
        state = await self._ask(record)
        if state == "running":
            return await self._destroy(domain, record, f"the guest runs at {record.peer}")
        if state == "postcopy":
            await self.site.journal.record(record, "postcopy")
            domain.hold = None
            self.doubts.pop(name, None)
            self.adopt_paused(domain, record, f"the guest runs at {record.peer} in postcopy")
            return (
                f"{name}: the guest runs at {record.peer} and needs the pages kept here: "
                f"postcopy is paused; resume with `ferry migrate {name} {record.peer} --resume`"
            )
        if state == "absent":
            return await self._resume(domain, record, f"{record.peer} does not have the guest")
        raise ToolstackError(f"{record.peer} has not decided yet (the guest is {state} there)")

    async def _ask(self, record: Record) -> str:
        try:
            with trio.fail_after(DEADLINES.resolve):
                link = await connect(record.peer)
                try:
                    await authenticate(link, self.site.key)
                    question = msgs.Whereabouts(name=record.name, migration_id=record.migration_id)
                    location = await link.call(question, DEADLINES.handshake, "whereabouts")
                finally:
                    await link.aclose()
        except trio.TooSlowError:
            raise ToolstackError(
                f"{record.peer} did not answer within {DEADLINES.resolve:g} s"
            ) from None
        except (LinkError, PeerRefused) as exc:
            raise ToolstackError(f"cannot ask {record.peer}: {exc}") from None
        return location.state

    async def _resume(self, domain: Domain, record: Record, why: str) -> str:
        await resume_source(domain, record.was_running)
        return await self._settled(domain, record, f"resumed here: {why}")

    async def _destroy(self, domain: Domain, record: Record, why: str) -> str:
        await self.site.host.destroy(domain)
        return await self._settled(domain, record, f"our copy destroyed: {why}")

    async def _settled(self, domain: Domain, record: Record, outcome: str) -> str:
        await self.site.journal.remove(record.migration_id)
        domain.hold = None
        self.doubts.pop(domain.name, None)
        message = f"{domain.name}: migration {record.migration_id} resolved, {outcome}"
        log.info("%s", message)
        return message

    # -- the receiver's answer ----------------------------------------------------------------
    async def whereabouts(self, name: str, migration_id: str) -> str:
        """Where migration `migration_id` of `name` left the guest, as this
        destination knows it: running, incoming (not decided yet) or absent."""
        job = self.site.jobs.get(name)
        if job is not None and job.migration_id == migration_id and job.running:
            with trio.move_on_after(SETTLE):
                await job.done.wait()
            if job.running:
                return "incoming"
        records, _problems = await trio.to_thread.run_sync(self.site.journal.load)
        for record in records:
            if record.migration_id == migration_id and record.role == DESTINATION:
                domain = self.site.host.domains.get(name)
                if domain is not None and record.name == name and record.phase != "receiving":
                    return "running" if record.phase == "committed" else "postcopy"
        return "absent"
