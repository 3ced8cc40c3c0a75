"""`ferry bench`: ferry's speed as ratios to what this machine does without it.

Eight measurements, each next to its baseline from the same run:

    stream      live migration of an idle, filled domain between two daemons
                on loopback (MB/s of the helper's stream)   vs  raw_stream
    rpc         precopy_policy round trip, helper to the trio toolstack,
                p50/p99                                     vs  raw_ping_pong
                and the share of precopy the helper spent waiting for answers
    downtime    a domain dirtying 5,000 pages/s, converge policy, 300 ms limit
    downtime_table  converge with a 100 ms limit at dirty rates from 0 to
                50,000 pages/s, three runs: expected and measured downtime,
                their ratio, within the limit (bench/downtime_table.py)
    restore     a save file restored from the page cache    vs  raw_read
    helper_rss  the save helper's peak RSS saving a 4 GiB domain
    peers       a whole migration of an idle domain holding 2 GiB of random
                bytes, request to guest running at the destination (MB/s of
                guest RAM, downtime)                        vs  QEMU migrating
                as much random RAM between two local QEMUs, one connection
                and multifd on 2 channels (bench/qemu_peer.py); skipped
                where qemu-system-x86_64 is not installed; and filling as
                much fresh memory alone, memfd (ferry) and anonymous (QEMU):
                the floor under each destination
    postcopy    a guest dirtying 100,000 pages/s switches to postcopy: downtime,
                fault latency with the push running and on an idle link,
                the time to resume a cut link   vs  the same guest by precopy
                forced to stop and copy (bench/postcopy.py)

The JSON report goes to bench-report.json; the table (or, with --json, the
JSON) to stdout.  --quick uses small domains: a smoke test, not a report.
"""

from __future__ import annotations

import os

import trio

from toolstack.harness import HarnessError

from . import baselines, downtime_table, measure, postcopy, qemu_peer, settle
from .rpc_round_trips import rpc_round_trips

GiB = 1 << 30
MiB = 1 << 20

FULL = {
    "stream_bytes": 2 * GiB,
    "downtime_bytes": 1 * GiB,
    "downtime_table_bytes": 1 * GiB,
    "downtime_table_rates": downtime_table.RATES,
    "downtime_table_runs": 3,
    "restore_bytes": 2 * GiB,
    "rss_bytes": 4 * GiB,
    "peers_bytes": 2 * GiB,
    "postcopy_bytes": 1 * GiB,
    "postcopy_idle_bytes": 256 * MiB,
    "rpcs": 5000,
}
QUICK = {
    "stream_bytes": 256 * MiB,
    "downtime_bytes": 256 * MiB,
    "downtime_table_bytes": 256 * MiB,
    "downtime_table_rates": downtime_table.QUICK_RATES,
    "downtime_table_runs": 1,
    "restore_bytes": 256 * MiB,
    "rss_bytes": 512 * MiB,
    "peers_bytes": 256 * MiB,
    "postcopy_bytes": 256 * MiB,
    "postcopy_idle_bytes": 64 * MiB,
    "rpcs": 1000,
}
ROUNDS = 2  # a full run measures each throughput and latency this often
DIRTY_RATE = 5000.0  # pages/s for the downtime measurement
DOWNTIME_LIMIT = 300.0  # ms

# (section, key, comparison, target): what issue 7 asks of this 2-core machine,
# and issue 14 of ferry next to QEMU (its best MB/s over the faster variant's)
TARGETS = [
    ("stream", "ratio", ">=", 0.6),
    ("restore", "ratio", ">=", 0.6),
    ("rpc", "p50_us", "<=", 60.0),
    # issue 14 (stricter than issue 7's 3%): the round trip near a raw
    # socketpair's, and the helper blocked on answers at most 1% of precopy
    ("rpc", "p50_over_raw", "<=", 3.0),
    ("rpc", "share_of_precopy", "<=", 0.01),
    ("downtime", "ratio", "<=", 1.0),
    # issue 14: converge's estimate keeps its promise at every dirty rate, every run
    ("downtime_table", "ratio_min", ">=", 0.5),
    ("downtime_table", "ratio_max", "<=", 2.0),
    ("downtime_table", "within_limit", ">=", True),
    ("helper_rss", "peak_rss_bytes", "<=", 128 * MiB),
    ("peers", "ratio", ">=", 1.0),
    # issue 12: postcopy (medians of the rounds)
    ("postcopy", "downtime_ms", "<=", 100.0),
    ("postcopy", "fault_p50_us", "<=", 1000.0),
    ("postcopy", "fault_p99_us", "<=", 5000.0),
    ("postcopy", "idle_link_fault_p50_us", "<=", 250.0),
    ("postcopy", "exactly_once", ">=", True),
]
STRETCH = {"peers.ratio": 1.2}  # reported beside the target, like every target: never asserted


