"""`ferry`: the command line.  Errors are one line on stderr (with --json,
a CliError object on stdout), never a traceback."""

from __future__ import annotations

import argparse
import sys

from protocol._gen_control_msgs import CliError as CliErrorReport

from .bench import Bench
from .commands import DOMAIN_COMMANDS, CliError, emit_json
from .demo import Demo
from .jobs import JOB_COMMANDS
from .resolve import MigrateResolve
from .verify import VerifyStream


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are a CliError object too when --json was asked for."""

    json_errors = False

    def error(self, message: str):
        if self.json_errors:
            command = self.prog.split()[-1] if " " in self.prog else ""
            emit_json(CliErrorReport(error=message, command=command))
            raise SystemExit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ferry", description="live-migration toolstack")
    parser.add_argument("--connect", metavar="SOCK", help="ferryd control socket")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in [*DOMAIN_COMMANDS, *JOB_COMMANDS, MigrateResolve, VerifyStream, Demo, Bench]:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as exc:
        if getattr(args, "json", False):
            emit_json(CliErrorReport(error=str(exc), command=args.command))
        else:
            print(f"ferry: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ferry ... | head`: the reader has all it wants
        sys.stderr.close()  # nothing more to say, not even at exit
        return 0
