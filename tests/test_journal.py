"""The migration journal on its own: what it writes, what it believes, and
that answering a peer never disturbs a write in progress."""

from __future__ import annotations

import json
import os

import pytest
import trio

from protocol._gen_control_msgs import DomainConfig
from toolstack.migration.journal import DESTINATION, SOURCE, Journal, JournalError, Record

ID = "0123456789abcdef0123456789abcdef"


def record(role=SOURCE, phase="precopy", migration_id=ID) -> Record:
    config = DomainConfig(name="vm1", memory_bytes=1 << 24)
    return Record(migration_id, role, "vm1", "10.0.0.2:7000", phase, config.to_wire())


async def test_a_record_reads_back_as_written_and_private(tmp_path):
    journal = Journal(str(tmp_path))
    await journal.record(record(), "go-sent")
    found = await journal.find(ID)
    assert found == record(phase="go-sent")
    path = os.path.join(journal.folder, f"{ID}.json")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    await journal.remove(ID)
    assert await journal.find(ID) is None


async def test_finding_and_loading_leave_a_write_in_progress_alone(tmp_path):
    journal = Journal(str(tmp_path))
    await journal.record(record(), "precopy")
    in_progress = os.path.join(journal.folder, f"{ID}.json.tmp")
    with open(in_progress, "w") as f:
        f.write('{"half": ')
    assert await journal.find(ID) is not None  # a whereabouts question meanwhile
    records, problems = journal.load()
    assert len(records) == 1 and problems == []
    assert os.path.exists(in_progress)  # only a daemon's start cleans
    journal.clean()
    assert not os.path.exists(in_progress)


@pytest.mark.parametrize(
    "content, says",
    [
        ("[]", "not a journal record"),
        (json.dumps({**vars(record()), "phase": "flying"}), "unknown phase"),
        (json.dumps({**vars(record()), "was_running": "yes"}), "was_running is not a bool"),
        (json.dumps({**vars(record()), "migration_id": "f" * 32}), "does not match its file"),
        (json.dumps({**vars(record()), "name": "vm2"}), "name and config disagree"),
        ("{" * 100_000, ""),
    ],
)
async def test_a_record_that_is_not_one_is_reported_and_left_in_place(tmp_path, content, says):
    journal = Journal(str(tmp_path))
    path = os.path.join(journal.folder, f"{ID}.json")
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o600)
    records, problems = journal.load()
    assert records == [] and len(problems) == 1 and says in problems[0], problems
    assert await journal.find(ID) is None and os.path.exists(path)


async def test_a_phase_of_the_other_role_or_a_fifo_is_refused(tmp_path):
    journal = Journal(str(tmp_path))
    with pytest.raises(JournalError, match="is not a destination phase"):
        await journal.record(record(role=DESTINATION), "go-sent")
    os.mkfifo(os.path.join(journal.folder, f"{ID}.json"), 0o600)
    with trio.fail_after(5):  # not a reader blocked on a FIFO forever
        assert await journal.find(ID) is None
