"""Domain runners and the sim backend: log-dirty, pause, context, lifecycle."""

from __future__ import annotations

import bisect
import os
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from hypervisor import GuestMemory, RpcError, parse_size
from hypervisor.sim import SimGuest, sequence
from protocol._gen_runner_msgs import DomainState, Workload
from protocol.rpc import CALL, ERROR, FRAME_HEADER

BUSY = Workload(dirty_rate=50_000.0, working_set=1.0, skew=0.3, seed=11)


def bits(bitmap: bytes, pages: int) -> set[int]:
    return set(
        np.flatnonzero(
            np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[:pages]
        ).tolist()
    )


@pytest.fixture
def guest():
    memory = GuestMemory(1024)
    g = SimGuest(memory, BUSY, threading.Lock())
    yield g
    g.close()
    memory.close()


def test_dirty_tracking_is_exact(guest):
    guest.logdirty(True)
    guest._running.set()  # write by hand, without the pacing thread
    guest._write(300)
    written = set(sequence(BUSY, 1024, 0, 300).tolist())
    count, bitmap = guest.dirty_bitmap(clear=True)
    assert bits(bitmap, 1024) == written and count == len(written)
    assert guest.dirty_bitmap(clear=True) == (0, bytes(128))
    guest._write(5)
    count, bitmap = guest.dirty_bitmap(clear=False)
    assert bits(bitmap, 1024) == set(sequence(BUSY, 1024, 300, 305).tolist())
    assert guest.dirty_bitmap(clear=True)[0] == count  # peek did not clear


def test_no_write_is_lost_while_cleans_run_concurrently(guest):
    guest.workload = Workload(200_000.0, 1.0, 0.0, 5)
    guest.logdirty(True)
    cleans: list[tuple[int, int, set[int]]] = []  # (writes before, writes after, pages)
    guest.start(incoming=False)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        before = guest.writes()
        pages = bits(guest.dirty_bitmap(clear=True)[1], 1024)
        cleans.append((before, guest.writes(), pages))
    guest.stop()
    cleans.append((guest.writes(), guest.writes(), bits(guest.dirty_bitmap(clear=True)[1], 1024)))
    assert guest.writes() > 5_000 and len(cleans) > 5  # the race really ran
    # Write j is in a clean that ended after it began and began no later
    # than the first clean that started after it was done.  The sequence is
    # a function of the write index, so the test replays it.
    written = sequence(guest.workload, 1024, 0, guest.writes())
    befores = [c[0] for c in cleans]
    afters = [c[1] for c in cleans]
    for j, page in enumerate(written.tolist()):
        lo = bisect.bisect_right(afters, j)
        hi = bisect.bisect_right(befores, j)
        assert any(page in cleans[k][2] for k in range(lo, hi + 1)), f"write {j} (page {page}) lost"
    assert guest.guest_check() == "ok"


def test_sequence_depends_only_on_the_write_index():
    whole = sequence(BUSY, 4096, 100, 3000)
    parts = np.concatenate(
        [sequence(BUSY, 4096, a, b) for a, b in [(100, 1023), (1023, 1024), (1024, 3000)]]
    )
    assert np.array_equal(whole, parts)
    hot = sequence(Workload(1.0, 1.0, 1.0, 3), 4096, 0, 2000)
    assert hot.max() < 410  # all writes in the hottest tenth


def test_runner_log_dirty_under_full_rate_loses_nothing(runners):
    _proc, path = runners.start(
        memory=8 << 20, workload=Workload(100_000.0, 1.0, 0.0, 2), paused=True
    )
    with runners.client(path) as c:
        c.logdirty_enable()
        c.unpause()
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen |= bits(c.logdirty_clean().bitmap, 2048)
        c.pause()
        seen |= bits(c.logdirty_clean().bitmap, 2048)
        ram = c.map_guest_memory()
        touched = set(np.flatnonzero(ram.words[:, 0]).tolist())
        ram.close()
        assert c.getinfo().writes > 10_000
        assert touched == seen


def test_pause_stops_writes_and_digest_needs_a_paused_domain(runners):
    _proc, path = runners.start(workload=BUSY)
    with runners.client(path) as c:
        time.sleep(0.2)
        with pytest.raises(RpcError, match="needs a paused domain"):
            c.digest()
        c.pause()
        info = c.getinfo()
        assert info.state == DomainState.PAUSED and info.writes > 0
        first = c.digest()
        time.sleep(0.3)
        assert c.digest() == first and c.getinfo().writes == info.writes
        c.unpause()
        time.sleep(0.2)
        c.pause()
        assert c.digest() != first


