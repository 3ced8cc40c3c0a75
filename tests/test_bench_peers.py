"""The `peers` section of `ferry bench`, wired into the report: ferry and
QEMU interleaved, the ratio to the faster QEMU, a skipped or failing QEMU
that never fails the bench.  No QEMU and no daemon runs here: both sides
are fakes."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from bench import qemu_peer, report
from toolstack.harness import HarnessError

MiB = 1 << 20
SKIPPED = {"skipped": "qemu-system-x86_64 not installed"}


def ferry_sample(mb_s: float, downtime_ms: float) -> dict:
    return {
        "memory_bytes": MiB,
        "seconds": MiB / 1e6 / mb_s,
        "mb_s": mb_s,
        "downtime_ms": downtime_ms,
    }


def qemu_sample(channels: int, mb_s: float, downtime_ms: int) -> dict:
    return {"channels": channels, "status": "completed", "mb_s": mb_s, "downtime_ms": downtime_ms}


@pytest.fixture
def fake_peers(monkeypatch, short_tmp):
    """bench_peers on fake hosts: ferry's and QEMU's samples come from the
    lists it returns (one per round, in order); `calls` is the order of runs."""
    calls: list[str] = []
    ferry = [ferry_sample(900.0, 40.0), ferry_sample(1100.0, 55.0)]
    qemu = {1: [qemu_sample(1, 400.0, 250), qemu_sample(1, 420.0, 210)]}
    qemu[2] = [qemu_sample(2, 1000.0, 300), qemu_sample(2, 980.0, 280)]

    def peers_migration(hosts, name, memory, ram_file, settle_first=None):
        assert os.path.getsize(ram_file) == memory and ram_file.startswith(hosts.root)
        if settle_first:
            settle_first()
        calls.append(name)
        return ferry[len([c for c in calls if c.startswith("peer")]) - 1]

    def qemu_migration(memory_bytes, channels, workdir, settle=None):
        if settle:
            settle()
        calls.append(f"qemu{channels}")
        return qemu[channels][calls.count(f"qemu{channels}") - 1]

    monkeypatch.setattr(qemu_peer, "qemu_binary", lambda: "/bin/true")
    monkeypatch.setattr(qemu_peer, "qemu_version", lambda binary: "QEMU emulator version 0")
    monkeypatch.setattr(qemu_peer, "qemu_migration", qemu_migration)
    monkeypatch.setattr(report, "peers_migration", peers_migration)
    hosts = SimpleNamespace(root=short_tmp)
    return SimpleNamespace(hosts=hosts, calls=calls, ferry=ferry, qemu=qemu)


def test_rounds_alternate_and_the_ratio_is_to_the_faster_qemu(fake_peers):
    section = report.bench_peers(fake_peers.hosts, MiB, 2)
    assert fake_peers.calls == ["peer0", "qemu1", "qemu2", "peer1", "qemu1", "qemu2"]
    assert section["memory_bytes"] == MiB and section["rounds"] == 2
    ferry, one, multifd = section["ferry"], section["one_connection"], section["multifd_2"]
    # best of the rounds, each figure on its own
    assert (ferry["best_mb_s"], ferry["best_downtime_ms"]) == (1100.0, 40.0)
    assert (one["best_mb_s"], one["best_downtime_ms"]) == (420.0, 210)
    assert (multifd["best_mb_s"], multifd["best_downtime_ms"]) == (1000.0, 280)
    assert ferry["samples_mb_s"] == [900.0, 1100.0] and multifd["samples_downtime_ms"] == [300, 280]
    assert ferry["samples"] == fake_peers.ferry and one["samples"] == fake_peers.qemu[1]
    assert section["ratio"] == 1.1 and section["ratio_to"] == "multifd_2"
    assert section["ratio_of"] == "ferry.best_mb_s / multifd_2.best_mb_s"
    assert os.listdir(fake_peers.hosts.root) == [f"qemu-ram-{MiB}.bin"]  # the hosts' root goes


def test_every_timed_run_of_either_side_settles_first(fake_peers):
    def settle_first():
        fake_peers.calls.append("settle")
        return 0.0

    section = report.bench_peers(fake_peers.hosts, MiB, 1, settle_first)
    runs = ["settle", "peer0", "settle", "qemu1", "settle", "qemu2"]
    fills = ["settle", "settle"]  # destination_memory: the memfd's fill, the anonymous one's
    assert fake_peers.calls == runs + fills
    assert section["ratio_to"] == "multifd_2"


def test_the_ratio_follows_whichever_qemu_was_faster(fake_peers):
    fake_peers.qemu[1][1]["mb_s"] = 2200.0  # one connection beat multifd this time
    section = report.bench_peers(fake_peers.hosts, MiB, 2)
    assert section["ratio_to"] == "one_connection" and section["ratio"] == round(1100 / 2200, 3)


def test_targets_judge_the_ratio_and_report_the_stretch(fake_peers):
    peers = report.bench_peers(fake_peers.hosts, MiB, 2)
    (row,) = report.check_targets({"peers": peers})
    assert row == {
        "measure": "peers.ratio",
        "value": 1.1,
        "target": ">= 1.0",
        "met": True,
        "stretch": ">= 1.2",
        "stretch_met": False,
    }


def test_without_qemu_the_section_is_skipped_and_not_judged(monkeypatch, short_tmp):
    monkeypatch.setattr(shutil, "which", lambda name: None)

    def peers_migration(*args):
        raise AssertionError("ferry's round runs only next to QEMU's")

    monkeypatch.setattr(report, "peers_migration", peers_migration)
    section = report.bench_peers(SimpleNamespace(root=short_tmp), MiB, 2)
    assert section == SKIPPED
    assert not os.listdir(short_tmp)  # no random RAM file written for nothing
    (row,) = report.check_targets({"peers": section})
    assert row["value"] is None and row["met"] is None and row["stretch_met"] is None
    assert row["why"] == SKIPPED["skipped"]


def test_a_failing_qemu_is_reported_with_ferrys_samples(fake_peers, monkeypatch):
    def second_round_fails(memory_bytes, channels, workdir, settle=None):
        fake_peers.calls.append(f"qemu{channels}")
        if len(fake_peers.calls) > 3:
            raise PermissionError(13, "Permission denied", "/usr/bin/qemu-system-x86_64")
        return fake_peers.qemu[channels][0]

    monkeypatch.setattr(qemu_peer, "qemu_migration", second_round_fails)
    section = report.bench_peers(fake_peers.hosts, MiB, 2)
    assert section["failed"] == (
        "one_connection: PermissionError: [Errno 13] Permission denied: "
        "'/usr/bin/qemu-system-x86_64'"
    )
    assert section["ferry"]["samples_mb_s"] == [900.0, 1100.0] and "ratio" not in section
    (row,) = report.check_targets({"peers": section})
    assert row["met"] is None and row["why"] == section["failed"]


def test_a_failing_ferry_fails_the_bench(fake_peers, monkeypatch):
    def peers_migration(hosts, name, memory, ram_file, settle_first=None):
        raise HarnessError("peer0 is paused at the destination after its migration")

    monkeypatch.setattr(report, "peers_migration", peers_migration)
    with pytest.raises(HarnessError):
        report.bench_peers(fake_peers.hosts, MiB, 1)


def test_the_table_shows_ferry_next_to_qemu(fake_peers, capsys):
    full = {
        "stream": {"ferry_mb_s": 700.0, "raw_mb_s": 1000.0, "ratio": 0.7},
        "rpc": {
            "p50_us": 50.0,
            "raw_p50_us": 10.0,
            "p99_us": 90.0,
            "raw_p99_us": 20.0,
            "share_of_precopy": 0.02,
            "raw_share_of_precopy": 0.01,
        },
        "downtime": {"measured_ms": 200.0, "limit_ms": 300.0, "ratio": 0.667},
        "restore": {"ferry_mb_s": 900.0, "raw_mb_s": 1000.0, "ratio": 0.9},
        "helper_rss": {"peak_rss_bytes": 50 * MiB, "guest_bytes": 4 << 30, "ratio": 0.012},
    }
    for peers in (report.bench_peers(fake_peers.hosts, MiB, 2), SKIPPED):
        full["peers"] = peers
        full["targets"] = report.check_targets(full)
        report.print_table(full)
    out = capsys.readouterr().out.splitlines()
    assert any(
        line.split() == ["vs", "QEMU", "1100", "MB/s", "1000", "MB/s", "QEMU", "multifd-2", "1.1"]
        for line in out
    )
    peer_targets = [line for line in out if "peers.ratio" in line]
    assert peer_targets[0].startswith("met    peers.ratio")
    assert peer_targets[0].endswith("(target >= 1.0; stretch >= 1.2)")
    assert peer_targets[1].startswith("n/a    peers.ratio")
    assert peer_targets[1].endswith("): qemu-system-x86_64 not installed")
