"""Human-readable job reports and the progress line."""

from __future__ import annotations

MB = 1e6


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}% of precopy"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def progress_line(p: dict) -> str:
    bw = p.get("bandwidth_mb_s")
    exp = p.get("expected_downtime_ms")
    total = p["memory_total"] // 4096 or 1
    return (
        f"{p['phase']:<16} iteration {p['iteration']:>2}  pages {p['pages_sent']:>9}/{total}"
        f"  {'-' if bw is None else f'{bw:.0f}':>6} MB/s  expected downtime {_ms(exp):>10}"
    )


def print_job(job: dict, policy: str | None = None, settings: dict | None = None) -> None:
    rows = [
        ("Job", f"{job['kind']} of {job['domain']}"),
        ("Phase", job["phase"]),
        ("Iteration", job["iteration"]),
        ("Time elapsed", _ms(job["elapsed_ms"])),
        ("Memory total", f"{job['memory_total'] / MB:.1f} MB"),
        ("Memory processed", f"{job['memory_processed'] / MB:.1f} MB"),
        (
            "Memory remaining",
            "-" if job["memory_remaining"] is None else f"{job['memory_remaining'] / MB:.1f} MB",
        ),
        (
            "Dirty rate",
            "-"
            if job["dirty_rate_pages_s"] is None
            else f"{job['dirty_rate_pages_s']:.0f} pages/s",
        ),
        (
            "Bandwidth",
            "-" if job["bandwidth_mb_s"] is None else f"{job['bandwidth_mb_s']:.1f} MB/s",
        ),
        ("Expected downtime", _ms(job["expected_downtime_ms"])),
        ("Downtime", _ms(job["downtime_ms"])),
        (
            "Policy RPCs",
            f"{job['policy_rpcs']} (wait p50 {job['policy_wait_p50_us']} us, p99 {job['policy_wait_p99_us']} us)",
        ),
        ("Policy wait", _share(job.get("policy_share_of_precopy"))),
        ("Helper peak RSS", _mib(job.get("helper_peak_rss"))),
    ]
    if policy:
        rows.append(("Policy", f"{policy} {settings or ''}"))
    if job.get("decision"):
        rows.append(("Decision", job["decision"]))
    if job.get("integrity"):
        rows.append(("Integrity", job["integrity"]))
    if job.get("error"):
        rows.append(("Error", job["error"]))
    for name, value in rows:
        print(f"{name + ':':<19} {value}")
    if job.get("iterations"):
        print("Iterations:")
        for i, it in enumerate(job["iterations"]):
            final = "  (stop-and-copy)" if it.get("final") else ""
            print(f"  {i:>3}: {it['pages']:>9} pages {it['bytes'] / MB:>9.1f} MB{final}")
