"""Save files and the helper: round trips, live precopy, aborts and failures."""

from __future__ import annotations

import os
import random
import signal
import sys

import pytest
import trio

from protocol import RemoteProtocolError, StreamChecker, libxc
from protocol._gen_control_msgs import DomainConfig
from protocol._gen_helper_msgs import PrecopyDecision
from protocol._gen_runner_msgs import Workload
from tests.conftest import processes_mentioning
from toolstack.host import ToolstackError
from toolstack.host.helper_job import HelperCallbacks, HelperFailed, run_helper
from toolstack.host.savefile import restore_from_file, save_to_file
from toolstack.host.stats import JobStats
from toolstack.policies import Policy, PolicyRegistry, XenPolicy

MiB = 1 << 20


def make_policy(name, **settings):
    return PolicyRegistry().make(name, settings)


def config(name="vm", memory=32 * MiB, rate=0.0, ws=1.0):
    return DomainConfig(name=name, memory_bytes=memory, dirty_rate=rate, working_set=ws, seed=5)


async def running_writes(domain) -> int:
    first = (await domain.runner.getinfo()).writes
    await trio.sleep(0.2)
    return (await domain.runner.getinfo()).writes - first


async def test_idle_domain_round_trips_through_a_save_file(host, short_tmp):
    domain = await host.create(config())
    await domain.runner.pause()
    digest = await domain.runner.digest()
    path = os.path.join(short_tmp, "vm.save")
    await save_to_file(host, domain, path)
    assert "vm" not in host.domains  # like xl save: the domain is gone
    summary = StreamChecker()
    summary.feed(open(path, "rb").read())
    assert summary.finish().pages == 32 * MiB // 4096
    restored = await restore_from_file(host, path, paused=True)
    assert await restored.runner.digest() == digest
    assert (await host.info(restored)).state == "paused"


async def test_busy_domain_live_save_restores_and_continues_its_sequence(host, short_tmp):
    domain = await host.create(config(rate=20_000, ws=0.5))
    await trio.sleep(0.2)
    path = os.path.join(short_tmp, "vm.save")
    stats = await save_to_file(
        host, domain, path, live=True, keep=True, policy=XenPolicy(), verify=True
    )
    assert stats.phase == "completed" and stats.downtime_ms is not None
    assert (await host.info(domain)).state == "running"  # --keep: it runs on
    await host.destroy(domain)
    restored = await restore_from_file(host, path, name="copy", paused=True)
    assert restored.name == "copy"
    assert await restored.runner.digest() == stats.source_digest
    at_restore = (await restored.runner.getinfo()).writes
    await restored.runner.unpause()
    assert await running_writes(restored) > 0
    await restored.runner.pause()
    assert (await restored.runner.getinfo()).writes > at_restore
    assert await restored.runner.guest_check() == "ok"


async def test_xen_policy_precopies_at_most_5_iterations_then_stops(host, short_tmp):
    domain = await host.create(config(rate=30_000, ws=0.25))
    stats = await save_to_file(
        host, domain, os.path.join(short_tmp, "s"), live=True, policy=XenPolicy()
    )
    precopy = [it for it in stats.iterations if not it.final]
    assert 1 <= len(precopy) <= 5 and stats.iterations[-1].final
    assert stats.iterations[0].pages == 32 * MiB // 4096
    # waits for answers as the helper timed them: one per call but the last
    assert len(stats.policy_waits_us) == stats.policy_calls - 1 >= len(precopy) - 1
    assert all(0 < us < 1e6 for us in stats.policy_waits_us)
    assert 0 < stats.policy_share_of_precopy < 1
    wait_us = sum(stats.policy_waits_us)
    assert wait_us == pytest.approx(stats.policy_wait_ns / 1e3)
    # the helper reported its peak memory (a Python process with numpy: > 8 MiB)
    assert 8 * MiB < stats.helper_peak_rss < 1024 * MiB
    # with the dirty-page rule switched off, the iteration limit alone stops it
    other = await host.create(config("other", rate=30_000, ws=0.25))
    policy = make_policy("xen", max_dirty=0)
    stats = await save_to_file(host, other, os.path.join(short_tmp, "t"), live=True, policy=policy)
    assert [it.final for it in stats.iterations] == [False] * 5 + [True]
    assert "5 iterations done" in stats.decision


