"""protocol: the sans-IO core of ferry.

Bytes in, typed events out, and back: the libxc and libxl migration stream
layers, xl's save-file header, the RPC framing and the generated message
tables.  No sockets, no trio, no subprocesses in here.
"""

from . import libxc, libxl, limits, xl
from .check import StreamChecker, Summary
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import NEED_DATA
from .rpc import Call, ErrorReply, Reply, RpcConnection

__all__ = [
    "NEED_DATA",
    "Call",
    "ErrorReply",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "RpcConnection",
    "StreamChecker",
    "Summary",
    "libxc",
    "libxl",
    "limits",
    "xl",
]
