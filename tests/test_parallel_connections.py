"""`migrate --parallel-connections N`: precopy's pages on N TCP connections,
sharded by 2 MiB block; through the executable and the fault proxy."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import pytest
import trio
from conftest import ferry
from peers import Peer

from hypervisor import uffd
from protocol import _gen_migration_msgs as msgs
from protocol._gen_control_msgs import DomainConfig
from protocol.rpc import ErrorReply
from toolstack.harness import FaultProxy
from toolstack.migration.joining import Joining

MiB = 1 << 20
SHORT = ["--deadline", "helper=3", "--deadline", "handshake=3", "--deadline", "ready=3"]


def busy(daemon, name="vm1", memory=64 * MiB, rate=20_000):
    config = DomainConfig(name=name, memory_bytes=memory, dirty_rate=rate, seed=3)
    daemon.call("create", config=config)
    time.sleep(0.3)


def listed(daemon) -> dict:
    return {d["name"]: d["state"] for d in json.loads(ferry(daemon, "list", "--json").stdout)}


@pytest.mark.parametrize("connections", [2, 3])
def test_pages_on_several_connections_arrive_whole(cluster, connections):
    a, b = cluster.daemon("a", listen=False), cluster.daemon("b")
    busy(a)
    r = ferry(
        a,
        "migrate",
        "vm1",
        b.address,
        "--parallel-connections",
        str(connections),
        "--verify",
        "--downtime-limit",
        "50",
        "--json",
    )
    report = json.loads(r.stdout)
    assert report["integrity"] == "ok" and len(report["iterations"]) >= 2
    assert listed(a) == {} and listed(b) == {"vm1": "running"}
    assert ferry(b, "guest-check", "vm1").stdout.strip() == "ok"


def test_the_report_shows_the_connections_a_migration_used(cluster):
    a, b = cluster.daemon("a", listen=False), cluster.daemon("b")
    used = {}
    for name, flag in (("default", []), ("two", ["--parallel-connections", "2"])):
        busy(a, name, 1024 * MiB, rate=0)  # idle and never written: its pages are holes, quick
        used[name] = json.loads(ferry(a, "migrate", name, b.address, *flag, "--json").stdout)
    assert {name: r["connections"] for name, r in used.items()} == {"default": 1, "two": 2}
    assert listed(b) == {"default": "running", "two": "running"}


@pytest.mark.skipif(not uffd.usable()[0], reason=f"postcopy cannot run here: {uffd.usable()[1]}")
def test_a_postcopy_switch_after_pages_on_several_connections(cluster):
    a, b = cluster.daemon("a", listen=False), cluster.daemon("b")
    busy(a, rate=50_000)
    r = ferry(
        a,
        "migrate",
        "vm1",
        b.address,
        "--parallel-connections",
        "2",
        "--postcopy-after-precopy",
        "--json",
    )
    pc = json.loads(r.stdout)["postcopy"]
    assert pc["pushed"] + pc["requested"] == pc["pages"]
    assert ferry(b, "guest-check", "vm1").stdout.strip() == "ok"


def test_a_cut_on_any_connection_fails_the_migration_cleanly(cluster):
    a, b = cluster.daemon("a", listen=False, args=SHORT), cluster.daemon("b", args=SHORT)
    busy(a, memory=128 * MiB)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        outcome = {}

        def run():
            r = ferry(
                a,
                "migrate",
                "vm1",
                f"127.0.0.1:{proxy.port}",
                "--parallel-connections",
                "3",
                check=False,
            )
            outcome.update(code=r.returncode, stderr=r.stderr)

        proxy.slow(20 * MiB)  # long enough to cut in the middle
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while not b.call("list"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        proxy.cut()
        thread.join(60)
    assert outcome["code"] == 1 and "Traceback" not in outcome["stderr"]
    assert listed(a) == {"vm1": "running"}  # the source runs on as it was
    deadline = time.monotonic() + 15
    while listed(b):
        assert time.monotonic() < deadline, listed(b)
        time.sleep(0.1)
    assert os.listdir(os.path.join(a.state, "journal")) == []


def test_a_join_nobody_expects_is_refused(cluster):
    b = cluster.daemon("b")
    key = open(cluster.key, "rb").read().strip()
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(key)
        reply = peer.call(msgs.Join(migration_id=secrets.token_hex(16), index=1))
        assert isinstance(reply, ErrorReply) and "expects connections" in reply.text
    finally:
        peer.close()
    assert b.call("list") == []


def test_extra_connections_that_never_join_fail_the_receiver_in_time(cluster):
    b = cluster.daemon("b", args=SHORT)
    key = open(cluster.key, "rb").read().strip()
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(key)
        config = DomainConfig(name="vm1", memory_bytes=16 * MiB)
        request = msgs.Migrate(config=config, migration_id=secrets.token_hex(16), connections=3)
        assert isinstance(peer.call(request), msgs.Accepted)
        peer.sock.sendall(peer.handshake.send_call(msgs.Stream()))  # but no join comes
        started = time.monotonic()
        while peer.sock.recv(4096):
            pass
        assert time.monotonic() - started < 10
    finally:
        peer.close()
    deadline = time.monotonic() + 10
    while b.call("list"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with open(b.log) as f:
        assert "2 of the sender's 2 extra connections did not join" in f.read()


async def test_a_migration_on_one_connection_waits_for_no_joiners():
    """With one connection nobody joins: the receiver starts at once (a wait
    here once held every migration for the handshake deadline)."""
    with trio.fail_after(1):
        assert await Joining(0).wait(30) == []