async def test_converge_keeps_downtime_within_the_limit_when_the_rate_allows(host, short_tmp):
    domain = await host.create(config(memory=128 * MiB, rate=5_000, ws=0.5))
    policy = make_policy("converge", downtime_limit=300)
    stats = await save_to_file(host, domain, os.path.join(short_tmp, "s"), live=True, policy=policy)
    assert "within 300 ms" in stats.decision
    assert stats.downtime_ms <= 300


async def test_converge_fallback_fires_when_the_rate_does_not_allow(host, short_tmp):
    policy = make_policy("converge", downtime_limit=0.001, max_iterations=3)
    domain = await host.create(config(rate=30_000, ws=0.5))
    stats = await save_to_file(host, domain, os.path.join(short_tmp, "s"), live=True, policy=policy)
    assert "3 iterations without converging; fallback: stop-and-copy" in stats.decision
    abort = make_policy("converge", downtime_limit=0.001, max_iterations=2, fallback="abort")
    other = await host.create(config("other", rate=30_000, ws=0.5))
    with pytest.raises(ToolstackError, match="policy converge aborted the migration: 2 iterations"):
        await save_to_file(host, other, os.path.join(short_tmp, "t"), live=True, policy=abort)
    assert (await host.info(other)).state == "running"
    assert not [f for f in os.listdir(short_tmp) if f == "t" or f.startswith(".t.")]


class StopEarly(Policy):
    """Stop and copy after the first batch of iteration 0."""

    def rule(self, stats, estimate):
        return PrecopyDecision.STOP_AND_COPY


async def test_stop_and_copy_in_the_first_pass_of_a_sparse_domain(host, short_tmp):
    domain = await host.create(config(memory=64 * MiB, rate=20_000, ws=0.1))
    await trio.sleep(0.2)
    path = os.path.join(short_tmp, "early.save")
    stats = await save_to_file(host, domain, path, live=True, policy=StopEarly(), verify=True)
    assert [it.pages for it in stats.iterations][0] == 1024 and stats.iterations[-1].final
    # obeyed at once: the batch prepared while the policy decided went out
    # only in the final pass, so the stream holds exactly what the job counted
    checker = StreamChecker()
    checker.feed(open(path, "rb").read())
    assert checker.finish().pages == stats.pages_sent
    restored = await restore_from_file(host, path, paused=True)
    assert await restored.runner.digest() == stats.source_digest
    assert await restored.runner.guest_check() == "ok"


class AbortAt(Policy):
    """Continue until `iteration`, then do `action` (tests)."""

    def __init__(self, iteration=1, action=None):
        super().__init__()
        self.iteration, self.action = iteration, action

    def rule(self, stats, estimate):
        if stats.iteration >= self.iteration:
            if self.action:
                self.action()
                self.action = None
                return PrecopyDecision.CONTINUE_PRECOPY
            return PrecopyDecision.ABORT
        return PrecopyDecision.CONTINUE_PRECOPY


async def save_raw(domain, policy, path):
    """Run a save helper into a plain file; returns (error or None, stats, callbacks)."""
    stats = JobStats("save", domain.name)
    callbacks = HelperCallbacks(domain, stats, policy)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await run_helper("save", fd, domain, callbacks, live=True)
        return None, stats, callbacks
    except HelperFailed as exc:
        return exc, stats, callbacks
    finally:
        os.close(fd)


async def test_abort_mid_precopy_leaves_the_source_running_and_the_stream_unfinished(
    host, short_tmp
):
    domain = await host.create(config(rate=20_000))
    path = os.path.join(short_tmp, "raw")
    error, _stats, callbacks = await save_raw(domain, AbortAt(1), path)
    assert "aborted the migration" in str(error)
    info = await domain.runner.getinfo()
    assert info.state.name == "RUNNING" and not info.logdirty and not callbacks.suspended
    assert await running_writes(domain) > 0
    checker = StreamChecker("libxc")
    checker.feed(open(path, "rb").read())
    with pytest.raises(RemoteProtocolError, match="truncated"):
        checker.finish()


