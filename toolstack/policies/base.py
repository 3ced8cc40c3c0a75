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

from protocol._gen_helper_msgs import PrecopyDecision, PrecopyStats

from .estimate import Estimator

Decision = PrecopyDecision
CONTINUE = Decision.CONTINUE_PRECOPY
STOP = Decision.STOP_AND_COPY
POSTCOPY = Decision.POSTCOPY
ABORT = Decision.ABORT

SETTING_TYPES = {int: "int", float: "float", str: "str", bool: "bool"}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


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
    """`value` (text, or already a value) as a `kind`; PolicyError otherwise."""
    if type(value) is kind or (kind is float and type(value) is int):
        return kind(value)
    if not isinstance(value, str):
        raise PolicyError(f"{key}: {value!r} is not a {SETTING_TYPES[kind]}")
    if kind is bool:
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise PolicyError(f"{key}: {value!r} is not true or false")
    try:
        parsed = kind(value)
    except ValueError:
        raise PolicyError(f"{key}: {value!r} is not a {SETTING_TYPES[kind]}") from None
    if kind is float and not math.isfinite(parsed):
        raise PolicyError(f"{key}: {value!r} is not a finite number")
    return parsed
