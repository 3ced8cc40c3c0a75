"""`ferry`: the command line.

main.py           the parser and error handling
commands.py       domain commands, and the shape of every subcommand
jobs.py           save, restore, migrate, job, job-control, policies
verify.py         verify-stream
demo.py, bench.py the demo and the benchmark
daemon_client.py  the control API's blocking client
output.py         human-readable output
"""

from .daemon_client import DaemonClient, DaemonError
from .main import main

__all__ = ["DaemonClient", "DaemonError", "main"]
