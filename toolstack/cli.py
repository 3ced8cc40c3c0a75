"""`ferry`: the command line.  Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys

from bench.command import Bench

from . import cli_commands
from .demo import Demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="live-migration toolstack")
    parser.add_argument("--connect", metavar="SOCK", help="ferryd control socket")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in [*cli_commands.COMMANDS, Demo, Bench]:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except cli_commands.CliError as exc:
        print(f"ferry: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ferry ... | head`: the reader has all it wants
        sys.stderr.close()  # nothing more to say, not even at exit
        return 0
