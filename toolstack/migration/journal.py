"""The migration journal: each migration's phase, on disk before ferryd acts on it.

    STATE_DIR/journal/MIGRATION_ID.json

A record says which side this daemon plays, the domain (its whole config:
an incoming domain has no state file until it commits), the peer, the phase,
and whether the source was running when the migration began.  It is written
to a fresh file, fsynced, renamed into place and the directory fsynced, so a
crash leaves the previous phase or the new one, never half a record.

    source       precopy -> suspended -> go-sent [-> postcopy] -> committed, then removed
    destination  receiving [-> postcopy] -> committed, kept KEEP_COMMITTED s
                 ("the guest ran here" answers a sender in doubt, even after the
                 guest moved on; a restart prunes older ones)
                 postcopy -> split, kept as long: the guest ran here and its
                 postcopy ended without all its pages (its runner died, or an
                 operator aborted it): the sender's copy must never run again

`postcopy`: the guest runs at the destination, the pages it still lacks are
at the source; neither side may give its copy up.

A restarted ferryd reads every record and resolves it (resolve.py) before it
reports the domain: the phase says what can be true at the peer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass

import trio

from protocol import ProtocolError
from protocol._gen_control_msgs import DomainConfig

from ..host import ToolstackError, faults
from ..host.domains import read_private_file, sync_dir, write_private_file

SOURCE, DESTINATION = "source", "destination"
PHASES = {
    SOURCE: ("precopy", "suspended", "go-sent", "postcopy", "committed"),
    DESTINATION: ("receiving", "postcopy", "committed", "split"),
}
MIGRATION_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_RECORD = 64 << 10  # octets: a record is a few hundred
KEEP_COMMITTED = 30 * 86400  # s a committed destination record answers whereabouts
log = logging.getLogger("ferry.journal")


class JournalError(ToolstackError):
    """A record that cannot be written or read; says which and why."""


@dataclass
class Record:
    migration_id: str
    role: str
    name: str
    peer: str
    phase: str
    config: dict
    was_running: bool = True

    @property
    def domain_config(self) -> DomainConfig:
        return DomainConfig.from_wire(self.config, f"journal {self.migration_id}: config")


FIELD_TYPES = {
    "migration_id": str,
    "role": str,
    "name": str,
    "peer": str,
    "phase": str,
    "config": dict,
    "was_running": bool,
}
FIELDS = set(FIELD_TYPES)


class Journal:
    def __init__(self, state_dir: str) -> None:
        self.folder = os.path.join(state_dir, "journal")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)

    def _path(self, migration_id: str) -> str:
        if not MIGRATION_ID.match(migration_id):
            raise JournalError(f"{migration_id!r} is not a migration id")
        return os.path.join(self.folder, f"{migration_id}.json")

    async def record(self, record: Record, phase: str) -> None:
        """Make `phase` durable, then reach its fault point (tests crash there).
        JournalError (no space, no fds...) when it cannot be written."""
        if phase not in PHASES[record.role]:
            raise JournalError(f"{phase!r} is not a {record.role} phase")
        record.phase = phase
        await trio.to_thread.run_sync(self._write, record)

    def _write(self, record: Record) -> None:
        data = json.dumps(asdict(record), sort_keys=True).encode()
        try:
            faults.point(f"journal:{record.role}:{record.phase}")  # before: tests fail it
            write_private_file(self._path(record.migration_id), data)
        except OSError as exc:
            raise JournalError(
                f"cannot journal migration {record.migration_id} ({record.phase}): "
                f"{exc.strerror or exc}"
            ) from None
        faults.point(f"{record.role}:{record.phase}")

    async def remove(self, migration_id: str) -> None:
        await trio.to_thread.run_sync(self._remove, migration_id)

    def _remove(self, migration_id: str) -> None:
        try:
            os.unlink(self._path(migration_id))
        except FileNotFoundError:
            return
        sync_dir(self.folder)

    def clean(self) -> None:
        """At the daemon's start only: temporary files of writes a crash cut short."""
        for entry in os.listdir(self.folder):
            if entry.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.folder, entry))
                except OSError as exc:
                    raise JournalError(f"journal/{entry}: {exc.strerror or exc}") from None

    def age(self, migration_id: str) -> float:
        """Seconds since the record was last written."""
        try:
            return time.time() - os.stat(self._path(migration_id)).st_mtime
        except OSError:
            return 0.0

    def load(self) -> tuple[list[Record], list[str]]:
        """Every record, and a line for each file that is not one (left in place)."""
        records, problems = [], []
        for entry in sorted(os.listdir(self.folder)):
            if entry.endswith(".tmp"):
                continue  # a write in progress (or, at start, cleaned before)
            try:
                records.append(self._read(entry.removesuffix(".json")))
            except (
                OSError,
                ValueError,
                TypeError,
                KeyError,
                RecursionError,
                ProtocolError,
                JournalError,
            ) as exc:
                problems.append(f"journal/{entry}: {exc}")
        return records, problems

    async def find(self, migration_id: str) -> Record | None:
        """One record by its id (None when there is none, or it is unreadable)."""

        def read() -> Record | None:
            try:
                return self._read(migration_id)
            except FileNotFoundError:
                return None
            except (
                OSError,
                ValueError,
                TypeError,
                KeyError,
                RecursionError,
                ProtocolError,
                JournalError,
            ) as exc:
                log.error("journal record %s unreadable: %s", migration_id, exc)
                return None

        return await trio.to_thread.run_sync(read)

    def _read(self, migration_id: str) -> Record:
        data = json.loads(read_private_file(self._path(migration_id), MAX_RECORD))
        if not isinstance(data, dict) or set(data) != FIELDS:
            raise JournalError("not a journal record")
        record = Record(**data)
        for name, kind in FIELD_TYPES.items():
            if type(getattr(record, name)) is not kind:
                raise JournalError(f"its {name} is not a {kind.__name__}")
        if record.migration_id != migration_id or record.role not in PHASES:
            raise JournalError("record does not match its file")
        if record.phase not in PHASES[record.role]:
            raise JournalError(f"unknown phase {record.phase!r}")
        if record.domain_config.name != record.name:
            raise JournalError("record's name and config disagree")
        return record
