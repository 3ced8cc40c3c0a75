"""Harnesses shared by `ferry demo`, `ferry bench` and the tests.

local.py       ferryd processes on loopback, each a host with its own state dir
faultproxy.py  a TCP proxy that breaks, stalls or slows the link between two daemons
"""

from .faultproxy import FaultProxy
from .local import HarnessError, LocalDaemon, LocalHosts

__all__ = ["FaultProxy", "HarnessError", "LocalDaemon", "LocalHosts"]
