"""The `downtime_table` section of `ferry bench`: does converge keep its promise?

A sim domain (1 GiB; 256 MiB --quick) dirtying from 0 to 50,000 pages/s
migrates under `converge` with a 100 ms `downtime_limit`, every rate once
per run, the runs one after the other (so each migration starts from what
the previous ones measured on these hosts, as on a real host).  For each
migration: the decision (`converged`: the expected downtime fitted the
limit; `fallback`: converge gave up after max_iterations or its timeout),
the downtime it expected, the downtime measured (the source paused to the
guest running at the destination), their ratio, and whether a converged
migration stayed within the limit.

One row per rate, with the median of its runs and every run; the section's
`ratio_min`, `ratio_max` and `within_limit` are over all runs (issue 14:
ratio within 0.5-2, converged migrations within the limit).
"""

from __future__ import annotations

import statistics

from . import measure

LIMIT_MS = 100.0
RATES = [0.0, 5000.0, 10000.0, 20000.0, 30000.0, 50000.0]  # pages/s
QUICK_RATES = [0.0, 20000.0]


def bench_downtime_table(hosts, memory: int, rates: list[float], runs: int) -> dict:
    samples: dict[float, list[dict]] = {rate: [] for rate in rates}
    for run in range(runs):
        for index, rate in enumerate(rates):
            samples[rate].append(migration(hosts, f"dt{run}-{index}", memory, rate))
    rows = [row(rate, samples[rate]) for rate in rates]
    return {
        "memory_bytes": memory,
        "limit_ms": LIMIT_MS,
        "runs": runs,
        **summary([s for rate in rates for s in samples[rate]]),
        "rows": rows,
    }


def migration(hosts, name: str, memory: int, rate: float) -> dict:
    measure.create(hosts, measure.SOURCE, name, memory, dirty_rate=rate)
    measure.unpause(hosts, measure.SOURCE, name)
    settings = {"downtime_limit": LIMIT_MS}
    job = measure.migrate(hosts, name, "converge", settings).to_wire()
    measure.destroy(hosts, measure.DESTINATION, name)
    return sample(job, LIMIT_MS)


def sample(job: dict, limit_ms: float) -> dict:
    """One migration's line.  Converge stops on the expected downtime before
    it counts iterations or time, so a stop whose estimate fits the limit is
    a converged one, any other a fallback."""
    expected, measured = job["expected_downtime_ms"], job["downtime_ms"]
    converged = expected is not None and expected <= limit_ms
    final = job["iterations"][-1] if job["iterations"] else {}
    return {
        "decision": "converged" if converged else "fallback",
        "expected_ms": expected,
        "measured_ms": measured,
        "ratio": round(measured / expected, 3) if expected and measured is not None else None,
        "within_limit": measured is not None and measured <= limit_ms,
        "iterations": len(job["iterations"]),
        "final_pages": final.get("pages", 0) if final.get("final") else 0,
        "reason": job["decision"],
    }


def row(rate: float, runs: list[dict]) -> dict:
    decisions = {s["decision"] for s in runs}
    return {
        "dirty_pages_s": rate,
        "decision": decisions.pop() if len(decisions) == 1 else "mixed",
        "expected_ms": median(runs, "expected_ms"),
        "measured_ms": median(runs, "measured_ms"),
        "ratio": median(runs, "ratio"),
        **summary(runs),
        "samples": runs,
    }


def summary(runs: list[dict]) -> dict:
    """Over `runs`: the lowest and highest ratio, the longest downtime, and
    whether every converged migration stayed within the limit (None when
    none converged: nothing to judge)."""
    ratios = [s["ratio"] for s in runs if s["ratio"] is not None]
    converged = [s for s in runs if s["decision"] == "converged"]
    measured = [s["measured_ms"] for s in runs if s["measured_ms"] is not None]
    return {
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "measured_max_ms": max(measured) if measured else None,
        "converged": len(converged),
        "within_limit": all(s["within_limit"] for s in converged) if converged else None,
    }


def median(runs: list[dict], key: str) -> float | None:
    values = [s[key] for s in runs if s[key] is not None]
    return round(statistics.median(values), 3 if key == "ratio" else 1) if values else None


def table_rows(section: dict | None) -> list[tuple]:
    """`ferry bench`'s table: per rate, the median measured next to the
    median expected, and the median ratio (its range over the runs)."""
    if not section:
        return []
    rows = []
    for r in section["rows"]:
        spread = f"{r['ratio_min']}-{r['ratio_max']}" if r["ratio_min"] is not None else "-"
        measured = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.0f} ms"
        expected = "-" if r["expected_ms"] is None else f"{r['expected_ms']:.0f} ms"
        rows.append(
            (
                f"down {r['dirty_pages_s'] / 1000:g}k/s",
                f"{measured} {r['decision']}",
                f"{expected} expected ({spread})",
                r["ratio"] if r["ratio"] is not None else "-",
            )
        )
    return rows
