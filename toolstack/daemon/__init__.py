"""ferryd: the daemon of one host.

server.py    the daemon: its listeners, its jobs
control.py   the control API's handlers (protocol/control_msgs.toml)
main.py      the `ferryd` command line
sched.py     a short time slice, so helpers' policy calls are answered promptly
"""

from .main import main
from .server import Daemon

__all__ = ["Daemon", "main"]
