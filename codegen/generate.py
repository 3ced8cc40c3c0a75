"""Generate every output of every schema, or find the stale ones."""

from __future__ import annotations

from pathlib import Path

from . import render
from .schema import load

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = (
    "protocol/helper_msgs.toml",
    "protocol/runner_msgs.toml",
    "protocol/control_msgs.toml",
    "protocol/migration_msgs.toml",
)
RENDERERS = {
    "models": render.models,
    "stubs": render.stubs,
    "dispatch": render.dispatch,
    "docs": render.docs,
}


def generate_all(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's path and the text it should have."""
    files: dict[Path, str] = {}
    for rel in SCHEMAS:
        schema = load(root / rel)
        for kind, renderer in RENDERERS.items():
            if kind in schema.outputs:
                files[root / schema.outputs[kind]] = renderer(schema)
    return files


def stale_files(root: Path = ROOT) -> list[Path]:
    return [p for p, text in generate_all(root).items() if not p.exists() or p.read_text() != text]
