"""`ferry bench` runs here (toolstack/cli/bench.py declares its flags);
the measuring is in bench/report.py."""

from __future__ import annotations

import json

from toolstack.cli.commands import CliError
from toolstack.cli.daemon_client import DaemonError
from toolstack.harness import HarnessError


def run(args) -> int:
    from .report import print_table, run_bench  # trio, numpy: only when asked

    try:
        report = run_bench(args.quick)
    except (DaemonError, HarnessError) as exc:
        raise CliError(f"bench failed: {exc}") from None
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0
