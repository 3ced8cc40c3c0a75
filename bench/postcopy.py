"""The `postcopy` section of `ferry bench`: a guest that outruns the link.

    switch      a domain dirtying 100,000 pages/s (1 GiB; 256 MiB --quick)
                switches to postcopy after the first pass: downtime (source
                suspended to guest running at the destination), fault
                latency while the background push runs, the whole job, and
                each postcopy pfn sent once (pushed + requested = the set)
    precopy     the same guest by precopy alone, converge with a 50 ms
                limit: it cannot converge, and falls back to stop-and-copy
                after max_iterations: its downtime and whole job
    idle_link   fault latency with the push capped at IDLE_PUSH_MB_S, so the
                link is idle almost always: the cost of one fault alone
    resume      a postcopy whose link is cut (the fault proxy) pauses; the
                time from `migrate --resume` to the migration complete

Each is measured `rounds` times; the report keeps every sample and judges
the median.
"""

from __future__ import annotations

import statistics
import threading
import time

from toolstack.cli import DaemonError
from toolstack.harness import FaultProxy, HarnessError

from . import measure

MiB = 1 << 20
DIRTY_RATE = 100_000.0  # pages/s: far more than precopy can carry within 50 ms
PRECOPY_LIMIT_MS = 50.0
PRECOPY_ITERATIONS = 5  # converge gives up after these and stops and copies
IDLE_PUSH_MB_S = 4.0
IDLE_DIRTY_RATE = 20_000.0
RESUME_PUSH_MB_S = 8.0  # slow enough that the cut comes before the push is done
WAIT = 60.0  # s for a job to reach a phase


def bench_postcopy(hosts, memory: int, idle_memory: int, rounds: int) -> dict:
    switches = [switch(hosts, f"pc{i}", memory) for i in range(rounds)]
    precopies = [precopy(hosts, f"pre{i}", memory) for i in range(rounds)]
    idles = [idle_link(hosts, f"idle{i}", idle_memory) for i in range(rounds)]
    resumes = [resume(hosts, f"res{i}", idle_memory) for i in range(rounds)]
    return {
        "memory_bytes": memory,
        "dirty_pages_s": DIRTY_RATE,
        "downtime_ms": median(switches, "downtime_ms"),
        "fault_p50_us": median(switches, "fault_p50_us"),
        "fault_p99_us": median(switches, "fault_p99_us"),
        "total_ms": median(switches, "total_ms"),
        "exactly_once": all(s["pushed"] + s["requested"] == s["pages"] for s in switches),
        "precopy_downtime_ms": median(precopies, "downtime_ms"),
        "precopy_total_ms": median(precopies, "total_ms"),
        "idle_link_fault_p50_us": median(idles, "fault_p50_us"),
        "idle_link_fault_p99_us": median(idles, "fault_p99_us"),
        "resume_to_complete_ms": median(resumes, "resume_to_complete_ms"),
        "switch_samples": switches,
        "precopy_samples": precopies,
        "idle_link_samples": idles,
        "resume_samples": resumes,
    }


