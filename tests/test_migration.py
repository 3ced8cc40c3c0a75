"""Live migration between real ferryd processes on loopback, and job control."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import processes_mentioning

from toolstack.client import DaemonError

MiB = 1 << 20


def create(daemon, name, memory=32 * MiB, rate=20_000.0, ws=1.0, backend="sim"):
    config = {
        "name": name,
        "memory_bytes": memory,
        "backend": backend,
        "dirty_rate": rate,
        "working_set": ws,
        "seed": 3,
    }
    return daemon.request("create", config=json.dumps(config))["domain"]


def migrate(src, dst, name, **fields) -> dict:
    return src.request(
        "migrate", name=name, address=f"127.0.0.1:{dst.port}", verify=True, **fields
    )["report"]


def writes(daemon, name) -> int:
    return daemon.request("info", name=name)["domain"]["writes"]


def assert_running_and_writing(daemon, name):
    before = writes(daemon, name)
    time.sleep(0.3)
    info = daemon.request("info", name=name)["domain"]
    assert info["state"] == "running" and info["writes"] > before


def ferry(daemon, *args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "toolstack", "--connect", daemon.socket, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in r.stderr
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_migrate_a_busy_domain(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1")
    time.sleep(0.3)
    r = ferry(a, "migrate", "vm1", f"127.0.0.1:{b.port}", "--verify", "--json")
    report = json.loads(r.stdout)
    assert report["integrity"] == "ok" and report["phase"] == "completed"
    assert report["downtime_ms"] > 0 and report["policy_rpcs"] > 0
    assert report["iterations"][0]["pages"] == 32 * MiB // 4096
    assert a.request("list")["domains"] == []
    assert_running_and_writing(b, "vm1")
    assert b.request("guest-check", name="vm1")["guest_check"] == "ok"
    listed = json.loads(ferry(b, "list", "--json").stdout)
    assert [(d["name"], d["state"], d["backend"], d["memory_bytes"]) for d in listed] == [
        ("vm1", "running", "sim", 32 * MiB)
    ]
    job = json.loads(ferry(a, "job", "vm1", "--json").stdout)
    assert job["phase"] == "completed" and job["downtime_ms"] == report["downtime_ms"]


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
    assert {n: r["integrity"] for n, r in results.items()} == dict.fromkeys(names, "ok")
    assert sorted(d["name"] for d in b.request("list")["domains"]) == names


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
            job = a.request("job", name=name)["job"]
            if job["phase"] == "precopy" and job["iteration"] >= 1:
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
    assert "policy aborted" in outcome["error"]
    info = a.request("info", name="vm1")["domain"]
    assert info["job"] is None
    assert_running_and_writing(a, "vm1")
    assert a.request("guest-check", name="vm1")["guest_check"] == "ok"
    assert b.request("list")["domains"] == []
    job = a.request("job", name="vm1")["job"]
    assert job["phase"] == "failed" and "operator requested abort" in job["decision"]


def test_job_control_stop_and_copy_completes_at_once(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    a.request("job-control", name="vm1", action="stop-and-copy")
    thread.join(60)
    assert outcome["report"]["integrity"] == "ok"
    assert "operator requested stop-and-copy" in outcome["report"]["decision"]
    assert_running_and_writing(b, "vm1")


def test_set_downtime_limit_mid_flight_changes_when_converge_switches_over(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b, policy="converge")
    r = ferry(a, "job-control", "vm1", "set", "downtime_limit=10000")
    assert "downtime_limit = 10000" in r.stdout
    thread.join(60)
    assert "within 10000 ms" in outcome["report"]["decision"]
    assert outcome["report"]["integrity"] == "ok"


def test_set_a_xen_limit_mid_flight(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    r = ferry(a, "job-control", "vm1", "set", "max_dirty=1000000")
    assert "max_dirty = 1000000" in r.stdout
    thread.join(60)
    assert "fewer than 1000000" in outcome["report"]["decision"]
    bad = ferry(a, "job-control", "vm1", "set", "downtime_limit=soon", check=False)
    assert bad.returncode == 1 and "no running job" in bad.stderr


def test_destination_killed_mid_stream_resumes_the_source(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", rate=40_000)
    thread, outcome = start_endless_migration(a, b)
    b.stop(signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert "error" in outcome and outcome["error"]
    assert_running_and_writing(a, "vm1")
    assert a.request("info", name="vm1")["domain"]["job"] is None
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
    r = ferry(intruder, "migrate", "vm1", f"127.0.0.1:{b.port}", check=False)
    assert r.returncode == 1 and "authentication" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert b.request("list")["domains"] == []
    assert os.listdir(os.path.join(b.state, "domains")) == []
    assert_running_and_writing(intruder, "vm1")


def test_daemon_restart_reattaches_running_domains(cluster):
    a = cluster.daemon("a", listen=False)
    create(a, "vm1")
    create(a, "vm2", rate=0)
    a.request("pause", name="vm2")
    create(a, "vm3")
    assert a.stop() == 0
    vm3 = os.path.join(a.state, "domains", "vm3")
    for pid in processes_mentioning(vm3 + ".sock"):  # dies while no ferryd watches
        os.kill(pid, signal.SIGKILL)
    a.start()
    listed = {d["name"]: d["state"] for d in a.request("list")["domains"]}
    assert listed == {"vm1": "running", "vm2": "paused"}
    assert not os.path.exists(vm3 + ".json") and not os.path.exists(vm3 + ".sock")
    assert_running_and_writing(a, "vm1")
    # A re-attached runner is not this ferryd's child; destroy still returns
    # only once it has exited, as it does for a runner the daemon started.
    for name in ("vm1", "vm2"):
        a.request("destroy", name=name)
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
        [
            sys.executable,
            "-m",
            "toolstack",
            "--connect",
            os.path.join(short_tmp, "no.sock"),
            "list",
        ],
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
    assert a.request("list")["domains"] == []
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
    assert b.request("list")["domains"] == []


def test_garbage_and_hostile_requests_on_the_migration_port(cluster):
    import socket as sk

    from protocol import auth
    from protocol.control import HEADER_SIZE, body_length, decode_body, encode_frame

    b = cluster.daemon("b")
    # no key: random bytes, then a short read, then silence: refused, nothing created
    for junk in (os.urandom(200), auth.HELLO + bytes(10), b""):
        with sk.create_connection(("127.0.0.1", b.port), timeout=15) as s:
            s.sendall(junk)
            s.shutdown(sk.SHUT_WR)
            try:  # the daemon may answer a nonce, but it ends the line
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    # with the key, but a hostile request: one clear error
    key = open(cluster.key, "rb").read().strip()
    with sk.create_connection(("127.0.0.1", b.port), timeout=15) as s:
        nonce = auth.new_nonce()
        s.sendall(auth.HELLO + nonce)
        answer = s.recv(64, sk.MSG_WAITALL)
        assert auth.verify(key, b"server", nonce, answer[:32], answer[32:])
        s.sendall(auth.proof(key, b"client", nonce, answer[:32]))
        assert s.recv(len(auth.ACCEPT), sk.MSG_WAITALL) == auth.ACCEPT
        config = json.dumps({"name": "vm1", "memory_bytes": -1}).encode()
        s.sendall(encode_frame({"op": "migrate", "config": config, "verify": False}))
        reply = decode_body(
            s.recv(body_length(s.recv(HEADER_SIZE, sk.MSG_WAITALL)), sk.MSG_WAITALL)
        )
        assert reply["ok"] is False and "bad domain config" in reply["error"]
    assert b.request("list")["domains"] == []
    assert os.listdir(os.path.join(b.state, "domains")) == []
    assert b.request("ping")["listen_port"] == b.port


def test_migrate_progress_line_on_a_terminal(cluster):
    import pty

    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=128 * MiB, rate=20_000)
    cmd = [
        sys.executable,
        "-m",
        "toolstack",
        "--connect",
        a.socket,
        "migrate",
        "vm1",
        f"127.0.0.1:{b.port}",
    ]
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
    import socket as sk

    from protocol import auth
    from protocol.control import HEADER_SIZE, body_length

    a = cluster.daemon("a")
    create(a, "vm1")
    key = open(cluster.key, "rb").read().strip()
    listener = sk.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake_destination():
        conn, _ = listener.accept()
        with conn:
            hello = conn.recv(len(auth.HELLO) + 32, sk.MSG_WAITALL)
            nonce = auth.new_nonce()
            conn.sendall(nonce + auth.proof(key, b"server", hello[len(auth.HELLO) :], nonce))
            conn.recv(32, sk.MSG_WAITALL)
            conn.sendall(auth.ACCEPT)
            conn.recv(body_length(conn.recv(HEADER_SIZE, sk.MSG_WAITALL)), sk.MSG_WAITALL)
            conn.sendall(b"\x00\x00\x00\x03\x93\x01\x02")  # a msgpack list, not a map

    thread = threading.Thread(target=fake_destination)
    thread.start()
    r = ferry(a, "migrate", "vm1", f"127.0.0.1:{port}", check=False)
    thread.join(30)
    listener.close()
    assert r.returncode == 1 and "destination sent nonsense" in r.stderr
    assert_running_and_writing(a, "vm1")


def test_a_watching_client_that_leaves_does_not_end_the_migration(cluster):
    from toolstack.client import DaemonClient

    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=64 * MiB, rate=40_000)
    client = DaemonClient(a.socket)
    seen = []

    class Leave(Exception):
        pass

    def on_progress(p):
        seen.append(p)
        raise Leave

    settings = {"max_dirty": 0, "max_iterations": 8}
    with pytest.raises(Leave):
        client.request(
            "migrate",
            name="vm1",
            address=f"127.0.0.1:{b.port}",
            policy="xen",
            settings=settings,
            watch=True,
            on_progress=on_progress,
        )
    client.close()
    assert seen and seen[0]["kind"] == "migrate"
    deadline = time.monotonic() + 60
    while a.request("job", name="vm1")["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert a.request("job", name="vm1")["job"]["phase"] == "completed"
    assert_running_and_writing(b, "vm1")
