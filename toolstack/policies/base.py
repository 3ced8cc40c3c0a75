"""The policy interface: what ferry's own policies and yours implement.

After every batch of 1024 pages the save helper stops and asks; ferryd
calls the job's policy and sends its answer back:

    class Patient(Policy):
        '''Stop and copy once fewer than `threshold` pages are dirty.'''
        SETTINGS = {"threshold": int}

        def __init__(self):
            super().__init__()
            self.threshold = 500          # the default a new job starts with

        def rule(self, stats, estimate):
            if 0 <= stats.dirty_count < self.threshold:
                self.reason = f"{stats.dirty_count} pages dirty"
                return Decision.STOP_AND_COPY
            return Decision.CONTINUE_PRECOPY

`stats` is the helper's `PrecopyStats` (docs/helper-messages.md lists every
field), `estimate` an `Estimator` that has already seen them (bandwidth,
dirty rate, expected downtime, elapsed time).  `rule` runs on ferryd's
event loop: it must answer within the daemon's time budget (2 ms by
default) without I/O; a rule that raises, answers something that is not a
`Decision`, or takes too long fails its job, and the source runs on as it
was.  `SETTINGS` names what `--set KEY=VALUE` and `job-control set` may
change (int, float, str or bool); the attributes of a fresh instance are
the defaults.  `reason` says why the last non-continue answer was given:
it is what `ferry job` shows as the decision.
"""

from __future__ import annotations

import math
import re

from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats

from .estimate import Estimator

Decision = PrecopyDecision
CONTINUE = Decision.CONTINUE_PRECOPY
STOP = Decision.STOP_AND_COPY
POSTCOPY = Decision.POSTCOPY
ABORT = Decision.ABORT

SETTING_TYPES = {int: "int", float: "float", str: "str", bool: "bool"}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
MAX_TEXT = 1024  # characters of a str setting
# names a setting may not take: the attributes every policy already has
RESERVED = {"name", "requested", "reason", "SETTINGS", "decide", "rule", "request", "set"}
RESERVED |= {"settings", "check_setting"}


class PolicyError(ValueError):
    """A policy cannot be made or changed as asked: one line that says why."""


class Policy:
    """Base of every precopy policy: subclasses write `rule()` and list
    their settings in `SETTINGS` (name -> int, float, str or bool)."""

    name = "policy"  # the name it runs under (the registry sets it)
    SETTINGS: dict[str, type] = {}

    def __init__(self) -> None:
        self.requested: Decision | None = None
        self.reason = ""  # why the last non-CONTINUE answer was given

    def decide(self, stats: PrecopyStats, estimate: Estimator) -> Decision:
        """The answer to one batch: an operator's order if one is pending,
        else the rule's.  `estimate` has already seen `stats`."""
        if self.requested is not None:
            self.reason = f"operator requested {self.requested.name.lower().replace('_', '-')}"
            return self.requested
        return self.rule(stats, estimate)

    def rule(self, stats: PrecopyStats, estimate: Estimator) -> Decision:
        raise NotImplementedError

    def request(self, decision: Decision) -> None:
        """An operator's order (abort, stop-and-copy), carried by the next answer."""
        self.requested = decision

    def set(self, key: str, value) -> None:
        """Change a setting (before or while the job runs); PolicyError names
        what is wrong.  `value` is text as a person typed it, or a value of
        the setting's type."""
        if key not in self.SETTINGS:
            known = ", ".join(sorted(self.SETTINGS)) or "none"
            raise PolicyError(f"policy {self.name} has no setting {key!r} (settings: {known})")
        parsed = parse_setting(key, self.SETTINGS[key], value)
        try:
            self.check_setting(key, parsed)
        except PolicyError:
            raise
        except Exception as exc:  # a policy's own rule, in its own words
            raise PolicyError(f"{key}: {exc}") from None
        setattr(self, key, parsed)

    def check_setting(self, key: str, value) -> None:
        """A rule a setting's value must keep; numbers may not be negative.
        Subclasses add their own (and call this one)."""
        if type(value) in (int, float) and value < 0:
            raise PolicyError(f"{key} must not be negative")

    def settings(self) -> dict:
        return {key: getattr(self, key) for key in self.SETTINGS}


def parse_setting(key: str, kind: type, value):
    """`value` (text, or already a value) as a `kind` within its bounds;
    PolicyError otherwise.  Text is plain ASCII as a person types it."""
    if isinstance(value, str):
        value = _from_text(key, kind, value)
    elif kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise PolicyError(f"{key}: {value!r} is not {_a(kind)}")
    if kind is int and not -(2**63) <= value < 2**63:
        raise PolicyError(f"{key}: {value} is out of range")
    if kind is float and not (math.isfinite(value) and abs(value) < 1e18):
        raise PolicyError(f"{key}: {value!r} is not a finite number below 1e18")
    if kind is str and (len(value) > MAX_TEXT or not value.isprintable()):
        raise PolicyError(f"{key}: at most {MAX_TEXT} printable characters")
    return value


def _from_text(key: str, kind: type, text: str):
    word = text.strip()
    if kind is str:
        return text
    if kind is bool:
        if word.lower() in TRUE_WORDS or word.lower() in FALSE_WORDS:
            return word.lower() in TRUE_WORDS
        raise PolicyError(f"{key}: {text!r} is not true or false")
    pattern = INT_TEXT if kind is int else FLOAT_TEXT
    if not pattern.fullmatch(word):
        raise PolicyError(f"{key}: {text!r} is not {_a(kind)}")
    return kind(word)


def _a(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
