"""Live migration between real ferryd processes on loopback, and job control."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import FERRY, ferry, processes_mentioning
from peers import Peer, serve_as_destination

from protocol import _gen_migration_msgs as msgs
from protocol._gen_control_msgs import DomainConfig
from protocol.rpc import ErrorReply
from toolstack.cli import DaemonClient, DaemonError

MiB = 1 << 20


def create(daemon, name, memory=32 * MiB, rate=20_000.0, ws=1.0, backend="sim"):
    config = DomainConfig(
        name=name, memory_bytes=memory, backend=backend, dirty_rate=rate, working_set=ws, seed=3
    )
    return daemon.call("create", config=config)


def migrate(src, dst, name, **fields):
    return src.call("migrate", name=name, address=dst.address, verify=True, **fields)


def writes(daemon, name) -> int:
    return daemon.call("info", name=name).writes


def assert_running_and_writing(daemon, name):
    before = writes(daemon, name)
    time.sleep(0.3)
    info = daemon.call("info", name=name)
    assert info.state == "running" and info.writes > before


def test_migrate_a_busy_domain(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1")
    time.sleep(0.3)
    r = ferry(a, "migrate", "vm1", b.address, "--verify", "--json")
    report = json.loads(r.stdout)
    assert report["integrity"] == "ok" and report["phase"] == "completed"
    assert report["downtime_ms"] > 0 and report["policy_rpcs"] > 0
    assert report["iterations"][0]["pages"] == 32 * MiB // 4096
    assert report["policy_rpc_p50_us"] > 0 and report["peer"] == b.address
    # the guest ran at the destination before the job ended (the source's copy went last)
    assert report["downtime_ms"] < report["running_after_ms"] < report["elapsed_ms"]
    assert a.call("list") == []
    assert_running_and_writing(b, "vm1")
    assert b.call("guest_check", name="vm1") == "ok"
    listed = json.loads(ferry(b, "list", "--json").stdout)
    assert [(d["name"], d["state"], d["backend"], d["memory_bytes"]) for d in listed] == [
        ("vm1", "running", "sim", 32 * MiB)
    ]
    job = json.loads(ferry(a, "job", "vm1", "--json").stdout)
    assert job["phase"] == "completed" and job["downtime_ms"] == report["downtime_ms"]
    shown = dict(  # the same job for a person: one "Name: value" row each
        line.split(":", 1) for line in ferry(a, "job", "vm1").stdout.splitlines() if ":" in line
    )
    assert shown["Connections"].strip() == "1"  # the default
    assert shown["Running after"].strip() == f"{report['running_after_ms']:.1f} ms"
    # the destination shows its side of the same migration
    received = json.loads(ferry(b, "job", "vm1", "--json").stdout)
    assert received["kind"] == "migrate-receive" and received["phase"] == "completed"
    assert received["running"] is False


def test_several_domains_migrate_at_once(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    names = ["m1", "m2", "m3"]
    for n in names:
        create(a, n, rate=10_000)
    results = {}

    def run(n):
        results[n] = migrate(a, b, n)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {n: r.integrity for n, r in results.items()} == dict.fromkeys(names, "ok")
    assert sorted(d.name for d in b.call("list")) == names


ENDLESS = {
    "xen": {"max_dirty": 0, "max_iterations": 1_000_000},
    "converge": {"downtime_limit": 0, "max_iterations": 1_000_000},
}


def start_endless_migration(a, b, name="vm1", policy="xen"):
    """A migration that never converges on its own (until steered)."""
    outcome = {}

    def run():
        try:
            outcome["report"] = migrate(a, b, name, policy=policy, settings=ENDLESS[policy])
        except DaemonError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            job = a.call("job", name=name)
            if job.phase == "precopy" and job.iteration >= 1:
                return thread, outcome
        except DaemonError:
            pass
        time.sleep(0.02)
    raise AssertionError("the migration never reached iteration 1")


def test_job_control_abort_mid_precopy(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    r = ferry(a, "job-control", "vm1", "abort")
    assert "abort requested" in r.stdout
    thread.join(60)
    assert "aborted by the operator" in outcome["error"]
    assert a.call("info", name="vm1").job is None
    assert_running_and_writing(a, "vm1")
    assert a.call("guest_check", name="vm1") == "ok"
    job = a.call("job", name="vm1")
    assert job.phase == "failed" and "operator requested abort" in job.decision
    deadline = time.monotonic() + 15  # the destination sees the line close and cleans up
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == []


def test_job_control_stop_and_copy_completes_at_once(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    ferry(a, "job-control", "vm1", "stop-and-copy")
    thread.join(60)
    assert outcome["report"].integrity == "ok"
    assert "operator requested stop-and-copy" in outcome["report"].decision
    assert_running_and_writing(b, "vm1")


def test_set_downtime_limit_mid_flight_changes_when_converge_switches_over(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b, policy="converge")
    r = ferry(a, "job-control", "vm1", "set", "downtime_limit=10000")
    assert "downtime_limit = 10000" in r.stdout
    thread.join(60)
    assert "within 10000 ms" in outcome["report"].decision
    assert outcome["report"].integrity == "ok"
    assert outcome["report"].settings["downtime_limit"] == 10000.0


def test_set_a_xen_limit_mid_flight(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    bad = ferry(a, "job-control", "vm1", "set", "downtime_limit=5", check=False)
    assert bad.returncode == 1 and "policy xen has no setting 'downtime_limit'" in bad.stderr
    r = ferry(a, "job-control", "vm1", "set", "max_dirty=1000000")
    assert "max_dirty = 1000000" in r.stdout
    thread.join(60)
    assert "fewer than 1000000" in outcome["report"].decision
    over = ferry(a, "job-control", "vm1", "set", "max_dirty=1", check=False)
    assert over.returncode == 1 and "no running job" in over.stderr


def test_destination_killed_mid_stream_resumes_the_source(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    b.stop(signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert "error" in outcome and outcome["error"]
    assert_running_and_writing(a, "vm1")
    assert a.call("info", name="vm1").job is None
    # the half-built destination domain removed itself with its toolstack
    deadline = time.monotonic() + 15
    while (
        os.path.exists(os.path.join(b.state, "domains", "vm1.sock")) and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not os.path.exists(os.path.join(b.state, "domains", "vm1.sock"))


def test_wrong_auth_key_is_refused_before_anything_is_created(cluster):
    b = cluster.daemon("b")
    intruder = cluster.daemon("c", listen=False, key=cluster.write_key("other.key", "x" * 64))
    create(intruder, "vm1")
    r = ferry(intruder, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "authentication" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert b.call("list") == []
    assert os.listdir(os.path.join(b.state, "domains")) == []
    assert_running_and_writing(intruder, "vm1")


def test_daemon_restart_reattaches_running_domains(cluster):
    a = cluster.daemon("a", listen=False)
    create(a, "vm1")
    create(a, "vm2", rate=0)
    a.call("pause", name="vm2")
    create(a, "vm3")
    assert a.stop() == 0
    vm3 = os.path.join(a.state, "domains", "vm3")
    for pid in processes_mentioning(vm3 + ".sock"):  # dies while no ferryd watches
        os.kill(pid, signal.SIGKILL)
    a.start()
    listed = {d.name: d.state for d in a.call("list")}
    assert listed == {"vm1": "running", "vm2": "paused"}
    assert not os.path.exists(vm3 + ".json") and not os.path.exists(vm3 + ".sock")
    assert_running_and_writing(a, "vm1")
    # A re-attached runner is not this ferryd's child; destroy still returns
    # only once it has exited, as it does for a runner the daemon started.
    for name in ("vm1", "vm2"):
        a.call("destroy", name=name)
        assert processes_mentioning(os.path.join(a.state, "domains", name + ".sock")) == []


def test_cli_errors_are_one_line(cluster, short_tmp):
    a = cluster.daemon("a", listen=False)
    for args, text in [
        (["pause", "nosuch"], "no domain named 'nosuch'"),
        (["create", "x", "--memory", "12"], "multiple of 4096"),
        (["create", "bad name!", "--memory", "1M"], "names are"),
        (["migrate", "nosuch", "nowhere"], "no domain named"),
        (["job", "nosuch"], "no job"),
        (["restore", os.path.join(short_tmp, "missing")], "cannot read"),
    ]:
        r = ferry(a, *args, check=False)
        assert r.returncode == 1 and text in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(
        [FERRY, "--connect", os.path.join(short_tmp, "no.sock"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot reach ferryd" in r.stderr and "Traceback" not in r.stderr


def test_save_and_restore_through_the_cli(cluster, short_tmp):
    a = cluster.daemon("a", listen=False)
    create(a, "vm1", rate=5_000)
    path = os.path.join(short_tmp, "vm1.save")
    ferry(a, "save", "vm1", path, "--live")
    assert a.call("list") == []
    assert "valid xl stream" in ferry(a, "verify-stream", path).stdout
    ferry(a, "restore", path, "--paused")
    digest = ferry(a, "digest", "vm1").stdout.strip()
    assert len(digest) == 64
    ferry(a, "unpause", "vm1")
    assert_running_and_writing(a, "vm1")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_daemon_stop_mid_migration_resumes_the_source(cluster, signum):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    assert a.stop(signum) == 0
    thread.join(60)
    assert "error" in outcome
    a.start()
    assert_running_and_writing(a, "vm1")
    deadline = time.monotonic() + 15
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == []


def test_garbage_and_hostile_requests_on_the_migration_port(cluster):
    b = cluster.daemon("b")
    # no key: random bytes, a huge frame length, then silence: refused, nothing created
    for junk in (os.urandom(200), b"\xff\xff\xff\xff" + bytes(16), b""):
        with socket.create_connection(("127.0.0.1", b.port), timeout=15) as s:
            try:  # the daemon may answer, but it ends the line (perhaps before we finish)
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except OSError:
                pass
    # with the key, but a request out of order, and one with a hostile config
    key = open(cluster.key, "rb").read().strip()
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(key)
        peer.sock.sendall(peer.handshake._rpc.send_call(msgs.Go()))
        reply = peer.handshake._rpc
        reply.receive_data(peer.sock.recv(4096))
        refusal = reply.next_event()
        assert isinstance(refusal, ErrorReply) and "go is not allowed in state" in refusal.text
        assert peer.sock.recv(4096) == b""  # and the line ends
    finally:
        peer.close()
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(key)

        class HostileMigrate:  # what a generated Migrate would not let us build
            SPEC = msgs.Migrate.SPEC

            def to_args(self):
                config = {"name": "../vm1", "memory_bytes": -1}
                return {"config": config, "migration_id": "0" * 32}

        reply = peer.call(HostileMigrate())
        assert isinstance(reply, ErrorReply) and "migrate.config.name" in reply.text
    finally:
        peer.close()
    assert b.call("list") == []
    assert os.listdir(os.path.join(b.state, "domains")) == []
    assert b.call("ping").listen_port == b.port


def test_migrate_progress_line_on_a_terminal(cluster):
    import pty

    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=128 * MiB, rate=20_000)
    cmd = [FERRY, "--connect", a.socket, "migrate", "vm1", b.address]
    main, child = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=child, stderr=child, stdin=subprocess.DEVNULL)
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(60) == 0
    text = output.decode()
    assert "iteration" in text and "MB/s" in text and "\r" in text  # the live line
    for field_name in ("Phase:", "Downtime:", "Policy RPCs:", "Iterations:"):
        assert field_name in text


def test_a_destination_that_sends_nonsense_fails_the_migration_cleanly(cluster):
    """A fake destination that authenticates, then answers garbage."""
    a = cluster.daemon("a")
    create(a, "vm1")
    key = open(cluster.key, "rb").read().strip()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake_destination():
        peer = serve_as_destination(listener, key)
        try:
            peer.next_event()  # migrate
            peer.sock.sendall(b"\x00\x00\x00\x03\x93\x01\x02")  # not a reply frame
        finally:
            peer.close()

    thread = threading.Thread(target=fake_destination)
    thread.start()
    r = ferry(a, "migrate", "vm1", f"127.0.0.1:{port}", check=False)
    thread.join(30)
    listener.close()
    assert r.returncode == 1 and "broke the handshake" in r.stderr
    assert_running_and_writing(a, "vm1")


def test_a_watching_client_that_leaves_does_not_end_the_migration(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=64 * MiB, rate=40_000)
    seen = []

    class Leave(Exception):
        pass

    def on_progress(job):
        seen.append(job)
        raise Leave

    settings = {"max_dirty": 0, "max_iterations": 8}
    client = DaemonClient(a.socket, on_progress=on_progress)
    with pytest.raises(Leave):
        client.migrate(name="vm1", address=b.address, policy="xen", settings=settings, watch=True)
    client.close()
    assert seen and seen[0].kind == "migrate"
    deadline = time.monotonic() + 60
    while a.call("job", name="vm1").running:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert a.call("job", name="vm1").phase == "completed"
    assert_running_and_writing(b, "vm1")
