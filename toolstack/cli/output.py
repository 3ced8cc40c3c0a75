"""Human-readable output: job reports (like domjobinfo), the progress line,
the policy list.  The JSON forms are the generated structs themselves."""

from __future__ import annotations

from protocol.limits import PAGE_SIZE

MB = 1e6


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _us(value) -> str:
    return "-" if value is None else f"{value:.0f} us"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}% of precopy"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _mb(value) -> str:
    return "-" if value is None else f"{value / MB:.1f} MB"


def progress_line(job) -> str:
    bw = job.bandwidth_mb_s
    total = job.memory_total_bytes // PAGE_SIZE or 1
    return (
        f"{job.phase:<16} iteration {job.iteration:>2}  pages {job.pages_sent:>9}/{total}"
        f"  {'-' if bw is None else f'{bw:.0f}':>6} MB/s"
        f"  expected downtime {_ms(job.expected_downtime_ms):>10}"
    )


def print_job(job) -> None:
    rows = [
        ("Job", f"{job.kind} of {job.domain}" + (f" ({job.peer})" if job.peer else "")),
        ("Phase", job.phase + ("" if job.running else " (ended)")),
        ("Iteration", job.iteration),
        ("Time elapsed", _ms(job.elapsed_ms)),
        ("Running after", _ms(job.running_after_ms)),
        ("Connections", "-" if job.connections is None else job.connections),
        ("Memory total", _mb(job.memory_total_bytes)),
        ("Memory processed", _mb(job.memory_processed_bytes)),
        ("Memory remaining", _mb(job.memory_remaining_bytes)),
        (
            "Dirty rate",
            "-" if job.dirty_rate_pages_s is None else f"{job.dirty_rate_pages_s:.0f} pages/s",
        ),
        ("Bandwidth", "-" if job.bandwidth_mb_s is None else f"{job.bandwidth_mb_s:.1f} MB/s"),
        ("Expected downtime", _ms(job.expected_downtime_ms)),
        ("Downtime", _ms(job.downtime_ms)),
        (
            "Policy RPCs",
            f"{job.policy_rpcs} (round trip p50 {_us(job.policy_rpc_p50_us)}, "
            f"p99 {_us(job.policy_rpc_p99_us)})",
        ),
        (
            "Policy wait",
            f"p50 {_us(job.policy_wait_p50_us)}, p99 {_us(job.policy_wait_p99_us)}, "
            f"{_share(job.policy_share_of_precopy)}",
        ),
        ("Helper peak RSS", _mib(job.helper_peak_rss_bytes)),
    ]
    if job.policy:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(job.settings.items()))
        rows.append(("Policy", f"{job.policy} ({settings})" if settings else job.policy))
    if job.decision:
        rows.append(("Decision", job.decision))
    if job.integrity:
        rows.append(("Integrity", job.integrity))
    if job.error:
        rows.append(("Error", job.error))
    if job.postcopy:
        pc = job.postcopy
        rows.append(
            (
                "Postcopy",
                f"{pc.pages} pages: {pc.pushed} pushed, {pc.requested} requested by faults, "
                f"{_mb(pc.bytes)} in {_ms(pc.ms)}",
            )
        )
        rows.append(("Fault latency", f"p50 {_us(pc.fault_p50_us)}, p99 {_us(pc.fault_p99_us)}"))
    for name, value in rows:
        print(f"{name + ':':<19} {value}")
    if job.iterations:
        print("Iterations:")
        for i, it in enumerate(job.iterations):
            final = "  (stop-and-copy)" if it.final else ""
            print(f"  {i:>3}: {it.pages:>9} pages {it.bytes / MB:>9.1f} MB{final}")


def print_policies(policies) -> None:
    for p in policies:
        print(f"{p.name}: {p.doc}  [{p.origin}; budget {p.budget_ms:g} ms per answer]")
        for s in p.settings:
            print(f"    {s.name} ({s.type}, default {s.default})")
