"""`ferry verify-stream`: check a save file or a captured migration stream."""

from __future__ import annotations

import sys

from protocol import RemoteProtocolError
from protocol._gen_control_msgs import VerifyReport
from protocol.formats import FORMATS

from .commands import CliError, Command, emit_json


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
        report = check_file(args.file, args.format)
        if args.json:
            emit_json(report)
        elif not report.valid:
            at = f" at offset {report.offset}" if report.offset is not None else ""
            print(f"{args.file}: invalid: {report.error}{at}", file=sys.stderr)
        else:
            print_summary(report, args.verbose)
        return 0 if report.valid else 1


def check_file(path: str, fmt: str | None) -> VerifyReport:
    from protocol import StreamChecker  # numpy: loaded only for this command

    checker = StreamChecker(fmt)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                checker.feed(chunk)
        summary = checker.finish()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    except RemoteProtocolError as exc:
        return VerifyReport(
            file=path,
            valid=False,
            format=checker.summary.format,
            error=exc.rule,
            offset=exc.offset,
            stream_bytes=checker.summary.stream_bytes,
        )
    return VerifyReport(
        file=path,
        valid=True,
        format=summary.format,
        records=dict(summary.records),
        pages=summary.pages,
        page_data_bytes=summary.page_data_bytes,
        stream_bytes=summary.stream_bytes,
        context_bytes=dict(summary.context_bytes),
        config_bytes=len(summary.config),
    )


def print_summary(r: VerifyReport, verbose: bool) -> None:
    print(f"{r.file}: valid {r.format} stream, {r.stream_bytes} octets")
    print(f"  pages: {r.pages} ({r.page_data_bytes} octets of page data)")
    for name, size in r.context_bytes.items():
        print(f"  {name}: {size} octets")
    if r.config_bytes:
        print(f"  domain config: {r.config_bytes} octets of JSON")
    shown = ("PAGE_DATA", "POSTCOPY_PAGE_DATA", "HVM_CONTEXT")
    records = r.records if verbose else {k: v for k, v in r.records.items() if k in shown}
    for name, count in sorted(records.items()):
        print(f"  {name}: {count} record(s)")
