"""A link that breaks or stalls between the daemons, through the fault-injecting
proxy: the migration fails within its deadline, the source runs on as it was,
the destination removes what it built.  A slow link or a long precopy is not a
fault: deadlines measure silence, never duration (they are shrunk to a few
seconds here, so a migration of a few times that length shows it)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import ferry, processes_mentioning

from hypervisor import RunnerClient
from protocol._gen_control_msgs import DomainConfig
from toolstack.cli import DaemonError
from toolstack.harness import FaultProxy

MiB = 1 << 20
SHORT = ["--deadline", "helper=3", "--deadline", "ready=3", "--deadline", "go=3"]
SHORT += ["--deadline", "running=3", "--deadline", "handshake=3"]


@pytest.fixture
def link(cluster):
    a = cluster.daemon("a", listen=False, args=SHORT)
    b = cluster.daemon("b", args=SHORT)
    with FaultProxy("127.0.0.1", b.port) as proxy:
        yield a, b, proxy


def create(daemon, name="vm1", memory=32 * MiB, rate=20_000.0):
    config = DomainConfig(name=name, memory_bytes=memory, dirty_rate=rate, seed=3)
    daemon.call("create", config=config)


def migrate(a, proxy, *flags, check=True):
    address = f"127.0.0.1:{proxy.port}"
    return ferry(a, "migrate", "vm1", address, *flags, check=check)


def migrate_in_background(a, proxy, *flags):
    outcome = {}

    def run():
        r = migrate(a, proxy, *flags, check=False)
        outcome.update(code=r.returncode, stderr=r.stderr, stdout=r.stdout)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_phase(daemon, phases, iteration=0, seconds=30):
    deadline = time.monotonic() + seconds
    job = None
    while time.monotonic() < deadline:
        try:
            job = daemon.call("job", name="vm1")
            if job.phase in phases and job.iteration >= iteration:
                return job
        except DaemonError:
            pass
        time.sleep(0.02)
    last = "no job" if job is None else f"{job.phase}, iteration {job.iteration}: {job.error!r}"
    raise AssertionError(f"the job never reached {phases} (last seen: {last})")


def assert_source_as_before(a, was="running"):
    with RunnerClient(os.path.join(a.state, "domains", "vm1.sock"), timeout=10) as runner:
        info = runner.getinfo()
        assert info.state.name == was.upper() and not info.logdirty
    assert a.call("info", name="vm1").job is None
    if was == "running":
        before = a.call("info", name="vm1").writes
        time.sleep(0.3)
        assert a.call("info", name="vm1").writes > before
    assert os.listdir(os.path.join(a.state, "journal")) == []


def assert_destination_empty(b, seconds=15):
    deadline = time.monotonic() + seconds
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == []
    assert os.listdir(os.path.join(b.state, "journal")) == []
    assert not processes_mentioning(os.path.join(b.state, "domains"))


@pytest.mark.parametrize(
    "fault, direction",
    [("reset", "up"), ("cut", "up"), ("stall", "up"), ("reset", "down"), ("cut", "down")],
)
def test_a_link_that_breaks_or_stalls_mid_stream_fails_cleanly(link, fault, direction):
    a, b, proxy = link
    create(a, rate=40_000)
    ENDLESS = ["--policy", "xen", "--set", "max_dirty=0", "--set", "max_iterations=1000000"]
    started = time.monotonic()
    thread, outcome = migrate_in_background(a, proxy, *ENDLESS)
    wait_for_phase(a, ("precopy",), iteration=1)
    proxy.after_bytes(1 << 20, fault, direction) if direction == "up" else getattr(proxy, fault)()
    thread.join(60)
    assert outcome["code"] == 1 and len(outcome["stderr"].strip().splitlines()) == 1
    assert time.monotonic() - started < 30, "the fault was not noticed within its deadline"
    assert_source_as_before(a)
    assert_destination_empty(b)


def test_a_link_that_stops_delivering_only_towards_the_source(link):
    """The stream flows, the destination's answers do not: 'Ready' never arrives."""
    a, b, proxy = link
    create(a)
    started = time.monotonic()
    thread, outcome = migrate_in_background(a, proxy)
    wait_for_phase(a, ("precopy",))
    proxy.stall("down")
    thread.join(60)
    assert outcome["code"] == 1 and "no Ready from the peer within 3 s" in outcome["stderr"]
    assert time.monotonic() - started < 30
    assert_source_as_before(a)
    proxy.resume("down")  # the destination's own deadline (go) ends its side meanwhile
    assert_destination_empty(b)


def test_a_slow_link_is_not_a_dead_one(link):
    """3 MiB/s for a 24 MiB guest: over twice the helper's 3 s silence deadline."""
    a, b, proxy = link
    create(a, memory=24 * MiB, rate=0)
    a.call("pause", name="vm1")
    ram = RunnerClient(os.path.join(a.state, "domains", "vm1.sock")).map_guest_memory(True)
    ram.bytes[:] = 0x5A  # every page holds data: nothing travels as a hole
    ram.close()
    a.call("unpause", name="vm1")
    proxy.slow(3 * MiB)
    started = time.monotonic()
    report = json.loads(migrate(a, proxy, "--verify", "--json").stdout)
    assert time.monotonic() - started > 2 * 3  # longer than two silence deadlines
    assert report["phase"] == "completed" and report["integrity"] == "ok"
    received = b.call("job", name="vm1")
    assert received.phase == "completed" and received.pages_sent >= 6144


