"""The helper's line to the toolstack: generated stubs over a blocking channel.

Also the helper's log: `log()` sends a `log` message (the helper has no log
of its own, like Xen's libxl-save-helper).
"""

from __future__ import annotations

import socket

from hypervisor.channel import SyncChannel
from protocol import _gen_helper_msgs as msgs

from ._gen_stubs import ToolstackStubs

LOG_ERROR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7
# A policy answer takes tens of microseconds when a CPU is free for the
# toolstack: wait that long for it without sleeping (see SyncChannel).
REPLY_SPIN_NS = 150_000


class ToolstackLink(ToolstackStubs):
    def __init__(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        channel = SyncChannel(
            sock, msgs.TABLE, sends=msgs.DIRECTION, receives=None, spin_ns=REPLY_SPIN_NS
        )
        super().__init__(channel)

    def begin_precopy_policy(self, stats: msgs.PrecopyStats) -> None:
        """precopy_policy in two halves, so the helper can work while the
        toolstack decides; `finish_precopy_policy` returns the answer."""
        self.channel.send_call(msgs.PrecopyPolicy(stats))

    def finish_precopy_policy(self) -> msgs.PrecopyDecision:
        return self.channel.reply_to(msgs.PrecopyPolicy)

    def say(self, level: int, context: str, message: str, errnoval: int = 0) -> None:
        self.log(level, errnoval, context, message)
