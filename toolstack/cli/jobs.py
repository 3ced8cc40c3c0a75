"""The `ferry` subcommands that run or steer jobs: save, restore, migrate,
job, job-control, policies.

Every flag that steers a policy becomes one of its settings, and settings
go to the daemon as they are: the daemon checks each against the chosen
policy before the job starts and refuses an unknown one by name (`ferry
policies` lists what each policy takes).
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import CliError, Command, call, emit_json
from .output import print_job, print_policies, progress_line

# (flag, setting): the named flags are shortcuts for --set SETTING=VALUE.
# --precopy-iterations and --precopy-threshold are Xen's names (xl migrate,
# in the postcopy RFC) for the xen policy's max_iterations and max_dirty.
SETTING_FLAGS = [
    ("downtime_limit", "downtime_limit"),
    ("max_iterations", "max_iterations"),
    ("precopy_timeout", "precopy_timeout"),
    ("fallback", "fallback"),
    ("precopy_iterations", "max_iterations"),
    ("precopy_threshold", "max_dirty"),
]


def add_policy_flags(p, default: str) -> None:
    p.add_argument(
        "--policy",
        default=default,
        help=f"precopy policy (default {default}; see `ferry policies`)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="set any setting of the policy (repeatable)",
    )


def settings_from(args) -> dict:
    """--set KEY=VALUE and the named shortcuts, each setting given once."""
    settings: dict[str, str] = {}
    given_as: dict[str, str] = {}

    def put(key: str, value: str, flag: str) -> None:
        if key in settings:
            raise CliError(f"{flag} sets {key}, which {given_as[key]} already set")
        settings[key], given_as[key] = value, flag

    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set needs KEY=VALUE, got {item!r}")
        put(key.strip(), value.strip(), f"--set {key.strip()}")
    for attr, key in SETTING_FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            put(key, str(value), "--" + attr.replace("_", "-"))
    return settings


def progress_printer(args, show: bool):
    """A progress callback: the live line on a terminal, nothing otherwise."""
    if not show:
        return None

    def show_line(job) -> None:
        print("\r" + progress_line(job), end="", file=sys.stderr, flush=True)

    return show_line


def run_job(args, operation: str, **fields):
    """A job operation, watched (progress keeps the connection's deadline
    honest), with the live line on a terminal."""
    show = sys.stderr.isatty() and not args.json
    try:
        return call(args, operation, on_progress=progress_printer(args, show), watch=True, **fields)
    finally:
        if show:
            print(file=sys.stderr)


class Save(Command):
    name = "save"
    help = "save a domain to a file (it is gone afterwards unless --keep)"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("file")
        p.add_argument("--live", action="store_true", help="precopy while the guest runs")
        p.add_argument("--keep", action="store_true", help="leave the domain as it was")
        add_policy_flags(p, "xen")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        settings = settings_from(args)
        if (settings or args.policy != "xen") and not args.live:
            raise CliError("a policy steers a live save: add --live")
        report = run_job(
            args,
            "save",
            name=args.domain,
            file=os.path.abspath(args.file),
            live=args.live,
            keep=args.keep,
            policy=args.policy,
            settings=settings,
        )
        if args.json:
            emit_json(report)
        else:
            print(f"saved {args.domain} to {args.file}")
        return 0


class Restore(Command):
    name = "restore"
    help = "restore a domain from a save file"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("file")
        p.add_argument("--name", help="restore under another name")
        p.add_argument("--paused", action="store_true", help="leave the guest paused")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        report = run_job(
            args,
            "restore",
            file=os.path.abspath(args.file),
            name=args.name or "",
            paused=args.paused,
        )
        if args.json:
            emit_json(report)
        else:
            state = "paused" if args.paused else "running"
            print(f"restored {report.domain} ({state})")
        return 0


class Migrate(Command):
    name = "migrate"
    help = "live-migrate a domain to another ferryd"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("address", metavar="HOST:PORT")
        add_policy_flags(p, "converge")
        p.add_argument(
            "--downtime-limit", type=float, metavar="MS", help="converge: downtime_limit"
        )
        p.add_argument("--max-iterations", type=int, metavar="N", help="max_iterations")
        p.add_argument(
            "--precopy-timeout", type=float, metavar="S", help="converge: precopy_timeout"
        )
        p.add_argument(
            "--fallback",
            choices=["stop-and-copy", "abort", "postcopy"],
            help="converge: what to do when precopy does not converge (postcopy needs --postcopy)",
        )
        p.add_argument(
            "--precopy-iterations", type=int, metavar="N", help="xen: max_iterations (Xen's name)"
        )
        p.add_argument(
            "--precopy-threshold", type=int, metavar="PAGES", help="xen: max_dirty (Xen's name)"
        )
        p.add_argument(
            "--verify", action="store_true", help="compare RAM digests before the switch"
        )
        p.add_argument(
            "--postcopy",
            action="store_true",
            help="this migration may switch to postcopy (job-control postcopy, a policy, "
            "or --postcopy-after-precopy)",
        )
        p.add_argument(
            "--postcopy-after-precopy",
            action="store_true",
            help="switch to postcopy once the first pass over RAM is done (implies --postcopy)",
        )
        p.add_argument(
            "--parallel-connections",
            type=connections,
            default=1,
            metavar="N",
            help="TCP connections for precopy's pages (1-8, default 1)",
        )
        p.add_argument(
            "--postcopy-bandwidth",
            type=float,
            default=0.0,
            metavar="MBPS",
            help="MB/s the postcopy push may use; faulted pages never wait (default 0: unlimited)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="go on with this domain's paused postcopy over a new connection to HOST:PORT",
        )
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        report = run_job(
            args,
            "migrate",
            name=args.domain,
            address=args.address,
            policy=args.policy,
            settings=settings_from(args),
            verify=args.verify,
            postcopy=args.postcopy or args.postcopy_after_precopy,
            postcopy_after_precopy=args.postcopy_after_precopy,
            resume=args.resume,
            postcopy_bandwidth=args.postcopy_bandwidth,
            parallel_connections=args.parallel_connections,
        )
        if args.json:
            emit_json(report)
        else:
            print_job(report)
        return 0


class JobInfo(Command):
    name = "job"
    help = "show a domain's current or last job (like domjobinfo)"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        report = call(args, "job", name=args.domain)
        if args.json:
            emit_json(report)
        else:
            print_job(report)
        return 0


class JobControl(Command):
    name = "job-control"
    help = "steer a running job: abort, stop-and-copy, postcopy, set KEY=VALUE"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("action", choices=["abort", "stop-and-copy", "postcopy", "set"])
        p.add_argument("setting", nargs="?", metavar="KEY=VALUE")

    @staticmethod
    def run(args) -> int:
        key, value = "", ""
        if args.action == "set":
            key, sep, value = (args.setting or "").partition("=")
            if not sep or not key:
                raise CliError("set needs KEY=VALUE, e.g. downtime_limit=50")
        elif args.setting:
            raise CliError(f"{args.action} takes no KEY=VALUE")
        print(call(args, "job_control", name=args.domain, action=args.action, key=key, value=value))
        return 0


class Policies(Command):
    name = "policies"
    help = "list the precopy policies the daemon can run, with their settings"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        policies = call(args, "policies")
        if args.json:
            emit_json(policies)
        else:
            print_policies(policies)
        return 0


JOB_COMMANDS = [Save, Restore, Migrate, JobInfo, JobControl, Policies]


def connections(text: str) -> int:
    """--parallel-connections N: a count the daemon accepts (1-8)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of connections") from None
    if not 1 <= n <= 8:
        raise argparse.ArgumentTypeError(f"{n} connections: 1 to 8")
    return n
