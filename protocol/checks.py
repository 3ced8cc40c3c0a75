"""Value checks used by the generated decoders: one rule each, one error line.

Every value that arrives from another process or host passes through one
of these before it becomes a field of a message.  A failure is a
`RemoteProtocolError` that names where the value was (`migrate.settings`,
`create.config.memory_bytes`) and what the rule wanted, so the peer or the
person who typed it knows what to change.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import RemoteProtocolError

MAX_STR = 1 << 16  # characters in any string field unless the schema says less


def fail(where: str, what: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: expected {what}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A value in an error line: never more than 60 characters of it."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def check_int(value: Any, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise fail(where, f"an integer in {lo}..{hi}", value)
    return value


def check_float(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite number (an integer is accepted as one) within lo..hi."""
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        bounds = "" if (lo, hi) == (-math.inf, math.inf) else f" in {lo:g}..{hi:g}"
        raise fail(where, f"a finite number{bounds}", value)
    return float(value)


def check_bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise fail(where, "a boolean", value)
    return value


def check_str(value: Any, where: str, max_len: int = MAX_STR) -> str:
    if type(value) is not str or len(value) > max_len:
        raise fail(where, f"a string of at most {max_len} characters", value)
    return value


def check_bytes(value: Any, where: str, max_len: int | None = None) -> bytes:
    if type(value) is not bytes or (max_len is not None and len(value) > max_len):
        limit = "" if max_len is None else f" (at most {max_len} octets)"
        raise fail(where, f"bytes{limit}", value)
    return value


def check_scalar(value: Any, where: str) -> int | float | str | bool:
    """A setting's value: a boolean, an integer, a finite number or a short string."""
    if type(value) is bool or type(value) is int:
        return value
    if type(value) is float:
        return check_float(value, where)
    if type(value) is str:
        return check_str(value, where, 4096)
    raise fail(where, "a boolean, number or string", value)


def check_list(value: Any, where: str, length: int | None = None) -> list:
    if type(value) is not list or (length is not None and len(value) != length):
        expected = "a list" if length is None else f"a list of {length} items"
        raise fail(where, expected, value)
    return value


def check_map(value: Any, where: str) -> dict:
    """A map whose keys are strings (their values are checked by the caller)."""
    if type(value) is not dict:
        raise fail(where, "a map", value)
    for key in value:
        check_str(key, f"{where} key", 256)
    return value


def check_fields(value: Any, where: str, known: frozenset, required: tuple) -> dict:
    """A map of named fields: no field the schema does not know, none it needs missing."""
    check_map(value, where)
    unknown = sorted(set(value) - known)
    if unknown:
        raise RemoteProtocolError(f"{where}: unknown field {unknown[0]!r}")
    for name in required:
        if name not in value:
            raise RemoteProtocolError(f"{where}: missing field {name!r}")
    return value


def check_pattern(value: str, where: str, pattern: re.Pattern, rule: str) -> str:
    if not pattern.fullmatch(value):
        raise RemoteProtocolError(f"{where}: {_shown(value)} breaks the rule: {rule}")
    return value


def check_choice(value: Any, where: str, choices: tuple) -> Any:
    if value not in choices:
        listed = ", ".join(repr(c) if c == "" else str(c) for c in choices)
        raise RemoteProtocolError(f"{where}: {_shown(value)} is not one of {listed}")
    return value


def check_multiple(value: int, where: str, step: int) -> int:
    if value % step:
        raise RemoteProtocolError(f"{where}: {value} is not a multiple of {step}")
    return value
