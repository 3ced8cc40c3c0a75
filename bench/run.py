"""`make bench`: ferry's speed as ratios measured in one run on one machine.

    stream goodput    migration bytes/s  vs  a raw TCP loopback copy of as many bytes
    policy RPC        precopy_policy round trip  vs  a raw socketpair ping-pong
    downtime          measured downtime  vs  the converge policy's limit
    helper memory     save helper's peak private memory  vs  guest size

Prints one JSON object.  Sizes are flags; defaults take about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypervisor import RunnerClient  # noqa: E402
from toolstack.demo import Hosts  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def raw_tcp_mb_s(total: int) -> float:
    """A plain Python TCP loopback copy: 4 MiB sendall, recv_into (the floor)."""
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    buf = memoryview(bytearray(4 << 20))

    def drain():
        got, into = 0, bytearray(1 << 20)
        while got < total:
            got += receiver.recv_into(into)

    thread = threading.Thread(target=drain)
    started = time.perf_counter()
    thread.start()
    for offset in range(0, total, len(buf)):
        sender.sendall(buf[: min(len(buf), total - offset)])
    thread.join()
    elapsed = time.perf_counter() - started
    for s in (sender, receiver, listener):
        s.close()
    return total / 1e6 / elapsed


class PeakPrivateMemory(threading.Thread):
    """Samples RssAnon of every save helper until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"--save-domain" not in f.read():
                            continue
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                self.peak = max(self.peak, int(line.split()[1]) * 1024)
                except OSError:
                    continue
            time.sleep(0.01)


def migrate(hosts: Hosts, name: str, memory: int, rate: float, fill: bool, settings: dict) -> dict:
    config = {
        "name": name,
        "memory_bytes": memory,
        "dirty_rate": rate,
        "working_set": 0.25,
        "seed": 1,
    }
    with hosts.client(0) as a:
        a.request("create", config=json.dumps(config), paused=fill)
    if fill:  # every page holds data: nothing is sent from the zero buffer
        control = os.path.join(hosts.root, "host-a", "domains", f"{name}.sock")
        with RunnerClient(control) as runner:
            ram = runner.map_guest_memory(writable=True)
            ram.bytes[:] = 0x5A
            ram.close()
            runner.unpause()
    else:
        time.sleep(1.0)
    with hosts.client(1) as b:
        port = b.request("ping")["listen_port"]
    with hosts.client(0) as a:
        policy = settings.pop("policy")
        return a.request(
            "migrate", name=name, address=f"127.0.0.1:{port}", policy=policy, settings=settings
        )["report"]


def spawn_peer(mode: str, *args) -> tuple[socket.socket, subprocess.Popen]:
    """bench/rpc_peer.py in its own process, on one end of a socketpair."""
    ours, theirs = socket.socketpair()
    cmd = [sys.executable, os.path.join(HERE, "rpc_peer.py"), mode, str(theirs.fileno())]
    peer = subprocess.Popen(
        [*cmd, *map(str, args)], pass_fds=[theirs.fileno()], stdout=subprocess.PIPE
    )
    theirs.close()
    return ours, peer


def rpc_round_trips(count: int) -> dict:
    """precopy_policy round trips, helper side in its own process (bench/rpc_peer.py)."""
    import trio

    from protocol import _gen_helper_msgs as msgs
    from toolstack._gen_helper_dispatch import ToolstackHandlers
    from toolstack.channel import AsyncChannel

    class Answer(ToolstackHandlers):
        async def on_precopy_policy(self, stats):
            return msgs.PrecopyDecision.CONTINUE_PRECOPY

        async def on_complete(self, retval, errnoval, message):
            return None

    async def serve(sock):
        channel = AsyncChannel(
            trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
            msgs.TABLE,
            sends=None,
            receives=msgs.DIRECTION,
        )
        handlers = Answer()
        while True:
            event = await channel.next_event()
            reply = await handlers.dispatch(event.message)
            if event.message.SPEC.wants_reply:
                await channel.send(channel.conn.send_reply(reply))
            if type(event.message) is msgs.Complete:
                return

    ours, peer = spawn_peer("rpc", count)
    trio.run(serve, ours)
    out = json.loads(peer.communicate()[0])
    ours.close()
    return out


def raw_ping_pong(count: int, size: int) -> dict:
    ours, peer = spawn_peer("raw", count, size)
    for _ in range(count):
        data = ours.recv(size, socket.MSG_WAITALL)
        ours.sendall(data[:8])
    out = json.loads(peer.communicate()[0])
    ours.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", type=int, default=512 << 20, help="guest size for the goodput run")
    p.add_argument("--rpcs", type=int, default=5000)
    args = p.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count()}}

    with Hosts() as hosts:
        sampler = PeakPrivateMemory()
        sampler.start()
        report = migrate(hosts, "goodput", args.memory, 0.0, True, {"policy": "xen"})
        sampler.stopping.set()
        sampler.join()
        goodput = report["bytes_sent"] / 1e6 / (report["stream_ms"] / 1000)
        whole = report["bytes_sent"] / 1e6 / (report["elapsed_ms"] / 1000)
        raw = raw_tcp_mb_s(report["bytes_sent"])
        results["stream_goodput"] = {
            "stream_mb_s": round(goodput, 1),
            "raw_tcp_copy_mb_s": round(raw, 1),
            "ratio": round(goodput / raw, 3),
            "bytes": report["bytes_sent"],
            "whole_migration_mb_s": round(whole, 1),
            "note": "stream: the helper's first write to its complete; whole: the job, "
            "with connecting, starting the incoming domain and both helpers",
        }
        results["helper_memory"] = {
            "peak_private_bytes": sampler.peak,
            "guest_bytes": args.memory,
            "ratio": round(sampler.peak / args.memory, 4),
        }
        limit = 300.0
        busy = migrate(
            hosts, "busy", 1 << 30, 20_000.0, False, {"policy": "converge", "downtime_limit": limit}
        )
        results["downtime"] = {
            "downtime_ms": busy["downtime_ms"],
            "limit_ms": limit,
            "ratio": round(busy["downtime_ms"] / limit, 3),
            "decision": busy["decision"],
        }

    rpc = rpc_round_trips(args.rpcs)
    raw = raw_ping_pong(args.rpcs, rpc["frame_bytes"])
    results["policy_rpc"] = {
        "p50_us": rpc["p50_us"],
        "p99_us": rpc["p99_us"],
        "raw_socketpair_p50_us": raw["p50_us"],
        "raw_socketpair_p99_us": raw["p99_us"],
        "ratio_p50": round(rpc["p50_us"] / raw["p50_us"], 2),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
