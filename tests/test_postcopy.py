"""Postcopy live migration end to end: real ferryd daemons, the installed
`ferry` executable, sim and KVM guests.

- the three ways to switch (after the first pass, mid-first-pass by
  `ferry job-control NAME postcopy`, the converge policy's fallback), each
  ending with the guest checked and writing at the destination, nothing left
  at the source and the report's postcopy section adding up;
- every page intact (RAM digests before and after, most pages by postcopy);
- a guest that faults on missing pages is served;
- either daemon killed after the switch: the other keeps its copy paused,
  then an abort renames both copies NAME--postcopy-inconsistent, or
  `ferry migrate NAME HOST:PORT --resume` finishes the migration;
- a hostile destination (tests/peers.py) asking for pages it may not have,
  or flooding requests; a hostile source sending pages without data;
- `ferry verify-stream` on a captured postcopy stream.

A slow link (the fault proxy) makes the first pass long enough to switch in
the middle of it; `--postcopy-bandwidth` keeps a postcopy going long enough
to kill a daemon in it.  Every test ends what it started: the `pair` and
`source` fixtures abort paused postcopy jobs and destroy every domain
(`end_everything`), and fail if they cannot.  Bugs found are kept as
xfail(strict=True) tests, each with its reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
from conftest import ferry, migrate_in_background, processes_mentioning
from peers import fault_record, play_postcopy_destination, play_postcopy_source, raw

from hypervisor import RunnerClient, uffd
from hypervisor.kvm_api import kvm_usable
from protocol import NEED_DATA, libxc
from protocol import _gen_migration_msgs as msgs
from protocol._gen_control_msgs import DomainConfig
from protocol._gen_runner_msgs import DomainState
from tests.streams import page
from toolstack.cli import DaemonError
from toolstack.harness import FaultProxy

POSTCOPY_OK, POSTCOPY_WHY = uffd.usable()
pytestmark = pytest.mark.skipif(
    not POSTCOPY_OK, reason=f"this host cannot serve postcopy faults: {POSTCOPY_WHY}"
)
BACKENDS = [
    "sim",
    pytest.param(
        "kvm",
        marks=pytest.mark.skipif(
            not kvm_usable(), reason="/dev/kvm is missing or cannot create a VM here"
        ),
    ),
]
MiB = 1 << 20
PAGE = 4096
INCONSISTENT = "vm1--postcopy-inconsistent"
SLOW_LINK = 16 * MiB  # bytes/s: a 64 MiB first pass takes seconds, long enough to switch in it


# -- helpers ---------------------------------------------------------------------------
def create(daemon, memory=64 * MiB, rate=20_000.0, ws=1.0, backend="sim", paused=False):
    config = DomainConfig(
        name="vm1", memory_bytes=memory, backend=backend, dirty_rate=rate, working_set=ws, seed=5
    )
    daemon.call("create", config=config, paused=paused)


def wait_for_job(daemon, predicate, seconds=30.0, name="vm1"):
    deadline = time.monotonic() + seconds
    while True:
        try:
            job = daemon.call("job", name=name)
            if predicate(job):
                return job
        except DaemonError:
            pass
        assert time.monotonic() < deadline, f"the job of {name} never got there"
        time.sleep(0.02)


def switch_mid_first_pass(a, proxy) -> None:
    """Over the slow link: once the first pass has sent a batch, switch by hand."""
    job = wait_for_job(a, lambda j: j.phase == "precopy" and j.pages_sent >= 1024)
    assert job.iteration == 0 and job.pages_sent < job.memory_total_bytes // PAGE
    assert ferry(a, "job-control", "vm1", "postcopy").stdout.strip() == "postcopy requested"
    proxy.slow(None)  # at most one more batch goes before the switch


def migrate_switching_mid_first_pass(a, b) -> dict:
    """`ferry migrate vm1 --postcopy --json` over a slow link, switched by
    hand during the first pass; its report once it succeeded."""
    with FaultProxy("127.0.0.1", b.port) as proxy:
        proxy.slow(SLOW_LINK, "up")
        thread, outcome = migrate_in_background(
            a, f"127.0.0.1:{proxy.port}", "--postcopy", "--json"
        )
        try:
            switch_mid_first_pass(a, proxy)
            thread.join(60)
        finally:
            proxy.cut()  # a postcopy still on it pauses (and the fixture ends it)
            thread.join(60)
    assert outcome["code"] == 0, outcome
    return json.loads(outcome["stdout"])


def listed(daemon) -> dict:
    return {d.name: d.state for d in daemon.call("list")}


def wait_for_listing(daemon, done, seconds=30.0) -> dict:
    """`ferry list` once `done(listing)` holds; asserted within `seconds`."""
    deadline = time.monotonic() + seconds
    while not done(shown := listed(daemon)):
        assert time.monotonic() < deadline, f"still listed as {shown}"
        time.sleep(0.05)
    return shown


def writes(daemon, name="vm1") -> int:
    return daemon.call("info", name=name).writes


def runner_state(daemon, name):
    with RunnerClient(os.path.join(daemon.state, "domains", name + ".sock"), timeout=10) as r:
        return r.getinfo().state


def journal(daemon) -> list:
    return os.listdir(os.path.join(daemon.state, "journal"))


def journal_phases(daemon) -> list:
    folder = os.path.join(daemon.state, "journal")
    phases = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            phases.append(json.load(f)["phase"])
    return phases


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def assert_moved(a, b, report: dict, downtime=True) -> None:
    """The guest runs at the destination, checked and writing; nothing is left
    at the source; the postcopy section adds up (on both hosts).  `downtime`:
    the job saw the switch (not one a restarted daemon re-made from its journal)."""
    assert report["phase"] == "completed" and report["error"] == "", report
    assert report["memory_remaining_bytes"] in (None, 0), report
    assert ferry(b, "guest-check", "vm1").stdout.strip() == "ok"
    before = writes(b)
    time.sleep(0.25)
    assert listed(b) == {"vm1": "running"} and writes(b) > before
    assert listed(a) == {} and journal(a) == []
    assert not processes_mentioning(os.path.join(a.state, "domains"))  # no runner left
    pc = report["postcopy"]
    assert pc["pages"] > 0 and pc["pushed"] + pc["requested"] == pc["pages"], pc
    assert pc["bytes"] >= pc["pages"] * PAGE and pc["ms"] > 0
    if downtime:
        assert report["downtime_ms"] is not None and report["downtime_ms"] > 0
    received = b.call("job", name="vm1")
    assert received.kind == "migrate-receive" and received.phase == "completed"
    assert received.postcopy.pages == pc["pages"]


def assert_faults_served(pc: dict) -> None:
    """The guest blocked on pages it lacked, and each wait was timed."""
    assert pc["requested"] > 0, pc
    assert 0 < sum(pc["fault_histogram"]) <= pc["requested"], pc
    assert 0 < pc["fault_p50_us"] <= pc["fault_p99_us"], pc


def end_everything(*daemons, proxy=None, seconds=30.0) -> None:
    """Whatever a test left: the link cut (a postcopy on it pauses), a killed
    daemon restarted, paused postcopy jobs aborted, every domain destroyed."""
    if proxy is not None:
        proxy.heal()
        proxy.cut()
    deadline = time.monotonic() + seconds
    for daemon in daemons:
        if not daemon.running:
            daemon.start()
        while domains := daemon.call("list"):
            for d in domains:
                try:
                    if d.state == "in-doubt":
                        daemon.call("migrate_resolve", name=d.name, force="destroy")
                    elif d.job is not None:
                        daemon.call("job_control", name=d.name, action="abort")
                    else:
                        daemon.call("destroy", name=d.name)
                except DaemonError:
                    pass  # a job not paused yet, or just ending
            assert time.monotonic() < deadline, f"{daemon.name} keeps {domains}"
            time.sleep(0.1)


@pytest.fixture
def pair(cluster):
    """Two daemons (started side by side); whatever the test left is ended
    before the cluster checks."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(cluster.daemon, ["a", "b"])
    yield a, b
    end_everything(a, b)


