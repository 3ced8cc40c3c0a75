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
    receiving             it never ran here, unless its     remove the record, but keep a
                          runner runs (crashed after the    running domain: committed
                          unpause)
    postcopy              it runs here, lacking pages       postcopy is paused: wait for resume
    committed             it ran here (it may have left)    keep the record (30 days)

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
from .journal import DESTINATION, KEEP_COMMITTED, SOURCE, Record
from .link import LinkError, PeerRefused
from .receiver import continue_receiving
from .sender import authenticate, connect, continue_postcopy, mark_inconsistent
from .site import Site

log = logging.getLogger("ferry.resolve")
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # s between asking an unreachable destination again
SETTLE = 2.0  # s a whereabouts answer waits for a migration that is about to settle


class Resolver:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.doubts: dict[str, Record] = {}  # domain name -> the record in doubt
        self._locks: dict[str, trio.Lock] = {}  # one verdict at a time per domain
        self._wake = trio.Event()

    # -- after a restart ----------------------------------------------------------------
    async def resolve_journal(self) -> None:
        """Every record the journal holds: destination records at once (they
        need nobody), source records by asking their peers in the background."""
        await trio.to_thread.run_sync(self.site.journal.clean)
        records, problems = await trio.to_thread.run_sync(self.site.journal.load)
        for line in problems:
            log.error("%s (left in place)", line)
        for record in records:
            if record.role == DESTINATION:
                await self._settle_destination(record)
            else:
                await self._settle_source_locally(record)

    async def _settle_destination(self, record: Record) -> None:
        domain = self.site.host.domains.get(record.name)
        if record.phase in ("committed", "split"):
            if self.site.journal.age(record.migration_id) > KEEP_COMMITTED:
                await self.site.journal.remove(record.migration_id)
            return  # kept: "the guest ran here" stays true after it leaves
        if record.phase == "receiving" and domain is not None:
            # reattach adopts only a runner that left INCOMING: it was unpaused,
            # so the guest ran here and the crash came before the journal said so
            await self.site.journal.record(record, "committed")
            log.info(
                "%s: incoming migration %s had committed; kept", record.name, record.migration_id
            )
            return
        if record.phase == "postcopy" and domain is not None:
            self.adopt_paused(domain, record, "ferryd restarted during postcopy")
            return
        if record.phase == "postcopy":
            log.error("%s: its runner died during postcopy; the guest is lost here", record.name)
            await self.site.journal.record(record, "split")  # the sender must not resume
            return
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
                except Exception:  # a bug, or a host refusing (a read-only journal...)
                    log.exception("%s still in doubt: resolving it failed", name)
            delay = RETRY_FIRST if not self.doubts else min(delay * 2, RETRY_MAX)

    async def resolve(self, name: str, force: str = "") -> str:
        """Settle the migration `name` is in doubt about; the outcome in a line.
        `force` ("resume" or "destroy") is an operator's decision, taken without
        asking.  One verdict at a time per domain: a background retry and an
        operator cannot both settle it, the second finds it settled."""
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            record = self.doubts.get(name)
            domain = self.site.host.domains.get(name)
            if record is None or domain is None or domain.owner is not None:
                raise ToolstackError(f"{name} is not in doubt: nothing to resolve")
            return await self._verdict(name, domain, record, force)

    async def _verdict(self, name: str, domain: Domain, record: Record, force: str) -> str:
        if force == "resume":
            return await self._resume(domain, record, "forced by the operator")
        if force == "destroy":
            return await self._destroy(domain, record, "forced by the operator")
        state = await self._ask(record)
        if state == "running":
            # it committed there (and may have moved on since): ours is stale
            return await self._destroy(domain, record, f"the guest committed at {record.peer}")
        if state == "postcopy":
            await self.site.journal.record(record, "postcopy")
            domain.hold = None
            self.doubts.pop(name, None)
            self.adopt_paused(domain, record, f"the guest runs at {record.peer} in postcopy")
            return (
                f"{name}: the guest runs at {record.peer} and needs the pages kept here: "
                f"postcopy is paused; resume with `ferry migrate {name} {record.peer} --resume`"
            )
        if state == "split":
            await mark_inconsistent(self.site, domain, record)
            self.doubts.pop(name, None)
            return (
                f"{name}: the guest ran at {record.peer} in postcopy and ended there without "
                f"all of its pages: kept here as {domain.name} for inspection, never resumed"
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
        await resume_source(domain, record.was_running)  # raises when it could not: still in doubt
        return await self._settled(domain, record, f"resumed here: {why}")

    async def _destroy(self, domain: Domain, record: Record, why: str) -> str:
        await self.site.host.destroy(domain)
        return await self._settled(domain, record, f"our copy destroyed: {why}")

    async def _settled(self, domain: Domain, record: Record, outcome: str) -> str:
        await self.site.journal.remove(record.migration_id)
        domain.hold = None
        self.doubts.pop(record.name, None)
        message = f"{record.name}: migration {record.migration_id} resolved, {outcome}"
        log.info("%s", message)
        job = self.site.jobs.get(record.name)
        if job is not None and job.migration_id == record.migration_id and not job.running:
            job.stats.error = f"{job.stats.error}; later {message}"  # ferry job tells the end
        return message

    # -- the receiver's answer ----------------------------------------------------------------
    async def whereabouts(self, name: str, migration_id: str) -> str:
        """What migration `migration_id` of `name` did here: "running" once it
        committed here (for good: the guest may have moved on since, and the
        sender's copy is stale either way), "postcopy" while it runs here
        lacking pages, "incoming" while it is not decided, "absent" when it
        never ran here."""
        job = self.site.jobs.get(name)
        if job is not None and job.migration_id == migration_id and job.running:
            with trio.move_on_after(SETTLE):
                await job.done.wait()
            if job.running and job.pause_reason is None and not job.committed:
                return "incoming"
        record = await self.site.journal.find(migration_id)
        if record is None or record.role != DESTINATION or record.name != name:
            return "absent"
        known = {"committed": "running", "postcopy": "postcopy", "split": "split"}
        return known.get(record.phase, "incoming")
