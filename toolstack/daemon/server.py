"""ferryd: the toolstack daemon of one host.

Serves the control API (the `ferry` CLI) on a unix socket, accepts
authenticated incoming migrations on --listen, owns the host's domains and
runs their jobs, each in the job nursery.  SIGTERM/SIGINT: stop accepting,
fail running jobs safely (sources resumed), leave domains running, exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import trio

from hypervisor import uffd

from ..host import Host, Job
from ..host.domains import DEFAULT_MAX_OVERCOMMIT
from ..migration import Journal, Resolver, Site, parse_address, serve_migration
from ..policies import PolicyRegistry
from .control import ControlSession

log = logging.getLogger("ferry.daemon")


class Daemon:
    def __init__(
        self,
        state_dir: str,
        control: str | None = None,
        listen: str | None = None,
        auth_key: bytes | None = None,
        policies: PolicyRegistry | None = None,
        max_overcommit: float = DEFAULT_MAX_OVERCOMMIT,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.control_path = control or os.path.join(self.state_dir, "control.sock")
        self.listen = parse_address(listen) if listen else None
        self.auth_key = auth_key
        self.policies = policies or PolicyRegistry()
        self.host = Host(self.state_dir, max_overcommit)
        self.jobs: dict[str, Job] = {}  # domain name -> its latest job
        self.site = Site(
            self.host,
            Journal(self.state_dir),
            auth_key,
            self.jobs,
            self.policies.budget_ms,
            self.start_job,
        )
        self.resolver = self.site.resolver = Resolver(self.site)
        self.job_nursery: trio.Nursery | None = None
        self.listen_port: int | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        found = await self.host.reattach()
        if found:
            log.info("re-attached to running domains: %s", ", ".join(found))
        self.site.postcopy = await trio.to_thread.run_sync(uffd.usable)
        if not self.site.postcopy[0]:
            log.info("postcopy cannot be served here: %s", self.site.postcopy[1])
        control = self._control_listener()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signals, nursery.cancel_scope)
                nursery.start_soon(self.resolver.retry_forever)
                async with trio.open_nursery() as jobs:
                    self.job_nursery = jobs
                    # Before any domain is reported: settle what the journal says
                    # (a domain whose migration needs the peer's word stays in
                    # doubt, a paused postcopy becomes a paused job again).
                    await self.resolver.resolve_journal()
                    jobs.start_soon(trio.serve_listeners, self._control_connection, [control])
                    if self.listen:
                        host, port = self.listen
                        listeners = await trio.open_tcp_listeners(port, host=host)
                        self.listen_port = listeners[0].socket.getsockname()[1]
                        jobs.start_soon(trio.serve_listeners, self._migration_connection, listeners)
                        log.info("accepting migrations on %s:%d", host, self.listen_port)
                    log.info("ferryd serving %s", self.control_path)
                    task_status.started(self)
        finally:
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
            log.info(
                "ferryd stopped; domains left running: %s", ", ".join(self.host.domains) or "none"
            )

    def start_job(self, job: Job, work) -> None:
        """Run `work(job)` as a job of this daemon (registered, in the job nursery)."""
        self.job_nursery.start_soon(job.run, work, self.jobs)

    def _control_listener(self) -> trio.SocketListener:
        os.makedirs(os.path.dirname(self.control_path), exist_ok=True)
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock._sock.bind(self.control_path)  # bind is synchronous for a path
        os.chmod(self.control_path, 0o600)
        sock.listen(64)
        return trio.SocketListener(sock)

    async def _stop_on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "%s: stopping (running jobs fail safely, domains keep running)",
                    signal.Signals(signum).name,
                )
                scope.cancel()
                return

    # -- connections ------------------------------------------------------
    async def _control_connection(self, stream) -> None:
        async with stream:
            try:
                await ControlSession(self, stream).serve()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left (a watched job runs on without it)
            except Exception:
                # A bug in one request must not take the daemon down.
                log.exception("control request failed")

    async def _migration_connection(self, stream) -> None:
        if self.auth_key is None:  # pragma: no cover - --listen requires a key
            await stream.aclose()
            return
        try:
            await serve_migration(self.site, stream)
        except Exception:
            log.exception("incoming migration failed")
