"""Crash consistency: either ferryd killed (SIGKILL) at each journalled phase of a
migration.  Within seconds of its restart exactly one copy of the guest runs,
the other host holds none, and `ferry list` on both agrees."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import ferry

from protocol._gen_control_msgs import DomainConfig
from toolstack.cli import DaemonError

MiB = 1 << 20
SETTLE = 30.0  # s for both hosts to agree after the restart


def start_pair(cluster, crash_side: str, point: str):
    env = dict(os.environ, FERRY_TEST_FAULTS=f"crash@{point}")
    a = cluster.daemon("a", env=env if crash_side == "a" else None)
    b = cluster.daemon("b", env=env if crash_side == "b" else None)
    a.call("create", config=DomainConfig(name="vm1", memory_bytes=32 * MiB, dirty_rate=20_000))
    return a, b


def migrate_in_background(a, b) -> threading.Thread:
    outcome = {}

    def run():
        try:
            outcome["report"] = a.call("migrate", name="vm1", address=b.address, watch=True)
        except DaemonError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for_crash(daemon, seconds=60):
    deadline = time.monotonic() + seconds
    while daemon.proc.poll() is None:
        assert time.monotonic() < deadline, "the crash point was never reached"
        time.sleep(0.05)
    assert daemon.proc.returncode == -9  # SIGKILL, by its own fault point


def listed(daemon) -> dict:
    return {d["name"]: d["state"] for d in json.loads(ferry(daemon, "list", "--json").stdout)}


def where_it_runs(a, b) -> str:
    """'a' or 'b' once exactly one host holds the guest, running, and the other
    none; fails after SETTLE seconds otherwise."""
    deadline = time.monotonic() + SETTLE
    while True:
        on_a, on_b = listed(a), listed(b)
        if on_a == {"vm1": "running"} and on_b == {}:
            return "a"
        if on_b == {"vm1": "running"} and on_a == {}:
            return "b"
        assert time.monotonic() < deadline, f"not settled: a {on_a}, b {on_b}"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "side, point, ends_on",
    [
        ("a", "source:precopy", "a"),
        ("a", "source:suspended", "a"),
        ("a", "source:go-sent", "a"),
        ("a", "source:go-out", "b"),
        ("a", "source:committed", "b"),
        ("b", "destination:receiving", "a"),
        ("b", "state:write", "a"),  # the incoming guest's state file, before it runs
        ("b", "destination:unpaused", "b"),
        ("b", "destination:committed", "b"),
    ],
)
def test_a_daemon_killed_at_each_phase_leaves_exactly_one_copy(cluster, side, point, ends_on):
    a, b = start_pair(cluster, side, point)
    thread = migrate_in_background(a, b)
    crashed = a if side == "a" else b
    wait_for_crash(crashed)
    crashed.start(env=dict(os.environ))  # the same daemon, without the fault
    thread.join(120)
    assert where_it_runs(a, b) == ends_on
    host = a if ends_on == "a" else b
    assert host.call("guest_check", name="vm1") == "ok"
    before = host.call("info", name="vm1").writes
    time.sleep(0.3)
    assert host.call("info", name="vm1").writes > before  # it runs, not merely listed
    journal = os.path.join(host.state, "journal")
    leftover = [f for f in os.listdir(journal) if "source" in open(os.path.join(journal, f)).read()]
    assert not leftover  # the source's record is settled


def test_an_unreachable_destination_leaves_the_domain_in_doubt_until_an_operator_decides(
    cluster,
):
    a, b = start_pair(cluster, "a", "source:go-out")
    thread = migrate_in_background(a, b)
    wait_for_crash(a)
    thread.join(120)
    b.stop()  # the destination is gone for good: nobody can say where the guest is
    a.start(env=dict(os.environ))
    assert listed(a) == {"vm1": "in-doubt"}
    for command in (["unpause", "vm1"], ["destroy", "vm1"], ["migrate", "vm1", "x:1"]):
        r = ferry(a, *command, check=False)
        assert r.returncode == 1 and "is in-doubt" in r.stderr, r.stderr
    r = ferry(a, "migrate-resolve", "vm1", check=False)
    assert r.returncode == 1 and "cannot reach destination" in r.stderr
    assert listed(a) == {"vm1": "in-doubt"}  # never resumed on a guess
    r = ferry(a, "migrate-resolve", "vm1", "--force-resume")
    assert "resumed here: forced by the operator" in r.stdout
    assert listed(a) == {"vm1": "running"}
    r = ferry(a, "migrate-resolve", "vm1", check=False)
    assert r.returncode == 1 and "not in doubt" in r.stderr
    b.start()  # the destination's own daemon ends what it left running


def test_an_operator_who_knows_the_guest_runs_elsewhere_destroys_the_copy(cluster):
    a, b = start_pair(cluster, "a", "source:go-out")
    thread = migrate_in_background(a, b)
    wait_for_crash(a)
    thread.join(120)
    deadline = time.monotonic() + 15
    while listed(b) != {"vm1": "running"}:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    b.stop()
    a.start(env=dict(os.environ))
    assert listed(a) == {"vm1": "in-doubt"}
    r = ferry(a, "migrate-resolve", "vm1", "--force-destroy")
    assert "our copy destroyed: forced by the operator" in r.stdout
    assert listed(a) == {}
    b.start()
    assert listed(b) == {"vm1": "running"}  # the one copy left


def test_a_source_back_after_the_guest_moved_on_destroys_its_stale_copy(cluster):
    a, b = start_pair(cluster, "a", "source:go-out")
    c = cluster.daemon("c")
    thread = migrate_in_background(a, b)
    wait_for_crash(a)
    thread.join(120)
    deadline = time.monotonic() + 15
    while listed(b) != {"vm1": "running"}:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ferry(b, "migrate", "vm1", c.address)  # it moves on while the source is down
    assert listed(b) == {} and listed(c) == {"vm1": "running"}
    a.start(env=dict(os.environ))
    deadline = time.monotonic() + SETTLE
    while listed(a):  # b still says it ran there: a's paused copy is stale
        assert time.monotonic() < deadline, listed(a)
        time.sleep(0.2)
    assert listed(c) == {"vm1": "running"} and listed(b) == {}


@pytest.mark.parametrize(
    "phase, ends_on, says",
    [
        ("go-sent", "a", "No space left on device"),  # go never left: the source resumes
        ("committed", "b", ""),  # the destination confirmed: the copy goes all the same
    ],
)
def test_a_journal_that_cannot_be_written_around_go(cluster, phase, ends_on, says):
    env = dict(os.environ, FERRY_TEST_FAULTS=f"fail@journal:source:{phase}=ENOSPC")
    a, b = cluster.daemon("a", env=env), cluster.daemon("b")
    a.call("create", config=DomainConfig(name="vm1", memory_bytes=32 * MiB, dirty_rate=20_000))
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == (1 if says else 0), r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
    assert where_it_runs(a, b) == ends_on
    assert os.listdir(os.path.join(a.state, "journal")) == []


def test_concurrent_resolutions_settle_once(cluster):
    a, b = start_pair(cluster, "a", "source:go-out")
    thread = migrate_in_background(a, b)
    wait_for_crash(a)
    thread.join(120)
    b.stop()
    a.start(env=dict(os.environ))
    assert listed(a) == {"vm1": "in-doubt"}
    b.start()
    outcomes = []
    threads = [
        threading.Thread(
            target=lambda: outcomes.append(ferry(a, "migrate-resolve", "vm1", check=False))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    settled = [r for r in outcomes if r.returncode == 0]
    assert len(settled) <= 1, [r.stdout for r in settled]  # the background retry may win
    assert all("not in doubt" in r.stderr for r in outcomes if r.returncode), outcomes
    assert where_it_runs(a, b) == "b"
