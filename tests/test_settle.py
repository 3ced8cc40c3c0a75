"""bench/settle.py: waiting for freed memory to go back to the host."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench import settle

REPORTING_ON = "0110010" + "0" * 57  # bit 5: VIRTIO_BALLOON_F_REPORTING
REPORTING_OFF = "0110000" + "0" * 57


def virtio_device(root: str, name: str, device: str, features: str) -> None:
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "device"), "w") as f:
        f.write(device + "\n")
    with open(os.path.join(root, name, "features"), "w") as f:
        f.write(features + "\n")


def test_only_a_balloon_with_the_reporting_feature_reports_free_pages(tmp_path):
    root = str(tmp_path)
    virtio_device(root, "virtio0", "0x0001", REPORTING_ON)  # a network card: not a balloon
    virtio_device(root, "virtio1", "0x0005", REPORTING_OFF)
    assert not settle.reports_free_pages(root)
    virtio_device(root, "virtio2", "0x0005", REPORTING_ON)
    assert settle.reports_free_pages(root)
    assert not settle.reports_free_pages(str(tmp_path / "absent"))


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(settle, "QUIET", 0.3)
    monkeypatch.setattr(settle, "POLL", 0.02)
    monkeypatch.setattr(settle, "UNCOUNTED", 0.2)


def test_waits_until_the_counter_has_been_quiet(tmp_path, fast):
    counter = tmp_path / "reported_kib"
    counter.write_text("100\n")

    def report_for_a_while():
        for kib in range(200, 800, 100):
            time.sleep(0.1)
            counter.write_text(f"{kib}\n")

    reporter = threading.Thread(target=report_for_a_while)
    reporter.start()
    started = time.monotonic()
    waited = settle.settle_free_memory(str(counter), str(tmp_path))
    reporter.join()
    assert time.monotonic() - started >= 0.6 + settle.QUIET  # the last change, then quiet
    assert waited >= 0.6 + settle.QUIET


def test_a_reporter_that_never_stops_is_waited_for_at_most_the_limit(tmp_path, fast, monkeypatch):
    monkeypatch.setattr(settle, "LIMIT", 0.5)
    counter = tmp_path / "reported_kib"
    busy = threading.Event()

    def report_forever():
        kib = 0
        while not busy.is_set():
            kib += 1
            counter.write_text(f"{kib}\n")
            time.sleep(0.01)

    counter.write_text("0\n")
    reporter = threading.Thread(target=report_forever)
    reporter.start()
    try:
        waited = settle.settle_free_memory(str(counter), str(tmp_path))
    finally:
        busy.set()
        reporter.join()
    assert 0.5 <= waited < 0.5 + settle.QUIET


def test_without_a_counter_it_waits_only_where_free_pages_are_reported(tmp_path, fast):
    devices = str(tmp_path / "devices")
    os.makedirs(devices)
    absent = str(tmp_path / "no_counter")
    assert settle.settle_free_memory(absent, devices) == 0.0
    virtio_device(devices, "virtio0", "0x0005", REPORTING_ON)
    assert settle.settle_free_memory(absent, devices) >= settle.UNCOUNTED
