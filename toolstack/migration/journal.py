"""The migration journal: each migration's phase, on disk before ferryd acts on it.

    STATE_DIR/journal/MIGRATION_ID.json

A record says which side this daemon plays, the domain (its whole config:
an incoming domain has no state file until it commits), the peer, the phase,
and whether the source was running when the migration began.  It is written
to a fresh file, fsynced, renamed into place and the directory fsynced, so a
crash leaves the previous phase or the new one, never half a record.

    source       precopy -> suspended -> go-sent [-> postcopy] -> committed, then removed
    destination  receiving [-> postcopy] -> committed, kept while the domain is here

`postcopy`: the guest runs at the destination, the pages it still lacks are
at the source; neither side may give its copy up.

A restarted ferryd reads every record and resolves it (resolve.py) before it
reports the domain: the phase says what can be true at the peer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

import trio

from protocol import ProtocolError
from protocol._gen_control_msgs import DomainConfig

from ..host import faults

SOURCE, DESTINATION = "source", "destination"
PHASES = {
    SOURCE: ("precopy", "suspended", "go-sent", "postcopy", "committed"),
    DESTINATION: ("receiving", "postcopy", "committed"),
}
MIGRATION_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_RECORD = 64 << 10  # octets: a record is a few hundred


class JournalError(Exception):
    pass


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


class Journal:
    def __init__(self, state_dir: str) -> None:
        self.folder = os.path.join(state_dir, "journal")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)

    def _path(self, migration_id: str) -> str:
        if not MIGRATION_ID.match(migration_id):
            raise JournalError(f"{migration_id!r} is not a migration id")
        return os.path.join(self.folder, f"{migration_id}.json")

    async def record(self, record: Record, phase: str) -> None:
        """Make `phase` durable, then reach its fault point (tests crash there)."""
        if phase not in PHASES[record.role]:
            raise JournalError(f"{phase!r} is not a {record.role} phase")
        record.phase = phase
        await trio.to_thread.run_sync(self._write, record)

    def _write(self, record: Record) -> None:
        path = self._path(record.migration_id)
        tmp = path + ".tmp"
        try:
            os.unlink(tmp)  # a leftover of a crash; unlink does not follow links
        except FileNotFoundError:
            pass
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            data = json.dumps(asdict(record), sort_keys=True).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        _fsync_dir(self.folder)
        faults.point(f"{record.role}:{record.phase}")

    async def remove(self, migration_id: str) -> None:
        await trio.to_thread.run_sync(self._remove, migration_id)

    def _remove(self, migration_id: str) -> None:
        try:
            os.unlink(self._path(migration_id))
        except FileNotFoundError:
            return
        _fsync_dir(self.folder)

    def load(self) -> tuple[list[Record], list[str]]:
        """Every record, and a line for each file that is not one (left in place)."""
        records, problems = [], []
        for entry in sorted(os.listdir(self.folder)):
            if entry.endswith(".tmp"):
                os.unlink(os.path.join(self.folder, entry))
                continue
            try:
                records.append(self._read(entry))
            except (OSError, ValueError, TypeError, KeyError, ProtocolError, JournalError) as exc:
                problems.append(f"journal/{entry}: {exc}")
        return records, problems

    def _read(self, entry: str) -> Record:
        migration_id = entry.removesuffix(".json")
        path = self._path(migration_id)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = os.read(fd, MAX_RECORD + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_RECORD:
            raise JournalError("record too large")
        data = json.loads(raw)
        record = Record(**data)
        if record.migration_id != migration_id or record.role not in PHASES:
            raise JournalError("record does not match its file")
        if record.phase not in PHASES[record.role]:
            raise JournalError(f"unknown phase {record.phase!r}")
        if record.domain_config.name != record.name:
            raise JournalError("record's name and config disagree")
        return record


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
