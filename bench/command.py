"""The `ferry bench` subcommand; the measuring is in bench/report.py."""

from __future__ import annotations

import json

from toolstack.cli_commands import CliError, Command
from toolstack.client import DaemonError
from toolstack.demo import DemoError

REPORT_FILE = "bench-report.json"


class Bench(Command):
    name = "bench"
    help = "measure ferry against this machine's raw limits (writes bench-report.json)"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--json", action="store_true", help="print the JSON report, not the table")
        p.add_argument("--quick", action="store_true", help="small domains: under a minute")
        p.add_argument("--output", default=REPORT_FILE, help=f"where the JSON goes ({REPORT_FILE})")

    @staticmethod
    def run(args) -> int:
        from .report import print_table, run_bench  # trio, numpy: only when asked

        try:
            report = run_bench(args.quick)
        except (DaemonError, DemoError) as exc:
            raise CliError(f"bench failed: {exc}") from None
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_table(report)
        return 0
