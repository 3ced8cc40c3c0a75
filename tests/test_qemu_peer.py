"""The QEMU peer of `ferry bench`: real migrations where QEMU is installed,
a skipped section where it is not, and nothing left behind either way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import qemu_peer
from bench.qemu_peer import QemuPeerError, peers_section, qemu_migration
from tests.conftest import processes_mentioning

MiB = 1 << 20
SIZE = 64 * MiB
RAM_FILE = f"qemu-ram-{SIZE}.bin"

needs_qemu = pytest.mark.skipif(
    qemu_peer.qemu_binary() is None,
    reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
)


@needs_qemu
@pytest.mark.parametrize("channels", [1, 2])
def test_qemu_migrates_random_ram_and_leaves_only_the_file(short_tmp, channels):
    r = qemu_migration(SIZE, channels, short_tmp)
    assert r["status"] == "completed" and r["channels"] == channels
    assert r["mb_s"] > 0 and r["qemu_mb_s"] > 0 and r["downtime_ms"] >= 0
    assert r["qemu_total_ms"] > 0
    # random bytes: all but the few pages SeaBIOS zeroed travel whole
    assert r["transferred_bytes"] > 0.98 * SIZE
    assert not processes_mentioning(short_tmp)
    assert os.listdir(short_tmp) == [RAM_FILE]


@needs_qemu
def test_command_prints_both_variants(short_tmp):
    r = subprocess.run(
        [sys.executable, "-m", "bench.qemu_peer", "64M", "--workdir", short_tmp, "--no-settle"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    section = json.loads(r.stdout)
    assert section["memory_bytes"] == SIZE and section["qemu"].startswith("QEMU")
    for name, channels in (("one_connection", 1), ("multifd_2", 2)):
        (sample,) = section[name]["samples"]
        assert sample["channels"] == channels
        assert section[name]["best_mb_s"] == sample["mb_s"] > 0
    assert "ratio" not in section
    assert not processes_mentioning(short_tmp)
    assert os.listdir(short_tmp) == [RAM_FILE]  # kept for the next run


def test_section_is_skipped_without_qemu(monkeypatch, short_tmp):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    called = []
    section = peers_section(SIZE, 2, short_tmp, ferry_round=lambda: called.append(1))
    assert section == {"skipped": "qemu-system-x86_64 not installed"}
    assert not called and not os.listdir(short_tmp)
    with pytest.raises(QemuPeerError, match="not installed"):
        qemu_migration(SIZE, 1, short_tmp)


def test_a_failing_qemu_is_reported_in_one_line(monkeypatch, short_tmp):
    fake = os.path.join(short_tmp, "qemu-system-x86_64")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\necho 'qemu-system-x86_64: no such machine' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    monkeypatch.setattr(qemu_peer, "qemu_binary", lambda: fake)
    workdir = os.path.join(short_tmp, "work")
    os.mkdir(workdir)
    section = peers_section(MiB, 1, workdir)
    assert section == {
        "failed": "source QEMU exited (status 1): qemu-system-x86_64: no such machine"
    }
    assert os.listdir(workdir) == [f"qemu-ram-{MiB}.bin"]


def test_ferry_rounds_come_first_and_give_the_ratio(monkeypatch, short_tmp):
    order = []

    def fake_migration(memory_bytes, channels, workdir, settle=None):
        order.append(f"qemu{channels}")
        return {"channels": channels, "mb_s": 300.0 * channels, "downtime_ms": 10}

    def ferry_round():
        order.append("ferry")
        return {"mb_s": 450.0 + len(order), "downtime_ms": 30.0 - len(order)}

    monkeypatch.setattr(qemu_peer, "qemu_binary", lambda: "/bin/true")
    monkeypatch.setattr(qemu_peer, "qemu_migration", fake_migration)
    section = peers_section(SIZE, 2, short_tmp, ferry_round=ferry_round)
    assert order == ["ferry", "qemu1", "qemu2"] * 2
    assert section["one_connection"]["samples_mb_s"] == [300.0, 300.0]
    assert section["multifd_2"]["best_mb_s"] == 600.0
    assert section["ferry"]["samples_mb_s"] == [451.0, 454.0]
    assert section["ferry"]["best_mb_s"] == 454.0
    assert section["ferry"]["best_downtime_ms"] == 26.0
    assert section["ratio"] == round(454 / 600, 3) and section["ratio_to"] == "multifd_2"
    assert section["ratio_of"] == "ferry.best_mb_s / multifd_2.best_mb_s"