def run_bench(quick: bool) -> dict:
    """Throughputs and latencies are measured `rounds` times, ferry and its
    baseline alternating, and each side's best is compared: a first touch
    of fresh memory on this VM, or a noisy neighbour, then weighs on
    neither side alone.  Every sample is in the report."""
    sizes = QUICK if quick else FULL
    rounds = 1 if quick else ROUNDS
    report: dict = {"machine": {"cpus": os.cpu_count()}, "quick": quick, "rounds": rounds}
    with measure.start_hosts() as hosts:
        report["stream"], migration = bench_stream(hosts, sizes["stream_bytes"], rounds)
        report["rpc"] = bench_rpc(sizes["rpcs"], migration, rounds)
        report["downtime"] = bench_downtime(hosts, sizes["downtime_bytes"])
        report["downtime_table"] = downtime_table.bench_downtime_table(
            hosts,
            sizes["downtime_table_bytes"],
            sizes["downtime_table_rates"],
            sizes["downtime_table_runs"],
        )
        report["restore"] = bench_restore(hosts, sizes["restore_bytes"], rounds)
        report["helper_rss"] = bench_helper_rss(hosts, sizes["rss_bytes"])
        report["postcopy"] = postcopy.bench_postcopy(
            hosts, sizes["postcopy_bytes"], sizes["postcopy_idle_bytes"], rounds
        )
        # quick: the tests' run, which judges shapes, not speeds, and has no time to settle
        settle_first = None if quick else settle.settle_free_memory
        report["peers"] = bench_peers(hosts, sizes["peers_bytes"], rounds, settle_first)
    report["targets"] = check_targets(report)
    return report


def stream_migration(hosts, name: str, memory: int) -> dict:
    measure.create(hosts, measure.SOURCE, name, memory)
    measure.fill(hosts, measure.SOURCE, name)
    migration = measure.migrate(hosts, name, "converge", {}).to_wire()
    measure.destroy(hosts, measure.DESTINATION, name)
    migration["mb_s"] = migration["bytes_sent"] / 1e3 / migration["stream_ms"]
    return migration


def bench_stream(hosts, memory: int, rounds: int) -> tuple[dict, dict]:
    """Returns the section and the fastest migration's report."""
    migrations, raws = [], []
    for index in range(rounds):
        migrations.append(stream_migration(hosts, f"stream{index}", memory))
        raws.append(baselines.raw_stream(migrations[-1]["bytes_sent"]))
    best = max(migrations, key=lambda m: m["mb_s"])
    raw = max(raws)
    return {
        "guest_bytes": memory,
        "bytes": best["bytes_sent"],
        "ferry_mb_s": round(best["mb_s"], 1),
        "raw_mb_s": round(raw, 1),
        "ratio": round(best["mb_s"] / raw, 3),
        "job_mb_s": round(best["bytes_sent"] / 1e3 / best["elapsed_ms"], 1),
        "downtime_ms": best["downtime_ms"],
        "ferry_samples_mb_s": [round(m["mb_s"], 1) for m in migrations],
        "raw_samples_mb_s": [round(r, 1) for r in raws],
    }, best


