"""What the migration protocol needs of the daemon it runs in: one object."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..host import Host, Job
from ..policies import DEFAULT_BUDGET_MS
from .journal import Journal


@dataclass
class Site:
    """This host, as a migration sees it."""

    host: Host
    journal: Journal
    key: bytes | None  # the shared key migrations authenticate with
    jobs: dict[str, Job] = field(default_factory=dict)  # domain name -> its latest job
    budget_ms: float = DEFAULT_BUDGET_MS
    start_job: object = None  # start_job(job, work): run a job in the daemon's nursery
    resolver: object = None  # the daemon's Resolver (resolve.py), for in-doubt outcomes
    postcopy: tuple[bool, str] = (False, "not probed")  # can this host serve faults, or why not
    unauthenticated: int = 0  # connections still proving they hold the key
    joining: dict = field(default_factory=dict)  # migration id -> Joining (joining.py)

    async def run_job(self, job: Job, work) -> None:
        """Start a job and wait until it ends."""
        self.start_job(job, work)
        await job.done.wait()