def test_a_long_precopy_is_not_a_hung_one(link):
    """Precopy that goes on for three silence deadlines, then stops."""
    a, b, proxy = link
    create(a, rate=40_000)
    ENDLESS = ["--policy", "xen", "--set", "max_dirty=0", "--set", "max_iterations=1000000"]
    thread, outcome = migrate_in_background(a, proxy, *ENDLESS)
    wait_for_phase(a, ("precopy",))
    time.sleep(9)
    ferry(a, "job-control", "vm1", "stop-and-copy")
    thread.join(60)
    assert outcome["code"] == 0, outcome["stderr"]
    assert b.call("guest_check", name="vm1") == "ok"


def save_helper_of(daemon) -> int:
    socket_path = os.path.join(daemon.state, "domains", "vm1.sock")
    pids = [p for p in processes_mentioning(socket_path) if "save-domain" in _cmdline(p)]
    assert len(pids) == 1
    return pids[0]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace")


@pytest.mark.parametrize("was", ["running", "paused"])
def test_abort_while_the_save_helper_is_stopped(link, was):
    a, b, proxy = link
    create(a, rate=40_000)
    if was == "paused":
        a.call("pause", name="vm1")
    ENDLESS = ["--policy", "xen", "--set", "max_dirty=0", "--set", "max_iterations=1000000"]
    thread, outcome = migrate_in_background(a, proxy, *ENDLESS)
    wait_for_phase(a, ("precopy",), iteration=1)
    helper = save_helper_of(a)
    os.kill(helper, signal.SIGSTOP)  # hung: it will neither answer nor die on its own
    started = time.monotonic()
    assert "abort requested" in ferry(a, "job-control", "vm1", "abort").stdout
    thread.join(30)
    assert time.monotonic() - started < 2.5  # sooner than any deadline would have
    assert outcome["code"] == 1 and "aborted by the operator" in outcome["stderr"]
    assert not os.path.exists(f"/proc/{helper}/cmdline")  # ended, not left stopped
    assert_source_as_before(a, was)
    assert_destination_empty(b)


def test_abort_while_the_sender_waits_for_the_destination(cluster):
    a = cluster.daemon("a", listen=False, args=["--deadline", "ready=120"])
    b = cluster.daemon("b")
    with FaultProxy("127.0.0.1", b.port) as proxy:
        create(a)
        thread, outcome = migrate_in_background(a, proxy)
        wait_for_phase(a, ("precopy",))
        proxy.stall("down")
        wait_for_phase(a, ("waiting for destination",))
        started = time.monotonic()
        ferry(a, "job-control", "vm1", "abort")
        thread.join(30)
        assert time.monotonic() - started < 2.5
        assert outcome["code"] == 1 and "aborted by the operator" in outcome["stderr"]
        assert_source_as_before(a)
        proxy.resume("down")
        proxy.cut()
        assert_destination_empty(b, seconds=30)


def test_an_incoming_domain_belongs_to_its_job(cluster):
    a = cluster.daemon("a", listen=False)
    b = cluster.daemon("b")
    with FaultProxy("127.0.0.1", b.port) as proxy:
        create(a)
        thread, outcome = migrate_in_background(a, proxy)
        wait_for_phase(a, ("precopy",))
        proxy.stall("up")
        listed = json.loads(ferry(b, "list", "--json").stdout)
        assert [(d["name"], d["state"], d["job"]) for d in listed] == [
            ("vm1", "incoming", "migrate-receive")
        ]
        for command in (
            ["pause", "vm1"],
            ["unpause", "vm1"],
            ["destroy", "vm1"],
            ["save", "vm1", os.path.join(b.state, "x.save")],
            ["migrate", "vm1", "127.0.0.1:1"],
        ):
            r = ferry(b, *command, check=False)
            assert r.returncode == 1 and "belongs to a migrate-receive job" in r.stderr, command
        assert b.call("job", name="vm1").running
        ferry(a, "job-control", "vm1", "abort")
        thread.join(30)
        proxy.cut()
        assert_source_as_before(a)
        assert_destination_empty(b, seconds=30)


def test_one_jobs_slow_disk_does_not_delay_anothers_policy_answers(cluster, short_tmp):
    env = dict(os.environ, FERRY_TEST_FAULTS="sleep@save:fsync=3")
    a = cluster.daemon("a", listen=False, env=env)
    b = cluster.daemon("b")
    create(a, "slow-disk", rate=0)
    create(a, "vm1")
    saved = {}

    def save():
        r = ferry(a, "save", "slow-disk", os.path.join(short_tmp, "s.save"), "--json")
        saved["report"], saved["done"] = json.loads(r.stdout), time.monotonic()

    saver = threading.Thread(target=save)
    saver.start()
    time.sleep(0.5)  # the save is in its 3 s fsync now
    report = json.loads(ferry(a, "migrate", "vm1", b.address, "--json").stdout)
    migrated = time.monotonic()
    saver.join(30)
    assert migrated < saved["done"]  # the migration finished while the save still synced
    assert report["policy_rpc_p99_us"] < 1_000_000
    assert saved["report"]["phase"] == "completed"
