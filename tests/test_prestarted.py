"""Helpers started ahead of their job (`--prestarted`, HelperProcess): a
migration starts each side's helper while the destination builds its domain,
so that the interpreter loads off the critical path.  Until ferryd answers
its first call (`start`) such a helper touches neither the domain nor the
stream; a job that ends before that kills it, and nothing is left."""

from __future__ import annotations

import os
import select
import time

import pytest
import trio

from protocol import StreamChecker
from protocol._gen_control_msgs import DomainConfig
from tests.conftest import ferry, processes_mentioning
from toolstack.host.helper_job import HelperCallbacks, HelperFailed, start_helper
from toolstack.host.stats import JobStats
from toolstack.policies import XenPolicy

MiB = 1 << 20
LOAD_DEADLINE_S = 30.0  # for a helper's interpreter to load and ask `start`


async def asked_to_start(helper) -> None:
    """Until the helper's first call (`start`) waits in ferryd's end, unread."""
    deadline = time.monotonic() + LOAD_DEADLINE_S
    while not select.select([helper.ours], [], [], 0)[0]:
        assert time.monotonic() < deadline, "the helper never asked to start"
        await trio.sleep(0.02)


async def test_a_prestarted_helper_waits_for_start_and_touches_nothing(short_tmp):
    read_end, write_end = os.pipe()
    absent = os.path.join(short_tmp, "no-such-domain.sock")  # touching it would fail the helper
    try:
        helper = await start_helper("save", write_end, absent, live=True, prestarted=True)
        await asked_to_start(helper)
        await trio.sleep(0.2)  # a helper that went on regardless would be at work by now
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
        await asked_to_start(helper)
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


class NotNow(HelperCallbacks):
    async def on_start(self) -> bool:
        return False


async def test_a_helper_told_not_to_start_ends_without_touching_anything(host, short_tmp):
    domain = await host.create(DomainConfig(name="vm", memory_bytes=8 * MiB, seed=1))
    path = os.path.join(short_tmp, "never.save")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        helper = await start_helper("save", fd, domain.control_path, live=True, prestarted=True)
        with pytest.raises(HelperFailed, match=r"died before completing \(exit status 1\)"):
            await helper.serve(NotNow(domain, JobStats("save", "vm"), XenPolicy()))
    finally:
        os.close(fd)
    assert os.path.getsize(path) == 0
    assert (await domain.runner.getinfo()).state.name == "RUNNING"


@pytest.mark.parametrize("when", ["while it loads", "while it waits for start"])
async def test_a_helper_whose_toolstack_leaves_before_start_ends_quietly(short_tmp, capfd, when):
    read_end, write_end = os.pipe()
    helpers = []
    try:
        for i in range(6):  # its watchdog and its `start` race: a few, to meet both orders
            path = os.path.join(short_tmp, f"left{i}.sock")
            helpers.append(await start_helper("save", write_end, path, prestarted=True))
        for helper in helpers:
            if when == "while it waits for start":
                await asked_to_start(helper)
            helper.ours.close()  # ferryd's end goes; the helper is not killed
        with trio.fail_after(LOAD_DEADLINE_S):
            for helper in helpers:
                await helper.proc.wait()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert [helper.proc.returncode for helper in helpers] == [1] * len(helpers)
    assert "Traceback" not in capfd.readouterr().err


# -- through the executables: a migration that fails before its stream -----------------
def helpers_for(daemon) -> list[int]:
    """Helpers (their argv names an --rpc-fd) working on `daemon`'s domains,
    and any child it has not reaped (a zombie's argv is empty)."""
    rpc = set(processes_mentioning("--rpc-fd"))
    working = processes_mentioning(os.path.join(daemon.state, "domains"))
    return [pid for pid in working if pid in rpc] + zombie_children(daemon.proc.pid)


def zombie_children(parent: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(pid))
    return found


def test_a_refused_migration_leaves_no_helper_behind(cluster):
    a, b = cluster.daemon("a", listen=False), cluster.daemon("b")
    ferry(a, "create", "vm1", "--memory", "16M")
    ferry(b, "create", "vm1", "--memory", "16M")  # the name is taken there: refused
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "exists here" in r.stderr
    assert a.call("info", name="vm1").state == "running"
    assert helpers_for(a) == [] and helpers_for(b) == []


def test_a_destination_that_cannot_start_its_runner_leaves_no_helper_behind(cluster):
    a = cluster.daemon("a", listen=False)
    faulty = dict(os.environ, FERRY_TEST_FAULTS="fail@runner:start=EMFILE")
    b = cluster.daemon("b", env=faulty)  # its restore helper is started before the runner
    ferry(a, "create", "vm1", "--memory", "16M")
    r = ferry(a, "migrate", "vm1", b.address, check=False)
    assert r.returncode == 1 and "Too many open files" in r.stderr
    assert a.call("info", name="vm1").state == "running"
    assert b.call("list") == []
    assert helpers_for(a) == [] and helpers_for(b) == []
