"""The migration protocol between two daemons, like `xl migrate` / `xl migrate-receive`.

    link.py       one connection: handshake frames and the raw stream, with deadlines
    sender.py     the source's side
    receiver.py   the destination's side
    deadlines.py  how long each side waits for the other, step by step

The order of the handshake's messages is `protocol.handshake`; their shapes
are generated from `protocol/migration_msgs.toml` (docs/migration-handshake.md).
"""

from .link import LinkError, MigrationLink, PeerRefused
from .receiver import serve_migration
from .sender import MigrationFailed, migrate_send, parse_address

__all__ = [
    "LinkError",
    "MigrationFailed",
    "MigrationLink",
    "PeerRefused",
    "migrate_send",
    "parse_address",
    "serve_migration",
]