async def test_sigkilled_helper_ends_the_job_clearly_and_the_source_runs(host, short_tmp):
    domain = await host.create(config(rate=20_000))
    callbacks_box = {}

    def kill_helper():
        os.kill(callbacks_box["cb"].process.pid, signal.SIGKILL)

    policy = AbortAt(1, kill_helper)
    stats = JobStats("save", "vm")
    callbacks_box["cb"] = HelperCallbacks(domain, stats, policy)
    fd = os.open(os.path.join(short_tmp, "raw"), os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(HelperFailed, match=r"died before completing \(killed by SIGKILL\)"):
        await run_helper("save", fd, domain, callbacks_box["cb"], live=True)
    os.close(fd)
    assert (await domain.runner.getinfo()).state.name == "RUNNING"
    assert await running_writes(domain) > 0


async def test_sigterm_stops_the_helper_at_a_safe_point(host, short_tmp):
    domain = await host.create(config(rate=20_000))
    box = {}
    policy = AbortAt(1, lambda: box["cb"].process.send_signal(signal.SIGTERM))
    stats = JobStats("save", "vm")
    box["cb"] = HelperCallbacks(domain, stats, policy)
    fd = os.open(os.path.join(short_tmp, "raw"), os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(HelperFailed, match="asked to stop"):
        await run_helper("save", fd, domain, box["cb"], live=True)
    os.close(fd)
    assert box["cb"].completed[0] == -1  # it said so with `complete`


FAKE_HELPERS = {
    "nonsense": "import os,sys; fd=int(sys.argv[sys.argv.index('--rpc-fd')+1]); os.write(fd, b'\\x00\\x00\\x00\\x05hello'); import time; time.sleep(30)",
    "hang": "import time; time.sleep(30)",
    "exit": "import sys; sys.exit(3)",
}


@pytest.mark.parametrize(
    "kind, rule",
    [("nonsense", "sent nonsense"), ("hang", "sent nothing for 1 s"), ("exit", "exit status 3")],
)
async def test_misbehaving_helpers_fail_their_job_only(host, short_tmp, kind, rule):
    domain = await host.create(config())
    callbacks = HelperCallbacks(domain, JobStats("save", "vm"), XenPolicy())
    fd = os.open(os.path.join(short_tmp, "raw"), os.O_WRONLY | os.O_CREAT, 0o600)
    command = [sys.executable, "-c", FAKE_HELPERS[kind], short_tmp]
    with pytest.raises(HelperFailed, match=rule):
        await run_helper("save", fd, domain, callbacks, silence_timeout=1, command=command)
    os.close(fd)
    assert not processes_mentioning(FAKE_HELPERS[kind][:30])


@pytest.fixture
async def small_save(host, short_tmp):
    domain = await host.create(config(memory=2 * MiB, rate=1000))
    await trio.sleep(0.1)
    path = os.path.join(short_tmp, "small.save")
    await save_to_file(host, domain, path, live=True, policy=XenPolicy())
    return open(path, "rb").read()


async def restore_fails(host, short_tmp, data: bytes) -> str:
    path = os.path.join(short_tmp, "bad.save")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ToolstackError) as info:
        await restore_from_file(host, path)
    assert not host.domains
    assert os.listdir(os.path.join(host.state_dir, "domains")) == []
    return str(info.value)


async def test_cut_streams_fail_restore_and_leave_no_domain(host, short_tmp, small_save):
    libxc_start = small_save.index(b"XENF") - 8
    rng = random.Random(7)
    offsets = [10, 47, 60, 100, 200, len(small_save) - 8, len(small_save) - 1]
    offsets += rng.sample(range(200, len(small_save) - 8), 8)
    for cut in offsets:
        message = await restore_fails(host, short_tmp, small_save[:cut])
        assert "truncated" in message, (cut, message)
        assert message.startswith(os.path.join(short_tmp, "bad.save")), message
        if "at offset" in message:  # an offset in the file, at or before the cut
            offset = int(message.rsplit("at offset ", 1)[1])
            assert min(cut, libxc_start) <= offset <= cut, (cut, message)
    assert not processes_mentioning(short_tmp + "/host")


async def test_corrupted_records_fail_restore_with_the_rule(host, short_tmp, small_save):
    header = small_save.index(b"XENF") - 8  # libxc image header
    page_rec = header + 24 + 16 + 8  # after domain header and STATIC_DATA_END
    cases = [
        (header + 8, b"XENX", "not 'XENF'"),
        (page_rec, b"\x77\x00\x00\x00", "unsupported mandatory record"),
        (page_rec + 16, (1 << 30).to_bytes(8, "little"), "outside the domain"),
        (page_rec + 8, (2000).to_bytes(4, "little"), "count 2000"),
        (10, b"\xff", "bad magic"),
    ]
    for offset, new, rule in cases:
        data = small_save[:offset] + new + small_save[offset + len(new) :]
        assert rule in await restore_fails(host, short_tmp, data)
    bad_config = small_save.replace(b'"memory_bytes":2097152', b'"memory_bytes":-2097152')
    assert bad_config != small_save
    assert "bad domain config" in await restore_fails(host, short_tmp, bad_config)


async def test_a_stream_without_a_vcpu_context_is_refused(host, short_tmp, small_save):
    # find HVM_CONTEXT and make it an optional record of unknown type: skipped
    start = small_save.index(b"XENF") - 8
    decoder = libxc.LibxcDecoder(start_offset=start)
    decoder.feed(small_save[start:])
    before = decoder.offset
    while not isinstance(event := decoder.next_event(), libxc.HvmContext):
        before = decoder.offset
    data = small_save[:before] + (0x80000009).to_bytes(4, "little") + small_save[before + 4 :]
    assert "without an HVM_CONTEXT" in await restore_fails(host, short_tmp, data)
    assert event.blob


def test_a_toolstack_answering_nonsense_ends_the_save_cleanly(runners, short_tmp):
    """The helper's side of bad input: a reply that is not a PrecopyDecision."""
    import socket
    import subprocess

    import msgpack

    from protocol import NEED_DATA, Call, RpcConnection
    from protocol import _gen_helper_msgs as msgs
    from protocol.rpc import FRAME_HEADER, REPLY
    from toolstack.host.helper_job import helper_command

    _proc, control = runners.start(workload=Workload(5000.0, 1.0, 0.0, 1))
    ours, theirs = socket.socketpair()
    out = os.open(os.path.join(short_tmp, "raw"), os.O_WRONLY | os.O_CREAT, 0o600)
    cmd = [*helper_command(), "--save-domain", "--live", "--io-fd", str(out)]
    cmd += ["--rpc-fd", str(theirs.fileno()), "--domain", control]
    helper = subprocess.Popen(cmd, pass_fds=(out, theirs.fileno()))
    theirs.close()
    os.close(out)
    conn = RpcConnection(msgs.TABLE, sends=None, receives=msgs.DIRECTION)
    complete = None
    try:
        while complete is None:
            event = conn.next_event()
            if event is NEED_DATA:
                data = ours.recv(65536)
                assert data, "the helper closed without `complete`"
                conn.receive_data(data)
                continue
            assert isinstance(event, Call)
            if isinstance(event.message, msgs.Complete):
                complete = event.message
            elif isinstance(event.message, msgs.PrecopyPolicy):
                body = msgpack.packb([REPLY, msgs.PrecopyPolicy.SPEC.id, 7])
                ours.sendall(FRAME_HEADER.pack(len(body)) + body)
                conn.send_reply(msgs.PrecopyDecision.CONTINUE_PRECOPY)  # our side's bookkeeping
        assert helper.wait(30) == 1
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        ours.close()
    assert complete.retval == -1 and "bad answer from the toolstack" in complete.message
    assert "not a PrecopyDecision" in complete.message
    with runners.client(control) as domain:
        info = domain.getinfo()
        assert info.state.name == "RUNNING" and not info.logdirty


def test_the_helper_outlives_the_thread_that_forked_it_and_dies_with_the_toolstack(
    runners, short_tmp
):
    """trio forks helpers from a worker thread that exits when idle; a helper
    tied to that thread (PR_SET_PDEATHSIG) was killed ~10 s into any job.
    It must live on, and still end when its toolstack goes away, even while
    blocked writing a stream nobody reads."""
    import socket
    import subprocess
    import threading
    import time

    from hypervisor import RunnerClient
    from protocol import Call, RpcConnection
    from protocol import _gen_helper_msgs as msgs
    from toolstack.host.helper_job import helper_command

    _proc, control = runners.start(workload=Workload(0.0, 1.0, 0.0, 1))
    with RunnerClient(control) as runner:  # pages of data: the stream fills the pipe
        ram = runner.map_guest_memory(writable=True)
        ram.bytes[:] = 0x5A
        ram.close()
    ours, theirs = socket.socketpair()
    stream_read, stream_write = os.pipe()  # never read: the helper's writev blocks
    cmd = [*helper_command(), "--save-domain", "--io-fd", str(stream_write)]
    cmd += ["--rpc-fd", str(theirs.fileno()), "--domain", control]
    box, release = {}, threading.Event()

    def fork_then_idle_out():  # what trio's worker thread does
        box["p"] = subprocess.Popen(cmd, pass_fds=(stream_write, theirs.fileno()))
        release.wait(30)

    forker = threading.Thread(target=fork_then_idle_out)
    forker.start()
    while "p" not in box:
        time.sleep(0.01)
    helper = box["p"]
    try:
        theirs.close()
        os.close(stream_write)
        # a non-live save suspends the guest first: the helper is up and waits
        conn = RpcConnection(msgs.TABLE, sends=None, receives=msgs.DIRECTION)
        while not isinstance(event := conn.next_event(), Call):
            data = ours.recv(65536)
            assert data, "the helper ended before its first call"
            conn.receive_data(data)
        assert isinstance(event.message, msgs.Suspend)
        release.set()
        forker.join()
        time.sleep(0.3)
        assert helper.poll() is None, "the helper died with the thread that forked it"
        # told yes, it writes pages until the pipe is full and blocks there
        ours.sendall(conn.send_reply(True))
        time.sleep(0.5)
        assert helper.poll() is None
        assert os.read(stream_read, 16)  # it is writing the stream
        ours.close()  # the toolstack goes away
        assert helper.wait(10) != 0
    finally:
        release.set()
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        os.close(stream_read)


async def test_the_save_helper_does_not_keep_the_guest_it_has_sent_resident(host, short_tmp):
    """A helper that kept every page it read mapped would grow to the guest's
    size (VmHWM counts shared pages); it lets go after each batch."""
    from hypervisor import RunnerClient

    domain = await host.create(config(memory=256 * MiB), paused=True)
    with RunnerClient(domain.control_path) as runner:
        ram = runner.map_guest_memory(writable=True)
        ram.bytes[:] = 0x5A  # every page holds data
        ram.close()
    stats = await save_to_file(host, domain, os.path.join(short_tmp, "vm.save"))
    assert stats.pages_sent == 256 * MiB // 4096
    assert 8 * MiB < stats.helper_peak_rss < 128 * MiB


async def test_a_zero_page_reads_zero_and_holds_no_memory(host, short_tmp):
    """XALLOC: a page sent without data.  One this restore wrote before is
    given back (it must read zero now); one never written stays a hole."""
    from hypervisor import RunnerClient
    from protocol.limits import PAGE_SIZE
    from tests import streams

    donor = await host.create(config("donor", memory=1 * MiB))  # for a valid vCPU context
    await donor.runner.pause()
    context = await donor.runner.get_context()
    await host.destroy(donor)
    xalloc = libxc.encode_page_data(
        [5, 6], [], types=[libxc.PAGE_TYPE_XALLOC, libxc.PAGE_TYPE_XALLOC]
    )
    stream = streams.libxc_stream(pfns=(0, 1, 2, 5), extra=[xalloc], context=context)
    path = os.path.join(short_tmp, "zeros.save")
    with open(path, "wb") as f:
        f.write(streams.save_file({"name": "vm", "memory_bytes": 1 * MiB}, stream))
    domain = await restore_from_file(host, path, paused=True)
    with RunnerClient(domain.control_path) as runner:
        ram = runner.map_guest_memory()
        try:
            assert ram.data_extents() == [(0, 3)]  # 5 punched out, 6 never allocated
            assert [bytes(ram.page_view(p)) == streams.page(p) for p in (0, 1, 2)] == [True] * 3
            assert os.pread(ram.fd, PAGE_SIZE, 5 * PAGE_SIZE) == bytes(PAGE_SIZE)
        finally:
            ram.close()


async def test_zero_pages_travel_without_data_and_arrive_as_zeros(host, short_tmp):
    domain = await host.create(config(memory=16 * MiB))  # never touched: all holes
    await domain.runner.pause()
    digest = await domain.runner.digest()
    path = os.path.join(short_tmp, "sparse.save")
    stats = await save_to_file(host, domain, path)
    assert os.path.getsize(path) < 200_000  # 4096 pfn entries, no page data
    assert stats.zero_pages == 16 * MiB // 4096
    restored = await restore_from_file(host, path, paused=True)
    assert await restored.runner.digest() == digest