def bench_rpc(count: int, migration: dict, rounds: int) -> dict:
    """The round trip alone (best p50 of `rounds`), and during the fastest
    stream migration, where the toolstack sleeps through each batch and must
    be woken for every call: the raw ping-pong after as long a busy spell
    shows what that costs without ferry."""
    alone, raw = [], []
    for _ in range(rounds):
        alone.append(trio.run(rpc_round_trips, count))
        raw.append(baselines.raw_ping_pong(count))
    best = min(alone, key=lambda r: r["p50_us"])
    best_raw = min(raw, key=lambda r: r["p50_us"])
    batch_us = migration["stream_ms"] * 1000 / migration["policy_rpcs"]
    raw_after_batch = baselines.raw_ping_pong(min(count, 300), busy_us=batch_us)
    return {
        "p50_us": best["p50_us"],
        "p99_us": best["p99_us"],
        "raw_p50_us": best_raw["p50_us"],
        "p50_over_raw": round(best["p50_us"] / best_raw["p50_us"], 2)
        if best_raw["p50_us"]
        else None,
        "raw_p99_us": best_raw["p99_us"],
        "share_of_precopy": migration["policy_share_of_precopy"],
        "in_migration_wait_p50_us": migration["policy_wait_p50_us"],
        "in_migration_wait_p99_us": migration["policy_wait_p99_us"],
        "batch_us": round(batch_us, 1),
        "raw_p50_after_batch_us": raw_after_batch["p50_us"],
        "raw_share_of_precopy": round(raw_after_batch["p50_us"] / batch_us, 4),
        "calls": count,
        "p50_samples_us": [r["p50_us"] for r in alone],
        "raw_p50_samples_us": [r["p50_us"] for r in raw],
    }


def bench_downtime(hosts, memory: int) -> dict:
    measure.create(hosts, measure.SOURCE, "busy", memory, dirty_rate=DIRTY_RATE)
    measure.unpause(hosts, measure.SOURCE, "busy")
    settings = {"downtime_limit": DOWNTIME_LIMIT}
    migration = measure.migrate(hosts, "busy", "converge", settings).to_wire()
    measure.destroy(hosts, measure.DESTINATION, "busy")
    return {
        "dirty_pages_s": DIRTY_RATE,
        "limit_ms": DOWNTIME_LIMIT,
        "measured_ms": migration["downtime_ms"],
        "ratio": round(migration["downtime_ms"] / DOWNTIME_LIMIT, 3),
        "expected_ms": migration["expected_downtime_ms"],
        "iterations": len(migration["iterations"]),
    }


def bench_restore(hosts, memory: int, rounds: int) -> dict:
    path = os.path.join(hosts.root, "restore.save")
    measure.create(hosts, measure.SOURCE, "saved", memory)
    measure.fill(hosts, measure.SOURCE, "saved")
    measure.save(hosts, measure.SOURCE, "saved", path)
    restores, raws = [], []
    try:
        size = os.path.getsize(path)
        for _ in range(rounds):
            raws.append(baselines.raw_read(path))  # the first also fills the page cache
            job, wall_s = measure.restore(hosts, measure.SOURCE, path, "restored")
            measure.destroy(hosts, measure.SOURCE, "restored")
            restores.append((size / 1e3 / job.stream_ms, size / 1e6 / wall_s))
    finally:
        os.unlink(path)
    ferry, command = max(restores)
    raw = max(raws)
    return {
        "file_bytes": size,
        "ferry_mb_s": round(ferry, 1),
        "raw_mb_s": round(raw, 1),
        "ratio": round(ferry / raw, 3),
        "command_mb_s": round(command, 1),
        "ferry_samples_mb_s": [round(r[0], 1) for r in restores],
        "raw_samples_mb_s": [round(r, 1) for r in raws],
    }


def bench_helper_rss(hosts, memory: int) -> dict:
    path = os.path.join(hosts.root, "rss.save")
    measure.create(hosts, measure.SOURCE, "large", memory)
    measure.fill(hosts, measure.SOURCE, "large")
    try:
        job = measure.save(hosts, measure.SOURCE, "large", path).to_wire()
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {
        "guest_bytes": memory,
        "peak_rss_bytes": job["helper_peak_rss_bytes"],
        "ratio": round(job["helper_peak_rss_bytes"] / memory, 4),
    }


