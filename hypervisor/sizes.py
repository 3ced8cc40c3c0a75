"""Memory sizes as people write them: 512M, 1GiB, 4096 (bytes)."""

from __future__ import annotations

import re

from protocol.limits import PAGE_SIZE

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`, a whole number of pages; ValueError with the rule otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 1GiB, 65536)")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{text!r} is not a positive multiple of {PAGE_SIZE} bytes")
    return size
