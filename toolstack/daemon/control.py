"""The daemon's control API: one handler per operation of protocol/control_msgs.toml.

A `ControlSession` serves one client connection: calls come in decoded and
checked by the generated table (an unknown operation or field never gets
this far), each is dispatched to `on_<operation>`, and its value goes back
as the reply.  A failure is one line in an error reply.  Long operations
(save, restore, migrate) start a job in the daemon's job nursery and wait
for it, sending `progress` while they wait when the client asked to watch.
"""

from __future__ import annotations

import logging
import os

import trio

from protocol import Call, ProtocolError
from protocol import _gen_control_msgs as msgs
from protocol._gen_control_msgs import DaemonInfo, DomainInfo, JobReport, PolicyInfo

from ..host import Job, JobStats, ToolstackError
from ..host.async_channel import AsyncChannel, ChannelError
from ..host.domains import INCONSISTENT
from ..host.savefile import open_save_file, rename, restore_domain, save_domain
from ..migration import migrate_send
from ..migration.sender import open_resume
from ..policies import PolicyError, PolicyFailed
from ..policies.guard import one_line
from ._gen_control_dispatch import DaemonHandlers

log = logging.getLogger("ferry.control")
PROGRESS_INTERVAL = 0.2  # s between progress messages of a watched job
VERSION = "0.2.0"


