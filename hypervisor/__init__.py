"""hypervisor: the substrate ferry manages.

One runner process per domain (`python -m hypervisor.runner`) holds guest
RAM in a memfd and answers "hypercalls" on a control socket; backends
`sim` (a dirtying workload) and `kvm` (a real virtual machine).
"""

from protocol.lazy import lazy_exports

from .channel import ChannelClosed, RpcError, SyncChannel
from .sizes import parse_size

# Guest memory needs numpy: loaded when first named
__getattr__ = lazy_exports(
    __name__,
    {
        "GuestMemory": ".memory",
        "RunnerClient": ".client",
        "runner_command": ".client",
        "start_runner": ".client",
        "wait_for_socket": ".client",
    },
)

__all__ = [
    "ChannelClosed",
    "GuestMemory",
    "RpcError",
    "RunnerClient",
    "SyncChannel",
    "parse_size",
    "runner_command",
    "start_runner",
    "wait_for_socket",
]
