"""Hardened edges: admission, a full disk, no file descriptors, private files
whatever the umask, hostile names and state files, and a bounded log."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest
from conftest import ferry, processes_mentioning

from protocol import xl
from toolstack.host.domains import host_ram

MiB = 1 << 20


def ratio_for(octets: int) -> str:
    """--max-overcommit that admits `octets` of guest memory on this host."""
    return repr(octets / host_ram())


def test_admission_refuses_what_would_overcommit_the_host(cluster):
    limit = ["--max-overcommit", ratio_for(48 * MiB)]
    a = cluster.daemon("a", args=limit)
    b = cluster.daemon("b", args=limit)
    ferry(a, "create", "vm1", "--memory", "32M")
    r = ferry(a, "create", "vm2", "--memory", "32M", check=False)
    assert r.returncode == 1 and "not enough memory for vm2" in r.stderr
    assert "--max-overcommit" in r.stderr
    ferry(b, "create", "busy", "--memory", "32M")
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "destination refused: not enough memory for vm1" in r.stderr
    assert [d.name for d in b.call("list")] == ["busy"]
    assert a.call("info", name="vm1").state == "running"


@pytest.mark.parametrize(
    "fault, says",
    [
        ("fail@state:write=ENOSPC", "cannot write the state of vm1: No space left on device"),
        ("fail@runner:start=EMFILE", "Too many open files"),
    ],
)
def test_a_host_that_refuses_resources_fails_create_cleanly(cluster, fault, says):
    a = cluster.daemon("a", listen=False, env=dict(os.environ, FERRY_TEST_FAULTS=fault))
    r = ferry(a, "create", "vm1", "--memory", "16M", check=False)
    assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert a.call("list") == []
    assert os.listdir(os.path.join(a.state, "domains")) == []
    assert not processes_mentioning(os.path.join(a.state, "domains"))  # no runner left


def test_what_ferryd_writes_is_private_whatever_the_umask(short_tmp):
    from toolstack.harness import LocalHosts
    from toolstack.harness.local import executable

    hosts = LocalHosts(root=short_tmp)
    state = os.path.join(short_tmp, "open")
    cmd = [*executable("ferryd", "toolstack.daemon"), "--state-dir", state]
    proc = subprocess.Popen(
        cmd, preexec_fn=lambda: os.umask(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        daemon = hosts.start("b")  # a peer, to make a migration write its journal
        import time

        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(state, "control.sock")):
            assert time.monotonic() < deadline
            time.sleep(0.05)

        class Here:
            socket = os.path.join(state, "control.sock")

        ferry(Here, "create", "vm1", "--memory", "16M")

        def mode(*parts):
            return stat.S_IMODE(os.stat(os.path.join(state, *parts)).st_mode)

        assert mode() == 0o700
        assert mode("control.sock") == 0o600
        assert mode("domains") == 0o700 and mode("journal") == 0o700
        assert mode("domains", "vm1.json") == 0o600
        assert mode("domains", "vm1.sock") & 0o077 == 0
        ferry(Here, "destroy", "vm1")
        assert daemon.running
    finally:
        proc.terminate()
        proc.wait(30)
        hosts.close()


def test_hostile_state_files_are_not_followed_nor_believed(cluster, short_tmp):
    a = cluster.daemon("a", listen=False)
    ferry(a, "create", "vm1", "--memory", "16M")
    a.stop()
    domains = os.path.join(a.state, "domains")
    outside = os.path.join(short_tmp, "outside.json")
    with open(outside, "w") as f:
        f.write(json.dumps({"name": "evil", "memory_bytes": 4096}))
    os.symlink(outside, os.path.join(domains, "evil.json"))  # a link: never followed
    with open(os.path.join(domains, "liar.json"), "w") as f:  # says it is another domain
        f.write(json.dumps({"name": "vm1", "memory_bytes": 4096}))
    with open(os.path.join(domains, "nan.json"), "w") as f:  # a config no check would pass
        f.write('{"name": "nan", "memory_bytes": 4096, "dirty_rate": NaN}')
    a.start()
    assert [d.name for d in a.call("list")] == ["vm1"]
    with open(a.log) as f:
        log = f.read()
    assert "state file liar.json ignored: it describes 'vm1'" in log
    assert "state file evil.json ignored" in log and "state file nan.json ignored" in log


def test_a_save_never_writes_through_a_link(cluster, short_tmp):
    a = cluster.daemon("a", listen=False)
    ferry(a, "create", "vm1", "--memory", "16M")
    target = os.path.join(short_tmp, "precious")
    with open(target, "w") as f:
        f.write("keep me")
    link = os.path.join(short_tmp, "vm1.save")
    os.symlink(target, link)
    ferry(a, "save", "vm1", link)
    with open(target) as f:
        assert f.read() == "keep me"
    assert not os.path.islink(link)
    with open(link, "rb") as f:
        assert f.read(len(xl.MAGIC)) == xl.MAGIC  # the save went to a fresh file
    assert stat.S_IMODE(os.stat(link).st_mode) == 0o600
    r = ferry(a, "restore", link, "--name", "../escape", check=False)
    assert r.returncode == 1 and "restore --name" in r.stderr and "breaks the rule" in r.stderr
    assert not os.path.exists(os.path.join(a.state, "escape.json"))


def test_refused_connections_are_logged_at_a_bounded_rate(cluster):
    b = cluster.daemon("b")
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", b.port), timeout=15) as s:
            try:
                s.sendall(b"\x00\x00\x00\x05junk!")
                s.recv(4096)
            except OSError:
                pass
    assert b.call("list") == []
    with open(b.log) as f:
        refused = [line for line in f if "refused" in line or "ended" in line]
    assert 1 <= len(refused) <= 11, refused


def test_a_name_too_long_for_a_runner_socket_is_refused_up_front(cluster, short_tmp):
    from conftest import Cluster

    from protocol._gen_control_msgs import DomainConfig

    root = os.path.join(short_tmp, "x" * 30)  # a state dir of 52 octets
    os.mkdir(root)
    deep = Cluster(root)
    try:
        a, b = cluster.daemon("a"), deep.daemon("b", key=cluster.key)
        name = "v" * 64  # a valid name, but STATE/domains/NAME.sock is 131 octets there
        r = ferry(b, "create", name, "--memory", "16M", check=False)
        assert r.returncode == 1 and "too long for this state directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and b.call("list") == []
        a.call("create", config=DomainConfig(name=name, memory_bytes=16 * MiB))
        r = ferry(a, "migrate", name, b.address, check=False)
        assert r.returncode == 1 and "too long for this state directory" in r.stderr, r.stderr
        assert [d.state for d in a.call("list")] == ["running"] and b.call("list") == []
    finally:
        deep.cleanup()


def test_list_answers_in_time_while_a_runner_is_stopped(cluster):
    from protocol._gen_control_msgs import DomainConfig

    a = cluster.daemon("a", listen=False, args=["--deadline", "status=1"])
    for name in ("vm1", "vm2", "vm3"):
        a.call("create", config=DomainConfig(name=name, memory_bytes=16 * MiB))
    (stopped,) = processes_mentioning(os.path.join(a.state, "domains", "vm2.sock"))
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = {d["name"]: d["state"] for d in json.loads(ferry(a, "list", "--json").stdout)}
        took = time.monotonic() - started
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert listed == {"vm1": "running", "vm2": "unreachable", "vm3": "running"}
    assert took < 10  # one status deadline, not one per domain nor the runner's 30 s


def test_at_most_64_connections_may_be_authenticating_at_once(cluster):
    from peers import Peer

    b = cluster.daemon("b", args=["--deadline", "handshake=20"])
    silent = []
    try:
        for _ in range(64):  # each may hold its handshake for up to 20 s
            silent.append(socket.create_connection(("127.0.0.1", b.port), timeout=15))
        time.sleep(0.5)  # all 64 are accepted and waiting for their hello
        with socket.create_connection(("127.0.0.1", b.port), timeout=15) as extra:
            extra.settimeout(5)
            assert extra.recv(4096) == b""  # closed at once, not after the 20 s
        silent[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            silent[0].recv(1)  # the first ones still wait, open
    finally:
        for s in silent:
            s.close()
    time.sleep(0.5)
    peer = Peer.connect(b.port)  # their places are free again
    try:
        peer.authenticate(open(cluster.key, "rb").read().strip())
    finally:
        peer.close()
    with open(b.log) as f:
        assert "are already authenticating" in f.read()


def test_a_sender_silent_after_announcing_its_stream_is_cut_off(cluster):
    import secrets

    from peers import Peer

    from protocol import _gen_migration_msgs as msgs
    from protocol._gen_control_msgs import DomainConfig

    b = cluster.daemon("b", args=["--deadline", "handshake=2"])
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(open(cluster.key, "rb").read().strip())
        config = DomainConfig(name="vm1", memory_bytes=16 * MiB)
        peer.call(msgs.Migrate(config=config, migration_id=secrets.token_hex(16)))
        assert [d.name for d in b.call("list")] == ["vm1"]  # incoming, being built
        peer.sock.sendall(peer.handshake.send_call(msgs.Stream()))
        started = time.monotonic()
        reply = peer.sock.recv(4096)  # then not one octet of the stream
        while reply:
            reply = peer.sock.recv(4096)  # a refusal, perhaps, then the line ends
        assert time.monotonic() - started < 8  # the handshake deadline, not TCP's
    finally:
        peer.close()
    deadline = time.monotonic() + 10
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == [] and os.listdir(os.path.join(b.state, "journal")) == []
    with open(b.log) as f:
        assert "did not start within 2 s" in f.read()
