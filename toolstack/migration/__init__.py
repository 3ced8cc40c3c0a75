"""The migration protocol between two daemons, like `xl migrate` / `xl migrate-receive`.

    site.py       what a migration needs of its daemon: the host, the journal, the jobs
    link.py       one connection: handshake frames and the raw stream, with deadlines
    sender.py     the source's side
    receiver.py   the destination's side
    journal.py    each migration's phase, durable before it is acted on
    resolve.py    settling migrations whose outcome is not known (restarts, lost answers)

The order of the handshake's messages is `protocol.handshake`; their shapes
are generated from `protocol/migration_msgs.toml` (docs/migration-handshake.md).
"""

from .journal import Journal
from .link import LinkError, MigrationLink, PeerRefused
from .receiver import serve_migration
from .resolve import Resolver
from .sender import MigrationFailed, migrate_send, parse_address
from .site import Site

__all__ = [
    "Journal",
    "LinkError",
    "MigrationFailed",
    "MigrationLink",
    "PeerRefused",
    "Resolver",
    "Site",
    "migrate_send",
    "parse_address",
    "serve_migration",
]
