"""A host's domains, and the jobs that save, restore and move them.

domains.py      the state dir, runner processes, hypercalls (`domain.runner`)
helper_job.py   one save or restore helper run, and the callbacks it calls
jobs.py         a job: registered, steerable, reported
stats.py        what a job knows about itself (JobReport)
savefile.py     `xl save` / `xl restore`
"""

from .domains import Domain, Host, ToolstackError, config_from_json, config_to_json
from .helper_job import HelperCallbacks, HelperFailed, HelperProcess, run_helper, start_helper
from .jobs import Job
from .stats import JobStats

__all__ = [
    "Domain",
    "HelperCallbacks",
    "HelperFailed",
    "HelperProcess",
    "Host",
    "Job",
    "JobStats",
    "ToolstackError",
    "config_from_json",
    "config_to_json",
    "run_helper",
    "start_helper",
]
