"""ferry-save-helper: one save or restore per process, exec'd by the toolstack.

    ferry-save-helper --save-domain    --io-fd N --rpc-fd M --domain SOCK [--live]
    ferry-save-helper --restore-domain --io-fd N --rpc-fd M --domain SOCK

With --prestarted it loads, then asks the toolstack (`start`) before it
touches the domain or the stream: a migration starts it early.

Like Xen's libxl-save-helper: fds and settings on argv, every callback to
the toolstack through the generated stubs on the rpc fd, and a `complete`
message as the very last word (retval 0, or an errno and a one-line reason).
Exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys
import threading
import traceback

from hypervisor import RpcError, RunnerClient
from protocol import ProtocolError

from .fdio import FdReader, FdWriter, StreamClosed
from .postcopy import DestinationBrokeRules
from .restore import Restorer
from .save import SaveAborted, Saver
from .toolstack_link import LOG_ERROR, ToolstackLink

POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ferry-save-helper")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save-domain", action="store_true")
    mode.add_argument("--restore-domain", action="store_true")
    p.add_argument("--io-fd", type=int, required=True, help="the migration stream")
    p.add_argument("--rpc-fd", type=int, required=True, help="the socket to the toolstack")
    p.add_argument("--domain", required=True, help="the domain runner's control socket")
    p.add_argument("--live", action="store_true", help="precopy while the guest runs")
    p.add_argument(
        "--postcopy", action="store_true", help="save: the toolstack may switch to postcopy"
    )
    p.add_argument(
        "--postcopy-resume",
        action="store_true",
        help="go on with a postcopy whose link broke (the stream is a resumed one)",
    )
    p.add_argument(
        "--extra-fd",
        type=int,
        action="append",
        default=[],
        help="an extra connection of the migration (repeatable; shards.py)",
    )
    p.add_argument(
        "--postcopy-bandwidth",
        type=float,
        default=0.0,
        help="save: MB/s the postcopy push may use (faulted pages never wait); 0: unlimited",
    )
    p.add_argument(
        "--stream-offset", type=int, default=0, help="where the libxc stream starts (for errors)"
    )
    p.add_argument(
        "--prestarted",
        action="store_true",
        help="started ahead of the job: ask the toolstack (start) before touching anything",
    )
    return p.parse_args(argv)


def run(args, link: ToolstackLink) -> int:
    """The job; returns the pages a save sent as zeros, without data."""
    with RunnerClient(args.domain) as domain:
        if args.save_domain:
            job = Saver(
                domain,
                link,
                FdWriter(args.io_fd),
                live=args.live,
                postcopy=args.postcopy,
                extra_fds=args.extra_fd,
            )
            job.postcopy_bandwidth = args.postcopy_bandwidth * 1e6  # octets/s
            work = job.resume_postcopy if args.postcopy_resume else job.save
        else:
            job = Restorer(
                domain, link, FdReader(args.io_fd), args.stream_offset, extra_fds=args.extra_fd
            )
            work = job.resume_postcopy if args.postcopy_resume else job.restore
        try:
            work()
        finally:
            job.close()
        return job.progress.zero_pages if args.save_domain else 0


def die_with_toolstack(rpc_fd: int) -> None:
    """A helper whose toolstack died has nobody to answer it: end at once,
    which also closes the stream for the other host.

    Not PR_SET_PDEATHSIG: it fires when the *thread* that forked us exits,
    and trio forks from a worker thread that idles out after ~10 s, which
    killed every helper running longer.  Instead a watchdog thread waits
    for the toolstack's end of the rpc socket to close (POLLRDHUP; replies
    are not POLLIN-requested here, so they never wake it)."""

    def watch() -> None:
        poller = select.poll()
        poller.register(rpc_fd, POLLRDHUP)
        poller.poll()
        os._exit(1)

    threading.Thread(target=watch, name="toolstack-watchdog", daemon=True).start()


def main(argv=None) -> None:
    """Run one job and exit at once: the toolstack waits for this process to
    end, often inside a guest's downtime, and an interpreter's orderly
    teardown (numpy and all) costs tens of milliseconds that buy nothing."""
    code = run_job(parse_args(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def yield_to_the_toolstack() -> None:
    """The helper is throughput-bound; the toolstack answering its policy
    calls is latency-bound.  On two busy cores a toolstack that waits for a
    time slice stalls every batch, so the helper declares itself batch work
    (SCHED_BATCH) and lets the scheduler favour the toolstack's wake-ups."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def run_job(args) -> int:
    die_with_toolstack(args.rpc_fd)
    yield_to_the_toolstack()
    link = ToolstackLink(args.rpc_fd)
    context = "save" if args.save_domain else "restore"
    if args.prestarted and not may_start(link):
        return 1  # the job is off: nothing was touched, nobody waits for `complete`
    try:
        zero_pages = run(args, link)
    except SaveAborted as exc:
        return fail(link, context, errno.ECANCELED, str(exc))
    except ProtocolError as exc:
        # a restore reads the stream; a save reads RPC answers, and in postcopy
        # the destination's records too (faults, COMPLETE, the resume list)
        if isinstance(exc, DestinationBrokeRules):
            what = "the destination broke the postcopy stream's rules"
        elif args.restore_domain:
            what = "bad stream"
        else:
            what = "bad answer from the toolstack or domain"
        return fail(link, context, errno.EPROTO, f"{what}: {exc}")
    except StreamClosed as exc:
        return fail(link, context, errno.EPIPE, str(exc))
    except RpcError as exc:
        return fail(link, context, errno.EIO, f"domain or toolstack call failed: {exc}")
    except OSError as exc:
        return fail(link, context, exc.errno or errno.EIO, f"{exc.strerror or exc}")
    except Exception as exc:  # a bug here must still end the job with a reason
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"{type(exc).__name__}: {exc} ({os.path.basename(where.filename)}:{where.lineno})"
        return fail(link, context, errno.EIO, f"internal error in the helper: {detail}")
    try:
        link.complete(0, 0, "", peak_rss(), zero_pages)
    except (RpcError, OSError):
        return 1  # done, but nobody is left to hear it
    return 0


def may_start(link: ToolstackLink) -> bool:
    """A prestarted helper's `start`: False when ferryd says no, or went away
    meanwhile (its job failed first; the watchdog may be ending us too)."""
    try:
        return link.start()
    except (RpcError, OSError, ProtocolError):
        return False


def peak_rss() -> int:
    """This process's peak resident set in octets: VmHWM, the high-water
    mark of its own memory.  Not getrusage's ru_maxrss, which carries over
    the forking parent's peak across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown (no procfs)


def fail(link: ToolstackLink, context: str, errnoval: int, message: str) -> int:
    try:
        link.say(LOG_ERROR, context, message, errnoval)
        link.complete(-1, errnoval, message, peak_rss(), 0)
    except (RpcError, OSError, ProtocolError):
        pass  # the toolstack is gone (or the link was mid-call): nobody left to tell
    return 1


if __name__ == "__main__":
    main()
