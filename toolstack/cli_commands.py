"""The `ferry` subcommands, one small class each."""

from __future__ import annotations

import json
import os
import sys

from hypervisor.sizes import parse_size
from protocol import RemoteProtocolError, StreamChecker
from protocol.check import FORMATS

from .client import DaemonClient, DaemonError
from .report import print_job, progress_line


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class Command:
    """A subcommand: its name, a line of help, its arguments and what it does."""

    name = ""
    help = ""

    @classmethod
    def add_parser(cls, sub) -> None:
        p = sub.add_parser(cls.name, help=cls.help)
        cls.configure(p)
        p.set_defaults(run=cls.run)

    @staticmethod
    def configure(p) -> None:
        pass

    @staticmethod
    def run(args) -> int:
        raise NotImplementedError


def client(args) -> DaemonClient:
    try:
        return DaemonClient(args.connect)
    except DaemonError as exc:
        raise CliError(str(exc)) from None


def request(args, op: str, on_progress=None, **fields) -> dict:
    with client(args) as c:
        try:
            return c.request(op, on_progress=on_progress, **fields)
        except DaemonError as exc:
            raise CliError(str(exc)) from None


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def emit_json(value) -> None:
    print(json.dumps(value, indent=None, sort_keys=True))


class Create(Command):
    name = "create"
    help = "create and start a domain"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("--memory", required=True, help="e.g. 512M, 1GiB")
        p.add_argument("--backend", choices=["sim", "kvm"], default="sim")
        p.add_argument("--dirty-rate", type=float, default=0.0, metavar="PAGES_PER_S")
        p.add_argument("--working-set", type=float, default=1.0, metavar="FRACTION")
        p.add_argument("--skew", type=float, default=0.0, metavar="FRACTION")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--paused", action="store_true")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        memory = memory_size(args.memory)
        config = {
            "name": args.domain,
            "memory_bytes": memory,
            "backend": args.backend,
            "dirty_rate": args.dirty_rate,
            "working_set": args.working_set,
            "skew": args.skew,
            "seed": args.seed,
        }
        reply = request(args, "create", config=json.dumps(config), paused=args.paused)
        if args.json:
            emit_json(reply["domain"])
        else:
            print(f"created {args.domain} ({reply['domain']['state']})")
        return 0


class List(Command):
    name = "list"
    help = "list this host's domains"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        domains = request(args, "list")["domains"]
        if args.json:
            emit_json(domains)
            return 0
        print(f"{'Name':<20} {'State':<10} {'Backend':<8} {'Memory':>10}  Job")
        for d in domains:
            mib = d["memory_bytes"] // (1 << 20)
            print(
                f"{d['name']:<20} {d['state']:<10} {d['backend']:<8} {mib:>7} MiB  {d.get('job') or '-'}"
            )
        return 0


def simple_command(command: str, summary: str, result_key: str | None = None):
    """pause, unpause, destroy, digest, guest-check: NAME in, a line out."""

    class Simple(Command):
        name = command
        help = summary

        @staticmethod
        def configure(p) -> None:
            p.add_argument("domain")

        @staticmethod
        def run(args) -> int:
            reply = request(args, command, name=args.domain)
            if result_key:
                print(reply[result_key])
            return 0

    return Simple


class Save(Command):
    name = "save"
    help = "save a domain to a file (it is gone afterwards unless --keep)"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("file")
        p.add_argument("--live", action="store_true", help="precopy while the guest runs")
        p.add_argument("--keep", action="store_true", help="leave the domain running")
        p.add_argument("--policy", default="xen", choices=["xen", "converge"])
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        reply = request(
            args,
            "save",
            name=args.domain,
            file=os.path.abspath(args.file),
            live=args.live,
            keep=args.keep,
            policy=args.policy,
        )
        if args.json:
            emit_json(reply["report"])
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
        p.add_argument("--paused", action="store_true")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        reply = request(
            args,
            "restore",
            file=os.path.abspath(args.file),
            name=args.name or "",
            paused=args.paused,
        )
        domain = reply["report"]["domain"]
        if args.json:
            emit_json(domain)
        else:
            print(f"restored {domain['name']} ({domain['state']})")
        return 0