def peers_migration(hosts, name: str, memory: int, ram_file: str, settle_first=None) -> dict:
    """ferry's whole job as QEMU's is timed: from the migrate request to the
    guest running at the destination (`running_after_ms`).  `job_seconds`
    also counts the source's copy destroyed, which ends ferry's job.
    `settle_first` waits, once the source is filled, before the request."""
    measure.create(hosts, measure.SOURCE, name, memory)
    measure.fill_from(hosts, measure.SOURCE, name, ram_file)
    settled = settle_first() if settle_first else 0.0
    job = measure.migrate(hosts, name, "converge", {}).to_wire()
    state = measure.state(hosts, measure.DESTINATION, name)
    measure.destroy(hosts, measure.DESTINATION, name)
    if state != "running":
        raise HarnessError(f"{name} is {state} at the destination after its migration")
    seconds = job["running_after_ms"] / 1e3
    return {
        "memory_bytes": memory,
        "seconds": round(seconds, 3),
        "job_seconds": round(job["elapsed_ms"] / 1e3, 3),
        "mb_s": round(memory / 1e6 / seconds, 1),
        "downtime_ms": job["downtime_ms"],
        "bytes_sent": job["bytes_sent"],
        "stream_mb_s": round(job["bytes_sent"] / 1e3 / job["stream_ms"], 1),
        "iterations": len(job["iterations"]),
        "settled_s": settled,
    }


def bench_peers(hosts, memory: int, rounds: int, settle_first=None) -> dict:
    """ferry and QEMU migrating as much random RAM, rounds interleaved:
    ferry, QEMU one connection, QEMU multifd-2, and again.  Both guests hold
    the same file of random bytes (made once, in the hosts' root).
    `settle_first` (settle.py) runs before each timed migration, both sides'."""
    names = iter(range(rounds))

    def ferry_round() -> dict:
        ram_file = qemu_peer.random_ram_file(hosts.root, memory)
        return peers_migration(hosts, f"peer{next(names)}", memory, ram_file, settle_first)

    section = qemu_peer.peers_section(memory, rounds, hosts.root, ferry_round, settle_first)
    if "skipped" not in section:  # beside QEMU's figures: what each destination's memory costs
        section["destination_memory"] = destination_memory(memory, rounds, settle_first)
    return section


def destination_memory(memory: int, rounds: int, settle_first=None) -> dict:
    """What filling as much fresh memory costs each design here, alone (best
    of `rounds`): ferry's destination writes guest RAM into a memfd (shmem),
    QEMU's receives into anonymous memory.  A migration cannot be faster
    than its destination's memory fills."""
    fills = {kind: [] for kind in ("memfd", "anonymous")}
    for _ in range(rounds):
        for kind, samples in fills.items():
            if settle_first:
                settle_first()
            samples.append(round(baselines.memory_fill(memory, kind), 1))
    return {
        "bytes": memory,
        "huge_pages": baselines.huge_pages("enabled"),
        "shmem_huge_pages": baselines.huge_pages("shmem_enabled"),
        "memfd_mb_s": max(fills["memfd"]),
        "anonymous_mb_s": max(fills["anonymous"]),
        "memfd_samples_mb_s": fills["memfd"],
        "anonymous_samples_mb_s": fills["anonymous"],
    }


def check_targets(report: dict) -> list[dict]:
    """Each target's value and whether it is met: not measured is not met,
    but a section that was skipped or failed (the QEMU peer) is not judged
    (met: null, and why).  A section the report lacks has no row."""
    results = []
    for section, key, comparison, target in TARGETS:
        if section not in report:
            continue
        part = report[section]
        value = part.get(key)
        measure_name = f"{section}.{key}"
        row = {"measure": measure_name, "value": value, "target": f"{comparison} {target}"}
        why = part.get("skipped") or part.get("failed")
        row["met"] = None if why else judge(value, comparison, target)
        if why:
            row["why"] = why
        if measure_name in STRETCH:
            stretch = STRETCH[measure_name]
            row["stretch"] = f"{comparison} {stretch}"
            row["stretch_met"] = None if why else judge(value, comparison, stretch)
        results.append(row)
    return results


def judge(value, comparison: str, target: float) -> bool:
    return value is not None and (value >= target if comparison == ">=" else value <= target)