def median(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def switch(hosts, name: str, memory: int) -> dict:
    """Postcopy after the first pass, the push at full speed."""
    running(hosts, name, memory, DIRTY_RATE)
    job = migrate(hosts, name, postcopy=True, postcopy_after_precopy=True)
    check_at_destination(hosts, name)
    pc = job["postcopy"]
    return {
        "downtime_ms": job["downtime_ms"],
        "total_ms": job["elapsed_ms"],
        "pages": pc["pages"],
        "pushed": pc["pushed"],
        "requested": pc["requested"],
        "postcopy_ms": pc["ms"],
        "fault_p50_us": pc["fault_p50_us"],
        "fault_p99_us": pc["fault_p99_us"],
        "fault_histogram": pc["fault_histogram"],
    }


def precopy(hosts, name: str, memory: int) -> dict:
    """The same guest by precopy alone: converge gives up and stops and copies."""
    running(hosts, name, memory, DIRTY_RATE)
    settings = {"downtime_limit": PRECOPY_LIMIT_MS, "max_iterations": PRECOPY_ITERATIONS}
    job = migrate(hosts, name, settings=settings)
    check_at_destination(hosts, name)
    return {
        "downtime_ms": job["downtime_ms"],
        "total_ms": job["elapsed_ms"],
        "expected_downtime_ms": job["expected_downtime_ms"],
        "iterations": len(job["iterations"]),
        "decision": job["decision"],
    }


def idle_link(hosts, name: str, memory: int) -> dict:
    """Faults with the push capped: what one fault costs on an idle link."""
    running(hosts, name, memory, IDLE_DIRTY_RATE)
    job = migrate(
        hosts, name, postcopy=True, postcopy_after_precopy=True, postcopy_bandwidth=IDLE_PUSH_MB_S
    )
    check_at_destination(hosts, name)
    pc = job["postcopy"]
    return {
        "push_mb_s": IDLE_PUSH_MB_S,
        "requested": pc["requested"],
        "fault_p50_us": pc["fault_p50_us"],
        "fault_p99_us": pc["fault_p99_us"],
    }


def resume(hosts, name: str, memory: int) -> dict:
    """Cut the link during postcopy, then `migrate --resume` straight to the
    destination: the time from that request to the migration complete."""
    running(hosts, name, memory, IDLE_DIRTY_RATE)
    source, destination = hosts.daemons[measure.SOURCE], hosts.daemons[measure.DESTINATION]
    with FaultProxy("127.0.0.1", destination.port) as proxy:
        outcome: dict = {}

        def first_attempt() -> None:
            try:
                with source.client() as a:
                    a.migrate(
                        name=name,
                        address=f"127.0.0.1:{proxy.port}",
                        postcopy=True,
                        postcopy_after_precopy=True,
                        postcopy_bandwidth=RESUME_PUSH_MB_S,
                    )
            except DaemonError as exc:
                outcome["error"] = str(exc)

        thread = threading.Thread(target=first_attempt)
        thread.start()
        try:
            wait_for_phase(source, name, "postcopy")
            proxy.cut()
            wait_for_phase(source, name, "postcopy-paused")
        finally:
            thread.join(WAIT)
    if "postcopy-paused" not in outcome.get("error", ""):
        raise HarnessError(f"{name}: the cut link did not pause postcopy: {outcome}")
    started = time.monotonic()
    with source.client() as a:
        job = a.migrate(
            name=name, address=destination.address, resume=True, postcopy_bandwidth=1e6
        ).to_wire()
    resumed_ms = (time.monotonic() - started) * 1000
    check_at_destination(hosts, name)
    return {
        "resume_to_complete_ms": round(resumed_ms, 1),
        "pages": job["postcopy"]["pages"],
        "requested": job["postcopy"]["requested"],
    }


# -- the scene ---------------------------------------------------------------------------
def running(hosts, name: str, memory: int, dirty_rate: float) -> None:
    """A running domain that has dirtied its RAM for a second."""
    measure.create(hosts, measure.SOURCE, name, memory, dirty_rate=dirty_rate)
    measure.unpause(hosts, measure.SOURCE, name)
    time.sleep(1.0)


def migrate(hosts, name: str, settings: dict | None = None, **flags) -> dict:
    address = hosts.daemons[measure.DESTINATION].address
    with hosts.daemons[measure.SOURCE].client() as a:
        job = a.migrate(name=name, address=address, settings=settings or {}, **flags)
    return job.to_wire()


def check_at_destination(hosts, name: str) -> None:
    """The guest runs at the destination and its own check passes; then it goes."""
    with hosts.daemons[measure.DESTINATION].client() as b:
        state, check = b.info(name=name).state, b.guest_check(name=name)
        b.destroy(name=name)
    if state != "running" or check != "ok":
        raise HarnessError(f"{name} after postcopy: {state}, guest check {check!r}")


def wait_for_phase(daemon, name: str, phase: str) -> None:
    deadline = time.monotonic() + WAIT
    with daemon.client() as a:
        while True:
            try:
                if a.job(name=name).phase == phase:
                    return
            except DaemonError:
                pass  # no job yet
            if time.monotonic() > deadline:
                raise HarnessError(f"{name}: its migration never reached {phase}")
            time.sleep(0.02)
