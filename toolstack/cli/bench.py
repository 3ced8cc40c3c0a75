"""`ferry bench`: the command's flags here, the measuring in the bench/ package.

bench/ sits above the toolstack (it drives daemons through it), so the
toolstack reaches it only when the command runs, never at import time.
"""

from __future__ import annotations

import importlib

from .commands import Command

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
        return importlib.import_module("bench.command").run(args)