def print_table(report: dict) -> None:
    s, r, d, rs, m = (report[k] for k in ("stream", "rpc", "downtime", "restore", "helper_rss"))
    rows = [
        ("stream", f"{s['ferry_mb_s']:.0f} MB/s", f"{s['raw_mb_s']:.0f} MB/s raw TCP", s["ratio"]),
        (
            "policy RPC p50",
            f"{r['p50_us']:.0f} us",
            f"{r['raw_p50_us']:.0f} us socketpair",
            round(r["p50_us"] / r["raw_p50_us"], 2),
        ),
        (
            "policy RPC p99",
            f"{r['p99_us']:.0f} us",
            f"{r['raw_p99_us']:.0f} us socketpair",
            round(r["p99_us"] / r["raw_p99_us"], 2),
        ),
        (
            "policy wait",
            f"{100 * r['share_of_precopy']:.1f}% of precopy",
            f"{100 * r['raw_share_of_precopy']:.1f}% raw, same gaps",
            round(r["share_of_precopy"] / r["raw_share_of_precopy"], 2),
        ),
        ("downtime", f"{d['measured_ms']:.0f} ms", f"{d['limit_ms']:.0f} ms limit", d["ratio"]),
        (
            "restore",
            f"{rs['ferry_mb_s']:.0f} MB/s",
            f"{rs['raw_mb_s']:.0f} MB/s raw read",
            rs["ratio"],
        ),
        (
            "helper peak RSS",
            f"{m['peak_rss_bytes'] / MiB:.0f} MiB",
            f"{m['guest_bytes'] / GiB:g} GiB guest",
            m["ratio"],
        ),
    ]
    rows.extend(downtime_table.table_rows(report.get("downtime_table")))
    rows.extend(postcopy_rows(report.get("postcopy")))
    rows.extend(peer_rows(report.get("peers", {})))
    print(f"{'':<16} {'ferry':>20} {'baseline':>26} {'ratio':>7}")
    for name, ours, base, ratio in rows:
        print(f"{name:<16} {ours:>20} {base:>26} {ratio!s:>7}")
    print()
    for t in report["targets"]:
        verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        line = f"{verdict} {t['measure']:<26} {t['value']!s:>12} (target {t['target']}"
        if "stretch" in t:
            line += f"; stretch {t['stretch']}{', met' if t['stretch_met'] else ''}"
        print(line + (f"): {t['why']}" if "why" in t else ")"))


def postcopy_rows(pc: dict | None) -> list[tuple]:
    if not pc:
        return []
    ratio = pc["downtime_ms"] / pc["precopy_downtime_ms"] if pc["precopy_downtime_ms"] else None
    return [
        (
            "postcopy down",
            f"{pc['downtime_ms']:.0f} ms",
            f"{pc['precopy_downtime_ms']:.0f} ms stop-and-copy",
            round(ratio, 3) if ratio is not None else "-",
        ),
        (
            "postcopy total",
            f"{pc['total_ms']:.0f} ms",
            f"{pc['precopy_total_ms']:.0f} ms precopy",
            round(pc["total_ms"] / pc["precopy_total_ms"], 3),
        ),
        ("fault p50/p99", f"{pc['fault_p50_us']:.0f}/{pc['fault_p99_us']:.0f} us", "push on", "-"),
        (
            "fault idle p50",
            f"{pc['idle_link_fault_p50_us']:.0f} us",
            f"push {postcopy.IDLE_PUSH_MB_S:g} MB/s",
            "-",
        ),
        ("resume", f"{pc['resume_to_complete_ms']:.0f} ms", "to complete", "-"),
    ]


def peer_rows(peers: dict) -> list[tuple]:
    """ferry's best next to the faster QEMU variant's (none without QEMU
    figures: the targets below say why)."""
    if "ratio" not in peers:
        return []
    ferry, qemu = peers["ferry"], peers[peers["ratio_to"]]
    name = peers["ratio_to"].replace("_", "-")
    downtime = ferry["best_downtime_ms"], qemu["best_downtime_ms"]
    return [
        (
            "vs QEMU",
            f"{ferry['best_mb_s']:.0f} MB/s",
            f"{qemu['best_mb_s']:.0f} MB/s QEMU {name}",
            peers["ratio"],
        ),
        (
            "downtime vs QEMU",
            f"{downtime[0]:.0f} ms",
            f"{downtime[1]:.0f} ms QEMU {name}",
            round(downtime[0] / downtime[1], 2) if all(downtime) else "",
        ),
    ]
