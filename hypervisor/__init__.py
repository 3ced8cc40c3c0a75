"""hypervisor: the substrate ferry manages.

One runner process per domain (`python -m hypervisor.runner`) holds guest
RAM in a memfd and answers "hypercalls" on a control socket; backends
`sim` (a dirtying workload) and `kvm` (a real virtual machine).
"""

from .channel import ChannelClosed, RpcError, SyncChannel
from .client import RunnerClient, runner_command, start_runner, wait_for_socket
from .memory import GuestMemory
from .sizes import parse_size

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
