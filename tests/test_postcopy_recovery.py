"""Postcopy recovery: a link that breaks or stalls after the switch, or a helper
that dies, pauses both jobs; `ferry migrate NAME HOST:PORT --resume` goes on
over a new connection, as often as it takes; nothing is lost or run twice.
Through the fault-injecting proxy and the installed executable."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time

import numpy as np
import pytest
from conftest import ferry, migrate_in_background, processes_mentioning
from peers import Peer

from hypervisor import RunnerClient, uffd
from hypervisor.kvm_api import kvm_usable
from protocol import NEED_DATA, libxc
from protocol import _gen_migration_msgs as msgs
from protocol.limits import PAGE_SIZE
from toolstack.cli import DaemonError
from toolstack.harness import FaultProxy

USABLE, WHY = uffd.usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"postcopy cannot run here: {WHY}")
MiB = 1 << 20
SHORT = ["--deadline", "helper=3", "--deadline", "handshake=3", "--deadline", "running=3"]
SLOW_PUSH = "2"  # MB/s: the push lasts long enough to break the link under it
BACKENDS = [
    "sim",
    pytest.param(
        "kvm", marks=pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm cannot create a VM")
    ),
]


# -- the scene --------------------------------------------------------------------------
def pair(cluster, backend="sim", memory=32 * MiB, rate=20000):
    a = cluster.daemon("a", listen=False, args=SHORT)
    b = cluster.daemon("b", args=SHORT)
    r = ferry(
        a, "create", "vm1", "--memory", str(memory), "--backend", backend, "--dirty-rate", str(rate)
    )
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)  # the guest dirties its RAM
    return a, b


def job(daemon) -> dict:
    r = ferry(daemon, "job", "vm1", "--json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_for(daemon, phase, seconds=30):
    """Through the control API (quicker than the executable: races are short)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if daemon.call("job", name="vm1").phase == phase:
                return
        except DaemonError:
            pass  # no job yet
        assert time.monotonic() < deadline, f"never reached {phase}: {job(daemon)}"
        time.sleep(0.02)


def listed(daemon) -> dict:
    return {d["name"]: d["state"] for d in json.loads(ferry(daemon, "list", "--json").stdout)}


def paused_by_a_cut(a, b, proxy, *flags):
    """Start a postcopy through the proxy, cut it after the switch: both paused."""
    thread, outcome = migrate_in_background(
        a,
        f"127.0.0.1:{proxy.port}",
        "--postcopy-after-precopy",
        "--postcopy-bandwidth",
        SLOW_PUSH,
        *flags,
    )
    wait_for(a, "postcopy")
    proxy.cut()
    thread.join(60)
    assert outcome["code"] == 1
    line = outcome["stderr"].strip()
    assert "\n" not in line and "postcopy-paused" in line and "--resume" in line, line
    wait_for(b, "postcopy-paused")
    assert listed(a) == {"vm1": "postcopy-paused"} and listed(b) == {"vm1": "postcopy-paused"}


def assert_it_ran_on(a, b):
    """The migration completed: the guest runs at b, checks its pages, and a has none."""
    assert listed(a) == {} and listed(b) == {"vm1": "running"}
    assert ferry(b, "guest-check", "vm1").stdout.strip() == "ok"
    before = b.call("info", name="vm1").writes
    time.sleep(0.3)
    assert b.call("info", name="vm1").writes > before
    assert os.listdir(os.path.join(a.state, "journal")) == []
    report = job(a)
    pc = report["postcopy"]
    assert report["phase"] == "completed" and pc["pushed"] + pc["requested"] >= pc["pages"]


# -- the tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cut_link_pauses_and_resume_completes(cluster, backend):
    a, b = pair(cluster, backend)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
    r = ferry(a, "migrate", "vm1", b.address, "--resume")
    assert "completed" in r.stdout
    assert_it_ran_on(a, b)


def test_a_link_cut_twice_is_resumed_twice(cluster):
    a, b = pair(cluster, memory=64 * MiB, rate=5000)  # faults do not fetch the set too soon
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
        # the first resume goes through the proxy again, slowly, and is cut too
        thread, outcome = migrate_in_background(
            a, f"127.0.0.1:{proxy.port}", "--resume", "--postcopy-bandwidth", "1"
        )
        wait_for(b, "postcopy")
        proxy.cut()
        thread.join(60)
        assert outcome["code"] == 1 and "postcopy-paused" in outcome["stderr"], job(a)
    wait_for(b, "postcopy-paused")
    ferry(a, "migrate", "vm1", b.address, "--resume", "--postcopy-bandwidth", "0")
    assert_it_ran_on(a, b)


def test_a_stalled_link_pauses_like_a_broken_one(cluster):
    a, b = pair(cluster)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        thread, outcome = migrate_in_background(
            a,
            f"127.0.0.1:{proxy.port}",
            "--postcopy-after-precopy",
            "--postcopy-bandwidth",
            SLOW_PUSH,
        )
        wait_for(a, "postcopy")
        proxy.stall()  # nothing closes; nothing moves
        thread.join(60)
        assert outcome["code"] == 1 and "moved nothing" in outcome["stderr"]
        wait_for(b, "postcopy-paused")
        proxy.heal()
    ferry(a, "migrate", "vm1", b.address, "--resume")
    assert_it_ran_on(a, b)


