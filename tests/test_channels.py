"""The I/O around RpcConnection: the helper's blocking channel, the toolstack's trio one."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio

from hypervisor.channel import SyncChannel
from protocol import NEED_DATA, RpcConnection
from protocol import _gen_helper_msgs as hm
from toolstack.host.async_channel import AsyncChannel


def answer_calls(sock: socket.socket, delays: list[float]) -> None:
    """The toolstack's part, slowly when told: answer each suspend after its delay."""
    conn = RpcConnection(hm.TABLE, sends=None, receives=hm.DIRECTION)
    for delay in delays:
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(sock.recv(65536))
        assert isinstance(event.message, hm.Suspend)
        time.sleep(delay)
        sock.sendall(conn.send_reply(True))


def test_the_helper_polls_for_quick_replies_and_sleeps_after_a_slow_one():
    ours, theirs = socket.socketpair()
    spin_ns = 50_000_000
    delays = [0.0, 0.2, 0.0, 0.0]
    responder = threading.Thread(target=answer_calls, args=(theirs, delays))
    responder.start()
    channel = SyncChannel(ours, hm.TABLE, sends=hm.DIRECTION, receives=None, spin_ns=spin_ns)
    try:
        seen = []
        for _ in delays:
            assert channel.call(hm.Suspend()) is True  # every reply arrives, polled or not
            seen.append(channel.spinning)
    finally:
        responder.join()
        channel.close()
        theirs.close()
    # quick: keeps polling; 0.2 s > 50 ms: gives up polling; quick again: polls again
    assert seen == [True, False, True, True]


def test_a_channel_without_spin_never_polls():
    ours, theirs = socket.socketpair()
    responder = threading.Thread(target=answer_calls, args=(theirs, [0.0]))
    responder.start()
    channel = SyncChannel(ours, hm.TABLE, sends=hm.DIRECTION, receives=None)
    try:
        assert channel.call(hm.Suspend()) is True
        assert channel.spinning is False
    finally:
        responder.join()
        channel.close()
        theirs.close()


def trio_channel(sock: socket.socket) -> AsyncChannel:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return AsyncChannel(stream, hm.TABLE, sends=None, receives=hm.DIRECTION, sock=sock)


async def test_the_direct_send_hands_what_does_not_fit_to_trio_in_order():
    ours, theirs = socket.socketpair()
    channel = trio_channel(ours)
    large = bytes(range(256)) * (8 << 12)  # 8 MiB: far more than a socket buffer holds
    expected = b"tiny" + large
    received = bytearray()

    def drain():
        while len(received) < len(expected):
            received.extend(theirs.recv(1 << 20))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, drain)
            await channel.send(b"tiny")  # fits: the direct path
            await channel.send(large)  # partly direct, the rest through send_all
    finally:
        await channel.aclose()
        theirs.close()
    assert received == expected


async def test_the_direct_send_to_a_closed_peer_is_a_broken_resource():
    ours, theirs = socket.socketpair()
    channel = trio_channel(ours)
    theirs.close()
    try:
        with pytest.raises(trio.BrokenResourceError):
            await channel.send(b"anyone there?")
    finally:
        await channel.aclose()


SLICE_PROBE = """
import os, subprocess
from toolstack.daemon.sched import request_short_slice

def slice_of(pid):
    for line in open(f"/proc/{pid}/sched"):
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None

before = slice_of(os.getpid())
taken = request_short_slice()
child = subprocess.Popen(["sleep", "5"])
try:
    import time; time.sleep(0.1)
    print(taken, before, slice_of(os.getpid()), slice_of(child.pid), os.getpriority(os.PRIO_PROCESS, 0))
finally:
    child.kill(); child.wait()
"""


def test_ferryd_asks_for_a_short_slice_that_its_children_do_not_inherit():
    import subprocess
    import sys

    out = subprocess.run(
        ["nice", "-n", "3", sys.executable, "-c", SLICE_PROBE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    taken, before, after, child, nice = out
    if taken != "True" or before == "None":
        pytest.skip(
            "this kernel has no per-task time slice (sched_setattr sched_runtime, Linux 6.12)"
        )
    assert int(after) == 100_000 < int(before)
    assert int(child) == int(before)  # helpers and runners keep the default slice
    assert nice == "3"  # the operator's nice value survives


def test_frames_sent_together_leave_in_one_write():
    ours, theirs = socket.socketpair()
    channel = SyncChannel(ours, hm.TABLE, sends=hm.DIRECTION, receives=None)
    stats = hm.PrecopyStats(0, 1, -1, 1, 2, 3, 4, 5, 6, 0, 0)
    try:
        with channel.together():
            channel.call(hm.Progress("save", "iteration 0", 1, 2))
            channel.send_call(hm.PrecopyPolicy(stats))
            theirs.setblocking(False)
            with pytest.raises(BlockingIOError):
                theirs.recv(1)  # nothing left yet
        theirs.setblocking(True)
        conn = RpcConnection(hm.TABLE, sends=None, receives=hm.DIRECTION)
        conn.receive_data(theirs.recv(65536))  # one read holds both, in order
        assert conn.next_event().message == hm.Progress("save", "iteration 0", 1, 2)
        assert conn.next_event().message == hm.PrecopyPolicy(stats)
        assert conn.next_event() is NEED_DATA
        theirs.sendall(conn.send_reply(hm.PrecopyDecision.CONTINUE_PRECOPY))
        assert channel.reply_to(hm.PrecopyPolicy(stats)) == hm.PrecopyDecision.CONTINUE_PRECOPY
        with pytest.raises(RuntimeError, match="waits for a reply"):
            with channel.together():
                channel.call(hm.Suspend())  # it would wait for an answer never asked
    finally:
        channel.close()
        theirs.close()
