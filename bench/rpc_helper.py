"""A stand-in save helper that only asks the policy, COUNT times.

    python -m bench.rpc_helper COUNT --save-domain --io-fd N --rpc-fd M ...

The toolstack runs it with `run_helper` like the real one and answers with
the real callbacks and policy, so the round trips measured are the policy
RPC's alone: no pages to send, nothing else on the CPUs.  Each call's
stats carry the wait so far, as the real helper's do, and the toolstack
turns them into round trips.
"""

from __future__ import annotations

import sys
import time

from helper.main import die_with_toolstack, parse_args, peak_rss, yield_to_the_toolstack
from helper.toolstack_link import ToolstackLink
from protocol._gen_helper_msgs import PrecopyStats

PAGES = 1 << 19  # a 2 GiB domain's worth of pfns


def main() -> None:
    count = int(sys.argv[1])
    args = parse_args(sys.argv[2:])
    die_with_toolstack(args.rpc_fd)
    yield_to_the_toolstack()  # as the real helper does
    link = ToolstackLink(args.rpc_fd)
    started = time.monotonic_ns()
    waited = 0
    for call in range(count):
        sent = (call + 1) * 1024
        stats = PrecopyStats(
            iteration=0,
            total_written=sent,
            dirty_count=-1,
            iter_written=sent,
            iter_remaining=max(0, PAGES - sent),
            iter_bytes=sent * 4104,
            total_bytes=sent * 4104,
            domain_pages=PAGES,
            time_ns=time.monotonic_ns(),
            stream_start_ns=started,
            policy_wait_ns=waited,
        )
        link.precopy_policy(stats)
        waited += time.monotonic_ns() - stats.time_ns
    link.complete(0, 0, "", peak_rss(), 0)


if __name__ == "__main__":
    main()
