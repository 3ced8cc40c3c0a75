"""The policy RPC alone: the toolstack's real callbacks and policy answering
bench/rpc_helper.py, which does nothing but ask."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from toolstack.host import HelperCallbacks, JobStats, run_helper
from toolstack.host.stats import percentile
from toolstack.policies import ConvergePolicy


async def rpc_round_trips(count: int) -> dict:
    """p50 and p99 in µs of `count` precopy_policy calls, as the helper timed them."""
    domain = SimpleNamespace(name="rpc-bench", control_path="-")
    stats = JobStats("save", domain.name)
    callbacks = HelperCallbacks(domain, stats, ConvergePolicy())
    command = [sys.executable, "-m", "bench.rpc_helper", str(count)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        await run_helper("save", devnull, domain, callbacks, command=command)
    finally:
        os.close(devnull)
    samples = stats.policy_waits_us
    return {
        "p50_us": round(percentile(samples, 0.5), 1),
        "p99_us": round(percentile(samples, 0.99), 1),
        "share": stats.policy_share_of_precopy,
    }
