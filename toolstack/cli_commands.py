"""The `ferry` subcommands, one small class each."""

from __future__ import annotations

import json
import sys

from protocol import RemoteProtocolError, StreamChecker
from protocol.check import FORMATS


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class VerifyStream:
    name = "verify-stream"

    @classmethod
    def add_parser(cls, sub) -> None:
        p = sub.add_parser(cls.name, help="check a save file or migration stream")
        p.add_argument("file")
        p.add_argument("--format", choices=FORMATS, help="default: detect from the header")
        p.add_argument("-v", "--verbose", action="store_true", help="show every record type")
        p.add_argument("--json", action="store_true")
        p.set_defaults(run=cls.run)

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


COMMANDS = [VerifyStream]
