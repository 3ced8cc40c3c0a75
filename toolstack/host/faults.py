"""Fault injection for the test suite: crash, stall or fail ferryd at a named point.

Off unless the environment of ferryd names faults (a test setting; nothing
in ferry's own configuration or API turns it on):

    FERRY_TEST_FAULTS="crash@source:suspended"            SIGKILL ferryd there
    FERRY_TEST_FAULTS="sleep@save:fsync=2"                 sleep 2 s there (off the trio thread)
    FERRY_TEST_FAULTS="fail@state:write=ENOSPC,..."        raise OSError(ENOSPC) there

Points are named where the code calls `point()`: each journalled migration
phase (`source:precopy`, `source:suspended`, `source:go-sent`,
`source:go-out`, `source:committed`, `destination:receiving`,
`destination:committed`), the same prefixed `journal:` before the
record is written (`fail@journal:source:committed=ENOSPC`),
`destination:unpaused` (the guest runs, the journal does not say so yet), `state:write` (a domain's state file),
`runner:start`, `save:fsync`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

log = logging.getLogger("ferry.faults")
ENV = "FERRY_TEST_FAULTS"


def _parse(text: str) -> dict[str, tuple[str, str]]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        action, _, rest = item.partition("@")
        where, _, arg = rest.partition("=")
        faults[where] = (action, arg)
    return faults


_FAULTS = _parse(os.environ.get(ENV, ""))


def point(where: str) -> None:
    """A place where a test may make ferryd crash, stall or fail.  Blocking:
    call it where blocking is allowed (a worker thread, or before trio runs)."""
    if where not in _FAULTS:
        return
    action, arg = _FAULTS[where]
    log.warning("test fault at %s: %s %s", where, action, arg)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sleep":
        time.sleep(float(arg or 1))
    elif action == "fail":
        code = getattr(errno, arg or "EIO")
        raise OSError(code, f"{os.strerror(code)} (test fault at {where})")


def armed(where: str) -> bool:
    return where in _FAULTS


async def reached(where: str) -> None:
    """`point()` from trio: off the event loop when a fault is armed there."""
    if where in _FAULTS:
        import trio

        await trio.to_thread.run_sync(point, where)