@pytest.mark.parametrize("side", ["destination", "source"])
def test_a_helper_killed_during_postcopy_pauses_and_resume_completes(cluster, side):
    a, b = pair(cluster)
    thread, outcome = migrate_in_background(
        a, b.address, "--postcopy-after-precopy", "--postcopy-bandwidth", SLOW_PUSH
    )
    wait_for(a, "postcopy")
    mode = "--restore-domain" if side == "destination" else "--save-domain"
    daemon = b if side == "destination" else a
    (helper,) = [
        pid
        for pid in processes_mentioning(os.path.join(daemon.state, "domains"))
        if mode in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    ]
    os.kill(helper, signal.SIGKILL)
    thread.join(60)
    assert outcome["code"] == 1 and "postcopy-paused" in outcome["stderr"]
    wait_for(b, "postcopy-paused")
    ferry(a, "migrate", "vm1", b.address, "--resume")
    assert_it_ran_on(a, b)


def test_resume_with_the_wrong_key_or_to_the_wrong_host_changes_nothing(cluster):
    a, b = pair(cluster)
    stranger = cluster.daemon("c", key=cluster.write_key("other.key", secrets.token_hex(32)))
    other = cluster.daemon("d")  # the right key, but not where the guest went
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
    for wrong in (stranger, other):
        r = ferry(a, "migrate", "vm1", wrong.address, "--resume", check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "authentication" in r.stderr or "no paused postcopy" in r.stderr, r.stderr
        assert listed(a) == {"vm1": "postcopy-paused"} and listed(b) == {"vm1": "postcopy-paused"}
        assert listed(wrong) == {}
    ferry(a, "migrate", "vm1", b.address, "--resume")
    assert_it_ran_on(a, b)


def test_abort_while_paused_keeps_both_copies_renamed(cluster):
    a, b = pair(cluster)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
    for daemon in (a, b):
        r = ferry(daemon, "job-control", "vm1", "abort")
        assert "both copies are kept" in r.stdout
    name = "vm1--postcopy-inconsistent"
    deadline = time.monotonic() + 15
    while not (listed(a) == {name: "postcopy-inconsistent"} == listed(b)):
        assert time.monotonic() < deadline, (listed(a), listed(b))
        time.sleep(0.1)
    for daemon in (a, b):  # nothing resumes it, nothing forgets it...
        r = ferry(daemon, "unpause", name, check=False)
        assert r.returncode == 1 and "postcopy-inconsistent" in r.stderr
        ferry(daemon, "destroy", name)  # ...until an operator destroys it
        assert listed(daemon) == {}


def test_a_restarted_daemon_still_knows_the_paused_postcopy(cluster):
    a, b = pair(cluster)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
    a.stop()
    b.stop()
    a.start()
    b.start()
    assert listed(a) == {"vm1": "postcopy-paused"} and listed(b) == {"vm1": "postcopy-paused"}
    ferry(a, "migrate", "vm1", b.address, "--resume")
    assert_it_ran_on(a, b)


def test_a_page_sent_again_after_resume_cannot_overwrite_the_guest(cluster):
    """A source that, resuming, sends a page the destination did not list
    (one it has, which the guest may have written since): refused, the page
    untouched, the postcopy paused again and resumable."""
    a, b = pair(cluster)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        paused_by_a_cut(a, b, proxy)
    (record,) = [f for f in os.listdir(os.path.join(b.state, "journal"))]
    migration_id = record.removesuffix(".json")
    peer = Peer.connect(b.port)
    try:
        peer.authenticate(open(cluster.key, "rb").read().strip())
        assert peer.call(msgs.Resume(name="vm1", migration_id=migration_id)) is None
        lacking = read_resume_list(peer)
        victim = next(p for p in range(8 * MiB // PAGE_SIZE) if p not in lacking)
        with RunnerClient(os.path.join(b.state, "domains", "vm1.sock")) as runner:
            ram = runner.map_guest_memory()
            before = os.pread(ram.fd, PAGE_SIZE, victim * PAGE_SIZE)
            pfns = np.array([victim], np.uint64)
            garbage = b"\xee" * PAGE_SIZE
            peer.sock.sendall(b"".join(libxc.encode_page_data(pfns, [garbage], postcopy=True)))
            wait_for(b, "postcopy-paused")
            assert os.pread(ram.fd, PAGE_SIZE, victim * PAGE_SIZE) == before != garbage
            ram.close()
    finally:
        peer.close()
    with open(b.log) as f:
        assert "was not announced for postcopy" in f.read()
    ferry(a, "migrate", "vm1", b.address, "--resume")
    assert_it_ran_on(a, b)


def read_resume_list(peer) -> set[int]:
    decoder = libxc.LibxcDecoder(max_pfns=1 << 20, records_only=True)
    lacking = set()
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            decoder.feed(peer.sock.recv(1 << 16))
        elif isinstance(event, libxc.PfnList):
            lacking.update(int(p) for p in event.pfns)
        else:
            assert event == libxc.Marker(libxc.REC_POSTCOPY_RESUME_END)
            return lacking
