"""protocol: the sans-IO core of ferry.

Bytes in, typed events out, and back: the libxc and libxl migration stream
layers, xl's save-file header, the RPC framing and the generated message
tables.  No sockets, no trio, no subprocesses in here.
"""

from . import limits
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import NEED_DATA
from .lazy import lazy_exports
from .rpc import Call, ErrorReply, Reply, RpcConnection

# The stream layers need numpy: loaded when first named
__getattr__ = lazy_exports(
    __name__,
    {
        "libxc": ".libxc",
        "libxl": ".libxl",
        "xl": ".xl",
        "StreamChecker": ".check",
        "Summary": ".check",
    },
)

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
