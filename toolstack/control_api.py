"""The daemon's control API: one method per operation the CLI asks for.

Requests are maps {"op": NAME, ...}; replies {"ok": true, ...} or
{"ok": false, "error": "one line"}.  Long jobs (save, restore, migrate) run
in the daemon's job nursery; with "watch" the reply is preceded by
{"progress": {...}} frames while the job runs.
"""

from __future__ import annotations

import logging
import os

import trio

from protocol import ProtocolError

from .domains import DomainConfig, ToolstackError
from .jobs import Job
from .migrate import migrate_send
from .policies import make_policy
from .savefile import restore_from_file, save_to_file
from .stats import JobStats
from .wire import field, send_frame

log = logging.getLogger("ferry.control")
PROGRESS_INTERVAL = 0.2  # s between progress frames of a watched job


class ControlApi:
    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.host = daemon.host

    async def handle(self, request: dict, stream) -> dict:
        try:
            op = field(request, "op", str)
            method = getattr(self, "op_" + op.replace("-", "_"), None)
            if method is None:
                raise ToolstackError(f"unknown operation {op!r}")
            return {"ok": True, **(await method(request, stream))}
        except (ToolstackError, ProtocolError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}

    # -- domains ----------------------------------------------------------
    async def op_ping(self, r, stream) -> dict:
        return {"state_dir": self.host.state_dir, "listen_port": self.daemon.listen_port}

    async def op_create(self, r, stream) -> dict:
        config = DomainConfig.from_json(field(r, "config", str))
        domain = await self.host.create(config, paused=field(r, "paused", bool, False))
        return {"domain": await self.host.info(domain)}

    async def op_list(self, r, stream) -> dict:
        domains = []
        for domain in list(self.host.domains.values()):
            try:
                domains.append(await self.host.info(domain))
            except ToolstackError:
                domains.append(
                    {
                        "name": domain.name,
                        "state": "unreachable",
                        "backend": domain.config.backend,
                        "memory_bytes": domain.config.memory_bytes,
                        "job": domain.busy,
                    }
                )
        return {"domains": domains}

    async def op_pause(self, r, stream) -> dict:
        await self._idle_domain(r).call("pause")
        return {}

    async def op_unpause(self, r, stream) -> dict:
        await self._idle_domain(r).call("unpause")
        return {}

    async def op_destroy(self, r, stream) -> dict:
        await self.host.destroy(self._idle_domain(r))
        return {}

    async def op_digest(self, r, stream) -> dict:
        return {"digest": await self._domain(r).call("digest")}

    async def op_guest_check(self, r, stream) -> dict:
        return {"guest_check": await self._domain(r).call("guest_check")}

    async def op_info(self, r, stream) -> dict:
        return {"domain": await self.host.info(self._domain(r))}

    def _domain(self, r):
        return self.host.get(field(r, "name", str))

    def _idle_domain(self, r):
        domain = self._domain(r)
        if domain.busy:
            raise ToolstackError(f"domain {domain.name} is busy with a {domain.busy} job")
        return domain

    # -- jobs ---------------------------------------------------------------
    async def op_save(self, r, stream) -> dict:
        domain = self._idle_domain(r)
        path = _absolute(field(r, "file", str))
        stats = JobStats("save", domain.name, domain.config.memory_bytes)
        policy = (
            make_policy(field(r, "policy", str, "xen")) if field(r, "live", bool, False) else None
        )

        async def work():
            await save_to_file(
                self.host,
                domain,
                path,
                live=field(r, "live", bool, False),
                keep=field(r, "keep", bool, False),
                policy=policy,
                stats=stats,
            )
            return stats.to_dict()

        return await self._run_job(domain, Job(stats, policy), work, r, stream)

    async def op_restore(self, r, stream) -> dict:
        path = _absolute(field(r, "file", str))
        stats = JobStats("restore", field(r, "name", str, "") or os.path.basename(path))

        async def work():
            domain = await restore_from_file(
                self.host,
                path,
                name=field(r, "name", str, None),
                paused=field(r, "paused", bool, False),
                stats=stats,
            )
            return {"domain": await self.host.info(domain), "job": stats.to_dict()}

        job = Job(stats)
        self.daemon.job_nursery.start_soon(job.run, work)
        return await self._await(job, r, stream)

    async def op_migrate(self, r, stream) -> dict:
        domain = self._idle_domain(r)
        address = field(r, "address", str)
        key = self._auth_key(r)
        settings = field(r, "settings", dict, {})
        policy = make_policy(field(r, "policy", str, "converge"), **settings)
        stats = JobStats("migrate", domain.name, domain.config.memory_bytes)

        async def work():
            return await migrate_send(
                self.host,
                domain,
                address,
                key,
                policy,
                stats,
                verify=field(r, "verify", bool, False),
            )

        return await self._run_job(domain, Job(stats, policy), work, r, stream)

    def _auth_key(self, r) -> bytes:
        key = self.daemon.auth_key
        if key is None:
            raise ToolstackError("this daemon has no --auth-key to authenticate to the destination")
        return key

    async def _run_job(self, domain, job: Job, work, r, stream) -> dict:
        domain.busy = job.stats.kind
        self.daemon.jobs[domain.name] = job

        async def guarded():
            try:
                return await work()
            finally:
                domain.busy = None

        self.daemon.job_nursery.start_soon(job.run, guarded)
        return await self._await(job, r, stream)

    async def _await(self, job: Job, r, stream) -> dict:
        """Wait for the job, sending progress frames when asked to watch it."""
        watch = field(r, "watch", bool, False)
        while not job.done.is_set():
            with trio.move_on_after(PROGRESS_INTERVAL):
                await job.done.wait()
            if watch and not job.done.is_set():
                await send_frame(stream, {"progress": job.stats.to_dict()})
        if job.error:
            raise ToolstackError(job.error)
        return {"report": job.result}

    async def op_job(self, r, stream) -> dict:
        name = field(r, "name", str)
        job = self.daemon.jobs.get(name)
        if job is None:
            raise ToolstackError(f"no job for domain {name!r}")
        return {
            "job": job.stats.to_dict(),
            "running": job.running,
            "settings": job.policy.settings() if job.policy else {},
            "policy": job.policy.name if job.policy else None,
        }

    async def op_job_control(self, r, stream) -> dict:
        name = field(r, "name", str)
        job = self.daemon.jobs.get(name)
        if job is None or not job.running:
            raise ToolstackError(f"no running job for domain {name!r}")
        message = job.control(
            field(r, "action", str), field(r, "key", str, None), field(r, "value", str, None)
        )
        log.info("%s: job-control: %s", name, message)
        return {"message": message}


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ToolstackError(f"{path!r}: the daemon needs an absolute path")
    return path
