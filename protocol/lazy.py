"""Re-exports imported on first use.

A package's `__init__` names what it offers; the modules behind the names
load when a name is first asked for.  The `ferry` command line needs the
control messages and a socket, not numpy: loading everything on every
`ferry list` cost it 0.2 s of start-up.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` for `package`: `exports` maps each public name
    to the module (relative to `package`) defining it, or being it."""

    def __getattr__(name: str):
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where, package)
        return module if where.rsplit(".", 1)[-1] == name else getattr(module, name)

    return __getattr__