class ControlSession(DaemonHandlers):
    def __init__(self, daemon, stream) -> None:
        self.daemon = daemon
        self.host = daemon.host
        self.channel = AsyncChannel(
            stream, msgs.TABLE, sends=msgs.REVERSE_DIRECTION, receives=msgs.DIRECTION
        )

    async def serve(self) -> None:
        """Calls until the client leaves; a bug in one call does not end the daemon."""
        conn = self.channel.conn
        while True:
            try:
                event = await self.channel.next_event()
            except ChannelError:
                return  # the client left
            except ProtocolError as exc:
                # An unknown operation or field, a wrong type: refused in one line.
                await self.channel.send(conn.send_protocol_error(exc))
                if conn.broken:
                    return
                continue
            if not isinstance(event, Call):
                return
            log.debug("control: %s", event.message.SPEC.name)
            try:
                reply = await self.dispatch(event.message)
            except (ToolstackError, ProtocolError, PolicyError, PolicyFailed) as exc:
                await self.channel.send(conn.send_error(one_line(str(exc), 1000)))
                continue
            except OSError as exc:  # the host refused something (no space, no fds...)
                await self.channel.send(conn.send_error(exc.strerror or str(exc)))
                continue
            try:
                frame = conn.send_reply(reply)
            except (ProtocolError, ValueError, OverflowError, TypeError) as exc:
                # a bug, but the client still deserves an answer, and the line stays usable
                log.exception("the reply to %s could not be encoded", event.message.SPEC.name)
                frame = conn.send_error(f"internal error: the reply could not be encoded ({exc})")
            await self.channel.send(frame)

    # -- domains -----------------------------------------------------------------
    async def on_ping(self) -> DaemonInfo:
        return DaemonInfo(
            state_dir=self.host.state_dir,
            listen_port=self.daemon.listen_port,
            version=VERSION,
            policies=list(self.daemon.policies.entries),
        )

    async def on_create(self, config, paused) -> DomainInfo:
        domain = await self.host.create(config, paused=paused)
        return await self.host.info(domain)

    async def on_list(self) -> list[DomainInfo]:
        """Every domain, asked at once: a host of stalled runners answers
        within one status deadline, not one per domain."""
        domains = list(self.host.domains.values())
        infos: list[DomainInfo | None] = [None] * len(domains)

        async def ask(i: int) -> None:
            infos[i] = await self.host.info(domains[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(domains)):
                nursery.start_soon(ask, i)
        return infos

    async def on_info(self, name) -> DomainInfo:
        return await self.host.info(self.host.get(name))

    async def on_pause(self, name) -> None:
        await self._idle_domain(name).runner.pause()

    async def on_unpause(self, name) -> None:
        await self._idle_domain(name).runner.unpause()

    async def on_destroy(self, name) -> None:
        await self.host.destroy(self._idle_domain(name, "destroy"))

    async def on_digest(self, name) -> str:
        return await self.host.get(name).runner.digest()

    async def on_guest_check(self, name) -> str:
        return await self.host.get(name).runner.guest_check()

    def _idle_domain(self, name: str, operation: str = ""):
        """A domain no job owns: the only kind an operator's command may change."""
        domain = self.host.get(name)
        if domain.hold is not None and operation not in domain.hold.allowed:
            raise ToolstackError(
                f"domain {name} is {domain.hold.state} ({domain.hold.why}); {domain.hold.command}"
            )
        if domain.busy:
            raise ToolstackError(
                f"domain {name} belongs to a {domain.busy} job until it ends "
                f"(see `ferry job {name}`)"
            )
        return domain

    # -- jobs ----------------------------------------------------------------------
    async def on_save(self, name, file, live, keep, policy, settings, watch) -> JobReport:
        domain = self._idle_domain(name)
        path = _absolute(file)
        steer = self.daemon.policies.make(policy, settings) if live else None
        job = Job(JobStats("save", name, domain.config.memory_bytes), steer)
        job.own(domain)  # claimed before anything else can run: no second job gets it

        async def work(job: Job) -> None:
            await save_domain(job, self.host, domain, path, live=live, keep=keep)

        return await self._run(job, work, watch)

    async def on_restore(self, file, name, paused, watch) -> JobReport:
        path = _absolute(file)
        fd, config = await trio.to_thread.run_sync(open_save_file, path)
        try:
            if name:
                config = rename(config, name)
            if config.name in self.host.domains:
                raise ToolstackError(f"a domain named {config.name!r} already exists")
        except BaseException:
            os.close(fd)
            raise
        job = Job(JobStats("restore", config.name, config.memory_bytes))

        async def work(job: Job) -> None:
            try:
                await restore_domain(job, self.host, fd, path, config, paused)
            finally:
                os.close(fd)  # the job's, not the request's: a client may leave

        return await self._run(job, work, watch)

    async def on_migrate(
        self,
        name,
        address,
        policy,
        settings,
        verify,
        watch,
        postcopy,
        postcopy_after_precopy,
        resume,
        parallel_connections,
        postcopy_bandwidth,
    ) -> JobReport:
        if self.daemon.auth_key is None:
            raise ToolstackError("this daemon has no --auth-key to authenticate to the destination")
        if resume:
            return await self._resume(name, address, watch, postcopy_bandwidth)
        if postcopy_after_precopy and not postcopy:
            raise ToolstackError("postcopy_after_precopy needs postcopy (migrate --postcopy)")
        if verify and postcopy:
            # the digests compare all of RAM before the guest runs at the
            # destination; after a postcopy switch it runs there first
            raise ToolstackError(
                "--verify cannot check a postcopy migration: the guest runs at the destination "
                "before all of its RAM is there to compare (drop --verify or --postcopy)"
            )
        domain = self._idle_domain(name)
        steer = self.daemon.policies.make(policy, settings)  # a bad setting fails here, early
        if not postcopy and "fallback" in steer.SETTINGS and steer.fallback == "postcopy":
            # refused now rather than after max_iterations of precopy
            raise ToolstackError(
                "fallback postcopy needs a migration that may switch to postcopy (migrate "
                "--postcopy); without it, choose --fallback stop-and-copy or abort"
            )
        job = Job(JobStats("migrate", name, domain.config.memory_bytes), steer)
        job.own(domain)  # claimed before anything else can run: no second job gets it
        job.postcopy_allowed = postcopy
        job.postcopy_after_precopy = postcopy_after_precopy
        job.postcopy_bandwidth = postcopy_bandwidth
        job.connections = parallel_connections

        async def work(job: Job) -> None:
            await migrate_send(self.daemon.site, job, domain, address, verify)

        return await self._run(job, work, watch)

    async def _resume(self, name: str, address: str, watch: bool, bandwidth: float) -> JobReport:
        """Hand a paused postcopy migration a new link to `address`; a refusal
        (wrong key, wrong host) leaves it paused as it was."""
        job = self.daemon.jobs.get(name)
        if job is None or job.kind != "migrate" or job.pause_reason is None:
            raise ToolstackError(
                f"{name} has no paused postcopy migration here to resume (see `ferry job {name}`)"
            )
        try:
            link = await open_resume(self.daemon.site, job, address)
        except ToolstackError as exc:
            raise ToolstackError(
                f"{exc}; the migration stays paused here (`ferry job-control {name} abort` "
                f"keeps this copy as {name}{INCONSISTENT}, for inspection)"
            ) from None
        job.stats.peer = address
        if bandwidth:
            job.postcopy_bandwidth = bandwidth
        job.resume_with(link)
        return await self._wait(job, watch)

    async def _run(self, job: Job, work, watch: bool) -> JobReport:
        """Start the job in the daemon's nursery and wait for it."""
        self.daemon.start_job(job, work)
        return await self._wait(job, watch)

    async def _wait(self, job: Job, watch: bool) -> JobReport:
        """Until the job ends or pauses, with progress when watched."""
        while job.running and job.pause_reason is None:
            with trio.move_on_after(PROGRESS_INTERVAL):
                await job.done.wait()
            if watch and job.running:
                await self.channel.call(msgs.Progress(job=job.report()))
        if job.pause_reason is not None:
            raise ToolstackError(f"{job.stats.domain}: postcopy-paused: {job.pause_reason}")
        if job.error:
            raise ToolstackError(job.error)
        return job.report()

    async def on_job(self, name) -> JobReport:
        job = self.daemon.jobs.get(name)
        if job is None:
            raise ToolstackError(f"no job for domain {name!r}")
        return job.report()

    async def on_job_control(self, name, action, key, value) -> str:
        job = self.daemon.jobs.get(name)
        if job is None or not job.running:
            raise ToolstackError(f"no running job for domain {name!r}")
        message = job.control(action, key, value, self.daemon.policies.budget_ms)
        log.info("%s: job-control: %s", name, message)
        return message

    async def on_migrate_resolve(self, name, force) -> str:
        return await self.daemon.resolver.resolve(name, force)

    async def on_policies(self) -> list[PolicyInfo]:
        return [PolicyInfo.from_wire(p) for p in self.daemon.policies.describe()]


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ToolstackError(f"{path!r}: the daemon needs an absolute path")
    return path
