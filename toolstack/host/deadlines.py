"""How long ferryd waits for anything outside itself: one table, one default each.

Every wait on another process or host has a deadline, and each deadline
measures silence or one bounded step, never the length of a healthy job: a
migration may run for hours (a large guest over a slow link, a long precopy)
as long as its helpers keep saying they are moving pages.  Expiry fails the
job through its normal path (the source resumed, a half-built domain
removed).  `ferryd --deadline NAME=SECONDS` changes one (tests shrink them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Deadlines:
    connect: float = 10.0  # opening the TCP connection to a destination
    handshake: float = 10.0  # each authentication step and the migrate request's answer
    helper: float = 60.0  # a save or restore helper's silence (it speaks after every batch)
    ready: float = 120.0  # sender: from the end of its stream to the receiver's Ready
    go: float = 120.0  # receiver: from Ready to the sender's go
    running: float = 30.0  # sender: from go to the receiver's confirmation
    runner: float = 30.0  # one hypercall to a domain runner
    status: float = 3.0  # a runner's state for list/info; after it, "unreachable"
    runner_long: float = 150.0  # a hypercall that reads all of RAM (digest, guest check)
    resolve: float = 15.0  # asking a peer what became of a migration (whereabouts)

    def set(self, assignment: str) -> None:
        """NAME=SECONDS; ValueError names what is wrong."""
        name, sep, value = assignment.partition("=")
        known = [f.name for f in fields(self)]
        if not sep or name not in known:
            raise ValueError(
                f"--deadline {assignment!r}: NAME=SECONDS, NAME one of {', '.join(known)}"
            )
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--deadline {assignment!r}: {value!r} is not a number") from None
        if not 0 < seconds < 1e9:
            raise ValueError(f"--deadline {assignment!r}: seconds must be positive")
        setattr(self, name, seconds)


# The daemon's deadlines: defaults here, set once at start from its command line.
DEADLINES = Deadlines()