class Migrate(Command):
    name = "migrate"
    help = "live-migrate a domain to another ferryd"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("address", metavar="HOST:PORT")
        p.add_argument("--policy", default="converge", choices=["xen", "converge"])
        p.add_argument("--downtime-limit", type=float, metavar="MS")
        p.add_argument("--max-iterations", type=int, metavar="N")
        p.add_argument("--precopy-timeout", type=float, metavar="S")
        p.add_argument("--fallback", choices=["stop-and-copy", "abort"])
        p.add_argument(
            "--verify", action="store_true", help="compare RAM digests before the switch"
        )
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        live = sys.stdout.isatty() and not args.json

        def show(progress: dict) -> None:
            print("\r" + progress_line(progress), end="", flush=True)

        fields = {
            "name": args.domain,
            "address": args.address,
            "policy": args.policy,
            "verify": args.verify,
            "watch": live,
        }
        for key in ("downtime_limit", "max_iterations", "precopy_timeout", "fallback"):
            value = getattr(args, key)
            if value is not None:
                fields[key] = value
        try:
            reply = request(args, "migrate", on_progress=show if live else None, **fields)
        finally:
            if live:
                print()
        if args.json:
            emit_json(reply["report"])
        else:
            print_job(reply["report"])
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
        reply = request(args, "job", name=args.domain)
        if args.json:
            emit_json(
                {
                    **reply["job"],
                    "running": reply["running"],
                    "policy": reply["policy"],
                    "settings": reply["settings"],
                }
            )
        else:
            print_job(reply["job"], reply["policy"], reply["settings"])
        return 0


class JobControl(Command):
    name = "job-control"
    help = "steer a running job: abort, stop-and-copy, set KEY=VALUE"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("domain")
        p.add_argument("action", choices=["abort", "stop-and-copy", "set"])
        p.add_argument("setting", nargs="?", metavar="KEY=VALUE")

    @staticmethod
    def run(args) -> int:
        fields = {"name": args.domain, "action": args.action}
        if args.action == "set":
            key, sep, value = (args.setting or "").partition("=")
            if not sep or not key:
                raise CliError("set needs KEY=VALUE, e.g. downtime_limit=50")
            fields.update(key=key, value=value)
        print(request(args, "job-control", **fields)["message"])
        return 0


class VerifyStream(Command):
    name = "verify-stream"
    help = "check a save file or migration stream"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("file")
        p.add_argument("--format", choices=FORMATS, help="default: detect from the header")
        p.add_argument("-v", "--verbose", action="store_true", help="show every record type")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        checker = StreamChecker(args.format)
        try:
            with open(args.file, "rb") as f:
                while chunk := f.read(1 << 20):
                    checker.feed(chunk)
            summary = checker.finish()
        except OSError as exc:
            raise CliError(f"{args.file}: {exc.strerror}") from None
        except RemoteProtocolError as exc:
            print(f"{args.file}: invalid: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(
                json.dumps(
                    {
                        "format": summary.format,
                        "valid": True,
                        "records": dict(summary.records),
                        "pages": summary.pages,
                        "page_data_bytes": summary.page_data_bytes,
                        "stream_bytes": summary.stream_bytes,
                        "context_bytes": summary.context_bytes,
                    }
                )
            )
            return 0
        print(f"{args.file}: valid {summary.format} stream, {summary.stream_bytes} octets")
        print(f"  pages: {summary.pages} ({summary.page_data_bytes} octets of page data)")
        for name, size in summary.context_bytes.items():
            print(f"  {name}: {size} octets")
        if summary.config:
            print(f"  domain config: {len(summary.config)} octets of JSON")
        records = (
            summary.records
            if args.verbose
            else {k: v for k, v in summary.records.items() if k in ("PAGE_DATA", "HVM_CONTEXT")}
        )
        for name, count in sorted(records.items()):
            print(f"  {name}: {count} record(s)")
        return 0


COMMANDS = [
    Create,
    List,
    simple_command("pause", "pause a domain"),
    simple_command("unpause", "unpause a domain"),
    simple_command("destroy", "destroy a domain"),
    simple_command("digest", "print the RAM digest of a paused domain", "digest"),
    simple_command("guest-check", "ask the guest to verify its own pages", "guest_check"),
    Save,
    Restore,
    Migrate,
    JobInfo,
    JobControl,
    VerifyStream,
]
