"""One exception family for everything the protocol layer rejects.

Like h11: a `LocalProtocolError` means *we* were asked to produce something
the format forbids (a bug on this side); a `RemoteProtocolError` means bytes
from another process or host broke a rule.  Both name the rule and, for
streams, the byte offset where it was broken, so a log line is enough to find
the fault.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by `protocol`."""

    def __init__(self, rule: str, offset: int | None = None) -> None:
        self.rule = rule
        self.offset = offset
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{rule}{where}")


class LocalProtocolError(ProtocolError):
    """This side tried to encode something the format does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer (a file, a helper, another host) sent bytes that break a rule."""