def test_context_round_trip_continues_the_same_sequence(runners):
    pages = 4096
    _a, path_a = runners.start("src", pages * 4096, workload=BUSY)
    # the destination runs with the domain's config, as ferryd starts it
    _b, path_b = runners.start("dst", pages * 4096, workload=BUSY, incoming=True)
    with runners.client(path_a) as a, runners.client(path_b) as b:
        time.sleep(0.3)
        a.pause()
        ctx, digest, start = a.get_context(), a.digest(), a.getinfo().writes
        src = a.map_guest_memory()
        dst = b.map_guest_memory(writable=True)
        dst.bytes[:] = src.bytes
        src_copy = src.words.copy()
        src.close()
        dst.close()
        b.set_context(ctx)
        assert b.digest() == digest
        assert b.getinfo().state == DomainState.INCOMING
        b.unpause()
        time.sleep(0.3)
        b.pause()
        info = b.getinfo()
        assert info.workload == BUSY and info.writes > start
        # replay the source's sequence from where it stopped
        versions = src_copy[:, 0] & np.uint64(0xFFFFFFFF)
        np.add.at(versions, sequence(BUSY, pages, start, info.writes), 1)
        restored = b.map_guest_memory()
        assert np.array_equal(restored.words[:, 0] & np.uint64(0xFFFFFFFF), versions)
        restored.close()
        assert b.guest_check() == "ok"


def test_set_context_refuses_garbage(runners):
    _p, path = runners.start(paused=True)
    with runners.client(path) as c:
        with pytest.raises(RpcError, match="not a sim guest context"):
            c.set_context(b"garbage")
        with pytest.raises(RpcError, match="'writes' is not a count"):
            c.set_context(msgpack.packb({"writes": -1}))
        with pytest.raises(RpcError, match="context of 70000 octets is above"):
            c.set_context(bytes(70000))
        with pytest.raises(RpcError, match="not a sim guest context"):
            c.set_context(b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion items
        # a context never overrides the validated config: a hostile rate is ignored
        before = c.getinfo().workload
        c.set_context(msgpack.packb({"writes": 5, "rate": float("nan"), "ws": 7.0}))
        info = c.getinfo()
        assert info.workload == before and info.writes == 5


def test_destroy_leaves_nothing_behind(runners):
    proc, path = runners.start()
    with runners.client(path) as c:
        c.destroy()
    assert proc.wait(10) == 0
    assert not os.path.exists(path)
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_dropped_connection_leaves_the_guest_running_and_reattachable(runners):
    proc, path = runners.start(workload=BUSY)
    c = runners.client(path)
    before = c.getinfo().writes
    c.close()
    time.sleep(0.3)
    assert proc.poll() is None
    with runners.client(path) as c:
        info = c.getinfo()
        assert info.state == DomainState.RUNNING and info.writes > before


def test_orphaned_incoming_domain_destroys_itself(runners):
    proc, path = runners.start(incoming=True)
    c = runners.client(path)
    assert c.getinfo().state == DomainState.INCOMING
    c.close()
    assert proc.wait(10) == 0
    assert not os.path.exists(path)


def raw_call(sock: socket.socket, body) -> list:
    packed = msgpack.packb(body)
    sock.sendall(FRAME_HEADER.pack(len(packed)) + packed)
    (length,) = FRAME_HEADER.unpack(sock.recv(4, socket.MSG_WAITALL))
    return msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL))


def test_bad_requests_get_an_error_reply_and_the_runner_carries_on(runners):
    proc, path = runners.start(paused=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        for bad, rule in [
            ([CALL, 99, []], "unknown message id 99"),
            ([CALL, 9, [123]], "set_context.blob"),
            ([CALL, 1, ["extra"]], "list of 0 items"),
            (["nonsense"], "triple"),
        ]:
            kind, _id, text = raw_call(s, bad)
            assert kind == ERROR and rule in text
        kind, _id, text = raw_call(s, [CALL, 5, []])  # logdirty_disable: fine
        assert kind != ERROR
        kind, _id, text = raw_call(s, [CALL, 6, []])  # clean while log-dirty is off
        assert kind == ERROR and "log-dirty mode is off" in text
    with runners.client(path) as c:
        assert c.getinfo().state == DomainState.PAUSED
    assert proc.poll() is None


def test_large_domains_start_sparse(runners):
    proc, path = runners.start(memory=4 << 30, paused=True)
    with runners.client(path) as c:
        assert c.getinfo().pages == (4 << 30) // 4096
    status = open(f"/proc/{proc.pid}/status").read()
    rss_kib = int(status.split("VmRSS:")[1].split()[0])
    assert rss_kib < 256 << 10  # RAM untouched: far below 4 GiB resident


def test_parse_size():
    assert parse_size("1GiB") == 1 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("8192") == 8192
    for bad in ("1.5G", "12", "-1G", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("how", ["write", "write_beside_others"])
def test_guest_memory_writes_land_in_the_memfd_and_leave_no_mapping_behind(how):
    memory = GuestMemory(16)
    other = GuestMemory(16, fd=os.dup(memory.fd))  # the runner's view of the same RAM
    write = getattr(memory, how)
    try:
        pages = np.arange(3 * 1024, dtype=np.uint32).view(np.uint8)
        write(5, memoryview(pages.tobytes()))
        assert other.bytes[5:8].tobytes() == pages.tobytes()
        assert not other.bytes[:5].any() and not other.bytes[8:].any()
        assert not memory.mapped().any()  # the writer's page tables hold none of them
        with pytest.raises(ValueError, match="do not fit"):
            write(15, bytes(2 * 4096))  # past the end of RAM
        with pytest.raises(ValueError, match="do not fit"):
            write(0, bytes(100))  # not whole pages
        assert not other.bytes[15].any()
    finally:
        other.close()
        memory.close()
    with pytest.raises((ValueError, OSError)):  # unmapped (or its fd closed): refused, no crash
        write(0, bytes(4096))
