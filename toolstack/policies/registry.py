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

from . import guard
from .base import RESERVED, SETTING_TYPES, Policy, PolicyError, parse_setting
from .builtin import BUILTIN
from .guard import DEFAULT_BUDGET_MS

ENTRY_POINT_GROUP = "ferry.policies"
POLICY_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    cls: type
    origin: str  # "builtin", the module it came from, or the entry point
    defaults: dict  # each setting's value in a fresh instance


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
        settings = cls.SETTINGS
        if not isinstance(settings, dict):
            raise PolicyError(f"{where}: SETTINGS is not a dict of name: type")
        for key, kind in settings.items():
            if not isinstance(key, str) or not key.isidentifier() or key in RESERVED:
                raise PolicyError(f"{where}: {key!r} cannot be a setting's name")
            if kind not in SETTING_TYPES:
                raise PolicyError(f"{where}: setting {key!r} is not int, float, str or bool")
        fresh = self._instance(name, cls, origin)
        defaults = {}
        for key, kind in settings.items():
            if not hasattr(fresh, key):
                raise PolicyError(f"{where}: a new {cls.__name__} has no {key!r} (its default)")
            try:
                defaults[key] = parse_setting(key, kind, getattr(fresh, key))
            except PolicyError as exc:
                raise PolicyError(f"{where}: default of {exc}") from None
        self.entries[name] = PolicyEntry(name, cls, origin, defaults)

    def _instance(self, name: str, cls, origin: str = "") -> Policy:
        try:
            return guard.call(name, "start", cls, budget_ms=self.budget_ms, loud=not origin)
        except guard.PolicyFailed as exc:
            raise PolicyError(f"{origin + ': ' if origin else ''}{exc}") from None

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
            except BaseException as exc:  # noqa: B036 - SystemExit at import too
                text = guard.one_line(str(exc))
                raise PolicyError(f"{origin}: cannot load {ep.value}: {text}") from None
            self.add(ep.name, cls, origin)
            names.append(ep.name)
        return names

    def make(self, name: str, settings: dict | None = None) -> Policy:
        """A fresh policy for one job, with `settings` applied (PolicyError names a bad one)."""
        entry = self.entries.get(name)
        if entry is None:
            raise PolicyError(f"unknown policy {name!r} (policies: {', '.join(self.entries)})")
        policy = self._instance(name, entry.cls)
        policy.name = name
        for key, value in (settings or {}).items():
            set_setting(policy, key, value, self.budget_ms)
        return policy

    def describe(self) -> list[dict]:
        """Each policy: name, origin, doc, settings with types and defaults."""
        out = []
        for entry in self.entries.values():
            doc = (entry.cls.__doc__ or "").strip().splitlines()
            out.append(
                {
                    "name": entry.name,
                    "origin": entry.origin,
                    "doc": guard.one_line(doc[0]) if doc else "",
                    "settings": [
                        {"name": key, "type": SETTING_TYPES[kind], "default": default}
                        for (key, kind), default in zip(
                            entry.cls.SETTINGS.items(), entry.defaults.values(), strict=True
                        )
                    ],
                    "budget_ms": self.budget_ms,
                }
            )
        return out


def set_setting(policy: Policy, key: str, value, budget_ms: float) -> None:
    """policy.set(key, value) under the budget (it runs the policy's own check)."""
    guard.call(policy.name, f"take {key}", policy.set, key, value, budget_ms=budget_ms)


def _import(spec: str):
    """A `.py` file by path, or a module by its dotted name."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            return _import_file(spec)
        return importlib.import_module(spec)
    except PolicyError:
        raise
    except BaseException as exc:  # noqa: B036 - SystemExit at import is a broken module too
        text = guard.one_line(str(exc))
        raise PolicyError(f"--policy-module {spec}: {type(exc).__name__}: {text}") from None


def _import_file(spec: str):
    path = os.path.abspath(spec)
    if not os.path.isfile(path):
        raise PolicyError(f"--policy-module {spec}: no such file")
    stem, ext = os.path.splitext(os.path.basename(path))
    if ext != ".py":
        raise PolicyError(f"--policy-module {spec}: a policy file's name ends in .py")
    name = "ferry_policy_" + re.sub(r"\W", "_", stem)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
