"""Helpers started ahead of their job (`--prestarted`, HelperProcess): a
migration starts each side's helper while the destination builds its domain,
so that the interpreter loads off the critical path.  Until ferryd answers
its first call (`start`) such a helper touches neither the domain nor the
stream; a job that ends before that kills it, and nothing is left."""

from __future__ import annotations

import os

import trio

from protocol import StreamChecker
from protocol._gen_control_msgs import DomainConfig
from tests.conftest import ferry, processes_mentioning
from toolstack.host.helper_job import HelperCallbacks, start_helper
from toolstack.host.stats import JobStats
from toolstack.policies import XenPolicy

MiB = 1 << 20
LOAD_S = 1.5  # long enough for a helper's interpreter to load and ask `start`


async def test_a_prestarted_helper_waits_for_start_and_touches_nothing(short_tmp):
    read_end, write_end = os.pipe()
    absent = os.path.join(short_tmp, "no-such-domain.sock")  # touching it would fail the helper
    try:
        helper = await start_helper("save", write_end, absent, live=True, prestarted=True)
        await trio.sleep(LOAD_S)
        assert helper.proc.returncode is None  # waiting, not failed on the missing domain
        os.set_blocking(read_end, False)
        try:
            written = os.read(read_end, 1)
        except BlockingIOError:
            written = b""
        assert written == b""  # not one octet of stream
        await helper.discard()
        assert helper.proc.returncode is not None
        assert not processes_mentioning(absent)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_discarding_a_helper_that_is_still_loading_leaves_nothing(short_tmp):
    absent = os.path.join(short_tmp, "loading.sock")
    read_end, write_end = os.pipe()
    try:
        helper = await start_helper("restore", read_end, absent, prestarted=True)
        await helper.discard()  # at once: it may not have imported anything yet
    finally:
        os.close(read_end)
        os.close(write_end)
    assert helper.proc.returncode is not None
    assert not processes_mentioning(absent)
    await helper.discard()  # twice: nothing more to do


async def test_a_prestarted_helper_served_later_saves_the_whole_domain(host, short_tmp):
    config = DomainConfig(name="vm", memory_bytes=8 * MiB, dirty_rate=500.0, seed=1)
    domain = await host.create(config)
    path = os.path.join(short_tmp, "early.save")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        helper = await start_helper("save", fd, domain.control_path, live=True, prestarted=True)
        await trio.sleep(LOAD_S)
        assert os.path.getsize(path) == 0  # nothing before `start`
        callbacks = HelperCallbacks(domain, JobStats("save", "vm"), XenPolicy())
        await helper.serve(callbacks)
    finally:
        os.close(fd)
    assert callbacks.completed[0] == 0 and callbacks.suspended
    checker = StreamChecker("libxc")
    with open(path, "rb") as f:
        checker.feed(f.read())
    checker.finish()
    await helper.discard()  # served: nothing to do


# -- through the executables: a migration that fails before its stream -----------------
def helpers_for(state_dir: str) -> list[int]:
    """Helper processes (their argv names an --rpc-fd) working on `state_dir`'s domains."""
    rpc = set(processes_mentioning("--rpc-fd"))
    return [pid for pid in processes_mentioning(os.path.join(state_dir, "domains")) if pid in rpc]


def test_a_refused_migration_leaves_no_helper_behind(cluster):
    a, b = cluster.daemon("a", listen=False), cluster.daemon("b")
    ferry(a, "create", "vm1", "--memory", "16M")
    ferry(b, "create", "vm1", "--memory", "16M")  # the name is taken there: refused
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "exists here" in r.stderr
    assert a.call("info", name="vm1").state == "running"
    assert helpers_for(a.state) == [] and helpers_for(b.state) == []


def test_a_destination_that_cannot_start_its_runner_leaves_no_helper_behind(cluster):
    a = cluster.daemon("a", listen=False)
    faulty = dict(os.environ, FERRY_TEST_FAULTS="fail@runner:start=EMFILE")
    b = cluster.daemon("b", env=faulty)  # its restore helper is started before the runner
    ferry(a, "create", "vm1", "--memory", "16M")
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "Too many open files" in r.stderr
    assert a.call("info", name="vm1").state == "running"
    assert b.call("list") == []
    assert helpers_for(a.state) == [] and helpers_for(b.state) == []