@pytest.fixture
def source(cluster):
    """One daemon (no --listen) with a busy 32 MiB guest, for a hand-driven destination."""
    a = cluster.daemon("a", listen=False)
    create(a, memory=32 * MiB, rate=20_000, ws=0.25)
    yield a
    end_everything(a)


# -- the three ways to switch ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_postcopy_after_the_first_pass_serves_a_faulting_guest(pair, backend):
    """--postcopy-after-precopy, the push capped at 4 MB/s so that the guest
    (a vCPU blocked in the kernel, with KVM) faults on pages still at the
    source: each is asked for, served, and the guest runs on."""
    a, b = pair
    create(a, memory=32 * MiB, rate=20_000, backend=backend)
    time.sleep(0.2)
    flags = ["--postcopy-after-precopy", "--postcopy-bandwidth", "4", "--json"]
    report = json.loads(ferry(a, "migrate", "vm1", b.address, *flags).stdout)
    assert "postcopy after precopy" in report["decision"]
    # one pass over all of RAM, then the switch: no second iteration
    assert [it["pages"] for it in report["iterations"]] == [32 * MiB // PAGE]
    assert_moved(a, b, report)
    assert_faults_served(report["postcopy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_mid_first_pass_by_job_control(pair, backend):
    """Like virsh migrate-postcopy while the first pass runs: most pages follow the guest."""
    a, b = pair
    create(a, rate=40_000 if backend == "sim" else 20_000, backend=backend)
    time.sleep(0.2)
    report = migrate_switching_mid_first_pass(a, b)
    assert "operator requested postcopy" in report["decision"]
    [first_pass] = report["iterations"]
    assert first_pass["pages"] < 64 * MiB // PAGE // 2
    assert_moved(a, b, report)
    assert report["postcopy"]["pages"] > 64 * MiB // PAGE // 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_converge_gives_up_and_falls_back_to_postcopy(pair, backend):
    a, b = pair
    create(a, memory=32 * MiB, rate=40_000 if backend == "sim" else 20_000, backend=backend)
    time.sleep(0.2)
    flags = ["--postcopy", "--fallback", "postcopy", "--downtime-limit", "0.001"]
    r = ferry(a, "migrate", "vm1", b.address, *flags, "--max-iterations", "2", "--json")
    report = json.loads(r.stdout)
    assert report["decision"].startswith("postcopy: 2 iterations without converging")
    assert report["settings"]["fallback"] == "postcopy"
    assert len(report["iterations"]) >= 2  # precopy went on before it gave up
    assert_moved(a, b, report)


def test_a_fallback_to_postcopy_without_postcopy_is_refused_before_anything_moves(pair):
    a, b = pair
    create(a, memory=32 * MiB, rate=40_000)
    flags = ["--fallback", "postcopy", "--downtime-limit", "0.001", "--max-iterations", "1"]
    r = ferry(a, "migrate", "vm1", b.address, *flags, check=False)
    assert r.returncode == 1 and "fallback postcopy needs" in one_line(r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1
    before = writes(a)
    time.sleep(0.25)
    assert listed(a) == {"vm1": "running"} and writes(a) > before
    assert listed(b) == {}  # nothing was ever sent
    assert a.call("info", name="vm1").job is None


def test_a_policy_that_answers_postcopy_unasked_aborts_and_the_source_runs_on(pair):
    """A job-control change to fallback postcopy mid-migration is the policy's
    answer, not the migration's permission: the job aborts, the guest stays."""
    a, b = pair
    create(a, memory=32 * MiB, rate=40_000)
    result = {}
    flags = ["--downtime-limit", "0.001", "--max-iterations", "100000"]
    thread = threading.Thread(
        target=lambda: result.update(r=ferry(a, "migrate", "vm1", b.address, *flags, check=False))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while ferry(a, "job-control", "vm1", "set", "fallback=postcopy", check=False).returncode:
            assert time.monotonic() < deadline, "the job never became steerable"
            time.sleep(0.05)
        ferry(a, "job-control", "vm1", "set", "max_iterations=1", check=False)
    finally:
        thread.join(60)
    r = result["r"]
    assert r.returncode == 1 and "not started with --postcopy" in one_line(r.stderr)
    before = writes(a)
    time.sleep(0.25)
    assert listed(a) == {"vm1": "running"} and writes(a) > before
    assert ferry(a, "guest-check", "vm1").stdout.strip() == "ok"
    deadline = time.monotonic() + 15
    while listed(b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listed(b) == {}


@pytest.mark.parametrize("flag", ["--postcopy", "--postcopy-after-precopy"])
def test_verify_with_postcopy_is_refused_before_anything_moves(pair, flag):
    """The digests compare all of RAM before the guest runs at the destination;
    after a postcopy switch it runs there first: refused, the guest stays."""
    a, b = pair
    create(a, memory=32 * MiB, rate=20_000)
    r = ferry(a, "migrate", "vm1", b.address, flag, "--verify", check=False)
    assert r.returncode == 1
    assert "--verify cannot check a postcopy migration" in one_line(r.stderr), r.stderr
    assert listed(a) == {"vm1": "running"} and listed(b) == {}


# -- integrity -------------------------------------------------------------------------
def test_every_page_arrives_intact(pair):
    """A paused domain full of random bytes: its RAM digest at the source
    before equals the destination's after, most pages having come by postcopy."""
    a, b = pair
    create(a, rate=0, paused=True)
    with RunnerClient(os.path.join(a.state, "domains", "vm1.sock")) as runner:
        ram = runner.map_guest_memory(True)
        ram.bytes[:] = np.random.default_rng(11).integers(0, 256, ram.bytes.shape, np.uint8)
        ram.close()
    digest = ferry(a, "digest", "vm1").stdout.strip()
    pc = migrate_switching_mid_first_pass(a, b)["postcopy"]
    assert pc["pages"] > 64 * MiB // PAGE // 2  # most pages came by postcopy
    assert pc["pushed"] + pc["requested"] == pc["pages"]
    assert listed(a) == {}
    ferry(b, "pause", "vm1")  # it runs at the destination (idle): digests need it paused
    assert ferry(b, "digest", "vm1").stdout.strip() == digest


# -- a daemon (or a helper) killed after the switch ------------------------------------
def start_capped_postcopy(a, b, address=None):
    """A busy guest switched after its first pass, the push capped at 1 MB/s:
    postcopy lasts seconds.  Returns once the guest runs at the destination."""
    create(a, rate=5_000, ws=0.5)
    time.sleep(0.2)
    flags = ["--postcopy-after-precopy", "--postcopy-bandwidth", "1"]
    thread, outcome = migrate_in_background(a, address or b.address, *flags)
    wait_for_job(a, lambda j: j.phase == "postcopy")
    return thread, outcome


def runner_of(daemon) -> int:
    sock = os.path.join(daemon.state, "domains", "vm1.sock")
    found = []
    for pid in processes_mentioning(sock):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"hypervisor.runner" in f.read():
                found.append(pid)
    assert len(found) == 1, found
    return found[0]


def assert_kept_paused(daemon, kind: str, seconds=15.0) -> None:
    """The copy on this host waits, paused, for a resume or an abort."""
    deadline = time.monotonic() + seconds
    while listed(daemon) != {"vm1": "postcopy-paused"}:
        assert time.monotonic() < deadline, listed(daemon)
        time.sleep(0.1)
    job = daemon.call("job", name="vm1")
    assert job.kind == kind and job.phase == "postcopy-paused" and job.running
    r = ferry(daemon, "destroy", "vm1", check=False)
    assert r.returncode == 1 and f"belongs to a {kind} job" in one_line(r.stderr)
    if kind == "migrate-receive":  # the guest here lacks pages: it never checks out
        r = ferry(daemon, "guest-check", "vm1", check=False)
        assert r.returncode == 1 and "needs every page" in one_line(r.stderr)
    else:
        assert runner_state(daemon, "vm1") == DomainState.PAUSED  # never resumed here


def abort_into_inconsistent(daemon, says: str) -> None:
    """`job-control abort` of a paused postcopy: no rollback, the copy renamed
    and kept paused, out of operators' reach but for destroy."""
    r = ferry(daemon, "job-control", "vm1", "abort")
    assert r.stdout.strip() == "abort requested: the guest's pages stay split; both copies are kept"
    deadline = time.monotonic() + 15
    while listed(daemon) != {INCONSISTENT: "postcopy-inconsistent"}:
        assert time.monotonic() < deadline, listed(daemon)
        time.sleep(0.1)
    job = daemon.call("job", name="vm1")
    assert job.phase == "failed" and says in job.error, job.error
    # settled: a restart will not resume it either; a destination keeps its
    # record as "split", the answer a source asking where its guest went gets
    assert journal_phases(daemon) in ([], ["split"]), journal_phases(daemon)
    for command in (["unpause", INCONSISTENT], ["migrate", INCONSISTENT, "127.0.0.1:1"]):
        r = ferry(daemon, *command, check=False)
        assert r.returncode == 1 and "is postcopy-inconsistent" in one_line(r.stderr), command


def assert_paused_line(outcome: dict) -> str:
    assert outcome["code"] == 1, outcome
    line = one_line(outcome["stderr"])
    assert "postcopy-paused" in line and "--resume" in line, line
    return line


@pytest.mark.parametrize(
    "killed, then", [("ferryd", "abort"), ("ferryd", "resume"), ("runner", "abort")]
)
def test_destination_killed_after_the_switch(pair, killed, then):
    """SIGKILL of the destination's ferryd (its helper dies with it), or of
    the guest's runner there: the source keeps its copy paused, never resumed;
    an abort renames it; the destination's copy is paused again after a
    restart, and an abort renames it too (a dead runner's is removed: the
    guest is lost); or --resume finishes the migration."""
    a, b = pair
    thread, outcome = start_capped_postcopy(a, b)
    try:
        if killed == "runner":
            os.kill(runner_of(b), signal.SIGKILL)
        else:
            b.stop(signal.SIGKILL)
        thread.join(30)
        assert_paused_line(outcome)
        assert_kept_paused(a, "migrate")
        frozen = writes(a)
        if then == "abort":
            abort_into_inconsistent(a, f"the guest runs at {b.address} without all of its pages")
            assert runner_state(a, INCONSISTENT) == DomainState.PAUSED
            assert writes(a, INCONSISTENT) == frozen
            assert len(ferry(a, "digest", INCONSISTENT).stdout.strip()) == 64  # for inspection
            if killed == "runner":  # the guest died with it: nothing left there to keep
                assert listed(b) == {} and journal_phases(b) == ["split"]
                assert "the guest is lost" in b.call("job", name="vm1").error
                return
            b.start()  # the destination's copy: paused again, lacking pages
            assert_kept_paused(b, "migrate-receive")
            abort_into_inconsistent(b, "the guest here lacks pages still at the source")
        else:
            b.start()
            assert_kept_paused(b, "migrate-receive")
            flags = ["--resume", "--postcopy-bandwidth", "1000", "--json"]
            report = json.loads(ferry(a, "migrate", "vm1", b.address, *flags).stdout)
            assert_moved(a, b, report)
    finally:
        thread.join(30)


def test_a_resume_after_the_destinations_guest_died_says_so(pair):
    a, b = pair
    thread, outcome = start_capped_postcopy(a, b)
    try:
        os.kill(runner_of(b), signal.SIGKILL)
        thread.join(30)
        assert_paused_line(outcome)
        r = ferry(a, "migrate", "vm1", b.address, "--resume", check=False)
        assert r.returncode == 1
        line = one_line(r.stderr)
        assert "--resume" not in line and "runner died here" in line and "lost" in line, line
        assert "`ferry job-control vm1 abort` keeps this copy" in line  # what is left to do
        assert listed(b) == {}  # nothing half-alive left at the destination
        job = b.call("job", name="vm1")
        assert job.phase == "failed" and "the guest is lost" in job.error, job.error
        assert_kept_paused(a, "migrate")  # the stale copy: an operator's to abort
    finally:
        thread.join(30)


def test_a_guest_that_dies_while_postcopy_is_paused_is_not_resumed(pair):
    """The destination's ferryd dies and comes back paused; then the guest's
    runner dies there too: the resume is refused, the half-guest removed."""
    a, b = pair
    thread, outcome = start_capped_postcopy(a, b)
    try:
        b.stop(signal.SIGKILL)
        thread.join(30)
        assert_paused_line(outcome)
        b.start()
        assert_kept_paused(b, "migrate-receive")
        os.kill(runner_of(b), signal.SIGKILL)
        r = ferry(a, "migrate", "vm1", b.address, "--resume", check=False)
        line = one_line(r.stderr)
        assert r.returncode == 1 and "runner died here" in line and "lost" in line, line
        deadline = time.monotonic() + 15
        while listed(b):
            assert time.monotonic() < deadline, listed(b)
            time.sleep(0.1)
        assert journal_phases(b) == ["split"]
    finally:
        thread.join(30)


@pytest.mark.parametrize("ended", ["runner died", "aborted"])
def test_a_source_back_after_the_destination_ended_postcopy_never_resumes_its_copy(cluster, ended):
    """The source's ferryd dies right after 'go' (its journal says go-sent);
    the guest then dies at the destination, or an operator aborts it there.
    Back, the source asks where the guest is: not "absent" (which would
    resume a stale copy of a guest that ran elsewhere) but "split": its copy
    is kept paused and renamed, never run."""
    crash = dict(os.environ, FERRY_TEST_FAULTS="crash@source:go-out")
    a, b = cluster.daemon("a", env=crash), cluster.daemon("b")
    try:
        create(a, rate=5_000, ws=0.5)
        flags = ["--postcopy-after-precopy", "--postcopy-bandwidth", "1"]
        thread, outcome = migrate_in_background(a, b.address, *flags)
        thread.join(60)
        assert outcome["code"] == 1  # its daemon died under it
        wait_for_job(b, lambda j: j.phase == "postcopy-paused")
        if ended == "runner died":
            os.kill(runner_of(b), signal.SIGKILL)
            wait_for_job(b, lambda j: "the guest is lost" in j.error)
        else:
            abort_into_inconsistent(b, "the guest here lacks pages still at the source")
        a.start(env=dict(os.environ))  # without the fault
        # back, the source is in doubt until its background question is answered
        assert wait_for_listing(a, lambda d: d != {"vm1": "in-doubt"}) == {
            INCONSISTENT: "postcopy-inconsistent"
        }
        assert runner_state(a, INCONSISTENT) == DomainState.PAUSED
        assert journal(a) == []
    finally:
        end_everything(a, b)


@pytest.mark.parametrize("then", ["abort", "resume"])
def test_source_killed_after_the_switch(pair, then):
    a, b = pair
    thread, outcome = start_capped_postcopy(a, b)
    try:
        a.stop(signal.SIGKILL)
        thread.join(30)
        assert outcome["code"] == 1 and "ferryd closed the connection" in outcome["stderr"]
        assert_kept_paused(b, "migrate-receive")  # the guest waits there for its pages
        a.start()  # the source's copy: a paused job again
        assert_kept_paused(a, "migrate")
        if then == "abort":
            abort_into_inconsistent(b, "the guest here lacks pages still at the source")
            abort_into_inconsistent(a, f"the guest runs at {b.address} without all of its pages")
            assert runner_state(a, INCONSISTENT) == DomainState.PAUSED
        else:
            report = json.loads(ferry(a, "migrate", "vm1", b.address, "--resume", "--json").stdout)
            assert_moved(a, b, report, downtime=False)  # the switch was before the restart
    finally:
        thread.join(30)


# -- a hostile destination (tests/peers.py) ----------------------------------------------
def migrate_to_a_fake(a, behave, *flags):
    """`ferry migrate vm1 --postcopy-after-precopy` to a hand-driven destination
    that takes the migration up to the switch, then `behave(peer, stream, fake)`."""
    key = open(a.cmd[a.cmd.index("--auth-key") + 1], "rb").read().strip()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    fake = {"port": port}

    def destination():
        try:
            peer, stream = play_postcopy_destination(listener, key)
            try:
                behave(peer, stream, fake)
            finally:
                peer.close()
        except Exception as exc:  # the test sees it in fake["error"]
            fake["error"] = repr(exc)

    thread = threading.Thread(target=destination)
    thread.start()
    try:
        r = ferry(
            a,
            "migrate",
            "vm1",
            f"127.0.0.1:{port}",
            "--postcopy-after-precopy",
            *flags,
            check=False,
        )
    finally:
        thread.join(60)
        listener.close()
    return r, fake


def ask_for(pick):
    """A destination that asks for the one pfn `pick(stream)`, then reads until
    the source ends the connection."""

    def behave(peer, stream, fake):
        fake["pfn"] = pfn = pick(stream)
        peer.sock.sendall(fault_record([pfn]))
        started = time.monotonic()
        while peer.sock.recv(1 << 16):
            pass
        fake["closed_after"] = time.monotonic() - started

    return behave


def outside_the_domain(stream) -> int:
    return 32 * MiB // PAGE + 5


def outside_the_set(stream) -> int:
    pfn = int(np.setdiff1d(np.arange(32 * MiB // PAGE, dtype=np.uint64), stream.rules.pfns)[-1])
    assert pfn < 32 * MiB // PAGE and pfn not in stream.rules.pfns
    return pfn


@pytest.mark.parametrize(
    "pick, says",
    [
        (outside_the_domain, "is outside the domain"),
        (outside_the_set, "is not in the postcopy set"),
    ],
)
def test_a_destination_asking_for_a_page_it_may_not_have(source, pick, says):
    """The source has committed (the guest runs there): it fails the postcopy
    with the rule broken, keeps its copy paused, and an abort renames it."""
    a = source
    r, fake = migrate_to_a_fake(a, ask_for(pick))
    assert "error" not in fake, fake
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "postcopy-paused" in line and f"POSTCOPY_FAULT: pfn {fake['pfn']:#x} {says}" in line
    assert fake["closed_after"] < 10  # the source ended the connection
    assert listed(a) == {"vm1": "postcopy-paused"}
    assert runner_state(a, "vm1") == DomainState.PAUSED
    abort_into_inconsistent(a, f"the guest runs at 127.0.0.1:{fake['port']} without all")
    assert runner_state(a, INCONSISTENT) == DomainState.PAUSED
    ferry(a, "destroy", INCONSISTENT)
    assert listed(a) == {}


def test_the_paused_line_says_the_destination_broke_the_rules(source):
    r, fake = migrate_to_a_fake(source, ask_for(outside_the_domain))
    line = one_line(r.stderr)
    assert "POSTCOPY_FAULT" in line
    assert "toolstack" not in line and f"127.0.0.1:{fake['port']}" in line, line


def complete_after(requests: int):
    """A destination that asks for the set's pages `requests` times over (1024
    pfns a record), reads every page, says COMPLETE, answers finish."""

    def behave(peer, stream, fake):
        everything = threading.Event()

        def read():
            try:
                while not stream.decoder.done:
                    stream.next_event()
                    if not stream.rules.remaining:
                        everything.set()
                stream.libxl_tail()
            except Exception as exc:
                fake["reader"] = repr(exc)
            finally:
                everything.set()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            fake["set"] = len(stream.rules.pfns)
            ask = fault_record(np.resize(stream.rules.pfns, 1024))
            for _ in range(requests):
                peer.sock.sendall(ask)
            assert everything.wait(30)
            peer.sock.sendall(b"".join(libxc.encode_marker(libxc.REC_POSTCOPY_COMPLETE)))
        finally:
            reader.join(30)
        fake["finish"] = peer.next_event().message.SPEC.name
        peer.answer(msgs.Finished(requested=fake["set"]))
        fake["captured"] = bytes(stream.captured)
        fake["page_records"] = list(stream.page_records)

    return behave


def test_a_flood_of_requests_is_served_each_page_once(source):
    """2,000 POSTCOPY_FAULT records (2 million requests, for pages already
    asked for or sent): every page goes once, the migration completes."""
    a = source
    r, fake = migrate_to_a_fake(a, complete_after(2000), "--json")
    assert "error" not in fake and "reader" not in fake, fake
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    pc = report["postcopy"]
    assert report["phase"] == "completed" and fake["finish"] == "finish"
    assert pc["pages"] == fake["set"] > 0 and pc["pushed"] + pc["requested"] == pc["pages"]
    assert listed(a) == {} and journal(a) == []


def test_a_flood_of_requests_does_not_grow_the_source_helper(source):
    r, fake = migrate_to_a_fake(source, complete_after(10_000), "--json")
    assert "error" not in fake and "reader" not in fake, fake
    report = json.loads(r.stdout)
    assert report["phase"] == "completed"
    assert report["helper_peak_rss_bytes"] < 80 * MiB, report["helper_peak_rss_bytes"]


# -- a hostile source (tests/peers.py) -------------------------------------------------------
@pytest.mark.parametrize("batch", ["alone", "with a page after it"])
def test_a_postcopy_page_without_data_never_puts_foreign_bytes_in_the_guest(cluster, batch):
    b = cluster.daemon("b")
    key = open(cluster.key, "rb").read().strip()
    config = DomainConfig(name="vm1", memory_bytes=1 * MiB, dirty_rate=0.0)
    context = msgpack.packb({"writes": 3})  # the sim guest's: three pages at version 1
    peer = play_postcopy_source(b.port, key, config, [1], [5, 6], context)
    try:
        xtab, notab = libxc.PAGE_TYPE_XTAB, libxc.PAGE_TYPE_NOTAB
        if batch == "alone":
            records = libxc.encode_page_data(np.array([5], np.uint64), [], [xtab], True)
            records += libxc.encode_page_data(np.array([6], np.uint64), [page(6)], None, True)
        else:
            pfns = np.array([5, 6], np.uint64)
            records = libxc.encode_page_data(pfns, [page(6)], [xtab, notab], True)
        peer.sock.sendall(raw(records))
        decoder = libxc.LibxcDecoder(max_pfns=256, records_only=True)
        while (event := decoder.next_event()) != libxc.Marker(libxc.REC_POSTCOPY_COMPLETE):
            if event is NEED_DATA:  # until COMPLETE, or the destination refuses (EOF)
                data = peer.sock.recv(1 << 16)
                if not data:
                    break
                decoder.feed(data)
        with RunnerClient(os.path.join(b.state, "domains", "vm1.sock")) as runner:
            ram = runner.map_guest_memory()
            got = {pfn: os.pread(ram.fd, PAGE, pfn * PAGE) for pfn in (5, 6)}
            ram.close()
        assert got[5] == bytes(PAGE), got[5][:64].hex()  # a page without data is a zero page
        assert got[6] in (page(6), bytes(PAGE))  # its own data, or refused before it
    finally:
        peer.close()
        end_everything(b)  # the job pauses when the line closes: abort it, destroy the guest


# -- ferry verify-stream on a captured postcopy stream ------------------------------------
def test_verify_stream_checks_a_captured_postcopy_stream(source, short_tmp):
    a = source
    r, fake = migrate_to_a_fake(a, complete_after(3), "--json")
    assert "error" not in fake and "reader" not in fake, fake
    report = json.loads(r.stdout)
    captured = fake["captured"]
    path = os.path.join(short_tmp, "postcopy.libxl")
    with open(path, "wb") as f:
        f.write(captured)
    out = json.loads(ferry(a, "verify-stream", path, "--json").stdout)
    assert out["valid"] and out["format"] == "libxl" and out["stream_bytes"] == len(captured)
    records = out["records"]
    for name in ("POSTCOPY_BEGIN", "POSTCOPY_PFNS_BEGIN", "POSTCOPY_TRANSITION", "HVM_CONTEXT"):
        assert records[name] == 1, records
    assert records["POSTCOPY_PAGE_DATA"] == len(fake["page_records"]) > 0
    precopy = sum(it["pages"] for it in report["iterations"])
    assert out["pages"] == precopy + report["postcopy"]["pages"]
    # the last page record twice, or missing: refused, with the rule and its offset
    start, end = fake["page_records"][-1]
    for broken, rule, offset in (
        (captured[:end] + captured[start:end] + captured[end:], "sent twice", end),
        (captured[:start] + captured[end:], "postcopy pages never sent", start),
    ):
        with open(path, "wb") as f:
            f.write(broken)
        r = ferry(a, "verify-stream", path, check=False)
        assert r.returncode == 1 and rule in one_line(r.stderr), r.stderr
        assert r.stderr.strip().endswith(f"at offset {offset}"), r.stderr
