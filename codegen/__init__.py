"""codegen: turns the declarative message schemas in protocol/*.toml into code.

`python -m codegen` (or `make gen`) writes every output; `--check` only
reports which checked-in files are stale.
"""

from .generate import SCHEMAS, generate_all, stale_files

__all__ = ["SCHEMAS", "generate_all", "stale_files"]
