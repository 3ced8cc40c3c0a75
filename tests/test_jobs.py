"""The one job lifecycle (toolstack/host/jobs.py), on its own."""

from __future__ import annotations

import logging

import pytest
import trio

from toolstack.host import Job, JobStats, ToolstackError


def new_job(domain=None) -> Job:
    return Job(JobStats("migrate", "vm1", 1 << 20), domain=domain)


class FakeDomain:
    name = "vm1"
    owner = None


def recorder(done: list, what: str):
    async def undo():
        await trio.sleep(0)  # would be cancelled if not shielded
        done.append(what)

    return undo


async def test_undo_runs_last_first_shielded_and_the_failure_is_one_line():
    job, done = new_job(), []

    async def work(job):
        job.on_failure("first", recorder(done, "first"))
        job.on_failure("second", recorder(done, "second"))
        raise ToolstackError("the destination went away")

    await job.run(work)
    assert done == ["second", "first"]
    assert job.error == "the destination went away" and job.stats.phase == "failed"
    assert not job.running


async def test_a_committed_job_undoes_nothing():
    job, done = new_job(), []

    async def work(job):
        job.on_failure("resume", recorder(done, "resumed"))
        job.commit()
        raise ToolstackError("after the commit point")

    await job.run(work)
    assert done == [] and job.error == "after the commit point"


async def test_abort_cancels_the_job_wherever_it_waits_and_undoes():
    job, done = new_job(), []

    async def work(job):
        job.on_failure("resume", recorder(done, "resumed"))
        await trio.sleep_forever()  # a helper that never answers, a silent peer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.run, work)
        await trio.sleep(0.05)
        assert job.control("abort") == "abort requested"
    assert done == ["resumed"] and "aborted by the operator" in job.error


async def test_abort_after_the_commit_point_is_refused():
    job = new_job()

    async def work(job):
        job.commit()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.run, work)
        await trio.sleep(0.05)
        with pytest.raises(ToolstackError, match="past its commit point"):
            job.control("abort")
        nursery.cancel_scope.cancel()


async def test_an_unexpected_error_is_one_line_for_the_user_and_a_traceback_in_the_log(caplog):
    job = new_job()

    async def work(job):
        async with trio.open_nursery() as nursery:  # a group with one failure inside

            async def broken():
                raise KeyError("oops")

            nursery.start_soon(broken)

    with caplog.at_level(logging.ERROR, logger="ferry.job"):
        await job.run(work)
    assert job.error == "internal error: KeyError: 'oops' (details in ferryd's log)"
    assert "Exceptions from Trio nursery" not in job.error
    assert any(r.exc_info for r in caplog.records)


async def test_a_domain_belongs_to_one_job_and_is_released_when_it_ends():
    domain = FakeDomain()
    first = new_job(domain)
    with pytest.raises(ToolstackError, match="belongs to a migrate job"):
        new_job(domain)

    async def work(job):
        pass

    await first.run(work)
    assert domain.owner is None
    new_job(domain)  # free again


async def test_a_job_that_cannot_start_does_not_hide_the_one_that_runs():
    registry = {}
    running, failing = new_job(), new_job()

    async def forever(job):
        await trio.sleep_forever()

    async def fail(job):
        raise ToolstackError("a domain named 'vm1' already exists")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.run, forever, registry)
        await trio.sleep(0.01)
        await failing.run(fail, registry)
        assert registry["vm1"] is running
        nursery.cancel_scope.cancel()
