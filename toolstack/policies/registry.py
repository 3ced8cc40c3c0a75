"""The policies a daemon can run: its own, and those its operator loaded.

Policies come from three places, all decided when ferryd starts, never by
a client (a client only chooses among them by name):

- ferry's builtins (`xen`, `converge`);
- `ferryd --policy-module PATH_OR_MODULE`: a `.py` file, or the name of an
  importable module, that defines `POLICIES = {name: PolicyClass}`;
- installed packages' entry points in the group `ferry.policies`: each
  entry point's name is the policy's name, its object the class.

A broken module (it does not import, has no POLICIES, names a class that is
not a Policy, reuses a name) stops ferryd from starting with one line that
says which and why: better than a daemon that silently lacks a policy.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass

from .base import SETTING_TYPES, Policy, PolicyError
from .builtin import BUILTIN
from .guard import DEFAULT_BUDGET_MS

ENTRY_POINT_GROUP = "ferry.policies"
POLICY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    cls: type
    origin: str  # "builtin", the module it came from, or the entry point


class PolicyRegistry:
    def __init__(self, budget_ms: float = DEFAULT_BUDGET_MS) -> None:
        self.budget_ms = budget_ms
        self.entries: dict[str, PolicyEntry] = {}
        for name, cls in BUILTIN.items():
            self.add(name, cls, "builtin")

    def add(self, name: str, cls, origin: str) -> None:
        where = f"{origin}: policy {name!r}"
        if not isinstance(name, str) or not POLICY_NAME.match(name):
            raise PolicyError(f"{where}: names are lowercase letters, digits, '-' or '_'")
        if name in self.entries:
            raise PolicyError(f"{where}: the name is taken by {self.entries[name].origin}")
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise PolicyError(f"{where}: {cls!r} is not a subclass of toolstack.Policy")
        if cls.rule is Policy.rule:
            raise PolicyError(f"{where}: {cls.__name__} does not implement rule()")
        for key, kind in cls.SETTINGS.items():
            if kind not in SETTING_TYPES:
                raise PolicyError(f"{where}: setting {key!r} is not int, float, str or bool")
        self.entries[name] = PolicyEntry(name, cls, origin)

    def load_module(self, spec: str) -> list[str]:
        """Load the policies a module defines; returns their names."""
        module = _import(spec)
        policies = getattr(module, "POLICIES", None)
        if not isinstance(policies, dict):
            raise PolicyError(f"--policy-module {spec}: it defines no POLICIES = {{name: class}}")
        for name, cls in policies.items():
            self.add(name, cls, f"--policy-module {spec}")
        return list(policies)

    def load_entry_points(self) -> list[str]:
        names = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            origin = f"entry point {ep.name} ({dist})"
            try:
                cls = ep.load()
            except Exception as exc:
                raise PolicyError(f"{origin}: cannot load {ep.value}: {exc}") from None
            self.add(ep.name, cls, origin)
            names.append(ep.name)
        return names

    def make(self, name: str, settings: dict | None = None) -> Policy:
        """A fresh policy for one job, with `settings` applied (PolicyError names a bad one)."""
        entry = self.entries.get(name)
        if entry is None:
            raise PolicyError(f"unknown policy {name!r} (policies: {', '.join(self.entries)})")
        try:
            policy = entry.cls()
        except Exception as exc:
            raise PolicyError(f"policy {name!r} could not be created: {exc}") from None
        policy.name = name
        for key, value in (settings or {}).items():
            policy.set(key, value)
        return policy

    def describe(self) -> list[dict]:
        """Each policy: name, origin, doc, settings with types and defaults."""
        out = []
        for entry in self.entries.values():
            fresh = entry.cls()
            doc = (entry.cls.__doc__ or "").strip().splitlines()
            out.append(
                {
                    "name": entry.name,
                    "origin": entry.origin,
                    "doc": doc[0] if doc else "",
                    "settings": [
                        {"name": key, "type": SETTING_TYPES[kind], "default": getattr(fresh, key)}
                        for key, kind in entry.cls.SETTINGS.items()
                    ],
                    "budget_ms": self.budget_ms,
                }
            )
        return out


def _import(spec: str):
    """A `.py` file by path, or a module by its dotted name."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            return _import_file(spec)
        return importlib.import_module(spec)
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(f"--policy-module {spec}: {type(exc).__name__}: {exc}") from None


def _import_file(spec: str):
    path = os.path.abspath(spec)
    if not os.path.isfile(path):
        raise PolicyError(f"--policy-module {spec}: no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "ferry_policy_" + re.sub(r"\W", "_", stem)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
