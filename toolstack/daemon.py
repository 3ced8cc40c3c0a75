"""ferryd: the toolstack daemon of one host.

    ferryd --state-dir DIR [--control SOCK] [--listen HOST:PORT] [--auth-key FILE]

Serves the control API (the `ferry` CLI) on a unix socket, accepts
authenticated incoming migrations on --listen, owns the host's domains and
runs their jobs, each in the job nursery.  SIGTERM/SIGINT: stop accepting,
fail running jobs safely (sources resumed), leave domains running, exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

import trio

from protocol import ProtocolError
from protocol.auth import MIN_KEY_SIZE

from .control_api import ControlApi
from .domains import Host
from .jobs import Job
from .migrate import migrate_receive, parse_address
from .sched import request_short_slice
from .stats import JobStats
from .wire import ConnectionLost, read_frame, send_frame

log = logging.getLogger("ferry.daemon")


class Daemon:
    def __init__(
        self,
        state_dir: str,
        control: str | None = None,
        listen: str | None = None,
        auth_key: bytes | None = None,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.control_path = control or os.path.join(self.state_dir, "control.sock")
        self.listen = parse_address(listen) if listen else None
        self.auth_key = auth_key
        self.host = Host(self.state_dir)
        self.api = ControlApi(self)
        self.jobs = {}  # domain name -> its latest Job
        self.job_nursery: trio.Nursery | None = None
        self.listen_port: int | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        found = await self.host.reattach()
        if found:
            log.info("re-attached to running domains: %s", ", ".join(found))
        control = self._control_listener()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signals, nursery.cancel_scope)
                async with trio.open_nursery() as jobs:
                    self.job_nursery = jobs
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
                await self._serve_client(stream)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left (a watched job runs on without it)
            except Exception:
                # A bug in one request must not take the daemon down.
                log.exception("control request failed")

    async def _serve_client(self, stream) -> None:
        while True:
            try:
                request = await read_frame(stream)
            except ConnectionLost:
                return
            except ProtocolError as exc:
                await _reply(stream, {"ok": False, "error": f"bad request: {exc}"})
                return
            reply = await self.api.handle(request, stream)
            if not await _reply(stream, reply):
                return

    async def _migration_connection(self, stream) -> None:
        jobs: list[Job] = []

        def on_job(stats: JobStats) -> None:
            job = Job(stats)
            self.jobs[stats.domain] = job
            jobs.append(job)

        async with stream:
            try:
                await migrate_receive(self.host, stream, self.auth_key, on_job=on_job)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                log.exception("incoming migration failed")
            finally:
                for job in jobs:
                    if job.stats.ended_ns is None:
                        job.stats.finish("cancelled", "the daemon stopped")
                    job.done.set()


async def _reply(stream, message: dict) -> bool:
    try:
        await send_frame(stream, message)
        return True
    except ConnectionLost:
        return False


def read_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"ferryd: cannot read auth key {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_SIZE:
        raise SystemExit(f"ferryd: auth key in {path} is shorter than {MIN_KEY_SIZE} octets")
    return key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ferryd", description="ferry toolstack daemon")
    p.add_argument("--state-dir", required=True, help="where domains and the control socket live")
    p.add_argument("--control", help="control socket (default: STATE_DIR/control.sock)")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="accept migrations here (needs --auth-key)"
    )
    p.add_argument("--auth-key", metavar="FILE", help="shared key for migration peers")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s ferryd %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.listen and not args.auth_key:
        print(
            "ferryd: --listen needs --auth-key: migrations are always authenticated",
            file=sys.stderr,
        )
        return 2
    key = read_key(args.auth_key) if args.auth_key else None
    request_short_slice()  # answer helpers promptly even when the CPUs are busy
    try:
        daemon = Daemon(args.state_dir, args.control, args.listen, key)
        trio.run(daemon.run)
    except OSError as exc:
        print(f"ferryd: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bad --listen, for one
        print(f"ferryd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
