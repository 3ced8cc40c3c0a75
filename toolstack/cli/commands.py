"""The `ferry` subcommands that act on domains; the shape every subcommand shares.

A subcommand is a small class: its name, a line of help, its arguments and
`run(args)`, which returns the exit status.  A failure is a `CliError`:
`ferry` prints it as one line on stderr (or, with --json, as a CliError
object on stdout) and exits 1.
"""

from __future__ import annotations

import json

from hypervisor.sizes import parse_size
from protocol import ProtocolError
from protocol._gen_control_msgs import DomainConfig

from .daemon_client import DaemonClient, DaemonError


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class Command:
    """A subcommand: its name, a line of help, its arguments and what it does."""

    name = ""
    help = ""

    @classmethod
    def add_parser(cls, sub) -> None:
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help)
        cls.configure(p)
        p.set_defaults(run=cls.run)

    @staticmethod
    def configure(p) -> None:
        pass

    @staticmethod
    def run(args) -> int:
        raise NotImplementedError


def daemon(args, on_progress=None) -> DaemonClient:
    try:
        return DaemonClient(args.connect, on_progress=on_progress)
    except DaemonError as exc:
        raise CliError(str(exc)) from None


def call(args, operation: str, on_progress=None, **fields):
    """One operation on the daemon: its reply, or CliError with the daemon's line."""
    with daemon(args, on_progress) as d:
        try:
            return getattr(d, operation)(**fields)
        except DaemonError as exc:
            raise CliError(str(exc)) from None


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def emit_json(value) -> None:
    """A generated struct (or a list of them, or plain data) as one line of JSON."""
    print(json.dumps(_wire(value), sort_keys=True))


def _wire(value):
    if hasattr(value, "to_wire"):
        return value.to_wire()
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


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
        p.add_argument("--paused", action="store_true", help="do not start the guest")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        try:
            config = DomainConfig.from_wire(
                {
                    "name": args.domain,
                    "memory_bytes": memory_size(args.memory),
                    "backend": args.backend,
                    "dirty_rate": args.dirty_rate,
                    "working_set": args.working_set,
                    "skew": args.skew,
                    "seed": args.seed,
                },
                "create",
            )
        except ProtocolError as exc:
            raise CliError(str(exc)) from None
        info = call(args, "create", config=config, paused=args.paused)
        if args.json:
            emit_json(info)
        else:
            print(f"created {args.domain} ({info.state})")
        return 0


class List(Command):
    name = "list"
    help = "list this host's domains"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        domains = call(args, "list")
        if args.json:
            emit_json(domains)
            return 0
        print(f"{'Name':<28} {'State':<12} {'Backend':<8} {'Memory':>10}  Job")
        for d in domains:
            mib = d.memory_bytes // (1 << 20)
            print(f"{d.name:<28} {d.state:<12} {d.backend:<8} {mib:>7} MiB  {d.job or '-'}")
        return 0


def simple_command(command: str, summary: str, prints_reply: bool = False):
    """pause, unpause, destroy, digest, guest-check: NAME in, a line out."""

    class Simple(Command):
        name = command
        help = summary

        @staticmethod
        def configure(p) -> None:
            p.add_argument("domain")

        @staticmethod
        def run(args) -> int:
            reply = call(args, command.replace("-", "_"), name=args.domain)
            if prints_reply:
                print(reply)
            return 0

    return Simple


DOMAIN_COMMANDS = [
    Create,
    List,
    simple_command("pause", "pause a domain"),
    simple_command("unpause", "unpause a domain"),
    simple_command("destroy", "destroy a domain"),
    simple_command("digest", "print the RAM digest of a paused domain", prints_reply=True),
    simple_command("guest-check", "ask the guest to verify its own pages", prints_reply=True),
]
