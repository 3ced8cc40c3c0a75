"""The far end of bench/run.py's RPC measurements, in its own process.

    rpc_peer.py rpc FD COUNT        precopy_policy calls through the generated stubs
    rpc_peer.py raw FD COUNT SIZE   a raw ping-pong of SIZE-octet messages

Prints {"p50_us", "p99_us", "frame_bytes"} as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def summary(samples: list[float], frame_bytes: int) -> str:
    samples.sort()
    return json.dumps(
        {
            "p50_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(len(samples) * 0.99)], 1),
            "frame_bytes": frame_bytes,
        }
    )


def rpc(fd: int, count: int) -> None:
    from helper.toolstack_link import ToolstackLink
    from protocol import RpcConnection
    from protocol import _gen_helper_msgs as msgs

    link = ToolstackLink(fd)
    stats = msgs.PrecopyStats(
        3, 123_456, 4_000, 1_024, 2_976, 4_202_496, 600_000_000, 262_144, 0, 0
    )
    sizer = RpcConnection(msgs.TABLE, sends=msgs.DIRECTION, receives=None)
    frame = len(sizer.send_call(msgs.PrecopyPolicy(stats)))
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        link.precopy_policy(stats)
        samples.append((time.perf_counter_ns() - started) / 1e3)
    link.complete(0, 0, "")
    print(summary(samples, frame))


def raw(fd: int, count: int, size: int) -> None:
    sock = socket.socket(fileno=fd)
    message = bytes(size)
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        sock.sendall(message)
        sock.recv(8, socket.MSG_WAITALL)
        samples.append((time.perf_counter_ns() - started) / 1e3)
    print(summary(samples, size))


if __name__ == "__main__":
    mode, fd, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode == "rpc":
        rpc(fd, count)
    else:
        raw(fd, count, int(sys.argv[4]))
