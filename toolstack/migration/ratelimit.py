"""A log that says a repeated thing at a bounded rate.

Anyone who can reach the migration port can make the daemon refuse them;
one log line per refusal would let them fill the disk.  At most
`per_minute` lines go out per minute; the next line after a quiet spell says
how many were left out."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, log: logging.Logger, per_minute: int = 10) -> None:
        self.log = log
        self.per_minute = per_minute
        self.window_start = time.monotonic()
        self.in_window = 0
        self.suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start >= 60:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.per_minute:
            self.suppressed += 1
            return
        self.in_window += 1
        if self.suppressed:
            message += f" ({self.suppressed} more like it not logged)"
            self.suppressed = 0
        self.log.warning(message, *args)
