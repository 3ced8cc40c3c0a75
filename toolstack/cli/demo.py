"""`ferry demo`: two hosts on loopback, a busy domain, a live migration.

Starts two ferryd daemons (two state dirs: two hosts), creates a domain that
dirties its memory on the first, live-migrates it to the second with the
integrity check on, checks the guest runs on at the destination, prints the
report, and ends everything it started, whatever happens.

`--postcopy`: the guest dirties more than the link can carry (a dirty rate
of 100,000 pages/s unless given), so the migration switches to postcopy
once the first pass is done (`--postcopy-after-precopy`); the guest runs at
the destination while its last pages follow.  RAM digests cannot be
compared then (the guest ran before its RAM was whole): the guest's own
check of its pages is the integrity check.
"""

from __future__ import annotations

import sys
import time

from protocol._gen_control_msgs import DemoReport, DomainConfig

from .commands import CliError, Command, emit_json, memory_size
from .daemon_client import DaemonError
from .jobs import progress_printer

DIRTY_RATE = 20_000  # pages/s: precopy converges over loopback
POSTCOPY_DIRTY_RATE = 100_000  # pages/s: it does not, within the default limit


def kvm_usable() -> bool:
    from hypervisor.kvm_api import kvm_usable as usable

    return usable()


class Demo(Command):
    name = "demo"
    help = "live-migrate a busy domain between two local daemons"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--backend", choices=["sim", "kvm", "auto"], default="auto")
        p.add_argument("--memory", default="1GiB")
        p.add_argument(
            "--dirty-rate",
            type=float,
            metavar="PAGES_PER_S",
            help=(f"default {DIRTY_RATE:g}, or {POSTCOPY_DIRTY_RATE:g} with --postcopy"),
        )
        p.add_argument("--working-set", type=float, default=0.25, metavar="FRACTION")
        p.add_argument("--policy", default="converge", help="precopy policy (default converge)")
        p.add_argument(
            "--downtime-limit", type=float, metavar="MS", help="the policy's downtime_limit"
        )
        p.add_argument(
            "--postcopy",
            action="store_true",
            help="switch to postcopy after the first pass (the guest outruns the link)",
        )
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        from ..harness import HarnessError, LocalHosts  # the harness imports the client

        memory = memory_size(args.memory)
        backend = args.backend
        if backend == "auto":
            backend = "kvm" if kvm_usable() else "sim"
        try:
            with LocalHosts(prefix="ferry-demo-") as hosts:
                report = run_demo(hosts, args, backend, memory)
        except (HarnessError, DaemonError) as exc:
            raise CliError(f"demo failed: {exc}") from None
        if args.json:
            emit_json(report)
        else:
            print_summary(report)
        return 0 if report.integrity == "ok" and report.guest_check == "ok" else 1


def run_demo(hosts, args, backend: str, memory: int) -> DemoReport:
    a = hosts.start("host-a", listen=False)
    b = hosts.start("host-b")
    dirty_rate = args.dirty_rate
    if dirty_rate is None:
        dirty_rate = POSTCOPY_DIRTY_RATE if args.postcopy else DIRTY_RATE
    config = DomainConfig(
        name="demo-vm",
        memory_bytes=memory,
        backend=backend,
        dirty_rate=dirty_rate,
        working_set=args.working_set,
        seed=42,
    )
    with a.client() as source:
        source.create(config=config)
    time.sleep(1.0)  # let the guest dirty its working set before migrating
    show = sys.stderr.isatty() and not args.json
    settings = {} if args.downtime_limit is None else {"downtime_limit": args.downtime_limit}
    with a.client(on_progress=progress_printer(args, show)) as source:
        try:
            job = source.migrate(
                name="demo-vm",
                address=b.address,
                policy=args.policy,
                settings=settings,
                verify=not args.postcopy,  # digests need RAM whole before the guest runs
                postcopy=args.postcopy,
                postcopy_after_precopy=args.postcopy,
                watch=True,
            )
        finally:
            if show:
                print(file=sys.stderr)
        remaining = [d.name for d in source.list()]
    with b.client() as destination:
        before = destination.info(name="demo-vm")
        time.sleep(0.5)
        after = destination.info(name="demo-vm")
        guest_check = destination.guest_check(name="demo-vm")
    total_s = job.elapsed_ms / 1000
    return DemoReport(
        backend=backend,
        memory_bytes=memory,
        policy=args.policy,
        settings=job.settings,
        iterations=job.iterations,
        pages_sent=job.pages_sent,
        bytes_sent=job.bytes_sent,
        total_ms=job.elapsed_ms,
        downtime_ms=job.downtime_ms,
        verify_ms=job.verify_ms,
        policy_rpcs=job.policy_rpcs,
        policy_rpc_p50_us=job.policy_rpc_p50_us,
        policy_rpc_p99_us=job.policy_rpc_p99_us,
        policy_wait_p50_us=job.policy_wait_p50_us,
        policy_wait_p99_us=job.policy_wait_p99_us,
        throughput_mb_s=round(job.bytes_sent / 1e6 / total_s, 1) if total_s else None,
        integrity=integrity(job, guest_check),
        decision=job.decision,
        source_gone="demo-vm" not in remaining,
        destination_state=after.state,
        destination_writes_advancing=(after.writes or 0) > (before.writes or 0),
        guest_check=guest_check,
        postcopy=job.postcopy,
    )


def integrity(job, guest_check: str) -> str:
    """The digests' verdict; after postcopy, the guest's own check of its pages."""
    if job.postcopy is not None:
        return "ok" if guest_check == "ok" else f"guest check: {guest_check}"
    return job.integrity or "mismatch"


def print_summary(r: DemoReport) -> None:
    settings = ", ".join(f"{k}={v}" for k, v in sorted(r.settings.items()))
    print(
        f"ferry demo: {r.memory_bytes >> 20} MiB {r.backend} domain, policy {r.policy} ({settings})"
    )
    for i, it in enumerate(r.iterations):
        final = "  (stop-and-copy, guest paused)" if it.final else ""
        print(f"  iteration {i:>2}: {it.pages:>8} pages{final}")
    print(f"  pages sent:      {r.pages_sent} ({r.bytes_sent / 1e6:.1f} MB)")
    print(f"  total time:      {r.total_ms:.0f} ms, {r.throughput_mb_s} MB/s")
    checked = "" if r.postcopy else f" (integrity check of {r.verify_ms or 0:.0f} ms excluded)"
    print(f"  downtime:        {r.downtime_ms:.1f} ms{checked}")
    if r.postcopy:
        pc = r.postcopy
        print(
            f"  postcopy:        {pc.pages} pages followed the guest: {pc.pushed} pushed, "
            f"{pc.requested} requested by its faults, in {pc.ms:.0f} ms"
        )
        print(f"  fault latency:   p50 {pc.fault_p50_us} us, p99 {pc.fault_p99_us} us")
    print(
        f"  policy RPCs:     {r.policy_rpcs} (round trip p50 {r.policy_rpc_p50_us} us, "
        f"p99 {r.policy_rpc_p99_us} us; helper blocked p50 {r.policy_wait_p50_us} us)"
    )
    print(f"  decision:        {r.decision}")
    how = (
        "(the guest's check of its pages: it ran before its RAM was whole)"
        if r.postcopy
        else "(source RAM digest at suspend == destination before unpause)"
    )
    print(f"  integrity:       {r.integrity} {how}")
    print(
        f"  destination:     {r.destination_state}, guest writing: "
        f"{r.destination_writes_advancing}, guest check: {r.guest_check}"
    )
    print(f"  source removed:  {r.source_gone}")
